"""The gamma-weighted loss (NeurIPS 2022): its gradient, its unbiasedness, its sampler, its state, and LibAUC."""
import math

import pytest
import torch

import flashcl
from conftest import DEVICE, assert_close, assert_norm_close, backend_cases, require_peer, unit_rows
from flashcl.gamma import GammaContrastiveLoss, ema_log, sample_log_weights


def reference_gamma(a, b, scale, log_u_a, log_u_b=None, exclude_positive=False):
    """-S_ii + u_i mean_j exp(S_ij), materialized (and its column twin when log_u_b is given)."""
    s = scale * a @ b.T
    n, m = s.shape
    keep = ~torch.eye(n, m, dtype=torch.bool, device=s.device) if exclude_positive else torch.ones_like(s, dtype=torch.bool)

    def direction(logits, keep, log_u):
        z = (torch.exp(logits) * keep).sum(1) / keep.sum(1)
        return torch.exp(log_u) * z - logits.diagonal()

    loss = direction(s, keep, log_u_a)
    if log_u_b is not None:
        loss = 0.5 * (loss + direction(s.T, keep.T, log_u_b))
    return loss.mean()


@pytest.mark.parametrize("backend,dtype,tiles", backend_cases([torch.float32, torch.float64, torch.bfloat16]))
@pytest.mark.parametrize("n,m,symmetric,exclude_positive", [(1, 5, False, False), (33, 33, True, True),
                                                            (33, 50, False, False), (40, 40, True, False),
                                                            (40, 40, False, True)])
def test_gradient_matches_materialized(backend, dtype, tiles, n, m, symmetric, exclude_positive, generator):
    a = unit_rows(n, 16, generator)
    b = unit_rows(m, 16, generator)
    b[:n] = unit_rows(n, 16, generator, like=a)
    log_u_a = torch.randn(n, generator=generator, device=DEVICE) - 2
    log_u_b = torch.randn(m, generator=generator, device=DEVICE) - 2 if symmetric else None
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    scale = torch.tensor(10.0, device=DEVICE, dtype=torch.promote_types(dtype, torch.float32), requires_grad=True)
    with flashcl.tiling(**tiles):
        out = flashcl.gamma_weighted_loss(a, b, scale, log_u_a, log_u_b, exclude_positive=exclude_positive,
                                          backend=backend)
    grads = torch.autograd.grad(out.loss, (a, b, scale))
    ref_inputs = [t.detach().double().requires_grad_() for t in (a, b, scale)]
    ref = reference_gamma(*ref_inputs, log_u_a.double(), None if log_u_b is None else log_u_b.double(),
                          exclude_positive)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    # Weights up to e^1 and logits up to the scale: terms of size ~ e * e^10 * scale before they cancel.
    assert_close(out.loss, ref, dtype, "loss", magnitude=10.0)
    for name, g, r in zip(("a", "b", "scale"), grads, ref_grads):
        assert g.dtype == (dtype if name != "scale" else scale.dtype)
        assert_close(g, r, dtype, f"grad {name}")
    s = 10.0 * a.detach().double() @ b.detach().double().T
    if exclude_positive:
        s = s.masked_fill(torch.eye(n, m, dtype=torch.bool, device=s.device), -math.inf)
    assert_close(out.row_lse, s.logsumexp(1), dtype, "row lse", magnitude=10.0)
    assert (out.col_lse is None) == (not symmetric)


@pytest.mark.parametrize("backend,dtype,tiles", backend_cases([torch.float16]))
def test_large_weights_in_half_precision(backend, dtype, tiles, generator):
    """A weight u scales anchor i's softmax by u Z_i, so G outgrows the anchor weights (here by
    10^5) while the gradient itself still fits fp16: the fp16 product must not overflow."""
    n, d, scale = 256, 16, 10.0
    a = unit_rows(n, d, generator)
    b = unit_rows(n, d, generator, like=a, noise=0.3)
    log_u_a = 5 + 4 * torch.rand(n, generator=generator, device=DEVICE)
    log_u_b = -4 * torch.rand(n, generator=generator, device=DEVICE)
    with torch.no_grad():  # what G reaches relative to the anchor weight 1/(2N): u exp(S_ij) / K
        s = scale * a.double() @ b.double().T
        assert (torch.exp(log_u_a.double()[:, None] + s) / n).max() > 2 * torch.finfo(dtype).max
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    with flashcl.tiling(**tiles):
        out = flashcl.gamma_weighted_loss(a, b, scale, log_u_a, log_u_b, backend=backend)
    grads = torch.autograd.grad(out.loss, (a, b))
    ref_inputs = [t.detach().double().requires_grad_() for t in (a, b)]
    ref_grads = torch.autograd.grad(reference_gamma(*ref_inputs, scale, log_u_a.double(), log_u_b.double()),
                                    ref_inputs)
    for name, g, r in zip(("a", "b"), grads, ref_grads):
        assert torch.isfinite(g).all() and r.abs().max() < torch.finfo(dtype).max / 4
        assert_close(g, r, dtype, f"grad {name}")


