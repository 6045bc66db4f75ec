"""Gradient caching (flashcl.cached_loss): the encoders' and the loss's parameters get the gradient of
the same chunked forward kept whole (dropout, autocast, ragged chunks, dict inputs, every loss kind)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashcl
from conftest import assert_norm_close


class Tower(nn.Module):
    """A small MLP with dropout; dict inputs ({"values", "weights"}) as tokenized text would come."""

    def __init__(self, inputs, embedding=8, dropout=0.3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, 32), nn.Dropout(dropout), nn.ReLU(), nn.Linear(32, embedding))

    def forward(self, x):
        if isinstance(x, dict):
            x = x["values"] * x["weights"][:, None]
        return F.normalize(self.net(x), dim=1)


def parameters(*modules):
    return [p for m in modules for p in m.parameters()]


def gradients(params):
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def chunked_reference(loss_fn, towers, chunk_size, context=None):
    """The same chunks, run with their graphs kept: what the cached step must reproduce. Each
    chunk in its own autocast context, as the cached replay runs it (one context for all would
    share one low-precision weight copy, whose gradient sums the chunks in bf16)."""
    context = context or (lambda: torch.autocast("cpu", enabled=False))
    embeddings = []
    for encoder, inputs in towers:
        n = (inputs if torch.is_tensor(inputs) else inputs["values"]).shape[0]
        pieces = []
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = inputs[rows] if torch.is_tensor(inputs) else {k: v[rows] for k, v in inputs.items()}
            with context():
                pieces.append(encoder(chunk))
        embeddings.append(torch.cat(pieces))
    with context():
        return loss_fn(*embeddings)


def assert_same_step(loss_fn, towers, params, chunk_size, rtol=1e-5, autocast=False):
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else \
        (lambda: torch.autocast("cpu", enabled=False))
    torch.manual_seed(123)
    with context():
        loss = flashcl.cached_loss(loss_fn, *towers, chunk_size=chunk_size)
    loss.backward()
    cached = gradients(params)
    torch.manual_seed(123)
    want = chunked_reference(loss_fn, towers, chunk_size, context)
    want.backward()
    reference = gradients(params)
    assert_norm_close(loss.detach(), want.detach(), rtol, "loss")
    for i, (got, ref) in enumerate(zip(cached, reference)):  # each a sum over chunks, in another order
        assert_norm_close(got, ref, rtol, f"parameter {i}")
    return loss


@pytest.fixture
def towers_and_scale():
    torch.manual_seed(0)
    return Tower(10), Tower(6), nn.Parameter(torch.tensor(math.log(10.0)))


@pytest.mark.parametrize("n,chunk_size", [(37, 8), (16, 16), (5, 64), (30, 1)])
def test_clip_with_dropout_and_a_learnable_scale(towers_and_scale, n, chunk_size):
    image_tower, text_tower, log_scale = towers_and_scale
    images, texts = torch.randn(n, 10), torch.randn(n, 6)
    loss_fn = lambda a, b: flashcl.clip_loss(a, b, log_scale.exp())
    assert_same_step(loss_fn, [(image_tower, images), (text_tower, texts)],
                     [*parameters(image_tower, text_tower), log_scale], chunk_size)
    assert log_scale.grad is None  # gradients() cleared it: it was filled above


def test_without_dropout_equals_the_plain_full_batch_step(towers_and_scale):
    image_tower, text_tower, log_scale = (towers_and_scale[0].eval(), towers_and_scale[1].eval(), towers_and_scale[2])
    images, texts = torch.randn(50, 10), torch.randn(50, 6)
    params = [*parameters(image_tower, text_tower), log_scale]
    loss_fn = lambda a, b: flashcl.clip_loss(a, b, log_scale.exp())
    flashcl.cached_loss(loss_fn, (image_tower, images), (text_tower, texts), chunk_size=7).backward()
    cached = gradients(params)
    loss_fn(image_tower(images), text_tower(texts)).backward()
    for i, (got, want) in enumerate(zip(cached, gradients(params))):
        assert_norm_close(got, want, 1e-5, f"parameter {i}")


def test_autocast_bf16(towers_and_scale):
    image_tower, text_tower, log_scale = towers_and_scale
    images, texts = torch.randn(40, 10), torch.randn(40, 6)
    loss_fn = lambda a, b: flashcl.clip_loss(a, b, log_scale.exp())
    assert_same_step(loss_fn, [(image_tower, images), (text_tower, texts)],
                     [*parameters(image_tower, text_tower), log_scale], 9, rtol=1e-5, autocast=True)


def test_dict_inputs(towers_and_scale):
    image_tower, _, log_scale = towers_and_scale
    text_tower = Tower(6)
    tokens = {"values": torch.randn(33, 6), "weights": torch.rand(33)}
    loss_fn = lambda a, b: flashcl.clip_loss(a, b, log_scale.exp())
    assert_same_step(loss_fn, [(image_tower, torch.randn(33, 10)), (text_tower, tokens)],
                     [*parameters(image_tower, text_tower), log_scale], 8)


LOSS_KINDS = {  # (towers, loss of the embeddings given the log scale)
    "infonce with extra negatives": (3, lambda ls: lambda q, k, extra: flashcl.infonce_loss(
        q, torch.cat([k, extra]), ls.exp())),
    "nt_xent (one encoder, two views)": (2, lambda ls: lambda z1, z2: flashcl.nt_xent_loss(z1, z2, ls.exp())),
    "gamma-weighted": (2, lambda ls: lambda a, b: flashcl.gamma_weighted_loss(
        a, b, ls.exp(), torch.linspace(-1, 1, a.shape[0]), torch.linspace(1, -1, a.shape[0]),
        exclude_positive=True).loss),
    "modality structure": (4, lambda ls: lambda v, t, v_aug, private: flashcl.ModalityStructureLoss(1.0, 0.5, 0.1)(
        v, t, ls.exp(), image_aug=v_aug, image_private=private)),
}


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_every_loss_kind(kind):
    torch.manual_seed(1)
    towers_count, make = LOSS_KINDS[kind]
    image_tower, text_tower = Tower(10), Tower(10)
    log_scale = nn.Parameter(torch.tensor(2.0))
    encoders = [image_tower, text_tower] + [image_tower] * (towers_count - 2)
    if kind.startswith("nt_xent"):
        encoders = [image_tower, image_tower]
    towers = [(encoder, torch.randn(23, 10)) for encoder in encoders]
    used = list({id(e): e for e in encoders}.values())
    assert_same_step(make(log_scale), towers, [*parameters(*used), log_scale], 6)


def test_gamma_module_updates_its_state_once_per_step():
    torch.manual_seed(2)
    image_tower, text_tower = Tower(10), Tower(6)
    gamma = flashcl.GammaContrastiveLoss(100, shape=math.inf)
    index = torch.arange(20)
    loss = flashcl.cached_loss(lambda a, b: gamma(a, b, 5.0, index), (image_tower, torch.randn(20, 10)),
                               (text_tower, torch.randn(20, 6)), chunk_size=6)
    state = gamma.state_dict()["log_z_a"].clone()
    loss.backward()
    assert torch.equal(gamma.state_dict()["log_z_a"], state)  # the backward's replay does not call the loss
    assert gamma.visited_a[:20].all() and not gamma.visited_a[20:].any()


def test_evaluation_without_grad(towers_and_scale):
    image_tower, text_tower, log_scale = towers_and_scale
    image_tower.eval(), text_tower.eval()
    images, texts = torch.randn(21, 10), torch.randn(21, 6)
    with torch.no_grad():
        loss = flashcl.cached_loss(lambda a, b: flashcl.clip_loss(a, b, 10.0), (image_tower, images),
                                   (text_tower, texts), chunk_size=4)
        want = flashcl.clip_loss(image_tower(images), text_tower(texts), 10.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, want)


def test_the_module_form(towers_and_scale):
    image_tower, text_tower, _ = towers_and_scale
    step = flashcl.CachedLoss(lambda a, b: flashcl.clip_loss(a, b, 10.0), chunk_size=5)
    loss = step((image_tower, torch.randn(12, 10)), (text_tower, torch.randn(12, 6)))
    loss.backward()
    assert all(p.grad is not None for p in parameters(image_tower, text_tower))


@pytest.mark.parametrize("call,error,message", [
    (lambda t: flashcl.cached_loss(lambda a: a.sum(), (t, torch.randn(4, 10)), chunk_size=0), ValueError,
     r"chunk_size must be a positive int, got 0"),
    (lambda t: flashcl.cached_loss(lambda a: a.sum(), (t, torch.randn(4, 10)), chunk_size=2.5), ValueError,
     r"chunk_size must be a positive int, got 2.5"),
    (lambda t: flashcl.cached_loss(lambda a: a.sum(), chunk_size=2), ValueError,
     r"cached_loss needs at least one \(encoder, inputs\) tower"),
    (lambda t: flashcl.cached_loss(lambda a: a.sum(), torch.randn(4, 10), chunk_size=2), TypeError,
     r"towers\[0\] must be an \(encoder, inputs\) pair with a callable encoder, got Tensor"),
    (lambda t: flashcl.cached_loss(lambda a: a.sum(), (t, [1, 2]), chunk_size=2), TypeError,
     r"towers\[0\]: inputs must be a tensor or a mapping of tensors \(e.g. tokenized text: a dict or a "
         r"BatchEncoding\), got list"),
    (lambda t: flashcl.cached_loss(lambda a: a.sum(), (t, {"values": torch.randn(4, 10), "weights": torch.rand(3)}),
                                   chunk_size=2), ValueError,
     r"towers\[0\]: the tensors of a mapping of inputs must share their first \(batch\) dimension, got \[3, 4\]"),
    (lambda t: flashcl.cached_loss(lambda a: a, (t, torch.randn(4, 10)), chunk_size=2), ValueError,
     r"loss_fn must return a scalar tensor"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(Tower(10))
