"""The guide mask in the Triton kernels (primitives 1 and 2, docs/design.md "Guide mask"), against
a dense float64 reference: entry (i, j) is left out where T_ij = gx_i . gy_j > threshold_i.

The guide features have small-integer entries and the thresholds are integers, so T is exact in
every dtype and summation order, and ties T_ij == threshold_i (kept: the comparison is strict)
occur on purpose. Small shapes: the kernels run in Triton's interpreter on CPU.
"""
import pytest
import torch

from conftest import DEVICE, TOLERANCE, assert_norm_close, missing_backend, unit_rows
from flashcl.backends import fused, triton as triton_backend

pytestmark = [mark for mark in [missing_backend("triton")] if mark]

HALF_AND_FP32 = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 7), (33, 130), (130, 33)]  # ragged against every tile side; (1, 7): one row, one partial tile
D, GUIDE_D, SCALE = 24, 5, 10.0


def tolerance(dtype, what):
    """Norm-wise relative error allowed. The LSEs come from the inputs' exact products accumulated in
    fp32 whatever the input dtype; G in a half-precision product and half gradients are rounded
    to the input dtype."""
    return 1e-5 if what == "lse" or dtype == torch.float32 else TOLERANCE[dtype]


def make_guide(n, m, generator, dtype, low=-1, high=6, guide_d=GUIDE_D):
    """(gx, gy, threshold): features in {-2, ..., 2}, gx strided (every other column of a wider
    tensor: the kernels take any strides), integer fp32 thresholds in [low, high)."""
    gx = torch.randint(-2, 3, (n, 2 * guide_d), generator=generator, device=DEVICE).to(dtype)[:, ::2]
    gy = torch.randint(-2, 3, (m, guide_d), generator=generator, device=DEVICE).to(dtype)
    threshold = torch.randint(low, high, (n,), generator=generator, device=DEVICE).float()
    return gx, gy, threshold


def left_out(guide, exclude_diagonal=False):
    """The dense mask of left-out entries, in float64 (T is exact)."""
    gx, gy, threshold = guide
    mask = gx.double() @ gy.double().T > threshold.double()[:, None]
    if exclude_diagonal:
        mask |= torch.eye(*mask.shape, dtype=torch.bool, device=mask.device)
    return mask


def reference_lse(x, y, scale, mask):
    s = (scale * x.double() @ y.double().T).masked_fill(mask, -torch.inf)
    return s.logsumexp(1), s.logsumexp(0)


def reference_weights(x, y, scale, mask, a=None, o=None, b=None, p=None, positives=None):
    """G = a_i exp(S_ij - o_i) + b_j exp(S_ij - p_j), left-out entries 0, plus the positives (never masked)."""
    s = scale * x.double() @ y.double().T
    g = torch.zeros_like(s)
    if a is not None:
        g += a.double()[:, None] * torch.exp(s - o.double()[:, None])
    if b is not None:
        g += b.double()[None, :] * torch.exp(s - p.double()[None, :])
    g = torch.where(mask, 0.0, g)  # not a product: exp(S - o) may be inf at a left-out entry
    if positives is not None:
        targets, coeff = positives
        g[torch.arange(x.shape[0], device=x.device), targets] += coeff.double()
    return g


def reference_grad(x, y, scale, mask, values=None, **terms):
    g = reference_weights(x, y, scale, mask, **terms)
    if values is not None:  # unscaled products of the values
        vx, vy = values[0].double(), values[1].double()
        return g @ vy, g.T @ vx, (g * (vx @ vy.T)).sum()
    x, y = x.double(), y.double()
    return scale * g @ y, scale * g.T @ x, (g * (x @ y.T)).sum()


def assert_lse_equal(got, want, dtype, what):
    """-inf exactly where the reference has it (every entry left out), norm-wise close elsewhere."""
    assert got.dtype == torch.float32 and not got.isnan().any(), f"{what}: {got}"
    empty = want == -torch.inf
    assert torch.equal(got == -torch.inf, empty), f"{what}: -inf at {(got == -torch.inf).nonzero()}, want {empty.nonzero()}"
    assert_norm_close(got[~empty], want[~empty], tolerance(dtype, "lse"), what)


def assert_grads_close(got, want, dtype, need=(True, True, True)):
    for name, needed, g, w in zip(("dx", "dy", "ds"), need, got, want):
        if not needed:
            assert g is None, name
            continue
        assert not g.isnan().any(), name
        assert_norm_close(g, w, tolerance(dtype, "grad"), name)


