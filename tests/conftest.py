import os

# FLASHCL_TEST_DEVICE=cuda runs the suite on CUDA tensors: every test that computes makes
# its inputs on DEVICE (the `generator` fixture lives there). On CPU, the Triton kernels run through Triton's interpreter,
# which must be switched on before any @triton.jit function is defined (flashcl imports
# its kernels lazily, on first use).
TEST_DEVICE = os.environ.get("FLASHCL_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

import flashcl
from flashcl import primitives

try:  # property-based tests (tests/test_properties.py): a fixed, derandomized set in CI
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=500, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("ci")
except ImportError:
    pass

DEVICE = torch.device(TEST_DEVICE)

# Per-dtype tolerances against a float64 reference (docs/design.md, "Precision").
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def slow_if_large(shapes, rows=500):
    """pytest params of shapes (tuples whose first entry is the row count), marked slow from `rows` on."""
    return [pytest.param(*shape, marks=[pytest.mark.slow] if shape[0] >= rows else [], id="-".join(map(str, shape)))
            for shape in shapes]


def unit_rows(n, d, generator, dtype=torch.float32, like=None, noise=0.5):
    """n unit-norm rows; with `like`, each row is a noisy copy of like's row (a positive pair)."""
    z = torch.randn(n, d, generator=generator, dtype=torch.float64, device=generator.device)
    if like is not None:
        z = like.double()[:n] + noise * z
    return F.normalize(z, dim=1).to(dtype)


def assert_close(actual, expected, dtype, what="", magnitude=0.0):
    """Relative error at most the dtype's tolerance, measured against the larger of the
    reference's largest entry and `magnitude`: the size of the terms that cancel to give
    the result (a loss r_i - S_ii of 1e-9 is the difference of two numbers near the scale).
    """
    tol = TOLERANCE[dtype]
    expected = expected.double()
    atol = tol * max(expected.abs().max().item(), magnitude, 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_norm_close(actual, expected, tol, what=""):
    """Tensors (or lists of them) within `tol` of the expected ones in norm-wise relative error over all of
    them together: for comparisons with another library's fp32 results, whose rounding (and summation
    order, which changes with the thread count) differs entry by entry; the size of the whole gradient
    is the size of the terms that cancel in any one entry."""
    actual = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    error = torch.sqrt(sum(((a.double() - e.double()) ** 2).sum() for a, e in zip(actual, expected))).item()
    size = torch.sqrt(sum((e.double() ** 2).sum() for e in expected)).item()
    assert error <= tol * max(size, 1e-30), f"{what}: norm-wise relative error {error / max(size, 1e-30):.3g} > {tol}"


# "one tile": the default budget covers the test sizes; "tiles": ragged small tiles force
# every combine path of the torch backend (rows and columns split, partial last tiles).
TILINGS = {"one tile": {}, "tiles": dict(block_rows=16, block_cols=48)}


def check_against_reference(loss_fn, ref_fn, features, scale, dtype, reduction, tiles="one tile",
                            backend=None, **kwargs):
    """Compare loss and all gradients with autograd through the float64 reference.

    Features are unit-norm, so |S_ij| <= scale and every softmax row sums to 1. A loss is
    then a difference of terms of size ~scale per anchor, d l_i / d x a difference of terms
    of size ~scale * w_i and d l_i / d scale of size ~w_i, with w_i the weight the
    reduction and the upstream gradient give anchor i: these set the tolerances' scale.
    """
    features = [f.to(dtype).requires_grad_() for f in features]
    scale_t = torch.tensor(float(scale), dtype=torch.promote_types(dtype, torch.float32), device=DEVICE,
                           requires_grad=True)
    with flashcl.tiling(**TILINGS[tiles]):
        loss = loss_fn(*features, scale_t, reduction=reduction, backend=backend, **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator(DEVICE).manual_seed(1), dtype=loss.dtype,
                           device=DEVICE)
    grads = torch.autograd.grad(loss, [*features, scale_t], upstream)

    ref_features = [f.detach().double().requires_grad_() for f in features]
    ref_scale = scale_t.detach().double().requires_grad_()
    ref_loss = ref_fn(*ref_features, ref_scale, reduction=reduction, **kwargs)
    ref_grads = torch.autograd.grad(ref_loss, [*ref_features, ref_scale], upstream.double())

    anchors = ref_fn(*ref_features, ref_scale, reduction="none", **kwargs).numel()
    weights = upstream.abs().expand(anchors) / (anchors if reduction == "mean" else 1)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, dtype, "loss", magnitude=scale * (anchors if reduction == "sum" else 1))
    for i, (g, ref) in enumerate(zip(grads[:-1], ref_grads[:-1])):
        assert g.dtype == dtype and g.shape == features[i].shape
        assert_close(g, ref, dtype, f"grad of input {i}", magnitude=2 * scale * weights.max().item())
    assert_close(grads[-1], ref_grads[-1], dtype, "grad of scale", magnitude=2 * weights.sum().item())



@pytest.fixture
def generator():
    return torch.Generator(DEVICE).manual_seed(0)


# FLASHCL_REQUIRE_BACKENDS=torch,triton (set by .ci/run) makes a backend that cannot run here a
# failure instead of a skip line.
REQUIRED_BACKENDS = {name for name in os.environ.get("FLASHCL_REQUIRE_BACKENDS", "").split(",") if name}


def missing_backend(backend):
    """A backend that cannot run on the test device: a skip that says why, or None when it runs (or is
    required, so that its tests run and fail)."""
    why = primitives.unavailable_reason(backend, DEVICE)
    if why is None or backend in REQUIRED_BACKENDS:
        return None
    return pytest.mark.skip(reason=f"the {backend} backend cannot run on {DEVICE.type} here: {why}")


def backend_params(names=None):
    """Every backend (or those named) as pytest params; one that cannot run here is a visible skip."""
    return [pytest.param(name, id=name, marks=[mark for mark in [missing_backend(name)] if mark])
            for name in (names or primitives.backend_names())]


def backend_cases(dtypes, tilings=({},)):
    """(backend, dtype, tiling) triples for every backend on the test device (one that cannot run here
    is a skip line). Tilings only mean something to the torch backend; the Triton kernels take no fp64."""
    cases = []
    for backend in primitives.backend_names():
        skip = missing_backend(backend)
        if skip is not None:
            cases.append(pytest.param(backend, None, {}, id=f"{backend}-unavailable", marks=skip))
            continue
        for dtype in dtypes:
            if backend not in flashcl.available_backends(DEVICE, dtype):
                continue
            for tiles in (tilings if backend == "torch" else ({},)):
                cases.append(pytest.param(backend, dtype, tiles, id=f"{backend}-{str(dtype)[6:]}-{tiles or 'auto'}"))
    return cases


def require_peer(name):
    """Import a peer library; a missing peer fails the run when FLASHCL_REQUIRE_PEERS=1 (CI)."""
    if os.environ.get("FLASHCL_REQUIRE_PEERS") == "1":
        return __import__(name)
    return pytest.importorskip(name)
