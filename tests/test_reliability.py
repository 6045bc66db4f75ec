"""Reliability beyond the chosen shapes: extreme values, non-finite input, determinism, and memory
offsets past 2**31 elements, on every backend that runs here."""
import math

import pytest
import torch
import torch.nn.functional as F

import flashcl
import reference
from conftest import DEVICE, TOLERANCE, backend_params
from flashcl.primitives import resolve_backend
from registry import REGISTRY, Batch, ids, make_batch

BACKENDS = backend_params()
# The extreme-value and non-finite tests bound softmax cross-entropies of scale * x . y logits.
SOFTMAX = [entry for entry in REGISTRY if entry.softmax_logits]


def batch_of(x, y, scale, dtype):
    """A registry batch around two feature matrices (candidates: y then x; z and private: y)."""
    keys = torch.cat([y, x])
    return make_batch(x.shape[0], x.shape[1], m=keys.shape[0], dtype=dtype).replace(
        x=x.to(dtype), y=y.to(dtype), z=y.to(dtype), keys=keys.to(dtype), private=y.to(dtype),
        scale=torch.tensor(scale, dtype=torch.promote_types(dtype, torch.float32), device=DEVICE))


def losses_and_gradients(entry, x, y, scale, backend, dtype=torch.float32):
    """(flashcl's loss and gradients of x, y and scale; the float64 textbook's, on the same inputs)."""
    results = []
    for mine in (True, False):
        batch = batch_of(x, y, scale, dtype if mine else torch.float64)
        batch = batch.replace(x=batch.x.requires_grad_(), y=batch.y.requires_grad_(),
                              scale=batch.scale.requires_grad_())
        loss = entry(batch, backend=backend) if mine else entry.expected(batch)
        grads = torch.autograd.grad(loss, [batch.x, batch.y, batch.scale], allow_unused=True)
        results.append([loss.detach(), *(torch.zeros_like(t) if g is None else g
                                         for g, t in zip(grads, (batch.x, batch.y, batch.scale)))])
    return results


def assert_matches(got, want, dtype, magnitudes, what):
    """Finite exactly where the float64 textbook is, and within the dtype's tolerance of the terms there."""
    for name, g, w, size in zip(("loss", "grad x", "grad y", "grad scale"), got, want, magnitudes):
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite), f"{what}: {name}: finite {torch.isfinite(g)} vs {finite}"
        if finite.any():
            error = (g.double() - w)[finite].abs().max().item()
            allowed = TOLERANCE[dtype] * max(size, w[finite].abs().max().item())
            assert error <= allowed, f"{what}: {name} off by {error:.3g}, allowed {allowed:.3g}"


def unit(n, d, seed, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=1).to(device=DEVICE, dtype=dtype)


# name: (x, y, scale, dtype): unit rows unless said otherwise
EXTREMES = {
    "scale 1e4": lambda: (unit(40, 16, 0), unit(40, 16, 1), 1e4, torch.float32),
    "rows of norm 1e3": lambda: (1e3 * unit(40, 16, 2), 1e3 * unit(40, 16, 3), 1.0, torch.float32),
    # Entries near fp16's largest (65504): a product accumulated in fp16 would overflow, fp32 does not.
    "fp16 near its range": lambda: (4e4 * unit(24, 4, 4), 4e4 * unit(24, 4, 5), 3e-8, torch.float16),
    # bf16 entries of 1e15: logits of 1e30 before the scale, still inside fp32's range.
    "bf16 large": lambda: (1e15 * unit(24, 4, 6), 1e15 * unit(24, 4, 7), 1e-29, torch.bfloat16),
    "identical rows": lambda: (unit(1, 8, 8).expand(30, 8), unit(1, 8, 9).expand(30, 8), 20.0, torch.float32),
    "one row, one dimension": lambda: (unit(1, 1, 10), unit(1, 1, 11), 5.0, torch.float32),
    "a zero row": lambda: (torch.cat([torch.zeros(1, 8, dtype=torch.float64, device=DEVICE), unit(19, 8, 12)]),
                           unit(20, 8, 13), 30.0, torch.float32),
}


