"""label_smoothing= of infonce_loss, clip_loss, InfoNCELoss and ClipLoss: F.cross_entropy's label smoothing.

Values and gradients (features and a learnable scale) against F.cross_entropy(..., label_smoothing=eps)
on the float64 materialized logits, by norm-wise relative error, on the torch backend (float64, whole-S
and tiled paths) and the Triton backend (float32; on CPU its interpreter); eps = 0 is the old loss;
bad values are errors naming the argument; group= on 2 gloo ranks is the loss of the concatenated batch;
the modules match the functions; torch.compile traces the smoothed losses into one graph.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import flashcl
from conftest import DEVICE, TILINGS, backend_params, unit_rows

EPSILONS = (0.0, 0.1, 1.0)
REDUCTIONS = ("mean", "sum", "none")
N, M, D, SCALE = 24, 37, 8, 7.0  # ragged: more candidates than queries
# (backend, dtype, tiling): fp64 on the torch backend, both its whole-S path and its tiles; Triton takes no fp64.
CASES = [pytest.param("torch", torch.float64, "one tile", id="torch-float64-one-tile"),
         pytest.param("torch", torch.float64, "tiles", id="torch-float64-tiles"),
         *[pytest.param("triton", torch.float32, "one tile", id="triton-float32", marks=p.marks)
           for p in backend_params(["triton"])]]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def relative_error(a, b):
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


def assert_relative(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: norm-wise relative error {error:.3g} > {tol}"


def smoothed_clip(image, text, scale, reduction="mean", label_smoothing=0.0):
    """The two-direction CLIP loss with F.cross_entropy's label smoothing, materialized."""
    s = scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    per_pair = 0.5 * (F.cross_entropy(s, labels, reduction="none", label_smoothing=label_smoothing)
                      + F.cross_entropy(s.T, labels, reduction="none", label_smoothing=label_smoothing))
    return {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()


def smoothed_infonce(queries, keys, scale, targets, reduction="mean", label_smoothing=0.0):
    return F.cross_entropy(scale * queries @ keys.T, targets, reduction=reduction, label_smoothing=label_smoothing)


def value_and_grads(fn, features, scale, upstream):
    """(value, [grad of each feature, grad of scale]) of fn(*features, scale) with fresh leaves."""
    leaves = [f.detach().clone().requires_grad_() for f in features]
    scale = scale.detach().clone().requires_grad_()
    out = fn(*leaves, scale)
    grads = torch.autograd.grad(out, [*leaves, scale], upstream.to(out.dtype).expand(out.shape))
    return out.detach(), list(grads)


def compare(loss_fn, ref_fn, features, dtype, tiles, reduction):
    """loss_fn in `dtype` against ref_fn in float64, value and every gradient, norm-wise."""
    wide = torch.promote_types(dtype, torch.float32)
    scale = torch.tensor(SCALE, dtype=wide, device=DEVICE)
    upstream = torch.randn(features[0].shape[0] if reduction == "none" else (), dtype=torch.float64,
                           generator=torch.Generator(DEVICE).manual_seed(1), device=DEVICE)
    with flashcl.tiling(**TILINGS[tiles]):
        got, got_grads = value_and_grads(loss_fn, [f.to(dtype) for f in features], scale, upstream)
    want, want_grads = value_and_grads(ref_fn, [f.double() for f in features], scale.double(), upstream)
    assert got.dtype == wide
    tol = TOLERANCE[dtype]
    assert_relative(got, want, tol, "loss")
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_relative(g, w, tol, "grad of scale" if i == len(features) else f"grad of input {i}")


@pytest.fixture
def batch():
    g = torch.Generator(DEVICE).manual_seed(0)
    queries = unit_rows(N, D, g, torch.float64)
    return dict(queries=queries, keys=unit_rows(M, D, g, torch.float64), text=unit_rows(N, D, g, torch.float64,
                                                                                          like=queries),
                targets=torch.randint(0, M, (N,), generator=g, device=DEVICE))


@pytest.mark.parametrize("backend, dtype, tiles", CASES)
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_infonce_is_cross_entropy_with_label_smoothing(batch, backend, dtype, tiles, eps, reduction):
    targets = batch["targets"]
    compare(lambda q, k, s: flashcl.infonce_loss(q, k, s, targets, reduction, label_smoothing=eps, backend=backend),
            lambda q, k, s: smoothed_infonce(q, k, s, targets, reduction, eps),
            [batch["queries"], batch["keys"]], dtype, tiles, reduction)


@pytest.mark.parametrize("backend, dtype, tiles", CASES)
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_clip_is_two_directions_with_label_smoothing(batch, backend, dtype, tiles, eps, reduction):
    compare(lambda x, y, s: flashcl.clip_loss(x, y, s, reduction, label_smoothing=eps, backend=backend),
            lambda x, y, s: smoothed_clip(x, y, s, reduction, eps),
            [batch["queries"], batch["text"]], dtype, tiles, reduction)


def test_default_targets(batch):
    compare(lambda q, k, s: flashcl.infonce_loss(q, k, s, label_smoothing=0.3),
            lambda q, k, s: smoothed_infonce(q, k, s, torch.arange(N, device=DEVICE), label_smoothing=0.3),
            [batch["queries"], batch["keys"]], torch.float64, "tiles", "mean")


@pytest.mark.parametrize("tiles", TILINGS)
def test_zero_is_the_old_loss(batch, tiles):
    scale = torch.tensor(SCALE, dtype=torch.float64, device=DEVICE)
    upstream = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    with flashcl.tiling(**TILINGS[tiles]):
        for new, old, features in [
            (lambda q, k, s: flashcl.infonce_loss(q, k, s, batch["targets"], label_smoothing=0.0),
             lambda q, k, s: flashcl.infonce_loss(q, k, s, batch["targets"]), [batch["queries"], batch["keys"]]),
            (lambda x, y, s: flashcl.clip_loss(x, y, s, label_smoothing=0),
             lambda x, y, s: flashcl.clip_loss(x, y, s), [batch["queries"], batch["text"]]),
        ]:
            got, got_grads = value_and_grads(new, features, scale, upstream)
            want, want_grads = value_and_grads(old, features, scale, upstream)
            assert torch.equal(got, want)
            assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


def test_modules_match_the_functions(batch):
    x, y, keys, targets = batch["queries"], batch["text"], batch["keys"], batch["targets"]
    scale = torch.tensor(SCALE, dtype=torch.float64, device=DEVICE)
    upstream = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    for module, function, features in [
        (lambda a, b, s: flashcl.ClipLoss(label_smoothing=0.2)(a, b, s),
         lambda a, b, s: flashcl.clip_loss(a, b, s, label_smoothing=0.2), [x, y]),
        (lambda a, b, s: flashcl.ClipLoss(label_smoothing=0.2)(a, b, s, output_dict=True)["contrastive_loss"],
         lambda a, b, s: flashcl.clip_loss(a, b, s, label_smoothing=0.2), [x, y]),
        (lambda a, b, s: flashcl.InfoNCELoss("sum", label_smoothing=0.2)(a, b, s, targets),
         lambda a, b, s: flashcl.infonce_loss(a, b, s, targets, "sum", label_smoothing=0.2), [x, keys]),
    ]:
        got, got_grads = value_and_grads(module, features, scale, upstream)
        want, want_grads = value_and_grads(function, features, scale, upstream)
        assert torch.equal(got, want)
        assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


BAD = [(-0.1, ValueError, r"label_smoothing must be a number in \[0, 1\]"),
       (1.5, ValueError, r"label_smoothing must be a number in \[0, 1\]"),
       (float("nan"), ValueError, r"label_smoothing must be a number in \[0, 1\]"),
       ("0.1", TypeError, "label_smoothing must be a Python float in \\[0, 1\\].*got str"),
       (None, TypeError, "label_smoothing must be a Python float.*got NoneType"),
       (True, TypeError, "label_smoothing must be a Python float.*got bool"),
       (torch.tensor(0.1), TypeError, "label_smoothing must be a Python float.*got Tensor")]


@pytest.mark.parametrize("value, error, match", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_values_are_errors_naming_the_argument(batch, value, error, match):
    x, y, keys = batch["queries"], batch["text"], batch["keys"]
    for call in (lambda: flashcl.infonce_loss(x, keys, SCALE, label_smoothing=value),
                 lambda: flashcl.clip_loss(x, y, SCALE, label_smoothing=value),
                 lambda: flashcl.ClipLoss(label_smoothing=value),
                 lambda: flashcl.InfoNCELoss(label_smoothing=value)):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("backend", backend_params(["torch", "triton"]))
def test_compiles_into_one_graph(batch, backend):
    torch._dynamo.reset()
    targets = batch["targets"]

    def step(x, y, keys, scale):
        return (flashcl.clip_loss(x, y, scale, label_smoothing=0.1, backend=backend)
                + flashcl.infonce_loss(x, keys, scale, targets, "none", label_smoothing=0.2, backend=backend).sum())

    tensors = [batch[k].float().requires_grad_() for k in ("queries", "text", "keys")]
    tensors.append(torch.tensor(SCALE, device=DEVICE, requires_grad=True))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want, got = step(*tensors), compiled(*tensors)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, tensors), torch.autograd.grad(want, tensors)):
        torch.testing.assert_close(g, w)


