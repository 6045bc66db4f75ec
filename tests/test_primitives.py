"""The primitives of docs/design.md, on every backend available here, against the materialized reference."""
import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, TOLERANCE, assert_close, backend_cases, backend_params, unit_rows
from flashcl.backends.torch_tiles import MIN_BLOCK, TILE_BUFFERS, Tiling, choose_tiles
from flashcl.primitives import resolve_backend

BACKENDS = backend_params()
SHAPES = [(1, 1, 1), (1, 9, 5), (7, 7, 3), (33, 130, 48), (130, 33, 100), (200, 200, 17)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TILINGS = [dict(), dict(block_rows=16, block_cols=16), dict(block_rows=7, block_cols=50)]
CASES = backend_cases(DTYPES, TILINGS)
FP32_CASES = backend_cases([torch.float32], TILINGS)


def inputs(n, m, d, dtype, generator, scale=10.0):
    x = unit_rows(n, d, generator, dtype)
    y = unit_rows(m, d, generator, dtype)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    return x, y, torch.tensor(scale, dtype=stats, device=DEVICE)


@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("backend,dtype,tiles", CASES)
def test_lse(backend, n, m, d, dtype, tiles, generator):
    for scale in (1.0, 100.0):
        x, y, s = inputs(n, m, d, dtype, generator, scale)
        with flashcl.tiling(**tiles):
            impl = resolve_backend(backend, x)
        ref_rows, ref_cols = reference.lse(x.double(), y.double(), s.double())
        rows, cols = impl.lse(x, y, s, rows=True, cols=True, exclude_diagonal=False)
        assert rows.dtype == cols.dtype == s.dtype
        assert_close(rows, ref_rows, dtype, "row lse", magnitude=scale)
        assert_close(cols, ref_cols, dtype, "col lse", magnitude=scale)
        only_rows, none_cols = impl.lse(x, y, s, rows=True, cols=False, exclude_diagonal=False)
        none_rows, only_cols = impl.lse(x, y, s, rows=False, cols=True, exclude_diagonal=False)
        assert none_cols is None and none_rows is None
        # Same numbers whether the directions are computed together or apart.
        assert_close(only_rows, ref_rows, dtype, "row lse alone", magnitude=scale)
        assert_close(only_cols, ref_cols, dtype, "col lse alone", magnitude=scale)


@pytest.mark.parametrize("n,m,d", [(2, 2, 3), (33, 33, 48), (130, 130, 7), (20, 75, 9), (75, 20, 9)])
@pytest.mark.parametrize("backend,dtype,tiles", FP32_CASES)
def test_lse_excluding_diagonal(backend, dtype, n, m, d, tiles, generator):
    """Square (NT-Xent) and rectangular: a distributed rank's anchors against every rank's candidates,
    its own first, leave out the entries (i, i), i < min(N, M)."""
    x, y, s = inputs(n, m, d, torch.float32, generator)
    if n == m:
        y = x
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x)
    ref_rows, ref_cols = reference.lse(x.double(), y.double(), s.double(), exclude_diagonal=True)
    rows, cols = impl.lse(x, y, s, rows=True, cols=True, exclude_diagonal=True)
    assert_close(rows, ref_rows, torch.float32, "row lse", magnitude=10.0)
    assert_close(cols, ref_cols, torch.float32, "col lse", magnitude=10.0)


def grad_inputs(n, m, dtype, x, y, s, generator, exclude_diagonal=False):
    """Signed weights and offsets that keep exponents bounded, as the losses and the gamma loss pass them."""
    rows, cols = reference.lse(x.double(), y.double(), s.double(), exclude_diagonal)
    stats = s.dtype
    a = torch.randn(n, generator=generator, dtype=torch.float64, device=DEVICE).to(stats)
    b = torch.randn(m, generator=generator, dtype=torch.float64, device=DEVICE).to(stats)
    # A gamma-weight offset log M - log u_i sits within a few units of the LSE.
    o = (rows + torch.rand(n, generator=generator, dtype=torch.float64, device=DEVICE) * 3).to(stats)
    p = (cols - torch.rand(m, generator=generator, dtype=torch.float64, device=DEVICE)).to(stats)
    targets = torch.randint(0, m, (n,), generator=generator, device=DEVICE)
    c = torch.randn(n, generator=generator, dtype=torch.float64, device=DEVICE).to(stats)
    return a, o, b, p, (targets, c)


