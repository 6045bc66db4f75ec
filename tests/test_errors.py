"""Bad input gets a clear error naming the argument, before any kernel runs."""
import functools

import pytest
import torch

import flashcl
from registry import REGISTRY, ids, make_batch

LOSSES = {
    "infonce": (flashcl.infonce_loss, ("queries", "keys"), "scale"),
    "clip": (flashcl.clip_loss, ("image_features", "text_features"), "logit_scale"),
    "nt_xent": (flashcl.nt_xent_loss, ("z1", "z2"), "scale"),
    "siglip": (functools.partial(flashcl.siglip_loss, logit_bias=-1.0), ("image_features", "text_features"),
               "logit_scale"),
}


def features(n=4, d=3, device="cpu", **kwargs):
    """CPU tensors: the messages name the device, and validation runs before any device work."""
    return torch.randn(n, d, device=device, **kwargs)


@pytest.mark.parametrize("bad,error,message", [
    ([[1.0, 2.0, 3.0]], TypeError, "must be a torch.Tensor"),
    (torch.randn(4), ValueError, "must be"),
    (torch.ones(4, 3, 2, 1), ValueError, "must be"),
    (torch.ones(4, 3, dtype=torch.int64), TypeError, "must have dtype"),
], ids=["list", "1-D", "4-D", "int64"])
@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
def test_every_public_loss_names_its_bad_first_argument(entry, bad, error, message):
    """Whatever the loss, a bad first argument is an error naming it, raised before any state changes."""
    args, kwargs = entry.arguments(make_batch(4, 3))
    loss_fn = entry.loss_fn()
    before = [t.clone() for t in loss_fn.state_dict().values()] if isinstance(loss_fn, torch.nn.Module) else []
    with pytest.raises(error, match=f"^{entry.first_argument} {message}"):
        loss_fn(bad, *args[1:], **kwargs)
    after = list(loss_fn.state_dict().values()) if before else []
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.fixture(params=LOSSES)
def loss(request):
    return LOSSES[request.param]


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("bad,error,message", [
    (torch.randn(4), ValueError, r"must be 2-D \(batch, dim\), got shape \(4,\)"),
    (torch.randn(2, 4, 3), ValueError, r"must be 2-D \(batch, dim\), got shape \(2, 4, 3\)"),
    ([[1.0, 2.0, 3.0]], TypeError, r"must be a torch.Tensor of shape \(batch, dim\), got list"),
    (torch.ones(4, 3, dtype=torch.int64), TypeError, r"must have dtype float16, bfloat16, float32, float64; got torch.int64"),
    (torch.ones(4, 3, dtype=torch.complex64), TypeError, r"must have dtype .* got torch.complex64"),
    (torch.randn(0, 3), ValueError, r"is an empty batch \(shape \(0, 3\)\)"),
    (torch.randn(4, 0), ValueError, r"has feature dimension 0"),
])
def test_bad_features(loss, position, bad, error, message):
    fn, names, _ = loss
    args = [features(), features()]
    args[position] = bad
    with pytest.raises(error, match=f"^{names[position]} {message}"):
        fn(*args, 2.0)


def test_feature_dims_differ(loss):
    fn, (a, b), _ = loss
    with pytest.raises(ValueError, match=f"{a} and {b} must have the same feature dimension, got 3 and 5"):
        fn(features(4, 3), features(4, 5), 2.0)


def test_dtypes_differ(loss):
    fn, (a, b), _ = loss
    with pytest.raises(TypeError, match=f"{a} and {b} must have the same dtype, got torch.float32 and torch.float16"):
        fn(features(), features(dtype=torch.float16), 2.0)


def test_devices_differ(loss):
    fn, (a, b), _ = loss
    with pytest.raises(ValueError, match=f"{a} and {b} must be on the same device, got cpu and meta"):
        fn(features(), features(device="meta"), 2.0)


@pytest.mark.parametrize("name", ["clip", "nt_xent", "siglip"])
def test_paired_losses_need_equal_rows(name):
    fn, (a, b), _ = LOSSES[name]
    with pytest.raises(ValueError, match=f"{a} and {b} must have the same number of rows, got 4 and 6"):
        fn(features(4), features(6), 2.0)


