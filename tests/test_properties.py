"""Property-based tests: every public loss (tests/registry.py) on shapes, dtypes, scales, reductions,
targets and layouts nobody chose, against the float64 materialized reference.

CI runs the "ci" profile (conftest.py: a fixed derandomized set of examples per test); run
`pytest tests/test_properties.py --hypothesis-profile=long` locally for 500 examples per test.
"""
import math
from types import SimpleNamespace

import pytest
import torch

import reference
from conftest import DEVICE, TOLERANCE, backend_params
from registry import REGISTRY, ids

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


class Draw:
    """What one example drew: sizes, dtype, scale, layouts; tensors come from a seeded generator."""

    def __init__(self, data, backend, max_rows=300, max_dim=300):
        self.data, self.backend = data, backend
        self.dtype = data.draw(st.sampled_from([d for d in DTYPES if backend == "torch" or d != torch.float64]))
        self.scale = 10 ** data.draw(st.floats(-3, 3))
        self.generator = torch.Generator(DEVICE).manual_seed(data.draw(st.integers(0, 2**31 - 1)))
        self.max_rows, self.max_dim = max_rows, max_dim
        self.dim = data.draw(st.integers(1, max_dim))

    def rows(self, low=1):
        return self.data.draw(st.integers(low, self.max_rows))

    def features(self, rows):
        """Rows of norm 0.5 to 2 in a drawn memory layout (expanded: every row the same)."""
        layout = self.data.draw(st.sampled_from(LAYOUTS))
        g, d = self.generator, self.dim
        base = torch.randn(rows, 2 * d if layout == "sliced" else d, generator=g, dtype=torch.float64, device=DEVICE)
        if layout == "sliced":
            base = base[:, ::2]
        if layout == "expanded":
            base = base[:1].expand(rows, d)
        norms = 0.5 + 1.5 * torch.rand(rows if layout != "expanded" else 1, 1, generator=g, dtype=torch.float64,
                                       device=DEVICE)
        unit = base / base.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x = (unit * norms).to(self.dtype)
        if layout == "transposed":
            x = x.T.contiguous().T
        elif layout == "expanded":
            x = x[:1].expand(rows, d)
        return x

    def integers(self, low, high, count):
        return torch.randint(low, high, (count,), generator=self.generator, device=DEVICE)

    def reduction(self, entry):
        """One of the entry's reductions, or None for a loss without the option (its "mean")."""
        return self.data.draw(st.sampled_from(entry.reductions)) if entry.reductions else None

    def options(self, entry, reduction, **more):
        """The call's options: the backend and the reduction where the loss takes them."""
        options = dict(more)
        if entry.takes_backend:
            options["backend"] = self.backend
        if reduction is not None:
            options["reduction"] = reduction
        return options


def compare(draw, case, what):
    """Loss and the gradients of the features and of the scale against the float64 reference.

    Tolerances are the dtype's, relative to the size of the terms that cancel (conftest's
    assert_close semantics), which each case bounds from its drawn norms and scale: `loss` for a
    per-anchor loss term, `grad` and `scale_grad` per unit of anchor weight; the anchors' weights
    (1/N for "mean", 1 for "sum", the upstream gradient for "none") sum to W."""
    features, reduction = case["features"], case["reduction"] or "mean"
    leaves = [f.detach().requires_grad_() for f in features]
    scale = torch.tensor(draw.scale, dtype=torch.promote_types(draw.dtype, torch.float32), device=DEVICE,
                         requires_grad=True)
    loss = case["call"](leaves, scale)
    upstream = torch.randn(loss.shape, generator=draw.generator, dtype=loss.dtype, device=DEVICE)
    grads = torch.autograd.grad(loss, [*leaves, scale], upstream, allow_unused=True)
    ref_leaves = [f.detach().double().requires_grad_() for f in features]
    ref_scale = scale.detach().double().requires_grad_()
    want = case["ref"](ref_leaves, ref_scale)
    want_grads = torch.autograd.grad(want, [*ref_leaves, ref_scale], upstream.double(), allow_unused=True)
    tol = max(TOLERANCE[draw.dtype], TOLERANCE[case["entry"].exact_as])
    anchors = want.numel() if reduction == "none" else case.get("anchors", features[0].shape[0])
    total_weight = upstream.abs().sum().item() if reduction == "none" else \
        upstream.abs().item() * (1 if reduction == "mean" else anchors)

    def close(got, expected, size, name):
        if expected is None:
            return
        assert got is not None and got.shape == expected.shape, name
        finite, settled = torch.isfinite(expected), torch.ones_like(expected, dtype=torch.bool)
        if got.dtype in (torch.float16, torch.bfloat16):  # a gradient beyond the dtype's range is inf in it
            limit = torch.finfo(got.dtype).max
            settled = (expected.abs() - limit).abs() > tol * limit  # near the limit, rounding decides
            finite = finite & (expected.abs() < limit)
        assert torch.equal(torch.isfinite(got)[settled], finite[settled]), \
            f"{what}: {name} is finite where the reference is not, or not"
        finite = finite & settled
        error = (got.double() - expected).abs()[finite]
        allowed = tol * max(size, expected.abs()[finite].max().item() if finite.any() else 0.0, 1e-30)
        assert error.numel() == 0 or error.max().item() <= allowed, \
            f"{what}: {name} off by {error.max().item():.3g}, allowed {allowed:.3g}"

    assert loss.dtype == (torch.float64 if draw.dtype == torch.float64 else torch.float32)
    close(loss, want, case["loss"] * (anchors if reduction == "sum" else 1), "loss")
    # A gradient exponentiates logits: a logit of size |S| rounded to fp32 is off by ~|S| 6e-8, and so
    # is every exp(S - LSE) relative to itself, in any fp32 implementation. That floor (found by the
    # long profile: scale 1e3, identical rows, the scale's gradient 1.03x over the plain tolerance)
    # widens the gradients' tolerance once logits are large.
    floor = 1.0 if draw.dtype == torch.float64 else max(1.0, case["loss"] * 1e-7 / tol)
    for i, (g, w) in enumerate(zip(grads[:-1], want_grads[:-1])):
        assert g is None or g.dtype == draw.dtype
        close(g, w, case["grad"] * total_weight * floor, f"grad of input {i}")
    close(grads[-1], want_grads[-1], case["scale_grad"] * total_weight * floor, "grad of scale")