@pytest.mark.parametrize("entry", SOFTMAX, ids=ids(SOFTMAX))
@pytest.mark.parametrize("case", EXTREMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values(backend, case, entry):
    x, y, scale, dtype = EXTREMES[case]()
    if dtype not in [d for d in (torch.float16, torch.bfloat16, torch.float32) if backend in
                     flashcl.available_backends(DEVICE, d)]:
        pytest.skip(f"{backend} does not take {dtype}")
    x, y = x.to(dtype), y.to(dtype)
    got, want = losses_and_gradients(entry, x, y, scale, backend, dtype)
    assert all(torch.isfinite(w).all() for w in want), "the textbook loss is finite on every case here"
    r = max(x.double().norm(dim=1).max().item(), y.double().norm(dim=1).max().item(), 1e-30)
    n = x.shape[0]
    assert_matches(got, want, dtype, [scale * r * r, 4 * scale * r * (1 + 1 / n), 4 * scale * r * r / scale * 2,
                                      2 * r * r], f"{case}, {entry.name}")


NON_FINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the deliberate NaN and inf
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("entry", SOFTMAX, ids=ids(SOFTMAX))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_gives_the_textbook_result(backend, entry, where, value):
    """A NaN or an infinity in an input: the loss and each gradient entry are non-finite exactly where
    the float64 textbook loss's are (NaN loss, NaN gradients where they belong), and equal elsewhere."""
    x, y = unit(12, 6, 20), unit(12, 6, 21)
    (x if where == "x" else y)[3, 2] = NON_FINITE[value]
    got, want = losses_and_gradients(entry, x, y, 7.0, backend)
    assert not torch.isfinite(want[0]), "the textbook loss is not finite"
    assert_matches(got, want, torch.float32, [7.0, 28.0, 28.0, 2.0], f"{value} in {where}, {entry.name}")


def test_non_finite_scale_is_an_error():
    x = unit(4, 3, 22)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"logit_scale must be finite and > 0"):
            flashcl.clip_loss(x, x, value)


def determinism_cases():
    # Ten runs through Triton's interpreter take seconds: those are "slow".
    return [pytest.param(entry, backend.values[0], id=f"{entry.name}-{backend.id}",
                         marks=[*backend.marks, *([pytest.mark.slow] if backend.values[0] != "torch" else [])])
            for entry in REGISTRY for backend in BACKENDS if backend.values[0] == "torch" or entry.takes_backend]


@pytest.mark.parametrize("entry,backend", determinism_cases())
def test_deterministic_mode_is_bit_identical(entry, backend):
    """torch.use_deterministic_algorithms(True): ten forward + backward runs, bit for bit the same."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    options = dict(backend=backend) if entry.takes_backend else {}
    try:
        runs = []
        for _ in range(10):
            batch = make_batch(70, 12, scale=9.0)
            leaves = batch.leaves(entry.learnable_scale)
            loss = entry(leaves, **options)
            wrt = [getattr(leaves, k) for k in Batch.FEATURES] + ([leaves.scale] if entry.learnable_scale else [])
            grads = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
            runs.append([loss.detach(), *(g for g in grads if g is not None)])
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_determinism_the_tolerance_holds(backend):
    runs = []
    for _ in range(3):
        x, y = unit(70, 12, 32).requires_grad_(), unit(70, 12, 33).requires_grad_()
        loss = flashcl.clip_loss(x, y, 9.0, backend=backend)
        runs.append([loss.detach(), *torch.autograd.grad(loss, (x, y))])
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            torch.testing.assert_close(a, b, rtol=TOLERANCE[torch.float32], atol=TOLERANCE[torch.float32] * 9.0)


def far_rows(d, dtype):
    """Two rows 2**31 elements apart in one storage: their memory offsets need 64 bits. The storage is
    reserved, not touched, so only the two rows' pages are ever resident."""
    storage = torch.empty(2**31 + d, dtype=dtype, device=DEVICE)
    rows = storage.as_strided((2, d), (2**31, 1))
    rows.copy_(unit(2, d, 40).to(dtype))
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_2_to_the_31(backend):
    """Every entry point that computes offsets reads a row 2**31 elements into its operand right,
    as anchor and as candidate, in both primitives (expanded tensors would not do: their stride is 0)."""
    dtype = torch.float16 if backend != "torch" else torch.float32
    far = far_rows(8, dtype)
    near = unit(5, 8, 41).to(dtype)
    scale = torch.tensor(4.0, device=DEVICE)
    impl = resolve_backend(backend, far)
    for x, y in ((far, near), (near, far)):
        want_rows, want_cols = reference.lse(x.double(), y.double(), scale.double())
        rows, cols = impl.lse(x, y, scale, rows=True, cols=True, exclude_diagonal=False)
        torch.testing.assert_close(rows.double(), want_rows, rtol=2e-2, atol=2e-2 * 4)
        torch.testing.assert_close(cols.double(), want_cols, rtol=2e-2, atol=2e-2 * 4)
        a = torch.ones(x.shape[0], device=DEVICE)
        b = torch.ones(y.shape[0], device=DEVICE)
        want = reference.weighted_grad(x, y, scale, a=a, o=want_rows.float(), b=b, p=want_cols.float())
        got = impl.weighted_grad(x, y, scale, a=a, o=want_rows.float(), b=b, p=want_cols.float(),
                                     need_dx=True, need_dy=True, need_ds=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 * 8 * max(1.0, math.sqrt(y.shape[0])))