@pytest.mark.parametrize("bad,error,message", [
    (torch.ones(2), ValueError, r"must be a Python float or a 0-d tensor, got shape \(2,\)"),
    (torch.ones(2, 2), ValueError, r"must be a Python float or a 0-d tensor, got shape \(2, 2\)"),
    (torch.tensor(3), TypeError, r"must be a floating-point tensor, got torch.int64"),
    ("10", TypeError, r"must be a Python float or a 0-d tensor, got str"),
    (True, TypeError, r"must be a Python float or a 0-d tensor, got bool"),
    (None, TypeError, r"must be a Python float or a 0-d tensor, got NoneType"),
    (0.0, ValueError, r"must be finite and > 0, got 0.0"),
    (-1.0, ValueError, r"must be finite and > 0, got -1.0"),
    (torch.tensor(-2.0), ValueError, r"must be finite and > 0, got -2.0"),
    (float("nan"), ValueError, r"must be finite and > 0, got nan"),
    (torch.tensor(float("inf")), ValueError, r"must be finite and > 0, got inf"),
    (torch.tensor(2.0, device="meta"), ValueError, r"is on meta but the features are on cpu"),
])
def test_bad_scale(loss, bad, error, message):
    fn, _, scale_name = loss
    with pytest.raises(error, match=f"^{scale_name} {message}"):
        fn(features(), features(), bad)


def test_scale_forms_accepted(loss):
    fn, _, _ = loss
    x, y = features(), features()
    values = [fn(x, y, s) for s in (3.0, 3, torch.tensor(3.0), torch.tensor([3.0]), torch.tensor(3.0, dtype=torch.float64))]
    assert all(torch.equal(v, values[0]) for v in values)


@pytest.mark.parametrize("bad,error,message", [
    (torch.tensor([0, 1, 2]), ValueError, r"targets must have shape \(4,\) \(one index per query\), got \(3,\)"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError, r"targets must have shape \(4,\)"),
    (torch.zeros(4), TypeError, r"targets must be an integer tensor \(e.g. torch.long\), got torch.float32"),
    (torch.zeros(4, dtype=torch.bool), TypeError, r"targets must be an integer tensor .* got torch.bool"),
    ([0, 1, 2, 3], TypeError, r"targets must be an integer tensor of shape \(4,\), got list"),
    (torch.tensor([0, 1, 2, 6]), ValueError, r"targets must lie in \[0, 5\] \(indices of keys\), got values in \[0, 6\]"),
    (torch.tensor([-1, 1, 2, 3]), ValueError, r"targets must lie in \[0, 5\] \(indices of keys\), got values in \[-1, 3\]"),
    (torch.zeros(4, dtype=torch.long, device="meta"), ValueError, r"targets is on meta but queries are on cpu"),
])
def test_bad_targets(bad, error, message):
    with pytest.raises(error, match=message):
        flashcl.infonce_loss(features(4), features(6), 2.0, targets=bad)


def test_default_targets_need_enough_keys():
    with pytest.raises(ValueError, match=r"targets=None pairs query i with key i, so keys needs at least as many rows as queries \(4\), got 3"):
        flashcl.infonce_loss(features(4), features(3), 2.0)


def test_integer_targets_of_any_width_accepted():
    x, y = features(4), features(6)
    targets = torch.tensor([5, 0, 3, 3])
    want = flashcl.infonce_loss(x, y, 2.0, targets=targets)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert torch.equal(flashcl.infonce_loss(x, y, 2.0, targets=targets.to(dtype)), want)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", None, ""])
def test_bad_reduction(loss, reduction):
    fn, _, _ = loss
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got"):
        fn(features(), features(), 2.0, reduction=reduction)


@pytest.mark.parametrize("kwargs,message", [
    (dict(use_horovod=True), r"use_horovod=True: flashcl.ClipLoss runs on torch.distributed only"),
    (dict(world_size=0), r"world_size must be a positive int, got 0"),
    (dict(world_size=2, rank=2), r"rank must be an int in \[0, world_size=2\), got 2"),
    (dict(world_size=2, rank=-1), r"rank must be an int in \[0, world_size=2\), got -1"),
])
def test_clip_loss_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flashcl.ClipLoss(**kwargs)


def test_distributed_clip_loss_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match=r"ClipLoss\(world_size=2\) needs torch.distributed initialized"):
        flashcl.ClipLoss(world_size=2, rank=1)(features(), features(), 2.0)
    with pytest.raises(RuntimeError, match=r"clip_loss: group= needs torch.distributed initialized"):
        flashcl.clip_loss(features(), features(), 2.0, group=object())


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_nt_xent_module_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        flashcl.NTXentLoss(temperature=temperature)


@pytest.mark.parametrize("kwargs,name", [(dict(block_rows=0), "block_rows"), (dict(block_cols=-3), "block_cols"),
                                         (dict(memory_budget=1.5), "memory_budget"), (dict(block_rows=True), "block_rows")])