def norm(*features):
    return max(f.double().norm(dim=1).max().item() for f in features)


def contrastive_terms(draw, features, factor=1.0):
    """A logit is at most s R^2; an anchor's softmax-minus-positive weights sum to at most 2, each
    multiplying a row of norm R, as anchor and as candidate."""
    r = norm(*features)
    return dict(loss=draw.scale * r * r * factor, grad=4 * draw.scale * r * factor, scale_grad=2 * r * r * factor)


# What every case draws beyond Draw: the losses' own arguments. A case takes the registry entry it
# tests (a function or its module form) and returns the features, the call and its reference, and
# the bounds of the terms that cancel (see compare).

def infonce_case(draw, entry):
    n, m = draw.rows(), draw.rows()
    queries, keys = draw.features(n), draw.features(m)
    explicit = m < n or draw.data.draw(st.booleans())
    targets = draw.integers(0, m, n) if explicit else None  # repeated and out of order
    reduction = draw.reduction(entry)
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))
    return dict(features=[queries, keys], reduction=reduction, **contrastive_terms(draw, [queries, keys]),
                call=lambda f, s: loss_fn(*f, s, targets),
                ref=lambda f, s: reference.infonce(*f, s, targets, reduction or "mean"))


def clip_case(draw, entry):
    n = draw.rows()
    reduction, features = draw.reduction(entry), [draw.features(n), draw.features(n)]
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))
    return dict(features=features, reduction=reduction, **contrastive_terms(draw, features),
                call=lambda f, s: loss_fn(*f, s),
                ref=lambda f, s: reference.clip(*f, s, reduction or "mean"))


def nt_xent_case(draw, entry):
    n = draw.rows()
    reduction, features = draw.reduction(entry), [draw.features(n), draw.features(n)]
    if entry.is_module:  # NTXentLoss: the scale is a fixed 1 / temperature, no argument
        loss_fn = entry.loss_fn(temperature=1 / draw.scale, **draw.options(entry, reduction))
        call, ref_scale = lambda f, s: loss_fn(*f), lambda s: draw.scale
    else:
        loss_fn = entry.loss_fn(**draw.options(entry, reduction))
        call, ref_scale = lambda f, s: loss_fn(*f, s), lambda s: s
    return dict(features=features, reduction=reduction, anchors=2 * n, **contrastive_terms(draw, features, 2.0),
                call=call, ref=lambda f, s: reference.nt_xent(*f, ref_scale(s), reduction or "mean"))


