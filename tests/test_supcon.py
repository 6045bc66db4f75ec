"""Supervised contrastive loss: loss and gradients against the float64 materialized reference (written
from the paper's definition in the reference code's layout) on every backend, both contrast modes,
labelled and unlabelled, anchors without positives, gradcheck."""
import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, assert_close, backend_cases, unit_rows

CASES = backend_cases([torch.float64, torch.float32, torch.float16, torch.bfloat16],
                      tilings=({}, dict(block_rows=16, block_cols=48)))


def views(n, v, d, generator, dtype=torch.float64):
    first = unit_rows(n, d, generator)
    stacked = torch.stack([first] + [unit_rows(n, d, generator, like=first) for _ in range(v - 1)], dim=1)
    return stacked.to(dtype) if v > 1 else stacked[:, 0].to(dtype)


def compare(features, labels, dtype, backend, tiles, generator, **kwargs):
    upstream_shape = None
    outcomes = []
    for mine in (True, False):
        x = features.to(dtype if mine else torch.float64).detach().requires_grad_()
        if mine:
            with flashcl.tiling(**tiles):
                loss = flashcl.supcon_loss(x, labels, backend=backend, **kwargs)
        else:
            loss = reference.supcon(x, labels, **kwargs)
        if upstream_shape is None:
            upstream = torch.randn(loss.shape, generator=generator, dtype=torch.float64, device=DEVICE)
            upstream_shape = loss.shape
        outcomes.append((loss, torch.autograd.grad(loss, x, upstream.to(loss.dtype))[0]))
    (loss, grad), (want, want_grad) = outcomes
    scale = kwargs.get("temperature", 0.07)
    factor = scale / kwargs.get("base_temperature", 0.07) / scale  # logits of size 1/T, times T/T_base
    anchors = want.numel() if want.dim() else 1
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want, dtype, "loss", magnitude=2 * factor * (anchors if kwargs.get("reduction") == "sum" else 1))
    assert grad.dtype == dtype and grad.shape == features.shape
    assert_close(grad, want_grad, dtype, "gradient", magnitude=4 * factor * upstream.abs().max().item())


@pytest.mark.parametrize("n,v,d", [(1, 2, 3), (9, 2, 5), (40, 3, 16), (70, 1, 8)])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("backend,dtype,tiles", CASES)
def test_matches_reference(backend, dtype, tiles, n, v, d, labelled, contrast_mode, generator):
    if v == 1 and not labelled:
        pytest.skip("one view needs labels")
    features = views(n, v, d, generator)
    labels = torch.randint(0, 4, (n,), generator=generator, device=DEVICE) * 7 - 3 if labelled else None
    for reduction in ("mean", "sum", "none"):
        compare(features, labels, dtype, backend, tiles, generator, temperature=0.1, contrast_mode=contrast_mode,
                reduction=reduction)


@pytest.mark.parametrize("backend,dtype,tiles", backend_cases([torch.float64, torch.float32]))
def test_anchors_without_positives_are_left_out_of_the_mean(backend, dtype, tiles, generator):
    """Labels 5 and 9 occur once in one view: those anchors have no positive. flashcl's mean (and the
    reference's here) runs over the other anchors; the reference code's counts them as zeros."""
    features = views(12, 1, 6, generator)
    labels = torch.tensor([0, 1, 0, 1, 5, 0, 1, 9, 0, 0, 1, 1], device=DEVICE)
    compare(features, labels, dtype, backend, tiles, generator, temperature=0.2)
    ours = flashcl.supcon_loss(features.to(dtype), labels, 0.2, backend=backend)
    every_anchor = reference.supcon(features, labels, 0.2, mean_over="all anchors")
    assert_close(ours * 10 / 12, every_anchor, dtype, "mean over all anchors", magnitude=2 / 0.07)
    per_anchor = flashcl.supcon_loss(features.to(dtype), labels, 0.2, reduction="none", backend=backend)
    assert per_anchor[4] == 0 and per_anchor[7] == 0 and (per_anchor[[0, 1, 2, 3]] != 0).all()


def test_no_positive_anywhere_is_a_zero_loss(generator):
    features = views(5, 1, 4, generator).requires_grad_()
    loss = flashcl.supcon_loss(features, torch.arange(5, device=DEVICE))
    loss.backward()
    assert loss.item() == 0 and torch.equal(features.grad, torch.zeros_like(features))
    single = views(1, 1, 4, generator).requires_grad_()  # one row: an empty denominator too
    flashcl.supcon_loss(single, torch.zeros(1, dtype=torch.long, device=DEVICE)).backward()
    assert torch.equal(single.grad, torch.zeros_like(single))


def test_unlabelled_views_are_simclr(generator):
    """labels=None with two views, mode "all": NT-Xent's loss over [z1; z2] at the same temperature."""
    features = views(16, 2, 8, generator)
    got = flashcl.supcon_loss(features, None, temperature=0.5, base_temperature=0.5)
    want = flashcl.nt_xent_loss(features[:, 0], features[:, 1], 2.0)
    assert_close(got, want, torch.float64, "SupCon without labels against NT-Xent")


def test_module_matches_the_function(generator):
    features, labels = views(10, 2, 4, generator), torch.arange(10, device=DEVICE) % 3
    module = flashcl.SupConLoss(temperature=0.3, contrast_mode="one", base_temperature=0.5)
    assert torch.equal(module(features, labels), flashcl.supcon_loss(features, labels, 0.3, 0.5, "one"))


def test_gradcheck(generator):
    features = views(6, 2, 3, generator).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 2], device=DEVICE)
    with flashcl.tiling(block_rows=4, block_cols=5):
        for mode in ("all", "one"):
            assert torch.autograd.gradcheck(
                lambda f: flashcl.supcon_loss(f, labels, 0.5, contrast_mode=mode, reduction="none", backend="torch"),
                (features,))
