"""Inside torch.autocast flashcl multiplies features in autocast's dtype exactly where torch.matmul
would, fp32 features (as open_clip passes them) included, and keeps its statistics in fp32: on every
backend, for every public loss (tests/registry.py), against the float64 loss of the features rounded to
bf16, and beside the textbook loss run under the same autocast."""
import pytest
import torch

import flashcl
import reference
from conftest import assert_close, backend_params
from registry import REGISTRY, Batch, ids, make_batch


def gradients(entry, batch, backend=None, autocast=True):
    leaves = batch.leaves(entry.learnable_scale)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if backend is None:
            loss = entry.expected(leaves)
        else:
            loss = entry(leaves, **(dict(backend=backend) if entry.takes_backend else {}))
    names = [*Batch.FEATURES, *(["scale"] if entry.learnable_scale else [])]
    grads = torch.autograd.grad(loss.float().sum(), [getattr(leaves, k) for k in names], allow_unused=True)
    return loss.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
def test_under_cpu_autocast(entry, backend):
    if backend != "torch" and not entry.takes_backend:
        pytest.skip(f"{entry.name} runs no primitive")
    batch = make_batch(n=24, d=16, m=30)  # fp32 features, as open_clip hands them over under autocast
    rounded = batch.to(torch.bfloat16).to(torch.float64)
    want, want_grads = gradients(entry, rounded, autocast=False)
    loss, grads = gradients(entry, batch, backend)
    textbook, textbook_grads = gradients(entry, batch)
    assert loss.dtype == torch.float32, "statistics stay fp32 under autocast"
    for name, got in (("flashcl", loss), ("textbook under autocast", textbook)):
        assert_close(got, want, torch.bfloat16, f"{entry.name}: {name} loss", magnitude=entry.magnitude)
    for key, grad in grads.items():
        if grad is not None:
            assert grad.dtype == torch.float32, f"{key}: the gradient of fp32 features is fp32"
            assert_close(grad, want_grads[key], torch.bfloat16, f"{entry.name}: grad {key}", magnitude=entry.magnitude)


@pytest.mark.parametrize("backend", backend_params())
def test_products_are_taken_in_the_autocast_dtype(backend):
    """The CLIP loss of fp32 features under bf16 autocast is the float64 loss of their bf16 roundings to
    fp32 accuracy (the products of bf16 values are exact in fp32), far closer than to the loss of the
    unrounded features; the textbook loss, whose logits autocast rounds to bf16, is further off."""
    batch = make_batch(n=64, d=32, scale=20.0)
    x, y = batch.x.float(), batch.y.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = flashcl.clip_loss(x, y, 20.0, backend=backend)
        textbook = reference.clip(x, y, 20.0)
    rounded = reference.clip(x.bfloat16().double(), y.bfloat16().double(), 20.0)
    exact = reference.clip(x.double(), y.double(), 20.0)
    assert_close(loss, rounded, torch.float32, "against the rounded features' loss", magnitude=20.0)
    assert abs(loss.item() - rounded.item()) < abs(loss.item() - exact.item()) / 10
    assert abs(loss.item() - rounded.item()) < abs(textbook.item() - rounded.item())