def gamma_case(draw, entry):
    symmetric = draw.data.draw(st.booleans())
    exclude_positive = draw.data.draw(st.booleans())
    n = draw.rows(low=2 if exclude_positive else 1)
    m = n if symmetric or exclude_positive else draw.rows()
    a, b = draw.features(n), draw.features(m)
    targets = draw.integers(0, m, n) if not (symmetric or exclude_positive) and (m < n or draw.data.draw(
        st.booleans())) else None
    # Weights near 1 / Z (what the E-step draws), so u * mean exp(S) stays finite at any scale.
    with torch.no_grad():
        lse_rows, lse_cols = reference.lse(a.double(), b.double(), torch.tensor(draw.scale, dtype=torch.float64),
                                           exclude_positive)
    noise = lambda count: torch.randn(count, generator=draw.generator, dtype=torch.float64, device=DEVICE).clamp(-1, 1)
    log_u_a = (math.log(max(m - exclude_positive, 1)) - lse_rows + noise(n)).float()
    log_u_b = (math.log(max(n - exclude_positive, 1)) - lse_cols + noise(m)).float() if symmetric else None
    reduction = draw.reduction(entry)
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))
    # u exp(S - LSE) reaches e^1 times the softmax: weights up to e times InfoNCE's.
    return dict(features=[a, b], reduction=reduction, **contrastive_terms(draw, [a, b], math.e),
                call=lambda f, s: entry.output(loss_fn(*f, s, log_u_a, log_u_b, targets,
                                                       exclude_positive=exclude_positive)),
                ref=lambda f, s: reference.gamma_weighted(*f, s, log_u_a.double(),
                                                          None if log_u_b is None else log_u_b.double(), targets,
                                                          reduction, exclude_positive))


def gamma_module_case(draw, entry):
    """GammaContrastiveLoss's point estimate on a fresh state: the registry's reference (the decoupled
    InfoNCE's gradient, each term's value 1 - S_ii), its fp32 state within fp32's tolerance."""
    n = draw.rows(low=2)
    features = [draw.features(n), draw.features(n)]
    loss_fn = entry.loss_fn(**draw.options(entry, None))
    index = torch.randperm(entry.constructor["num_samples"], generator=torch.Generator().manual_seed(n))[:n]
    return dict(features=features, reduction=None, **contrastive_terms(draw, features),
                call=lambda f, s: loss_fn(*f, s, index.to(DEVICE)),
                ref=lambda f, s: entry.reference(SimpleNamespace(x=f[0], y=f[1], scale=s)))


def row_logsumexp_case(draw, entry):
    exclude = draw.data.draw(st.booleans())
    n = draw.rows(low=2 if exclude else 1)
    m = n if exclude else draw.rows()
    features = [draw.features(n), draw.features(m)]
    loss_fn = entry.loss_fn(**draw.options(entry, None))
    return dict(features=features, reduction="none", **contrastive_terms(draw, features),
                call=lambda f, s: loss_fn(*f, s, exclude_diagonal=exclude),
                ref=lambda f, s: reference.row_logsumexp(*f, s, exclude))


def bridge_terms(features, t, sigma):
    """An InfoNCE of [a, 1] against [mu, -|mu|^2 / 2] at scale 1 / (sigma^2 t (1 - t)); mu's gradient
    reaches the image and the text through |mu|^2 too. The drawn scale is not used."""
    r, bridge_scale = norm(*features), 1 / (sigma**2 * t * (1 - t))
    logit = bridge_scale * math.sqrt(r * r + 1) * math.sqrt(r * r + r**4 / 4)
    return dict(loss=logit, grad=4 * logit * (1 + r), scale_grad=0.0)


def bridge_case(draw, entry):
    n = draw.rows()
    t = draw.data.draw(st.floats(0.05, 0.95))
    sigma = 10 ** draw.data.draw(st.floats(-1, 1))
    contrastive = draw.data.draw(st.booleans())
    reduction = draw.reduction(entry)
    features = [draw.features(n), draw.features(n), draw.features(n)]
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))
    return dict(features=features, reduction=reduction, **bridge_terms(features, t, sigma),
                call=lambda f, s: loss_fn(*f, t, sigma=sigma, contrastive=contrastive),
                ref=lambda f, s: reference.brownian_bridge(*f, t, sigma, contrastive, reduction))


def geometric_terms(features):
    """Squares of differences of inner products of size R^2, as Frobenius products of D x D Grams
    whose entries sum N terms: the gradient's terms are 4 R (N R^2) / N^2 each, a few of them."""
    r = norm(*features)
    return dict(loss=8 * r**4, grad=32 * r**3, scale_grad=0.0)


def geometric_case(draw, entry):
    n = draw.rows()
    views = draw.data.draw(st.integers(2, 4))
    distinct = draw.data.draw(st.booleans())
    features = [draw.features(n) for _ in range(views)]
    args = lambda f: (f[0], f[1], f[2] if views > 2 else None, f[3] if views > 3 else None)
    loss_fn = entry.loss_fn()
    return dict(features=features, reduction=None, anchors=1, **geometric_terms(features),
                call=lambda f, s: loss_fn(*args(f), distinct_pairs=distinct),
                ref=lambda f, s: reference.geometric_consistency(*args(f), distinct))