def test_meta_tensors(batch):
    x, y, keys = (batch[k].to("meta").requires_grad_() for k in ("queries", "text", "keys"))
    scale = torch.tensor(SCALE, device="meta", requires_grad=True)
    targets = batch["targets"].to("meta")
    loss = (flashcl.clip_loss(x, y, scale, label_smoothing=0.1, backend="torch")
            + flashcl.infonce_loss(x, keys, scale, targets, label_smoothing=0.1, backend="torch"))
    grads = torch.autograd.grad(loss, [x, y, keys, scale])
    assert loss.shape == () and [g.shape for g in grads] == [x.shape, y.shape, keys.shape, scale.shape]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="autocast on the CPU")
def test_autocast_products_in_its_dtype(batch):
    """Inside torch.autocast the smoothed term uses the features as the core multiplies them (bf16), so the
    loss is the float64 loss of the bf16-rounded features, to fp32 accumulation."""
    x, y, keys, targets = batch["queries"].float(), batch["text"].float(), batch["keys"].float(), batch["targets"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clip = flashcl.clip_loss(x, y, SCALE, label_smoothing=0.1)
        infonce = flashcl.infonce_loss(x, keys, SCALE, targets, label_smoothing=0.1)
    rounded = [t.bfloat16().double() for t in (x, y, keys)]
    assert clip.dtype == infonce.dtype == torch.float32
    assert_relative(clip, smoothed_clip(rounded[0], rounded[1], SCALE, label_smoothing=0.1), 1e-6, "clip")
    assert_relative(infonce, smoothed_infonce(rounded[0], rounded[2], SCALE, targets, label_smoothing=0.1), 1e-6,
                    "infonce")


# -- group= on 2 gloo ranks ------------------------------------------------------------------------------------

ANCHOR_SHARDS, KEY_SHARDS = [5, 3], [6, 9]  # ragged
DIST_CASES = {  # name: (loss of (inputs, scale, group), "share" (a scalar) or "rows" (reduction="none"))
    "infonce, default targets": (lambda t, s, g: flashcl.infonce_loss(t["image"], t["keys"], s, label_smoothing=0.1,
                                                                      group=g), "share"),
    "infonce, targets, sum": (lambda t, s, g: flashcl.infonce_loss(t["image"], t["keys"], s, t["targets"], "sum",
                                                                   label_smoothing=0.3, group=g), "share"),
    "infonce, targets, none": (lambda t, s, g: flashcl.infonce_loss(t["image"], t["keys"], s, t["targets"], "none",
                                                                    label_smoothing=1.0, group=g), "rows"),
    "clip mean": (lambda t, s, g: flashcl.clip_loss(t["image"], t["text"], s, label_smoothing=0.1, group=g), "share"),
    "clip sum": (lambda t, s, g: flashcl.clip_loss(t["image"], t["text"], s, "sum", label_smoothing=0.5, group=g),
                 "share"),
    "clip none": (lambda t, s, g: flashcl.clip_loss(t["image"], t["text"], s, "none", label_smoothing=0.2, group=g),
                  "rows"),
}
DIST_FEATURES = ("image", "text", "keys")


def global_batch():
    g = torch.Generator().manual_seed(5)
    n, m = sum(ANCHOR_SHARDS), sum(KEY_SHARDS)
    image = unit_rows(n, D, g, torch.float64)
    return {"image": image, "text": unit_rows(n, D, g, torch.float64, like=image), "keys": unit_rows(m, D, g,
                                                                                                      torch.float64),
            "targets": torch.randint(0, m, (n,), generator=g), "upstream": torch.randn(n, generator=g,
                                                                                      dtype=torch.float64)}


def dist_evaluate(name, inputs, group):
    fn, kind = DIST_CASES[name]
    leaves = {k: (v.clone().requires_grad_() if k in DIST_FEATURES else v) for k, v in inputs.items()}
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    out = fn(leaves, scale, group)
    upstream = inputs["upstream"] if kind == "rows" else torch.ones_like(out)
    grads = torch.autograd.grad(out, [leaves[k] for k in DIST_FEATURES] + [scale], upstream, allow_unused=True)
    return out.detach(), dict(zip([*DIST_FEATURES, "scale"], grads))


def smoothed_on_ranks(rank, world_size):
    tensors = global_batch()
    local = {}
    for name, t in tensors.items():
        sizes = KEY_SHARDS if name == "keys" else ANCHOR_SHARDS
        local[name] = t[sum(sizes[:rank]):sum(sizes[:rank + 1])]
    return {name: dist_evaluate(name, local, dist.group.WORLD) for name in DIST_CASES}


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu",
                    reason="gloo on CPU processes")
def test_group_is_the_loss_of_the_concatenated_batch():
    from distributed_ranks import RankFailed, run_ranks

    results = run_ranks(2, smoothed_on_ranks)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    tensors = global_batch()
    for name, (_, kind) in DIST_CASES.items():
        want, want_grads = dist_evaluate(name, tensors, None)
        outs = [r[name][0] for r in results]
        got = torch.stack(outs).mean() if kind == "share" else torch.cat(outs)
        assert_relative(got, want, 1e-10, f"{name}: loss")
        factor = 2 if kind == "share" else 1  # DDP averages world_size times the gradient
        for key, w in want_grads.items():
            if w is None:
                continue
            got_grads = [r[name][1][key] for r in results]
            g = torch.stack(got_grads).sum() / factor if key == "scale" else torch.cat(got_grads) / factor
            assert_relative(g, w, 1e-10, f"{name}: grad of {key}")
