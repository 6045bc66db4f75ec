"""The CVPR 2023 modality-structure regularizers against materialized float64 references: values,
gradients, gradcheck, bad input, and the module that combines them."""
import math

import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, assert_close, backend_params, slow_if_large, unit_rows

BACKENDS = backend_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, D): N < D, N = D, N > D, ragged; N * N * D stays small enough for the explicit references.
SHAPES = slow_if_large([(1, 5), (2, 3), (7, 3), (33, 64), (48, 48), (130, 300), (257, 17), (1000, 17)], rows=130)


def paired_views(n, d, generator, count):
    """count unit-norm views of the same n examples: features, their partners, augmentations."""
    first = unit_rows(n, d, generator)
    return [first] + [unit_rows(n, d, generator, like=first, noise=0.4) for _ in range(count - 1)]


def compare(fn, ref_fn, inputs, dtype, loss_magnitude, grad_magnitude, **kwargs):
    """Loss and every input's gradient against autograd through the float64 reference."""
    leaves = [x.to(dtype).requires_grad_() for x in inputs]
    loss = fn(*leaves, **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator(DEVICE).manual_seed(3), dtype=loss.dtype,
                           device=DEVICE)
    grads = torch.autograd.grad(loss, leaves, upstream)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    ref = ref_fn(*ref_leaves, **ref_kwargs)
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream.double())
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref.shape
    assert_close(loss, ref, dtype, "loss", magnitude=loss_magnitude)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype and g.shape == leaves[i].shape
        assert_close(g, r, dtype, f"grad of input {i}", magnitude=grad_magnitude * upstream.abs().max().item())


# Geometric consistency: a mean over N^2 pairs of squares of terms of size ~1 (unit rows), so
# the loss's terms are ~1 and a row's gradient is a mean over N pairs of terms of size ~4.
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("views", ["pair", "image_aug", "both_aug"])
def test_geometric_consistency(n, d, dtype, views, generator):
    count = {"pair": 2, "image_aug": 3, "both_aug": 4}[views]
    inputs = paired_views(n, d, generator, count)
    if views == "image_aug":
        fn = lambda v, t, va: flashcl.geometric_consistency_loss(v, t, image_aug=va)
        ref = lambda v, t, va: reference.geometric_consistency(v, t, image_aug=va)
    else:
        fn, ref = flashcl.geometric_consistency_loss, reference.geometric_consistency
    compare(fn, ref, inputs, dtype, loss_magnitude=8.0, grad_magnitude=16.0 / n)


@pytest.mark.parametrize("n,d", [(2, 3), (33, 8), (8, 33)])
def test_geometric_consistency_distinct_pairs(n, d, generator):
    """Features of any norm, so the j == k terms are not 0 and leaving them out changes the loss."""
    v, t = (torch.randn(n, d, generator=generator, device=DEVICE) for _ in range(2))
    compare(lambda v, t: flashcl.geometric_consistency_loss(v, t, distinct_pairs=True),
            lambda v, t: reference.geometric_consistency(v, t, distinct_pairs=True),
            [v, t], torch.float32, loss_magnitude=8.0 * d * d, grad_magnitude=16.0 * d * d / n)
    all_pairs = flashcl.geometric_consistency_loss(v, t)
    assert not torch.allclose(all_pairs, flashcl.geometric_consistency_loss(v, t, distinct_pairs=True))


def test_geometric_consistency_is_zero_for_identical_modalities(generator):
    v = unit_rows(300, 16, generator, torch.float64)
    assert flashcl.geometric_consistency_loss(v, v.clone()).abs() < 1e-12