def test_exact_weights_give_the_infonce_gradient(generator):
    """u_i = 1 / mean_j exp(S_ij) turns the decomposed gradient into InfoNCE's."""
    a, b = unit_rows(30, 8, generator).requires_grad_(), unit_rows(30, 8, generator).requires_grad_()
    with torch.no_grad():
        s = 5.0 * a @ b.T
        log_u_a, log_u_b = -(s.logsumexp(1) - math.log(30)), -(s.logsumexp(0) - math.log(30))
    gamma = torch.autograd.grad(flashcl.gamma_weighted_loss(a, b, 5.0, log_u_a, log_u_b).loss, (a, b))
    infonce = torch.autograd.grad(flashcl.clip_loss(a, b, 5.0), (a, b))
    assert_norm_close(gamma, infonce, 1e-5, "gradients")


@pytest.mark.slow
def test_unbiased_where_infonce_is_biased():
    """The paper's claim, as a statistic. Over many batches of 4 from 64 fixed pairs, with u set from the
    exact all-negatives denominators, the mean gamma-weighted minibatch gradient equals the full-dataset
    gradient within its Monte-Carlo error; the ordinary minibatch InfoNCE gradient is far from it."""
    g = torch.Generator().manual_seed(7)
    n, d, batch, draws, scale = 64, 6, 4, 2000, 4.0
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(a + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)

    def full_loss(a, b):  # all negatives, negatives only: mean_i [-S_ii + log mean_{j != i} exp(S_ij)]
        s = scale * a @ b.T
        return (s.masked_fill(~off_diagonal, -math.inf).logsumexp(1) - math.log(n - 1) - s.diagonal()).mean()

    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    truth = torch.cat([t.flatten() for t in torch.autograd.grad(full_loss(*leaves), leaves)])
    with torch.no_grad():
        s = scale * a @ b.T
        log_z = s.masked_fill(~off_diagonal, -math.inf).logsumexp(1) - math.log(n - 1)

    def batch_gradient(rows, loss_fn):
        xa, xb = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
        ga, gb = torch.autograd.grad(loss_fn(xa, xb, rows), (xa, xb))
        full_a, full_b = torch.zeros_like(a), torch.zeros_like(b)
        full_a[rows], full_b[rows] = ga, gb
        return torch.cat([full_a.flatten(), full_b.flatten()])

    estimators = {
        "gamma a=inf": lambda xa, xb, rows: flashcl.gamma_weighted_loss(
            xa, xb, scale, sample_log_weights(log_z[rows], math.inf), exclude_positive=True).loss,
        "gamma a=1": lambda xa, xb, rows: flashcl.gamma_weighted_loss(
            xa, xb, scale, sample_log_weights(log_z[rows], 1.0, g), exclude_positive=True).loss,
        "infonce": lambda xa, xb, rows: flashcl.gamma_weighted_loss(  # u = 1 / (the batch's own estimate)
            xa, xb, scale, -(flashcl.gamma_weighted_loss(xa, xb, scale, torch.zeros(batch, dtype=torch.float64),
                                                         exclude_positive=True).row_lse.detach()
                             - math.log(batch - 1)), exclude_positive=True).loss,
    }
    chi2_per_coordinate = {}
    for name, loss_fn in estimators.items():
        samples = torch.stack([batch_gradient(torch.randperm(n, generator=g)[:batch], loss_fn) for _ in range(draws)])
        mean, stderr = samples.mean(0), samples.std(0) / math.sqrt(draws)
        chi2_per_coordinate[name] = (((mean - truth) / stderr) ** 2).mean().item()
    # Unbiased: each coordinate's z-score is ~N(0, 1), so over 2 * 64 * 6 = 768 coordinates the mean
    # square is 1 +- ~0.05 (more with correlated coordinates). Measured with these seeds: 1.09
    # (a = inf), 1.18 (a = 1) and 9.8 for minibatch InfoNCE, whose bias grows with `draws`.
    assert chi2_per_coordinate["gamma a=inf"] < 1.5, chi2_per_coordinate
    assert chi2_per_coordinate["gamma a=1"] < 1.5, chi2_per_coordinate
    assert chi2_per_coordinate["infonce"] > 3, chi2_per_coordinate