@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("backend,dtype,tiles", CASES)
def test_exp_weighted_grad(backend, n, m, d, dtype, tiles, generator):
    x, y, s = inputs(n, m, d, dtype, generator)
    a, o, b, p, positives = grad_inputs(n, m, dtype, x, y, s, generator)
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x)
    for terms in (dict(a=a, o=o), dict(b=b, p=p), dict(a=a, o=o, b=b, p=p, positives=positives),
                  dict(positives=positives)):
        ref = reference.weighted_grad(x, y, s, **terms)
        dx, dy, ds = impl.weighted_grad(x, y, s, **terms, exclude_diagonal=False,
                                            need_dx=True, need_dy=True, need_ds=True)
        assert dx.dtype == x.dtype and dy.dtype == y.dtype and ds.dtype == s.dtype
        # Offsets sit up to 3 below the LSE, so the weights may reach e^3 times |a|.
        bound = 2 * 20 * float(s) * (a.abs().max() + b.abs().max() + positives[1].abs().max()).item()
        assert_close(dx, ref[0], dtype, f"dx {sorted(terms)}", magnitude=bound)
        assert_close(dy, ref[1], dtype, f"dy {sorted(terms)}", magnitude=bound)
        assert_close(ds, ref[2], dtype, f"ds {sorted(terms)}", magnitude=bound * max(n, m) / float(s))


