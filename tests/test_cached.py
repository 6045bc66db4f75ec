"""Gradient caching (flashcl.cached_loss): the encoders' and the loss's parameters get the gradient of
the same chunked forward kept whole (dropout, autocast, ragged chunks, dict inputs, every loss kind)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashcl
from conftest import assert_norm_close, require_peer


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


def test_frozen_towers_are_constants_embedded_once(towers_and_scale):
    """A teacher in frozen=: its embeddings reach loss_fn after the towers', without gradient, from one
    pass (no replay in backward); the towers' gradients are the plain step's with the teacher's constants."""
    image_tower, text_tower, log_scale = (towers_and_scale[0].eval(), towers_and_scale[1].eval(), towers_and_scale[2])
    teacher, calls = Tower(10, embedding=5).eval(), []

    def teach(inputs):
        calls.append(inputs.shape[0])
        return teacher(inputs)

    images, texts = torch.randn(23, 10), torch.randn(23, 6)
    params = [*parameters(image_tower, text_tower), log_scale]

    def loss_fn(image, text, teacher_image):
        assert not teacher_image.requires_grad
        return flashcl.clip_distillation_loss(image, text, log_scale.exp(), teacher_image, teacher_image, 3.0)

    flashcl.cached_loss(loss_fn, (image_tower, images), (text_tower, texts), chunk_size=10,
                        frozen=[(teach, images)]).backward()
    assert calls == [10, 10, 3]
    cached = gradients(params)
    with torch.no_grad():
        constant = teacher(images)
    loss_fn(image_tower(images), text_tower(texts), constant).backward()
    for i, (got, want) in enumerate(zip(cached, gradients(params))):
        assert_norm_close(got, want, 1e-5, f"parameter {i}")


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


# Tokenized text: each chunk is cut to its longest row (trailing padding), which changes nothing where the
# encoder masks padding. A tiny randomly initialized BERT (no download) on rows of very different lengths.
WIDTH = 40
LENGTHS = [3, 5, 2, 4, 5, 1,  12, 7, 9, 3, 12, 2,  40, 6, 2, 8, 3, 5,  2, 1]  # chunks of 6: widths 5, 12, 40, 2


def tokens(lengths, seed, width=WIDTH, vocab=60):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g) * mask
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}


class MeanPooledBert(nn.Module):
    """A 2-layer BERT, mean-pooled over the mask; records the (rows, width) of every call."""

    def __init__(self, dropout=0.0, attention="sdpa"):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=WIDTH,
                                         hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                         attn_implementation=attention))
        self.shapes = []

    def forward(self, features):
        self.shapes.append(tuple(features["input_ids"].shape))
        hidden = self.bert(**features).last_hidden_state
        mask = features["attention_mask"][..., None].to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1)


@pytest.fixture
def bert():
    require_peer("transformers")
    return MeanPooledBert()


def bert_step(bert, trim_padding, columns=2):
    bert.zero_grad(set_to_none=True)
    bert.shapes.clear()
    towers = [(bert, tokens(LENGTHS, seed)) for seed in range(columns)]
    loss = flashcl.cached_loss(lambda a, b: flashcl.clip_loss(a, b, 20.0), *towers, chunk_size=6,
                               trim_padding=trim_padding)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in bert.named_parameters() if p.grad is not None}
    return loss.detach(), grads, list(bert.shapes)


def test_chunks_of_tokenized_text_are_cut_to_their_longest_row(bert):
    loss, grads, shapes = bert_step(bert, trim_padding=True)
    want_loss, want_grads, full_shapes = bert_step(bert, trim_padding=False)
    chunk_shapes = [(6, 5), (6, 12), (6, 40), (2, 2)]
    assert shapes == chunk_shapes * 2 + chunk_shapes * 2  # both towers, first pass then replay
    assert full_shapes == [(rows, WIDTH) for rows, _ in chunk_shapes] * 4  # the opt-out: the whole width
    assert grads.keys() == want_grads.keys() and len(grads) > 30
    assert_norm_close(loss, want_loss, 1e-5, "loss")
    whole = torch.linalg.vector_norm(torch.cat([g.flatten() for g in want_grads.values()]))
    for name, want in want_grads.items():
        if name.endswith("attention.self.key.bias"):  # exactly 0 (softmax ignores a shift per query): rounding
            assert torch.linalg.vector_norm(grads[name]) <= 1e-7 * whole, name
        else:
            assert_norm_close(grads[name], want, 1e-5, name)