def terms_for(n, m, lse, generator, which):
    """Primitive 2's terms as the losses pass them: weights of either sign, the LSEs as offsets (the
    core passes 0 for an empty row; -inf here makes every left-out exp(S - o) inf, which must not leak)."""
    rows, cols = lse
    a = torch.randn(n, generator=generator, device=DEVICE)
    b = torch.randn(m, generator=generator, device=DEVICE)
    terms = {}
    if "row" in which:
        terms.update(a=a, o=rows)
    if "col" in which:
        terms.update(b=b, p=cols)
    if "positives" in which:
        targets = torch.randint(0, m, (n,), generator=generator, device=DEVICE)
        terms.update(positives=(targets, -torch.ones(n, device=DEVICE)))
    return terms


def features(n, m, generator, dtype):
    x, y = unit_rows(n, D, generator, dtype), unit_rows(m, D, generator, dtype)
    return x, y, torch.tensor(SCALE, device=DEVICE)


@pytest.mark.parametrize("deterministic", [False, True], ids=["merged", "deterministic"])
@pytest.mark.parametrize("dtype", HALF_AND_FP32, ids=str)
@pytest.mark.parametrize("n,m", SHAPES, ids=lambda v: str(v))
def test_lse(n, m, dtype, deterministic, generator):
    """Rows and columns together: one merged pass, or (deterministic) the rows' pass and the columns'
    as the rows of S.T, whose launch swaps the guide operands and indexes the threshold by column."""
    x, y, s = features(n, m, generator, dtype)
    guide = make_guide(n, m, generator, dtype)
    mask = left_out(guide)
    assert mask.any() and (n == 1 or not mask.any(dim=1).all())  # entries left out, and rows with none out
    kernels = triton_backend.make(deterministic=deterministic)
    rows, cols = kernels.lse(x, y, s, rows=True, cols=True, guide=guide)
    want_rows, want_cols = reference_lse(x, y, s, mask)
    assert_lse_equal(rows, want_rows, dtype, "rows")
    assert_lse_equal(cols, want_cols, dtype, "cols")
    if deterministic:  # one direction alone: the same launches
        assert kernels.lse(x, y, s, rows=False, cols=True, guide=guide)[0] is None
        assert torch.equal(kernels.lse(x, y, s, rows=True, cols=False, guide=guide)[0], rows)


def test_ties_are_kept(generator):
    """The comparison is strict: a threshold at a row's largest T keeps every entry (the unguided
    result, bit for bit: the same tiles and masks), half a step below leaves out exactly the ties."""
    n, m = 33, 130
    x, y, s = features(n, m, generator, torch.float32)
    gx, gy, _ = make_guide(n, m, generator, torch.float32)
    row_max = (gx.double() @ gy.double().T).max(dim=1).values.float()
    kernels = triton_backend.make(deterministic=False)
    unguided = kernels.lse(x, y, s, rows=True, cols=True)
    guided = kernels.lse(x, y, s, rows=True, cols=True, guide=(gx, gy, row_max))
    assert all(torch.equal(a, b) for a, b in zip(guided, unguided))
    below = (gx, gy, row_max - 0.5)
    mask = left_out(below)
    assert mask.any(dim=1).all()
    for got, want, what in zip(kernels.lse(x, y, s, rows=True, cols=True, guide=below),
                               reference_lse(x, y, s, mask), ("rows", "cols")):
        assert_lse_equal(got, want, torch.float32, what)


def test_data_has_ties(generator):
    """The shapes and thresholds the tests use put entries exactly at their row's threshold."""
    gx, gy, threshold = make_guide(130, 33, generator, torch.float32)
    assert (gx.double() @ gy.double().T == threshold.double()[:, None]).sum() > 50


