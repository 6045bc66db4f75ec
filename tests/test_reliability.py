"""Reliability beyond the chosen shapes: extreme values, non-finite input, determinism, and memory
offsets past 2**31 elements, on every backend that runs here."""
import math

import pytest
import torch
import torch.nn.functional as F

import flashcl
import reference
from conftest import DEVICE, TOLERANCE
from flashcl.primitives import resolve_backend

BACKENDS = flashcl.available_backends(DEVICE)


def textbook(name, x, y, scale):
    return {"clip": lambda: reference.clip(x, y, scale), "infonce": lambda: reference.infonce(x, y, scale),
            "nt_xent": lambda: reference.nt_xent(x, y, scale)}[name]()


def flash(name, x, y, scale, backend):
    return {"clip": flashcl.clip_loss, "infonce": flashcl.infonce_loss, "nt_xent": flashcl.nt_xent_loss}[name](
        x, y, scale, backend=backend)


def losses_and_gradients(name, x, y, scale, backend):
    """(flashcl's loss and gradients of x, y and scale; the float64 textbook's, on the same inputs)."""
    leaves = [x.detach().clone().requires_grad_(), y.detach().clone().requires_grad_()]
    s = torch.tensor(scale, dtype=torch.promote_types(x.dtype, torch.float32), device=DEVICE, requires_grad=True)
    loss = flash(name, *leaves, s, backend)
    got = [loss.detach(), *torch.autograd.grad(loss, [*leaves, s])]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, y)]
    ref_s = s.detach().double().requires_grad_()
    want_loss = textbook(name, *ref_leaves, ref_s)
    want = [want_loss.detach(), *torch.autograd.grad(want_loss, [*ref_leaves, ref_s])]
    return got, want


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


@pytest.mark.parametrize("name", ["clip", "infonce", "nt_xent"])
@pytest.mark.parametrize("case", EXTREMES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_values(backend, case, name):
    x, y, scale, dtype = EXTREMES[case]()
    if dtype not in [d for d in (torch.float16, torch.bfloat16, torch.float32) if backend in
                     flashcl.available_backends(DEVICE, d)]:
        pytest.skip(f"{backend} does not take {dtype}")
    x, y = x.to(dtype), y.to(dtype)
    got, want = losses_and_gradients(name, x, y, scale, backend)
    assert all(torch.isfinite(w).all() for w in want), "the textbook loss is finite on every case here"
    r = max(x.double().norm(dim=1).max().item(), y.double().norm(dim=1).max().item(), 1e-30)
    n = x.shape[0]
    assert_matches(got, want, dtype, [scale * r * r, 4 * scale * r * (1 + 1 / n), 4 * scale * r * r / scale * 2,
                                      2 * r * r], f"{case}, {name}")


NON_FINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the deliberate NaN and inf
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("name", ["clip", "infonce", "nt_xent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_gives_the_textbook_result(backend, name, where, value):
    """A NaN or an infinity in an input: the loss and each gradient entry are non-finite exactly where
    the float64 textbook loss's are (NaN loss, NaN gradients where they belong), and equal elsewhere."""
    x, y = unit(12, 6, 20), unit(12, 6, 21)
    (x if where == "x" else y)[3, 2] = NON_FINITE[value]
    got, want = losses_and_gradients(name, x, y, 7.0, backend)
    assert not torch.isfinite(want[0]), "the textbook loss is not finite"
    assert_matches(got, want, torch.float32, [7.0, 28.0, 28.0, 2.0], f"{value} in {where}, {name}")


def test_non_finite_scale_is_an_error():
    x = unit(4, 3, 22)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"logit_scale must be finite and > 0"):
            flashcl.clip_loss(x, x, value)


LOSSES = {
    "clip": lambda x, y, s, b: flashcl.clip_loss(x, y, s, backend=b),
    "infonce": lambda x, y, s, b: flashcl.infonce_loss(x, torch.cat([y, x]), s, backend=b),
    "nt_xent": lambda x, y, s, b: flashcl.nt_xent_loss(x, y, s, backend=b),
    "gamma": lambda x, y, s, b: flashcl.gamma_weighted_loss(x, y, s, torch.zeros(x.shape[0], device=DEVICE),
                                                            torch.zeros(x.shape[0], device=DEVICE),
                                                            exclude_positive=True, backend=b).loss,
    "regularizers": lambda x, y, s, b: flashcl.ModalityStructureLoss(1.0, 1.0, 1.0, backend=b)(
        x, y, s, image_aug=x.flip(0), image_private=y.flip(0)),
}


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_is_bit_identical(backend, name):
    """torch.use_deterministic_algorithms(True): ten forward + backward runs, bit for bit the same."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(10):
            x, y = unit(70, 12, 30).requires_grad_(), unit(70, 12, 31).requires_grad_()
            s = torch.tensor(9.0, device=DEVICE, requires_grad=True)
            loss = LOSSES[name](x, y, s, backend)
            runs.append([loss.detach(), *torch.autograd.grad(loss, (x, y, s))])
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