def test_trimmed_chunks_replay_dropout_and_autocast():
    """With dropout (and bf16 autocast), the replay draws the first pass's masks at the cut width: the
    gradient is that of the same trimmed chunks kept whole. Eager attention: with torch's CPU SDPA,
    attention dropout under bf16 autocast gives a replayed chunk a gradient ~1e-2 off the reference
    whether the chunks are cut or not (fp32, and dropout elsewhere, replay exactly)."""
    require_peer("transformers")
    bert = MeanPooledBert(dropout=0.2, attention="eager").train()
    towers = [(bert, tokens(LENGTHS, seed)) for seed in range(2)]
    names, params = zip(*[(n, p) for n, p in bert.named_parameters() if ".pooler." not in n])  # the pooler: unused
    loss_fn = lambda a, b: flashcl.clip_loss(a, b, 20.0)
    for autocast in (False, True):
        context = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        torch.manual_seed(7)
        with context():
            loss = flashcl.cached_loss(loss_fn, *towers, chunk_size=6)
        loss.backward()
        cached = gradients(params)
        torch.manual_seed(7)
        embeddings = []
        for _, inputs in towers:
            pieces = []
            for start, width in zip(range(0, len(LENGTHS), 6), (5, 12, 40, 2)):
                with context():
                    pieces.append(bert({k: v[start:start + 6, :width] for k, v in inputs.items()}))
            embeddings.append(torch.cat(pieces))
        with context():
            want = loss_fn(*embeddings)
        want.backward()
        assert_norm_close(loss.detach(), want.detach(), 1e-5, f"loss, autocast={autocast}")
        for name, got, ref in zip(names, cached, gradients(params)):
            if not name.endswith("attention.self.key.bias"):  # exactly 0: rounding either way
                assert_norm_close(got, ref, 1e-5, f"{name}, autocast={autocast}")


class Recorder(nn.Module):
    """Embeds token ids (masked where a mask is given); records every input's shapes."""

    def __init__(self):
        super().__init__()
        self.embed, self.shapes = nn.Embedding(60, 8), []

    def forward(self, features):
        if torch.is_tensor(features):
            features = {"input_ids": features}
        self.shapes.append({k: tuple(v.shape) for k, v in features.items() if torch.is_tensor(v)})
        x = self.embed(features["input_ids"])
        if "attention_mask" in features:
            x = x * features["attention_mask"][..., None]
        return F.normalize(x.sum(1) + 1e-3, dim=1)


def test_what_is_cut_and_what_is_not():
    require_peer("transformers")
    from transformers import BatchEncoding

    encoder = Recorder()
    text = tokens([2, 3, 0, 0, 7, 1], seed=0, width=10)  # the second chunk's mask is all zeros: kept whole
    text["row_weights"] = torch.ones(6)  # not (N, L): rows only
    text["per_token"] = torch.ones(6, 10, 3)  # (N, L, ...): cut too
    text["label"] = "kept"  # not a tensor: as it is
    no_mask = {"input_ids": text["input_ids"]}
    loss = flashcl.cached_loss(lambda a, b, c: (a * b).sum() + c.sum(), (encoder, BatchEncoding(text)),
                               (encoder, no_mask), (encoder, text["input_ids"]), chunk_size=2)
    loss.backward()
    first = encoder.shapes[:len(encoder.shapes) // 2]
    assert first[:3] == [{"input_ids": (2, w), "token_type_ids": (2, w), "attention_mask": (2, w), "row_weights": (2,),
                          "per_token": (2, w, 3)} for w in (3, 10, 7)]
    assert first[3:] == [{"input_ids": (2, 10)}] * 6  # no mask, or a tensor: untouched
    assert encoder.shapes[len(first):] == first  # the replay sees what the first pass saw
    encoder.shapes.clear()
    with torch.no_grad():  # evaluation cuts too; the module form passes the opt-out on
        flashcl.cached_loss(lambda a: a.sum(), (encoder, text), chunk_size=2)
        flashcl.CachedLoss(lambda a: a.sum(), chunk_size=2, trim_padding=False)((encoder, text))
    assert [s["input_ids"] for s in encoder.shapes] == [(2, 3), (2, 10), (2, 7)] + [(2, 10)] * 3