@pytest.mark.parametrize("which", ["row", "col", "row col", "row col positives"])
@pytest.mark.parametrize("n,m", SHAPES, ids=lambda v: str(v))
def test_weighted_grad_terms(n, m, which, generator):
    """Each exponential term alone and together, with and without positives (which no mask touches)."""
    x, y, s = features(n, m, generator, torch.float32)
    guide = make_guide(n, m, generator, torch.float32)
    mask = left_out(guide)
    lse = reference_lse(x, y, s, mask)
    terms = terms_for(n, m, [v.float() for v in lse], generator, which)
    got = triton_backend.make().weighted_grad(x, y, s, **terms, need_ds=True, guide=guide)
    assert_grads_close(got, reference_grad(x, y, s, mask, **terms), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m", SHAPES, ids=lambda v: str(v))
def test_weighted_grad_half(n, m, dtype, generator):
    x, y, s = features(n, m, generator, dtype)
    guide = make_guide(n, m, generator, dtype)
    mask = left_out(guide)
    lse = triton_backend.make().lse(x, y, s, rows=True, cols=True, guide=guide)
    terms = terms_for(n, m, lse, generator, "row col positives")
    got = triton_backend.make().weighted_grad(x, y, s, **terms, need_ds=True, guide=guide)
    assert got[0].dtype == got[1].dtype == dtype
    assert_grads_close(got, reference_grad(x, y, s, mask, **terms), dtype)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dx", "dy", "ds"])
def test_weighted_grad_one_output(need, generator):
    """ds without dx still runs the (x, y) products; dy alone only the transposed ones."""
    n, m = 33, 130
    x, y, s = features(n, m, generator, torch.float32)
    guide = make_guide(n, m, generator, torch.float32)
    mask = left_out(guide)
    terms = terms_for(n, m, [v.float() for v in reference_lse(x, y, s, mask)], generator, "row col")
    got = triton_backend.make().weighted_grad(x, y, s, **terms, guide=guide, need_dx=need[0], need_dy=need[1],
                                              need_ds=need[2])
    assert_grads_close(got, reference_grad(x, y, s, mask, **terms), torch.float32, need)


@pytest.mark.parametrize("n,m", [(33, 130), (130, 33)], ids=lambda v: str(v))
def test_diagonal_and_guide_together(n, m, generator):
    x, y, s = features(n, m, generator, torch.float32)
    guide = make_guide(n, m, generator, torch.float32)
    mask = left_out(guide, exclude_diagonal=True)
    kernels = triton_backend.make(deterministic=False)
    lse = kernels.lse(x, y, s, rows=True, cols=True, exclude_diagonal=True, guide=guide)
    for got, want, what in zip(lse, reference_lse(x, y, s, mask), ("rows", "cols")):
        assert_lse_equal(got, want, torch.float32, what)
    terms = terms_for(n, m, lse, generator, "row col positives")
    got = kernels.weighted_grad(x, y, s, **terms, exclude_diagonal=True, need_ds=True, guide=guide)
    assert_grads_close(got, reference_grad(x, y, s, mask, **terms), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_values_and_guide_together(dtype, generator):
    """G from (x, y, scale) with the mask, multiplying values of their own width: unscaled, fp32."""
    n, m = 33, 130
    x, y, s = features(n, m, generator, dtype)
    values = unit_rows(n, 9, generator, dtype), unit_rows(m, 9, generator, dtype)
    guide = make_guide(n, m, generator, dtype)
    mask = left_out(guide)
    terms = terms_for(n, m, [v.float() for v in reference_lse(x, y, s, mask)], generator, "row col positives")
    got = triton_backend.make().weighted_grad(x, y, s, **terms, need_ds=True, values=values, guide=guide)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[0].shape == (n, 9)
    assert_grads_close(got, reference_grad(x, y, s, mask, values=values, **terms), dtype)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's inf - inf, masked by tl.where
@pytest.mark.parametrize("deterministic", [False, True], ids=["merged", "deterministic"])
def test_every_entry_left_out(deterministic, generator):
    """Rows whose threshold is -inf and columns whose guide features exceed every threshold lose every
    entry: LSE -inf, and with those -inf as offsets no NaN and no exponential term, only the positives."""
    n, m = 40, 70
    x, y, s = features(n, m, generator, torch.float32)
    gx, gy, threshold = make_guide(n, m, generator, torch.float32)
    gx = torch.cat([torch.ones(n, 1, device=DEVICE), gx], dim=1)  # a constant guide feature...
    gy = torch.cat([torch.zeros(m, 1, device=DEVICE), gy], dim=1)
    empty_cols = torch.tensor([0, 33, 69], device=DEVICE)
    gy[empty_cols, 0] = 100.0  # ...that puts these columns above every threshold
    empty_rows = torch.tensor([0, 17, 39], device=DEVICE)
    threshold[empty_rows] = -torch.inf
    guide = (gx, gy, threshold)
    mask = left_out(guide)
    assert mask[empty_rows].all() and mask[:, empty_cols].all() and not mask.all()
    kernels = triton_backend.make(deterministic=deterministic)
    rows, cols = kernels.lse(x, y, s, rows=True, cols=True, guide=guide)
    want_rows, want_cols = reference_lse(x, y, s, mask)
    assert (rows[empty_rows] == -torch.inf).all() and (cols[empty_cols] == -torch.inf).all()
    assert_lse_equal(rows, want_rows, torch.float32, "rows")
    assert_lse_equal(cols, want_cols, torch.float32, "cols")

    terms = terms_for(n, m, (rows, cols), generator, "row col")
    dx, dy, ds = kernels.weighted_grad(x, y, s, **terms, need_ds=True, guide=guide)
    assert not (dx.isnan().any() or dy.isnan().any() or ds.isnan())
    assert (dx[empty_rows] == 0).all() and (dy[empty_cols] == 0).all()
    assert_grads_close((dx, dy, ds), reference_grad(x, y, s, mask, **terms), torch.float32)

    terms = terms_for(n, m, (rows, cols), generator, "row col positives")  # the positives stay
    got = kernels.weighted_grad(x, y, s, **terms, need_ds=True, guide=guide)
    targets = terms["positives"][0]
    torch.testing.assert_close(got[0][empty_rows], -s * y[targets[empty_rows]])
    assert_grads_close(got, reference_grad(x, y, s, mask, **terms), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_infinite_threshold_is_no_guide(dtype, generator):
    """Nothing is left out: the unguided results, bit for bit, through every launch."""
    n, m = 33, 130
    x, y, s = features(n, m, generator, dtype)
    gx, gy, _ = make_guide(n, m, generator, dtype)
    guide = (gx, gy, torch.full((n,), torch.inf, device=DEVICE))
    for deterministic in (False, True):
        kernels = triton_backend.make(deterministic=deterministic)
        lse = kernels.lse(x, y, s, rows=True, cols=True)
        assert all(torch.equal(a, b) for a, b in zip(kernels.lse(x, y, s, rows=True, cols=True, guide=guide), lse))
    terms = terms_for(n, m, lse, generator, "row col positives")
    unguided = kernels.weighted_grad(x, y, s, **terms, need_ds=True)
    assert all(torch.equal(a, b) for a, b in zip(kernels.weighted_grad(x, y, s, **terms, need_ds=True, guide=guide),
                                                 unguided))


def test_wider_thresholds_round_toward_minus_infinity():
    """A float64 threshold reaches the kernels as fp32 with the same strict comparison against fp32 T."""
    wide = torch.tensor([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 2.0**200, -(2.0**200), torch.inf, -torch.inf],
                        dtype=torch.float64)
    got = fused.float32_threshold(wide)
    assert got.dtype == torch.float32 and got.is_contiguous()
    t = torch.tensor([1.0, torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item(),
                      torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item(),
                      torch.finfo(torch.float32).max, torch.inf, -torch.finfo(torch.float32).max])
    assert torch.equal(t[None, :] > got[:, None], t.double()[None, :] > wide[:, None])
    strided = torch.arange(6.0)[::2]
    assert torch.equal(fused.float32_threshold(strided), strided) and fused.float32_threshold(strided).is_contiguous()


def test_capability_and_errors():
    """Only a family made with the guide capability lists it and takes it; the Triton one does, the
    CUDA C++ one (made without it) refuses it with a clear error (dispatch hands such a loss over first)."""
    assert "guide" in triton_backend.make().functions
    without = fused.FusedKernels("cuda", lambda *a, **k: None, lambda *a, **k: None)
    assert "guide" not in without.functions
    x = torch.zeros(3, 4)
    guide = (torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="the cuda kernels take no guide mask"):
        without.lse(x, x, torch.tensor(1.0), guide=guide)
    with pytest.raises(ValueError, match="the cuda kernels take no guide mask"):
        without.weighted_grad(x, x, torch.tensor(1.0), a=torch.ones(3), o=torch.zeros(3), guide=guide)
    with pytest.raises(ValueError, match="guide features of the similarity's dtype"):
        triton_backend.make().lse(x, x, torch.tensor(1.0), guide=(guide[0].half(), guide[1].half(), guide[2]))


def test_autotuning_keys_and_fake_shapes():
    """The guide's flags and width tune apart; the fake implementations take the new arguments."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashcl.triton_kernels import lse_forward, weighted_products

    flags = {"HAS_GUIDE", "THRESHOLD_BY_ROW", "guide_dim"}
    assert flags <= set(lse_forward._lse_forward_tuned.keys)
    assert flags <= set(weighted_products._weighted_products_tuned.keys)
    with FakeTensorMode():
        x, y, s = torch.empty(10, 8), torch.empty(7, 8), torch.empty(())
        gx, gy, threshold = torch.empty(10, 3), torch.empty(7, 3), torch.empty(10)
        rows, cols = torch.ops.flashcl.triton_lse_forward(x, y, s, False, True, guide_a=gx, guide_b=gy,
                                                          threshold=threshold)
        assert (rows.shape, cols.shape) == ((10,), (7,))
        out = torch.ops.flashcl.triton_weighted_products(y, x, s, None, None, None, None, None, None, 0, False, 2, 7,
                                                         guide_a=gy, guide_b=gx, threshold=threshold,
                                                         threshold_by_row=False)
        assert out.shape == (5, 8)