def test_exact_ratio_weights_are_the_minibatch_infonce():
    """The 'infonce' estimator above is what it claims: weights from the batch's own denominators
    give the gradient of the ordinary (negatives-only) minibatch InfoNCE."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a.requires_grad_()
    s = 2.0 * a @ b.T
    lse = s.masked_fill(torch.eye(5, dtype=torch.bool), -math.inf).logsumexp(1).detach()
    gamma = torch.autograd.grad(flashcl.gamma_weighted_loss(a, b, 2.0, -(lse - math.log(4)),
                                                            exclude_positive=True).loss, a)[0]
    dcl = (s.masked_fill(torch.eye(5, dtype=torch.bool), -math.inf).logsumexp(1) - s.diagonal()).mean()
    torch.testing.assert_close(gamma, torch.autograd.grad(dcl, a)[0])


@pytest.mark.parametrize("shape", [0.5, 1.0, 4.0])
def test_sampler_moments(shape):
    log_z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64).repeat_interleave(200_000)
    u = torch.exp(sample_log_weights(log_z, shape, torch.Generator().manual_seed(0))).view(3, -1)
    z = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64).exp()
    mean_error = u.std(1) / math.sqrt(u.shape[1])
    assert ((u.mean(1) - 1 / z).abs() < 5 * mean_error).all()  # E[u] = 1/Z
    torch.testing.assert_close(u.var(1), 1 / (shape * z**2), rtol=0.05, atol=0)  # Var[u] = 1/(a Z^2)


def test_sampler_point_estimate_is_exact():
    log_z = torch.tensor([-2.0, 0.5, 7.0])
    assert torch.equal(sample_log_weights(log_z, math.inf), -log_z)


def test_sampler_is_reproducible_with_a_seeded_generator():
    log_z = torch.zeros(100)
    first = sample_log_weights(log_z, 1.0, torch.Generator().manual_seed(5))
    second = sample_log_weights(log_z, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


def test_ema_log_arithmetic():
    old, new = torch.tensor([math.log(2.0)]), torch.tensor([math.log(10.0)])
    torch.testing.assert_close(ema_log(old, new, 0.25), torch.tensor([math.log(0.75 * 2 + 0.25 * 10)]))
    assert torch.equal(ema_log(old, new, 1.0), new)
    # Far apart in magnitude, still exact: no overflow in the linear domain.
    torch.testing.assert_close(ema_log(torch.tensor([1000.0]), torch.tensor([-1000.0]), 0.5),
                               torch.tensor([1000.0 + math.log(0.5)]))


# ---- the module and its state -------------------------------------------------------------------------------

def batch_estimates(a, b, scale, exclude_positive=True):
    """log of each row's and column's mean exp(S) over its denominator, materialized."""
    s = scale * a.double() @ b.double().T
    if exclude_positive:
        s = s.masked_fill(torch.eye(*s.shape, dtype=torch.bool, device=s.device), -math.inf)
    k = s.shape[1] - (1 if exclude_positive else 0)
    return s.logsumexp(1) - math.log(k), s.logsumexp(0) - math.log(s.shape[0] - (1 if exclude_positive else 0))


def test_first_visit_then_moving_average(generator):
    loss_fn = GammaContrastiveLoss(num_samples=10, momentum=0.25)
    a1, b1 = unit_rows(4, 8, generator), unit_rows(4, 8, generator)
    a2, b2 = unit_rows(4, 8, generator), unit_rows(4, 8, generator)
    index = torch.tensor([7, 2, 5, 0])
    loss_fn(a1, b1, 3.0, index)
    first_rows, first_cols = batch_estimates(a1, b1, 3.0)
    torch.testing.assert_close(loss_fn.log_z_a[index], first_rows.float())
    torch.testing.assert_close(loss_fn.log_z_b[index], first_cols.float())
    assert loss_fn.visited_a[index].all() and loss_fn.visited_a.sum() == 4
    loss_fn(a2, b2, 3.0, index)
    second_rows, _ = batch_estimates(a2, b2, 3.0)
    want = torch.log(0.75 * first_rows.exp() + 0.25 * second_rows.exp())
    torch.testing.assert_close(loss_fn.log_z_a[index], want.float())
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert (loss_fn.log_z_a[untouched] == 0).all() and not loss_fn.visited_a[untouched].any()


def test_loss_gradient_uses_the_updated_estimate(generator):
    """Point estimate, first visit: u = 1 / (this batch's estimate), so the gradient is the
    negatives-only minibatch InfoNCE's (SogCLR's order: update, then weight)."""
    a, b = unit_rows(6, 4, generator).requires_grad_(), unit_rows(6, 4, generator).requires_grad_()
    out = GammaContrastiveLoss(num_samples=6, shape=math.inf)(a, b, 2.0, torch.arange(6), output_dict=True)
    got = torch.autograd.grad(out["loss"], (a, b))
    ra, rb = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    s = 2.0 * ra @ rb.T
    off = torch.eye(6, dtype=torch.bool)
    dcl = 0.5 * ((s.masked_fill(off, -math.inf).logsumexp(1) - s.diagonal()).mean()
                 + (s.masked_fill(off, -math.inf).logsumexp(0) - s.diagonal()).mean())
    for g, w in zip(got, torch.autograd.grad(dcl, (ra, rb))):
        assert_close(g, w, torch.float32, "grad")
    # The logged InfoNCE is the ordinary one, positive in its denominator.
    assert_close(out["infonce"], flashcl.clip_loss(a.detach().double(), b.detach().double(), 2.0), torch.float32,
                 "infonce", magnitude=2.0)
    assert out["skipped"] == 0


def test_duplicate_indices_are_averaged_deterministically(generator):
    a, b = unit_rows(5, 8, generator), unit_rows(5, 8, generator)
    index = torch.tensor([3, 1, 3, 3, 0])
    states = []
    for _ in range(2):
        loss_fn = GammaContrastiveLoss(num_samples=4, momentum=0.5)
        loss_fn(a, b, 3.0, index)
        states.append(loss_fn.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    rows, _ = batch_estimates(a, b, 3.0)
    torch.testing.assert_close(states[0]["log_z_a"][3], rows[[0, 2, 3]].exp().mean().log().float())
    torch.testing.assert_close(states[0]["log_z_a"][1], rows[1].float())


def test_state_dict_round_trip(generator):
    a, b = unit_rows(8, 8, generator), unit_rows(8, 8, generator)
    trained = GammaContrastiveLoss(num_samples=20, shape=2.0)
    trained(a, b, 3.0, torch.arange(8) * 2)
    restored = GammaContrastiveLoss(num_samples=20, shape=2.0)
    restored.load_state_dict(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    outputs = []
    for module in (trained, restored):
        module.generator = torch.Generator().manual_seed(11)
        outputs.append(module(a, b, 3.0, torch.arange(8) * 2))
    assert torch.equal(*outputs)


def test_wrong_size_state_is_refused(generator):
    small = GammaContrastiveLoss(num_samples=5)
    large = GammaContrastiveLoss(num_samples=10)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"log_z_a holds \(5,\) running estimates but this GammaContrastiveLoss "
                                           r"has num_samples=10; the state was not loaded"):
        large.load_state_dict(small.state_dict())
    assert all(torch.equal(before[k], v) for k, v in large.state_dict().items())


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_rows_leave_the_state_bit_identical(poison, generator):
    loss_fn = GammaContrastiveLoss(num_samples=6, symmetric=False)
    a, b = unit_rows(3, 4, generator), unit_rows(3, 4, generator)
    loss_fn(a, b, 3.0, torch.tensor([0, 1, 2]))
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    poisoned = a.clone()
    poisoned[1, 0] = poison
    other_b = unit_rows(3, 4, generator)  # new negatives, so the healthy rows' estimates move
    other_b[:, 0] = other_b[:, 0].abs() + 0.1  # with an inf feature, row 1's logits are all +inf: LSE +inf
    with pytest.warns(RuntimeWarning, match="1 rows had non-finite statistics"):
        out = loss_fn(poisoned, other_b, 3.0, torch.tensor([0, 1, 5]), output_dict=True)
    assert out["skipped"] == 1
    after = loss_fn.state_dict()
    assert torch.equal(after["log_z_a"][1], before["log_z_a"][1])  # the poisoned row: untouched
    assert after["visited_a"][5] and not torch.equal(after["log_z_a"][0], before["log_z_a"][0])  # the others: updated


def test_a_fully_non_finite_batch_writes_nothing(generator):
    loss_fn = GammaContrastiveLoss(num_samples=6)
    loss_fn(unit_rows(3, 4, generator), unit_rows(3, 4, generator), 3.0, torch.tensor([0, 1, 2]))
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loss_fn(torch.full((3, 4), float("inf")), unit_rows(3, 4, generator), 3.0, torch.tensor([0, 1, 2]))
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())


@pytest.mark.parametrize("index,error,message", [
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"index must be an integer tensor \(e.g. torch.long\), got torch.float32"),
    ([0, 1, 2], TypeError, r"index must be an integer tensor .* got list"),
    (torch.tensor([0, 1]), ValueError, r"index must have shape \(3,\) \(one dataset index per row\), got \(2,\)"),
    (torch.tensor([0, 1, 6]), ValueError, r"index must lie in \[0, 5\] \(num_samples=6\), got values in \[0, 6\]"),
    (torch.tensor([-1, 1, 2]), ValueError, r"index must lie in \[0, 5\] .* got values in \[-1, 2\]"),
])
def test_bad_index_is_an_error_before_any_update(index, error, message, generator):
    loss_fn = GammaContrastiveLoss(num_samples=6)
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    with pytest.raises(error, match=message):
        loss_fn(unit_rows(3, 4, generator), unit_rows(3, 4, generator), 3.0, index)
    assert all(torch.equal(before[k], v) for k, v in loss_fn.state_dict().items())


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_samples=0), r"num_samples must be a positive int, got 0"),
    (dict(num_samples=10.0), r"num_samples must be a positive int, got 10.0"),
    (dict(num_samples=10, shape=0), r"shape must be a number > 0 or float\('inf'\), got 0"),
    (dict(num_samples=10, momentum=0.0), r"momentum must be a number in \(0, 1\], got 0.0"),
    (dict(num_samples=10, momentum=1.5), r"momentum must be a number in \(0, 1\], got 1.5"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GammaContrastiveLoss(**kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(log_weights_a=torch.zeros(3)), ValueError, r"log_weights_a must have shape \(4,\) \(one log-weight per anchor\), got \(3,\)"),
    (dict(log_weights_a=torch.zeros(4, dtype=torch.long)), TypeError, r"log_weights_a must be a floating-point tensor of shape \(4,\), got torch.int64"),
    (dict(log_weights_a=torch.tensor([0.0, float("nan"), 0, 0])), ValueError, r"log_weights_a must not hold NaN or \+inf"),
    (dict(log_weights_a=torch.zeros(4), targets=torch.tensor([0, 1, 2, 3]), exclude_positive=True), ValueError,
     r"exclude_positive=True needs pairs i <-> i"),
    (dict(log_weights_a=torch.zeros(4), log_weights_b=torch.zeros(4), targets=torch.tensor([1, 0, 2, 3])), ValueError,
     r"a symmetric loss \(log_weights_b given\) pairs row i with row i; pass targets=None"),
])
def test_bad_functional_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        flashcl.gamma_weighted_loss(torch.randn(4, 3), torch.randn(4, 3), 2.0, **kwargs)


def test_minus_infinite_log_weight_means_zero_weight(generator):
    a, b = unit_rows(4, 3, generator).requires_grad_(), unit_rows(4, 3, generator)
    log_u = torch.tensor([-math.inf, 0.0, 0.0, 0.0])
    loss = flashcl.gamma_weighted_loss(a, b, 2.0, log_u, reduction="none").loss
    grad = torch.autograd.grad(loss[0], a)[0]
    torch.testing.assert_close(grad[0], -2.0 * b[0])  # only the positive term is left
    assert torch.isfinite(loss).all()


# ---- the point-estimate mode against LibAUC's GCLoss ---------------------------------------------------------

def _libauc_and_ours(size, tau, momentum):
    import contextlib
    import io

    from libauc.losses.contrastive import GCLoss_v2

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its gamma schedule
        theirs = GCLoss_v2(N=size, tau=tau, gamma=momentum)
    return theirs, GammaContrastiveLoss(num_samples=size, shape=math.inf, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.6, 1.0])
def test_point_estimate_matches_libauc_gcloss(momentum, generator):
    """LibAUC's GCLoss_v2 (SogCLR, bimodal) with gamma = our momentum and tau = 1/scale, on a fixed dataset
    of 40 feature pairs visited in batches that are all new or all revisited. Both exclude the positive
    from the denominators, take the batch estimate on a first visit, and update before weighting; their
    running estimates agree at every step, and so do the gradients wherever the formulations coincide.

    Conventions that differ:
    1. LibAUC's loss is sum_j p_ij (S_ij - S_ii) on raw dot products, p_ij = exp((S_ij - S_ii)/tau) / u_i,
       so its gradient is (B - 1) * tau times ours.
    2. LibAUC differentiates that whole sum, so the positive's gradient is weighted by (batch estimate /
       running estimate); flashcl's positive term -S_ii stands outside the denominator with weight 1.
       The two agree when the running estimate is the batch estimate: on first visits, or momentum = 1.
    3. LibAUC stores the mean of exp((S_ij - S_ii)/tau), relative to the positive's current score;
       flashcl the mean of exp(S_ij / tau). Equal here (fixed pairs keep their scores between visits).
    4. LibAUC treats a batch as a first visit only when all its indices are new (a new index in a mixed
       batch gets momentum * its estimate); flashcl decides index by index.
    """
    require_peer("libauc")
    size, d, tau = 40, 8, 0.2
    data_a = unit_rows(size, d, generator)
    data_b = unit_rows(size, d, generator, like=data_a)
    theirs, ours = _libauc_and_ours(size, tau, momentum)
    batches = [torch.arange(0, 16), torch.arange(16, 32), torch.cat([torch.arange(0, 8), torch.arange(16, 24)])]
    for step, index in enumerate(batches):
        grads = []
        for loss_fn in (lambda x, y: theirs(x, y, index)[0], lambda x, y: ours(x, y, 1 / tau, index)):
            x, y = data_a[index].clone().requires_grad_(), data_b[index].clone().requires_grad_()
            grads.append(torch.autograd.grad(loss_fn(x, y), (x, y)))
        positive = (data_a[index] * data_b[index]).sum(1) / tau
        for u, b, log_z in ((theirs.u1, theirs.b1, ours.log_z_a), (theirs.u2, theirs.b2, ours.log_z_b)):
            theirs_log_z = u[index].squeeze(1).log() + b[index].squeeze(1) + positive
            torch.testing.assert_close(theirs_log_z, log_z[index], rtol=0, atol=1e-5)
        first_visit = step < 2
        if first_visit or momentum == 1.0:
            for theirs_grad, ours_grad in zip(*grads):
                assert_close(theirs_grad, (len(index) - 1) * tau * ours_grad, torch.float32, f"step {step}")


def test_the_sampler_with_a_generator_is_the_only_graph_break(generator):
    """Without a generator the E-step samples from torch's global generator and the whole training step
    compiles with fullgraph=True; with one (Dynamo cannot trace a torch.Generator) the sampler is the
    one graph break, and the compiled step still computes the same loss as the eager one."""
    a, b = unit_rows(12, 4, generator).requires_grad_(), unit_rows(12, 4, generator).requires_grad_()
    index = torch.arange(12, device=DEVICE)
    torch._dynamo.reset()
    module = GammaContrastiveLoss(20, shape=2.0)
    torch.compile(lambda a, b: module(a, b, 3.0, index), backend="aot_eager", fullgraph=True)(a, b).backward()
    seeded = GammaContrastiveLoss(20, shape=2.0, generator=torch.Generator(DEVICE).manual_seed(4))
    explanation = torch._dynamo.explain(lambda a, b: seeded(a, b, 3.0, index))(a, b)
    # One reason (Dynamo splits every enclosing frame at it, so it counts several breaks).
    reasons = explanation.break_reasons
    assert len(reasons) == 1, [r.reason for r in reasons]
    assert reasons[0].user_stack[-1].name == "sample_log_weights" and "proxy" in reasons[0].reason
    torch._dynamo.reset()
    eager, compiled = (GammaContrastiveLoss(20, shape=2.0, generator=torch.Generator(DEVICE).manual_seed(4))
                       for _ in range(2))
    want = eager(a, b, 3.0, index)
    got = torch.compile(lambda a, b: compiled(a, b, 3.0, index), backend="aot_eager")(a, b)
    torch.testing.assert_close(got, want)