def test_bad_tiling(kwargs, name):
    with pytest.raises(ValueError, match=f"tiling: {name} must be a positive int or None"):
        with flashcl.tiling(**kwargs):
            pass


@pytest.mark.parametrize("bad,error,message", [
    (torch.ones(2), ValueError, r"must be a Python float or a 0-d tensor, got shape \(2,\)"),
    (torch.tensor(3), TypeError, r"must be a floating-point tensor, got torch.int64"),
    ("-10", TypeError, r"must be a Python float or a 0-d tensor, got str"),
    (float("nan"), ValueError, r"must be finite, got nan"),
    (torch.tensor(float("-inf")), ValueError, r"must be finite, got -inf"),
])
def test_bad_logit_bias(bad, error, message):
    with pytest.raises(error, match=f"^logit_bias {message}"):
        flashcl.siglip_loss(features(), features(), 2.0, bad)


@pytest.mark.parametrize("features_,labels,kwargs,error,message", [
    (torch.randn(4), None, {}, ValueError, r"features must be \(N, V, D\) .* got shape \(4,\)"),
    (torch.randn(4, 2, 3, 1), None, {}, ValueError, r"features must be \(N, V, D\)"),
    ([[1.0]], None, {}, TypeError, r"features must be a torch.Tensor"),
    (torch.randn(4, 0, 3), None, {}, ValueError, r"features has no views"),
    (torch.randn(0, 2, 3), None, {}, ValueError, r"features is an empty batch"),
    (torch.ones(4, 2, 3, dtype=torch.int64), None, {}, TypeError, r"features must have dtype"),
    (torch.randn(4, 3), None, {}, ValueError, r"labels=None .* needs V >= 2 views"),
    (torch.randn(4, 1, 3), None, {}, ValueError, r"labels=None .* needs V >= 2 views"),
    (torch.randn(4, 2, 3), torch.zeros(3, dtype=torch.long), {}, ValueError, r"labels must have shape \(4,\)"),
    (torch.randn(4, 2, 3), torch.zeros(4), {}, TypeError, r"labels must be an integer tensor"),
    (torch.randn(4, 2, 3), [0, 1, 2, 3], {}, TypeError, r"labels must be an integer tensor of shape \(4,\), got list"),
    (torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long, device="meta"), {}, ValueError, r"labels is on meta"),
    (torch.randn(4, 2, 3), None, dict(contrast_mode="any"), ValueError, r"contrast_mode must be one of"),
    (torch.randn(4, 2, 3), None, dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
    (torch.randn(4, 2, 3), None, dict(base_temperature=float("inf")), ValueError, r"base_temperature must be"),
    (torch.randn(4, 2, 3), None, dict(reduction="avg"), ValueError, r"reduction must be one of"),
])
def test_bad_supcon_arguments(features_, labels, kwargs, error, message):
    with pytest.raises(error, match=message):
        flashcl.supcon_loss(features_, labels, **kwargs)


def test_supcon_module_refuses_a_mask():
    with pytest.raises(ValueError, match=r"mask: flashcl never builds the N x N positive mask"):
        flashcl.SupConLoss()(torch.randn(4, 2, 3), mask=torch.eye(4))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dist_impl="ring"), r"dist_impl must be one of \(None, 'bidir', 'shift', 'reduce', 'gather'\), got 'ring'"),
    (dict(world_size=0), r"world_size must be a positive int, got 0"),
    (dict(rank=2, world_size=2), r"rank must be an int in \[0, world_size=2\), got 2"),
])
def test_siglip_module_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flashcl.SigLipLoss(**kwargs)


def test_distributed_siglip_loss_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match=r"SigLipLoss\(world_size=2\) needs torch.distributed initialized"):
        flashcl.SigLipLoss(rank=0, world_size=2)(features(), features(), 2.0, -1.0)


@pytest.mark.parametrize("value", [-2.3, 0.0, torch.tensor(-1.5)], ids=["negative", "zero", "tensor"])
def test_a_log_scale_gets_a_hint(value):
    """open_clip keeps log(scale) as its parameter; passing it instead of its exp() is the likeliest way
    to a non-positive logit_scale, and the message says what to do."""
    with pytest.raises(ValueError, match=r"^logit_scale must be finite and > 0, got .*; it is the multiplier "
                                         r"itself: if .* is a log-scale \(open_clip's logit_scale parameter\), "
                                         r"pass logit_scale.exp\(\)$"):
        flashcl.clip_loss(features(), features(), value)