def separation_terms(features, u):
    """Orthogonality terms <z, p>^2 <= R^4; uniformity logits -u |p_j - p_k|^2 >= -4 u R^2."""
    r = norm(*features)
    return dict(loss=4 * u * r * r + r**4, grad=8 * u * r + 2 * r**3, scale_grad=0.0)


def separation_case(draw, entry):
    n = draw.rows(low=2)
    u = 10 ** draw.data.draw(st.floats(-1, 0.5))
    features = [draw.features(n), draw.features(n)]
    loss_fn = entry.loss_fn(**draw.options(entry, None))
    return dict(features=features, reduction=None, anchors=1, **separation_terms(features, u),
                call=lambda f, s: loss_fn(*f, uniformity_t=u),
                ref=lambda f, s: reference.feature_separation(*f, u))


def modality_case(draw, entry):
    """CLIP plus the three regularizers at unit weight and default settings: the terms' bounds add up."""
    n = draw.rows(low=2)
    features = [draw.features(n) for _ in range(4)]  # image, text, augmented image, private image
    loss_fn = entry.loss_fn(**draw.options(entry, None))
    parts = [contrastive_terms(draw, features[:2]), geometric_terms(features[:3]),
             bridge_terms(features[:3], 0.25, 1.0), separation_terms([features[0], features[3]], 2.0)]
    bounds = {key: sum(part[key] for part in parts) for key in ("loss", "grad", "scale_grad")}
    return dict(features=features, reduction=None, anchors=1, **bounds,
                call=lambda f, s: loss_fn(f[0], f[1], s, image_aug=f[2], image_private=f[3]),
                ref=lambda f, s: entry.reference(SimpleNamespace(x=f[0], y=f[1], z=f[2], private=f[3], scale=s)))


def siglip_case(draw, entry):
    n = draw.rows()
    bias = draw.data.draw(st.floats(-20, 20))
    reduction, features = draw.reduction(entry), [draw.features(n), draw.features(n)]
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))
    # A logit is at most s R^2 + |b|; an image's loss sums n softplus terms, its gradient n
    # sigmoid-weighted rows (as anchor and as candidate).
    r = norm(*features)
    return dict(features=features, reduction=reduction, loss=n * (draw.scale * r * r + abs(bias) + 1),
                grad=2 * n * draw.scale * r, scale_grad=2 * n * r * r,
                call=lambda f, s: loss_fn(*f, s, bias),
                ref=lambda f, s: reference.sigmoid_pairs(*f, s, bias, reduction or "mean"))


def supcon_case(draw, entry):
    n, views = draw.rows(), draw.data.draw(st.integers(1, 3))
    labelled = views == 1 or draw.data.draw(st.booleans())
    labels = draw.integers(0, draw.data.draw(st.integers(1, n)), n) if labelled else None
    mode = draw.data.draw(st.sampled_from(["all", "one"]))
    reduction = draw.reduction(entry)
    features = [draw.features(n * views).reshape(n, views, draw.dim)]
    # The drawn scale is 1/T (a float: no gradient); the loss is T/T_base = 1/(0.07 s) times a
    # contrastive one (the positives' mean weighs at most 1, like a softmax row).
    settings = dict(temperature=1 / draw.scale, contrast_mode=mode)
    if entry.is_module:
        loss_fn = entry.loss_fn(**settings, **draw.options(entry, reduction))
        call = lambda f, s: loss_fn(*f, labels)
    else:
        loss_fn = entry.loss_fn(**draw.options(entry, reduction))
        call = lambda f, s: loss_fn(*f, labels, **settings)
    factor = 1 / (0.07 * draw.scale)
    return dict(features=features, reduction=reduction, anchors=n * (views if mode == "all" else 1),
                **contrastive_terms(draw, [features[0].reshape(-1, draw.dim)], factor), call=call,
                ref=lambda f, s: reference.supcon(*f, labels, 1 / draw.scale, contrast_mode=mode,
                                                  reduction=reduction or "mean"))