@pytest.mark.parametrize("n,m", [(70, 70), (40, 90), (90, 40)])
@pytest.mark.parametrize("backend,dtype,tiles", FP32_CASES)
def test_exp_weighted_grad_excluding_diagonal(backend, dtype, n, m, tiles, generator):
    d = 12
    x, y, s = inputs(n, m, d, torch.float32, generator)
    if n == m:
        y = x
    a, o, b, p, positives = grad_inputs(n, m, torch.float32, x, y, s, generator, exclude_diagonal=True)
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x)
    ref = reference.weighted_grad(x, y, s, a=a, o=o, b=b, p=p, positives=positives, exclude_diagonal=True)
    got = impl.weighted_grad(x, y, s, a=a, o=o, b=b, p=p, positives=positives, exclude_diagonal=True,
                                 need_dx=True, need_dy=True, need_ds=True)
    for name, g, r in zip(("dx", "dy", "ds"), got, ref):
        assert_close(g, r, torch.float32, name, magnitude=1e3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exp_weighted_grad_skips_what_is_not_needed(backend, generator):
    x, y, s = inputs(20, 30, 8, torch.float32, generator)
    a, o, *_ = grad_inputs(20, 30, torch.float32, x, y, s, generator)
    impl = resolve_backend(backend, x)
    full = impl.weighted_grad(x, y, s, a=a, o=o, need_dx=True, need_dy=True, need_ds=True)
    for need in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        got = impl.weighted_grad(x, y, s, a=a, o=o, need_dx=need[0], need_dy=need[1], need_ds=need[2])
        for wanted, g, f in zip(need, got, full):
            assert (g is None) != wanted
            if wanted:
                torch.testing.assert_close(g, f)


@pytest.mark.parametrize("n,m,d", [(10, 10, 4), (16384, 16384, 256), (128, 10**6, 768), (10**6, 7, 3000)])
@pytest.mark.parametrize("budget", [2**16, 2**22, 2**26])
def test_choose_tiles_fits_the_budget(n, m, d, budget):
    rows, cols = choose_tiles(n, m, d, 4, Tiling(memory_budget=budget))
    assert 1 <= rows <= n and 1 <= cols <= m
    live = 4 * (TILE_BUFFERS * rows * cols + (rows + cols) * d)
    at_floor = rows <= MIN_BLOCK and cols <= MIN_BLOCK
    assert live <= budget or at_floor
    # Largest such tile: doubling the shorter free side would not fit.
    if rows < n and cols < m and not at_floor:
        assert 4 * (TILE_BUFFERS * rows * 2 * cols + (rows + 2 * cols) * d) > budget or \
               4 * (TILE_BUFFERS * 2 * rows * cols + (2 * rows + cols) * d) > budget


def test_choose_tiles_keeps_forced_sides():
    assert choose_tiles(1000, 1000, 64, 4, Tiling(block_rows=10)) == (10, 1000)
    assert choose_tiles(1000, 1000, 64, 4, Tiling(block_rows=10, block_cols=3000)) == (10, 1000)
    rows, cols = choose_tiles(10**5, 10**5, 64, 4, Tiling(block_cols=500))
    assert cols == 500 and rows < 10**5


def test_tiling_scope_is_captured_by_forward(generator):
    """backward() outside the `with` block still uses the tiles forward ran with."""
    x, y, _ = inputs(64, 64, 8, torch.float32, generator)
    x.requires_grad_()
    with flashcl.tiling(block_rows=16, block_cols=16):
        loss = flashcl.clip_loss(x, y, 5.0)
    assert loss.grad_fn.plan.backend.tiles == Tiling(16, 16)
    loss.backward()


@pytest.mark.parametrize("backend,dtype,tiles", backend_cases([torch.float32, torch.float16, torch.bfloat16]))
def test_lse_of_columns_far_below_zero(backend, dtype, tiles, generator):
    """Every logit of some columns lies near -145. A running column max that starts at 0 instead
    of -inf sums their exponentials to 0 in fp32: column LSE -inf, then NaN gradients."""
    n, m, d, scale = 70, 40, 16, 150.0
    direction = unit_rows(1, d, generator, torch.float64)
    x = unit_rows(n, d, generator, like=direction.expand(n, d), noise=0.05)
    y = unit_rows(m, d, generator)
    far = torch.arange(0, m, 3, device=DEVICE)
    y[far] = unit_rows(len(far), d, generator, like=-direction.expand(len(far), d), noise=0.05)
    x, y, s = x.to(dtype), y.to(dtype), torch.tensor(scale, device=DEVICE)
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x)
    ref_rows, ref_cols = reference.lse(x.double(), y.double(), s.double())
    assert ref_cols[far].max() < -130
    for deterministic_order in (False, True):  # merged in one pass, and as the rows of S.T
        if deterministic_order and not hasattr(impl, "deterministic"):
            continue
        if deterministic_order:
            impl.deterministic = True
        rows, cols = impl.lse(x, y, s, rows=True, cols=True, exclude_diagonal=False)
        assert torch.isfinite(cols).all(), cols
        assert_close(rows, ref_rows, dtype, "row lse", magnitude=scale)
        assert_close(cols, ref_cols, dtype, "col lse", magnitude=scale)
    image = x.clone().requires_grad_()
    loss = flashcl.infonce_loss(y, image, s, backend=backend)  # the far columns as queries' keys
    loss.backward()
    assert torch.isfinite(image.grad).all()