# Brownian bridge: an InfoNCE at scale 1/(sigma^2 t (1 - t)) over logits of size ~ scale * 1.5.
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_brownian_bridge(backend, n, d, dtype, generator):
    if backend != "torch" and n > 300:
        pytest.skip("Triton's interpreter: the smaller shapes suffice")
    inputs = paired_views(n, d, generator, 3)
    for t, sigma in ((0.25, 1.0), (0.6, 0.5)):
        scale = 1 / (sigma**2 * t * (1 - t))
        compare(flashcl.brownian_bridge_loss, reference.brownian_bridge, inputs, dtype, loss_magnitude=2 * scale,
                grad_magnitude=4 * scale / n, t=t, sigma=sigma, backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("contrastive", [True, False])
def test_brownian_bridge_reductions_and_pointwise_form(reduction, contrastive, generator):
    inputs = paired_views(40, 12, generator, 3)
    weight = 1 if reduction != "mean" else 1 / 40
    compare(flashcl.brownian_bridge_loss, reference.brownian_bridge, inputs, torch.float32,
            loss_magnitude=20.0 * (40 if reduction == "sum" else 1), grad_magnitude=20.0 * weight,
            contrastive=contrastive, reduction=reduction)


def test_brownian_bridge_rewards_the_bridge(generator):
    """An augmentation on its own bridge scores lower than one on another pair's bridge."""
    v, t = paired_views(64, 32, generator, 2)
    on_bridge = 0.75 * v + 0.25 * t
    assert flashcl.brownian_bridge_loss(v, t, on_bridge) < flashcl.brownian_bridge_loss(v, t, on_bridge.roll(1, 0))


# Feature separation: orthogonality terms of size ~1; uniformity logits of size ~ 4u.
@pytest.mark.parametrize("n,d", [shape for shape in SHAPES if shape.values[0] >= 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_separation(backend, n, d, dtype, generator):
    if backend != "torch" and n > 300:
        pytest.skip("Triton's interpreter: the smaller shapes suffice")
    shared, private = paired_views(n, d, generator, 2)
    compare(flashcl.feature_separation_loss, reference.feature_separation, [shared, private], dtype,
            loss_magnitude=10.0, grad_magnitude=20.0 / n, backend=backend)


def test_feature_separation_weights_and_any_norm(generator):
    shared = torch.randn(30, 6, generator=generator, device=DEVICE)
    private = 0.7 * torch.randn(30, 6, generator=generator, device=DEVICE)
    for weights in (dict(orthogonality_weight=0.0), dict(uniformity_weight=0.0), dict(uniformity_weight=2.5)):
        compare(flashcl.feature_separation_loss, reference.feature_separation, [shared, private], torch.float32,
                loss_magnitude=50.0, grad_magnitude=10.0, uniformity_t=1.3, **weights)


def test_uniformity_prefers_spread_features(generator):
    shared = unit_rows(64, 8, generator)
    spread = unit_rows(64, 8, generator)
    clumped = unit_rows(64, 8, generator, like=spread[:1].expand(64, 8), noise=0.1)
    loss = lambda p: flashcl.feature_separation_loss(shared, p, orthogonality_weight=0.0)
    assert loss(spread) < loss(clumped)


def test_row_logsumexp(generator):
    """The differentiable log-sum-exp the uniformity term is built on, with and without the diagonal."""
    q, k = unit_rows(40, 6, generator), unit_rows(40, 6, generator)
    for exclude in (False, True):
        def ref(q, k, s):
            logits = s * q @ k.T
            if exclude:
                logits = logits.masked_fill(torch.eye(40, dtype=torch.bool, device=DEVICE), -math.inf)
            return logits.logsumexp(1)

        scale = torch.tensor(7.0, device=DEVICE)
        compare(lambda q, k, s: flashcl.row_logsumexp(q, k, s, exclude_diagonal=exclude), ref,
                [q, k, scale], torch.float32, loss_magnitude=7.0, grad_magnitude=7.0)


def test_gradcheck(generator):
    leaf = lambda t: t.double().requires_grad_()
    v, t, a = (leaf(x) for x in paired_views(5, 3, generator, 3))  # N > D: the Gram route
    assert torch.autograd.gradcheck(lambda v, t, a: flashcl.geometric_consistency_loss(v, t, a), (v, t, a))
    w, u = leaf(torch.randn(3, 6, generator=generator, device=DEVICE)), leaf(torch.randn(3, 6, generator=generator,
                                                                                      device=DEVICE))
    assert torch.autograd.gradcheck(lambda w, u: flashcl.geometric_consistency_loss(w, u, distinct_pairs=True), (w, u))
    assert torch.autograd.gradcheck(lambda v, t, a: flashcl.brownian_bridge_loss(v, t, a, 0.3, sigma=0.8), (v, t, a))
    assert torch.autograd.gradcheck(lambda v, t: flashcl.feature_separation_loss(v, t, uniformity_t=1.5), (v, t))
    s = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t, s: flashcl.row_logsumexp(v, t, s, exclude_diagonal=True), (v, t, s))


# That no regularizer allocates anything N x N is tests/test_memory.py's, over the registry of losses.


def test_module_sums_the_weighted_terms(generator):
    v, t, va, ta, vp, tp = paired_views(50, 16, generator, 6)
    loss_fn = flashcl.ModalityStructureLoss(geometric=2.0, bridge=0.5, separation=0.1, bridge_t=0.3, uniformity_t=1.0)
    terms = loss_fn(v, t, 10.0, image_aug=va, text_aug=ta, image_private=vp, text_private=tp, output_dict=True)
    want = {
        "contrastive_loss": flashcl.clip_loss(v, t, 10.0),
        "geometric_loss": 2.0 * flashcl.geometric_consistency_loss(v, t, va, ta),
        "bridge_loss": 0.5 * flashcl.brownian_bridge_loss(v, t, va, 0.3),
        "separation_loss": 0.1 * (flashcl.feature_separation_loss(v, vp, uniformity_t=1.0)
                                  + flashcl.feature_separation_loss(t, tp, uniformity_t=1.0)) / 2,
    }
    assert terms.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(terms[key], want[key])
    total = loss_fn(v, t, 10.0, image_aug=va, text_aug=ta, image_private=vp, text_private=tp)
    torch.testing.assert_close(total, sum(want.values()))


def test_module_leaves_out_zero_weights(generator):
    v, t = paired_views(20, 8, generator, 2)
    terms = flashcl.ModalityStructureLoss(geometric=1.0)(v, t, 5.0, output_dict=True)
    assert set(terms) == {"contrastive_loss", "geometric_loss"}
    torch.testing.assert_close(flashcl.ModalityStructureLoss()(v, t, 5.0), flashcl.clip_loss(v, t, 5.0))


def test_module_trains(generator):
    """One optimizer step through every term moves every input's parameters."""
    v, t, va, vp = (torch.nn.Parameter(x) for x in paired_views(32, 8, generator, 4))
    loss_fn = flashcl.ModalityStructureLoss(1.0, 1.0, 1.0)
    loss_fn(v, t, 10.0, image_aug=va, image_private=vp).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (v, t, va, vp))


def features(n=4, d=3, **kwargs):
    return torch.randn(n, d, **kwargs)


@pytest.mark.parametrize("call,error,message", [
    (lambda: flashcl.geometric_consistency_loss(features(4), features(5)), ValueError,
     r"image and text must have the same number of rows, got 4 and 5"),
    (lambda: flashcl.geometric_consistency_loss(features(4, 3), features(4, 6)), ValueError,
     r"image and text must have the same feature dimension, got 3 and 6"),
    (lambda: flashcl.geometric_consistency_loss(features(), features(), image_aug=features(3)), ValueError,
     r"image and image_aug must have the same number of rows, got 4 and 3"),
    (lambda: flashcl.geometric_consistency_loss(features(), features(), text_aug=torch.randn(4)), ValueError,
     r"text_aug must be 2-D \(batch, dim\), got shape \(4,\)"),
    (lambda: flashcl.geometric_consistency_loss(features(), torch.ones(4, 3, dtype=torch.long)), TypeError,
     r"text must have dtype float16, bfloat16, float32, float64; got torch.int64"),
    (lambda: flashcl.brownian_bridge_loss(features(), features(), features(), t=0.0), ValueError,
     r"t must be a number in \(0, 1\), the bridge time of the augmented image, got 0.0"),
    (lambda: flashcl.brownian_bridge_loss(features(), features(), features(), t=1.5), ValueError,
     r"t must be a number in \(0, 1\).*got 1.5"),
    (lambda: flashcl.brownian_bridge_loss(features(), features(), features(), sigma=-1.0), ValueError,
     r"sigma must be a finite number > 0, got -1.0"),
    (lambda: flashcl.brownian_bridge_loss(features(), features(), features(4, 5)), ValueError,
     r"image and image_aug must have the same feature dimension, got 3 and 5"),
    (lambda: flashcl.brownian_bridge_loss(features(), features(), [[1.0]]), TypeError,
     r"image_aug must be a torch.Tensor of shape \(batch, dim\), got list"),
    (lambda: flashcl.brownian_bridge_loss(features(), features(), features(), reduction="avg"), ValueError,
     r"reduction must be one of"),
    (lambda: flashcl.feature_separation_loss(features(1), features(1)), ValueError,
     r"private needs at least 2 rows for the uniformity term \(pairs j != k\), got 1"),
    (lambda: flashcl.feature_separation_loss(features(), features(dtype=torch.float16)), TypeError,
     r"shared and private must have the same dtype"),
    (lambda: flashcl.feature_separation_loss(features(), features(), uniformity_weight=-1.0), ValueError,
     r"uniformity_weight must be a finite number >= 0, got -1.0"),
    (lambda: flashcl.feature_separation_loss(features(), features(), uniformity_t=0), ValueError,
     r"uniformity_t must be a finite number > 0, got 0"),
    (lambda: flashcl.ModalityStructureLoss(geometric=-0.1), ValueError,
     r"geometric must be a finite number >= 0, got -0.1"),
    (lambda: flashcl.ModalityStructureLoss(bridge=float("nan")), ValueError, r"bridge must be a finite number >= 0"),
    (lambda: flashcl.ModalityStructureLoss(separation="1"), ValueError, r"separation must be a finite number >= 0"),
    (lambda: flashcl.ModalityStructureLoss(bridge_t=1.0), ValueError, r"bridge_t must be a number in \(0, 1\), the bridge time of the augmented image, got 1.0"),
    (lambda: flashcl.ModalityStructureLoss(bridge=1.0)(features(), features(), 2.0), ValueError,
     r"image_aug is needed for the Brownian bridge term \(bridge=1.0\)"),
    (lambda: flashcl.ModalityStructureLoss(separation=1.0)(features(), features(), 2.0), ValueError,
     r"image_private or text_private is needed for the separation term \(separation=1.0\)"),
    (lambda: flashcl.row_logsumexp(features(4), features(5), 1.0, exclude_diagonal=True), ValueError,
     r"queries and keys must have the same number of rows, got 4 and 5"),
])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