def distillation_case(draw, entry):
    """The student's features are drawn as CLIP's; the teacher's (constants) have a drawn dimension of
    their own and a drawn scale. The per-pair loss is at most 2 s R^2 + log N, its weights sum to at most
    4 per direction (the student's and the teacher's softmax)."""
    n = draw.rows()
    reduction, features = draw.reduction(entry), [draw.features(n), draw.features(n)]
    teacher_dim = draw.data.draw(st.integers(1, draw.max_dim))
    teacher = [torch.nn.functional.normalize(torch.randn(n, teacher_dim, generator=draw.generator, dtype=torch.float64,
                                                         device=DEVICE), dim=1).to(draw.dtype) for _ in range(2)]
    teacher_scale = 10 ** draw.data.draw(st.floats(-2, 2))
    exact = [t.double() for t in teacher]  # the reference's teacher: the same values, in float64
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))
    if entry.is_module:
        call = lambda f, s: sum(loss_fn(*f, s, *teacher, teacher_scale))
        ref = lambda f, s: reference.clip(*f, s) + reference.clip_distillation(*f, s, *exact, teacher_scale)
    else:
        call = lambda f, s: loss_fn(*f, s, *teacher, teacher_scale)
        ref = lambda f, s: reference.clip_distillation(*f, s, *exact, teacher_scale, reduction or "mean")
    return dict(features=features, reduction=reduction, **contrastive_terms(draw, features, 2.0), call=call, ref=ref)


def gist_case(draw, entry):
    """Anchors, positives and maybe negatives as CLIP's features; the guide's features have small-integer
    entries and the margin is a multiple of 1/2, so every guide similarity and threshold is exact in every
    dtype and a tie is a tie for the loss and its reference alike (kept: the rule is strict)."""
    n = draw.rows()
    with_negatives, reduction = draw.data.draw(st.booleans()), draw.reduction(entry)
    features = [draw.features(n) for _ in range(3 if with_negatives else 2)]
    guide_dim = draw.data.draw(st.integers(1, 8))
    guide = [torch.randint(-1, 2, (n, guide_dim), generator=draw.generator, device=DEVICE).to(draw.dtype)
             for _ in features]
    options = dict(margin=draw.data.draw(st.sampled_from([-1.0, 0.0, 0.5, 2.0])),
                   margin_strategy=draw.data.draw(st.sampled_from(["absolute", "relative"])),
                   contrast_anchors=draw.data.draw(st.booleans()), contrast_positives=draw.data.draw(st.booleans()))
    loss_fn = entry.loss_fn(**draw.options(entry, reduction))

    def arguments(f, s, guide):
        negatives = (f[2], guide[2]) if with_negatives else ()
        return (f[0], f[1], guide[0], guide[1], s, *negatives)

    exact = [g.double() for g in guide]
    return dict(features=features, reduction=reduction, **contrastive_terms(draw, features, 2.0),
                call=lambda f, s: loss_fn(*arguments(f, s, guide), **options),
                ref=lambda f, s: reference.gist(*arguments(f, s, exact), **options, reduction=reduction or "mean"))


# Each registered loss's case; a module shares its function's.
CASES = {"infonce_loss": infonce_case, "InfoNCELoss": infonce_case, "clip_loss": clip_case, "ClipLoss": clip_case,
         "nt_xent_loss": nt_xent_case, "NTXentLoss": nt_xent_case, "gamma_weighted_loss": gamma_case,
         "GammaContrastiveLoss": gamma_module_case, "row_logsumexp": row_logsumexp_case,
         "brownian_bridge_loss": bridge_case, "geometric_consistency_loss": geometric_case,
         "feature_separation_loss": separation_case, "ModalityStructureLoss": modality_case,
         "siglip_loss": siglip_case, "SigLipLoss": siglip_case, "supcon_loss": supcon_case, "SupConLoss": supcon_case,
         "clip_distillation_loss": distillation_case, "DistillClipLoss": distillation_case, "gist_loss": gist_case}
INTERPRETED = [entry for entry in REGISTRY if entry.takes_backend]


def test_every_registered_loss_has_a_case():
    assert set(CASES) == {entry.name for entry in REGISTRY}


def run_case(entry, data, backend, max_rows, max_dim):
    draw = Draw(data, backend, max_rows, max_dim)
    case = dict(entry=entry, **CASES[entry.name](draw, entry))
    compare(draw, case, f"{entry.name} on {backend}, {draw.dtype}, scale {draw.scale:.3g}, "
                        f"shapes {[tuple(f.shape) for f in case['features']]}, reduction {case['reduction']}")


@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
@given(data=st.data())
def test_torch_backend(entry, data):
    run_case(entry, data, "torch", 300, 300)


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params(["triton"]))
@pytest.mark.parametrize("entry", INTERPRETED, ids=ids(INTERPRETED))
@settings(max_examples=settings().max_examples // 2 or 1)
@given(data=st.data())
def test_triton_backend(entry, backend, data):
    run_case(entry, data, backend, 48, 40)