def assert_rows_close(actual, expected, magnitudes, dtype, what):
    """Each row within the dtype's tolerance of its own magnitude: a row of small weights must
    keep its precision, not vanish below the error of the largest row."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    error = (actual.double() - expected).abs().amax(dim=1)
    allowed = TOLERANCE[dtype] * magnitudes
    bad = (error > allowed).nonzero().flatten()
    assert not len(bad), f"{what}: rows {bad.tolist()[:8]} off by {error[bad][:8].tolist()}, allowed {allowed[bad][:8].tolist()}"


@pytest.mark.parametrize("backend,dtype,tiles", backend_cases([torch.float32, torch.float16, torch.bfloat16]))
def test_exp_weighted_grad_with_unbounded_weights(backend, dtype, tiles, generator):
    """Gamma weights u multiply exp(S - LSE) by u (offsets log K - log u), so G is not bounded by the
    weights: here rows of G reach 1e6 times the largest weight, and rows differ by 1e6 in size.
    Half-precision products must neither overflow nor flush the small rows to 0."""
    n, m, d = 50, 70, 24
    x, y, s = inputs(n, m, d, dtype, generator, scale=10.0)
    rows, cols = reference.lse(x.double(), y.double(), s.double())
    uniform = lambda count, low, high: low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64,
                                                                         device=DEVICE)
    row_size = torch.exp(uniform(n, -9, 7))  # a_i u_i: each row's magnitude, 1e-4 to 1e3
    a = 1e-6 * torch.exp(uniform(n, -3, 3)) * torch.where(torch.rand(n, generator=generator, device=DEVICE) < 0.5, -1, 1)
    o = rows - torch.log(row_size / a.abs())  # the offset log K - log u of a weight u = row_size / |a|
    b = 1e-3 * torch.randn(m, generator=generator, dtype=torch.float64, device=DEVICE)
    targets = torch.randint(0, m, (n,), generator=generator, device=DEVICE)
    c = -a * uniform(n, 0, 2)  # as the losses pass them: the positive's coefficient on the weights' scale
    terms = dict(a=a.float(), o=o.float(), b=b.float(), p=cols.float(), positives=(targets, c.float()))
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x)
    dx, dy, ds = impl.weighted_grad(x, y, s, **terms, need_dx=True, need_dy=True, need_ds=True)
    g = reference.weights(x, y, s, **terms).abs()
    ref = reference.weighted_grad(x, y, s, **terms)
    assert g.amax(1).max() > 1e6 * a.abs().max() and g.amax(1).max() > 1e6 * g.amax(1).min()
    assert_rows_close(dx, ref[0], float(s) * g.sum(1), dtype, "dx")
    assert_rows_close(dy, ref[1], float(s) * g.sum(0), dtype, "dy")
    assert_close(ds, ref[2], dtype, "ds", magnitude=g.sum().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_of_an_infinite_logit_is_nan_as_in_softmax(backend, generator):
    """Found by tests/test_reliability.py: the torch backend's torch.logsumexp turned a row with a +inf
    logit into LSE +inf (and the loss into +inf, other rows' gradients finite) where PyTorch's
    cross-entropy, like the kernels, gives NaN (softmax's inf - inf). Non-finite input must be
    non-finite exactly where the textbook loss is."""
    x, y, s = inputs(6, 5, 4, torch.float32, generator)
    x[2, 1] = float("inf")
    rows, cols = resolve_backend(backend, x).lse(x, y, s, rows=True, cols=True, exclude_diagonal=False)
    want_rows, want_cols = reference.lse(x.double(), y.double(), s.double())  # torch.logsumexp: inf there
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
    assert_close(rows[[0, 1, 3, 4, 5]], want_rows[[0, 1, 3, 4, 5]], torch.float32, "other rows", magnitude=10.0)
    assert torch.equal(torch.isfinite(cols), torch.isfinite(want_cols))  # columns the infinity reaches


# -- the sigmoid family: primitive 2 with f = sigmoid, and primitive 1' ----------------------------------------

SIGMOID_CASES = backend_cases([torch.float64, torch.float32, torch.float16, torch.bfloat16], TILINGS[:2])


def sigmoid_inputs(n, m, dtype, x, y, s, generator, bias):
    """Signed weights of both terms and offsets near -bias (where SigLIP puts them), and signed positives."""
    stats = s.dtype
    a = torch.randn(n, generator=generator, dtype=torch.float64, device=DEVICE).to(stats)
    b = torch.randn(m, generator=generator, dtype=torch.float64, device=DEVICE).to(stats)
    o = (-bias + torch.randn(n, generator=generator, dtype=torch.float64, device=DEVICE)).to(stats)
    p = (-bias + torch.randn(m, generator=generator, dtype=torch.float64, device=DEVICE)).to(stats)
    targets = torch.randint(0, m, (n,), generator=generator, device=DEVICE)
    c = torch.randn(n, generator=generator, dtype=torch.float64, device=DEVICE).to(stats)
    return a, o, b, p, (targets, c)


@pytest.mark.parametrize("n,m,d,exclude", [(1, 1, 1, False), (7, 7, 3, True), (33, 70, 48, False), (70, 33, 17, True),
                                           (40, 90, 12, True)])
@pytest.mark.parametrize("backend,dtype,tiles", SIGMOID_CASES)
def test_sigmoid_weighted_grad(backend, dtype, tiles, n, m, d, exclude, generator):
    """G = a_i sigmoid(S - o_i) + b_j sigmoid(S - p_j) + positives: row and column terms, with and without
    the diagonal (i, i), i < min(N, M), against the materialized float64 G."""
    x, y, s = inputs(n, m, d, dtype, generator)
    a, o, b, p, positives = sigmoid_inputs(n, m, dtype, x, y, s, generator, bias=-4.0)
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x, "sigmoid")
    for terms in (dict(a=a, o=o), dict(b=b, p=p), dict(a=a, o=o, b=b, p=p, positives=positives)):
        ref = reference.weighted_grad(x, y, s, **terms, exclude_diagonal=exclude, function="sigmoid")
        got = impl.weighted_grad(x, y, s, **terms, exclude_diagonal=exclude, need_dx=True, need_dy=True,
                                 need_ds=True, function="sigmoid")
        assert got[0].dtype == x.dtype and got[1].dtype == y.dtype and got[2].dtype == s.dtype
        # sigmoid <= 1: a row of G sums at most m |a| + |b| terms, a column n of them.
        size = (a.abs().max() + b.abs().max() + positives[1].abs().max()).item()
        for name, g, r, count in (("dx", got[0], ref[0], m), ("dy", got[1], ref[1], n), ("ds", got[2], ref[2], n * m)):
            assert_close(g, r, dtype, f"{name} {sorted(terms)}", magnitude=2 * float(s) * size * count / (
                float(s) if name == "ds" else 1))


@pytest.mark.parametrize("n,m,d,exclude", [(1, 1, 1, False), (7, 7, 3, True), (33, 70, 48, True), (70, 33, 17, True),
                                           (50, 50, 9, False)])
@pytest.mark.parametrize("backend,dtype,tiles", SIGMOID_CASES)
def test_softplus_sums(backend, dtype, tiles, n, m, d, exclude, generator):
    """Primitive 1': the row sums of softplus(S + bias) and sigmoid(S + bias), with and without the
    diagonal, square and rectangular, against the materialized float64 sums."""
    x, y, s = inputs(n, m, d, dtype, generator)
    with flashcl.tiling(**tiles):
        impl = resolve_backend(backend, x, "sigmoid")
    for bias in (-10.0, 0.0, 3.0):
        want_softplus, want_sigmoid = reference.softplus_sums(x, y, s, bias, exclude)
        got_softplus, got_sigmoid = impl.softplus_sums(x, y, s, torch.tensor(bias, dtype=s.dtype, device=DEVICE),
                                                       exclude_diagonal=exclude)
        assert got_softplus.dtype == got_sigmoid.dtype == s.dtype
        # Each of the m terms is at most |S| + |bias| + log 2 (softplus) or 1 (sigmoid).
        assert_close(got_softplus, want_softplus, dtype, f"softplus sums, bias {bias}",
                     magnitude=m * (float(s) + abs(bias) + 1))
        assert_close(got_sigmoid, want_sigmoid, dtype, f"sigmoid sums, bias {bias}", magnitude=m)
