"""The distributed composition (flashcl.distributed) on 2 and 3 CPU processes joined by gloo.

Every loss with group=: the mean over ranks of the returned values is the single-process loss of
the concatenated batch, and the ranks' gradients are world_size times its gradient (what DDP's
average needs), for equal and ragged shards; open_clip's ClipLoss parity for its four
(local_loss, gather_with_grad) modes; the gamma state identical on every rank; and ranks that
disagree, or whose input is bad, raise on every rank instead of hanging. Each spawn runs many
cases, so the processes start once per world size.
"""
import math
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import flashcl
from conftest import assert_close, assert_norm_close, unit_rows
from distributed_ranks import RankFailed, run_ranks

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available() or os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu",
                                 reason="gloo on CPU processes")]

SHARDS = {2: ([5, 3], [6, 9]), 3: ([5, 3, 7], [6, 2, 9])}  # anchors and candidates per rank: ragged
D, SCALE, SEED = 6, 7.0, 11


def global_inputs(anchors, keys, dtype=torch.float64):
    """Every tensor of the global batch, and how each is split over ranks ("anchors" or "keys")."""
    g = torch.Generator().manual_seed(SEED)
    image = unit_rows(anchors, D, g, dtype)
    tensors = {"image": image, "text": unit_rows(anchors, D, g, dtype, like=image),
               "aug": unit_rows(anchors, D, g, dtype, like=image), "keys": unit_rows(keys, D, g, dtype),
               "targets": torch.randint(0, keys, (anchors,), generator=g),
               "log_u": torch.randn(anchors, generator=g, dtype=torch.float64) - 1,
               "log_v": torch.randn(anchors, generator=g, dtype=torch.float64) - 1,
               "upstream": torch.randn(anchors, generator=g, dtype=torch.float64),
               "labels": torch.randint(0, 3, (anchors,), generator=g)}
    split = {name: "keys" if name == "keys" else "anchors" for name in tensors}
    return tensors, split


def local_inputs(tensors, split, anchor_sizes, key_sizes, rank):
    sizes = {"anchors": anchor_sizes, "keys": key_sizes}
    local = {}
    for name, t in tensors.items():
        s = sizes[split[name]]
        local[name] = t[sum(s[:rank]):sum(s[:rank + 1])]
    return local


FEATURES = ("image", "text", "aug", "keys")
# name: (loss of (inputs, scale, group, backend), kind): "share" returns world_size times this rank's
# share of a scalar; "rows" returns this rank's anchors' values, back-propagated with their upstream.
CASES = {
    "clip mean": (lambda t, s, g, b: flashcl.clip_loss(t["image"], t["text"], s, backend=b, group=g), "share"),
    "clip sum": (lambda t, s, g, b: flashcl.clip_loss(t["image"], t["text"], s, "sum", backend=b, group=g), "share"),
    "clip none": (lambda t, s, g, b: flashcl.clip_loss(t["image"], t["text"], s, "none", backend=b, group=g), "rows"),
    "infonce, default targets": (lambda t, s, g, b: flashcl.infonce_loss(t["image"], t["keys"], s, backend=b, group=g),
                                 "share"),
    "infonce, targets": (lambda t, s, g, b: flashcl.infonce_loss(t["image"], t["keys"], s, t["targets"], backend=b,
                                                                 group=g), "share"),
    "nt_xent": (lambda t, s, g, b: flashcl.nt_xent_loss(t["image"], t["text"], s, backend=b, group=g), "share"),
    "gamma, symmetric, positives excluded": (
        lambda t, s, g, b: flashcl.gamma_weighted_loss(t["image"], t["text"], s, t["log_u"], t["log_v"],
                                                       exclude_positive=True, backend=b, group=g).loss, "share"),
    "gamma, targets": (lambda t, s, g, b: flashcl.gamma_weighted_loss(t["image"], t["keys"], s, t["log_u"],
                                                                      targets=t["targets"], backend=b, group=g).loss,
                       "share"),
    "row_logsumexp": (lambda t, s, g, b: flashcl.row_logsumexp(t["image"], t["keys"], s, backend=b, group=g), "rows"),
    "geometric consistency": (lambda t, s, g, b: flashcl.geometric_consistency_loss(
        t["image"], t["text"], t["aug"], distinct_pairs=True, group=g), "share"),
    "brownian bridge": (lambda t, s, g, b: flashcl.brownian_bridge_loss(t["image"], t["text"], t["aug"], 0.3,
                                                                        backend=b, group=g), "share"),
    "feature separation": (lambda t, s, g, b: flashcl.feature_separation_loss(t["image"], t["aug"], backend=b,
                                                                              group=g), "share"),
    # The bias s - 9 makes the scale's gradient carry the bias's too.
    "siglip mean": (lambda t, s, g, b: flashcl.siglip_loss(t["image"], t["text"], s, s - 9, backend=b, group=g),
                    "share"),
    "siglip none": (lambda t, s, g, b: flashcl.siglip_loss(t["image"], t["text"], s, s - 9, "none", backend=b,
                                                           group=g), "rows"),
    # The teacher: constants of their own dimension (2 D).
    "clip distillation": (lambda t, s, g, b: flashcl.clip_distillation_loss(
        t["image"], t["text"], s, torch.cat([t["aug"], t["text"]], 1).detach(),
        torch.cat([t["text"], t["aug"]], 1).detach(), 3.0, backend=b, group=g), "share"),
    "clip distillation none": (lambda t, s, g, b: flashcl.clip_distillation_loss(
        t["image"], t["text"], s, torch.cat([t["aug"], t["text"]], 1).detach(),
        torch.cat([t["text"], t["aug"]], 1).detach(), 3.0, "none", backend=b, group=g), "rows"),
    # Without anchor-anchor contrast (which sentence-transformers keeps per rank) GISTEmbed's loss is the
    # global batch's. The guide: one-hot classes, margin 1/2 leaves out every other same-class candidate.
    "gist": (lambda t, s, g, b: flashcl.gist_loss(
        t["image"], t["text"], *_gist_guide(t["labels"], t["image"].dtype)[:2], s, t["aug"],
        _gist_guide(t["labels"], t["image"].dtype)[2], margin=0.5, contrast_anchors=False, backend=b, group=g),
        "share"),
    "supcon, labels": (lambda t, s, g, b: flashcl.supcon_loss(torch.stack([t["image"], t["aug"]], 1), t["labels"],
                                                              0.15, backend=b, group=g), "share"),
    "supcon, views only": (lambda t, s, g, b: flashcl.supcon_loss(torch.stack([t["image"], t["aug"]], 1), None,
                                                                  0.2, reduction="sum", backend=b, group=g), "share"),
    "supcon, one, none": (lambda t, s, g, b: flashcl.supcon_loss(torch.stack([t["image"], t["aug"]], 1), t["labels"],
                                                                 0.2, contrast_mode="one", reduction="none", backend=b,
                                                                 group=g), "rows"),
}


def _gist_guide(labels, dtype):
    classes = torch.nn.functional.one_hot(labels, 3).to(dtype)
    return classes, classes, torch.nn.functional.one_hot((labels + 1) % 3, 3).to(dtype)


def evaluate(name, inputs, group, backend, dtype):
    """(output, {input: gradient}) of one case; features and scale are fresh leaves."""
    fn, kind = CASES[name]
    leaves = {k: (v.to(dtype).requires_grad_() if k in FEATURES else v) for k, v in inputs.items()}
    scale = torch.tensor(SCALE, dtype=torch.promote_types(dtype, torch.float32), requires_grad=True)
    out = fn(leaves, scale, group, backend)
    upstream = inputs["upstream"].to(out.dtype) if kind == "rows" else torch.ones_like(out)
    wrt = [k for k in FEATURES if leaves[k].requires_grad] + ["scale"]
    tensors = [leaves[k] for k in wrt[:-1]] + [scale]
    grads = torch.autograd.grad(out, tensors, upstream, allow_unused=True)
    return out.detach(), {k: (g.detach() if g is not None else None) for k, g in zip(wrt, grads)}


def losses_on_ranks(rank, world_size, names, backend, dtype):
    anchor_sizes, key_sizes = SHARDS[world_size]
    tensors, split = global_inputs(sum(anchor_sizes), sum(key_sizes))
    local = local_inputs(tensors, split, anchor_sizes, key_sizes, rank)
    return {name: evaluate(name, local, dist.group.WORLD, backend, dtype) for name in names}


def check_against_single_process(results, names, world_size, backend, dtype):
    anchor_sizes, key_sizes = SHARDS[world_size]
    tensors, split = global_inputs(sum(anchor_sizes), sum(key_sizes))
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for name in names:
        want_out, want_grads = evaluate(name, tensors, None, "torch", torch.float64)
        kind = CASES[name][1]
        outs = [r[name][0] for r in results]
        if kind == "share":
            assert_close(torch.stack(outs).mean(), want_out, dtype, f"{name}: loss", magnitude=2 * SCALE)
        else:
            assert_close(torch.cat(outs), want_out, dtype, f"{name}: values", magnitude=2 * SCALE)
        factor = world_size if kind == "share" else 1
        for key, want in want_grads.items():
            if want is None:
                continue
            got = [r[name][1][key] for r in results]
            if key == "scale":
                total = torch.stack(got).sum() / (world_size if kind == "share" else 1)
                assert_close(total, want, dtype, f"{name}: grad of scale", magnitude=10.0)
            else:
                assert_close(torch.cat(got) / factor, want, dtype, f"{name}: grad of {key}", magnitude=10.0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_loss_is_the_global_loss(world_size):
    names = list(CASES)
    results = run_ranks(world_size, losses_on_ranks, names, "torch", torch.float64)
    check_against_single_process(results, names, world_size, "torch", torch.float64)


def test_float32_and_the_triton_interpreter():
    pytest.importorskip("triton")
    names = ["clip mean", "infonce, targets", "nt_xent", "siglip mean", "supcon, labels"]
    for backend in ("torch", "triton"):
        results = run_ranks(2, losses_on_ranks, names, backend, torch.float32)
        check_against_single_process(results, names, 2, backend, torch.float32)


# -- open_clip's ClipLoss, world_size > 1 ----------------------------------------------------------------

def equal_pair_shards(rank, world_size, seed, n=4):
    """This rank's (image, text) of a float64 batch of paired unit rows in shards of n each (open_clip's
    gathers and ring exchanges need equal shards)."""
    g = torch.Generator().manual_seed(seed)
    image = unit_rows(n * world_size, 8, g, torch.float64)
    text = unit_rows(n * world_size, 8, g, torch.float64, like=image)
    mine = slice(rank * n, (rank + 1) * n)
    return image[mine], text[mine]


def open_clip_parity(rank, world_size):
    from test_open_clip import load_open_clip_loss

    open_clip = load_open_clip_loss()
    image, text = equal_pair_shards(rank, world_size, seed=3)
    outcomes = {}
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            for make in (open_clip.ClipLoss, flashcl.ClipLoss):
                loss_fn = make(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                               world_size=world_size)
                x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
                log_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
                loss = loss_fn(x, y, log_scale.exp())
                outcomes[(make.__module__, local_loss, gather_with_grad)] = [
                    loss.detach(), *torch.autograd.grad(loss, (x, y, log_scale))]
    return outcomes


@pytest.mark.parametrize("world_size", [2, 3])
def test_open_clip_parity_in_every_mode(world_size):
    from test_open_clip import load_open_clip_loss

    load_open_clip_loss()  # skips here, or fails under FLASHCL_REQUIRE_PEERS=1, if open_clip is missing
    results = run_ranks(world_size, open_clip_parity)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for mode in [(False, False), (False, True), (True, False), (True, True)]:
        theirs = [r[("open_clip_loss", *mode)] for r in results]
        ours = [r[("flashcl.modules", *mode)] for r in results]
        for rank in range(world_size):
            for what, a, b in zip(("loss", "image grad", "text grad"), ours[rank], theirs[rank]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"rank {rank} {mode} {what}: {m}")
        # The logit scale's gradient: the same on every rank, except with (True, True), where the ranks
        # split the same total differently (open_clip by loss terms, flashcl by row blocks).
        scale_ours, scale_theirs = [o[3] for o in ours], [t[3] for t in theirs]
        if mode == (True, True):
            scale_ours, scale_theirs = [sum(scale_ours)], [sum(scale_theirs)]
        for a, b in zip(scale_ours, scale_theirs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{mode} scale grad: {m}")


def open_clip_siglip_parity(rank, world_size):
    from test_open_clip import load_open_clip_loss

    open_clip = load_open_clip_loss()
    image, text = equal_pair_shards(rank, world_size, seed=4)
    outcomes = {}
    for dist_impl in ("bidir", "shift", "reduce", "gather"):
        for make in (open_clip.SigLipLoss, flashcl.SigLipLoss):
            loss_fn = make(rank=rank, world_size=world_size, dist_impl=dist_impl)
            x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
            log_scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
            loss = loss_fn(x, y, log_scale.exp(), bias)
            outcomes[(make.__module__, dist_impl)] = [loss.detach(), *torch.autograd.grad(loss, (x, y, log_scale,
                                                                                                 bias))]
    return outcomes


@pytest.mark.parametrize("world_size", [2, 3])
def test_open_clip_siglip_parity_for_every_dist_impl(world_size):
    """open_clip's SigLipLoss(world_size > 1): every rank's loss and its gradients of its features,
    logit scale and bias, for each of open_clip's four exchange implementations."""
    from test_open_clip import load_open_clip_loss

    load_open_clip_loss()
    results = run_ranks(world_size, open_clip_siglip_parity)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for dist_impl in ("bidir", "shift", "reduce", "gather"):
        for rank, r in enumerate(results):
            ours, theirs = r[("flashcl.modules", dist_impl)], r[("open_clip_loss", dist_impl)]
            for what, a, b in zip(("loss", "image grad", "text grad", "log scale grad", "bias grad"), ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13,
                                           msg=lambda m: f"rank {rank} {dist_impl} {what}: {m}")


# -- GammaContrastiveLoss ----------------------------------------------------------------------------------

GAMMA_STEPS = [  # dataset indices per rank and step: shared between ranks and across steps
    [[0, 1, 2, 3], [2, 3, 4, 5, 6]],
    [[6, 7, 0, 1], [1, 9, 8, 0, 2]],
    [[3, 3, 5, 9], [4, 7, 7, 1, 6]],
]


def gamma_batches():
    g = torch.Generator().manual_seed(5)
    for indices in GAMMA_STEPS:
        count = sum(len(i) for i in indices)
        a = unit_rows(count, D, g, torch.float64)
        yield indices, a, unit_rows(count, D, g, torch.float64, like=a)


def gamma_states(rank, world_size):
    loss_fn = flashcl.GammaContrastiveLoss(10, shape=math.inf, momentum=0.5, group=dist.group.WORLD)
    states, values = [], []
    for indices, a, b in gamma_batches():
        start = sum(len(i) for i in indices[:rank])
        rows = slice(start, start + len(indices[rank]))
        out = loss_fn(a[rows], b[rows], 5.0, torch.tensor(indices[rank]))
        states.append({k: v.clone() for k, v in loss_fn.state_dict().items()})
        values.append(out.detach())
    return states, values


def test_gamma_state_is_identical_on_every_rank():
    results = run_ranks(2, gamma_states)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    single = flashcl.GammaContrastiveLoss(10, shape=math.inf, momentum=0.5)
    for step, (indices, a, b) in enumerate(gamma_batches()):
        want = single(a, b, 5.0, torch.tensor(sum(indices, [])))
        states = [r[0][step] for r in results]
        for key in states[0]:
            assert torch.equal(states[0][key], states[1][key]), f"step {step}: {key} differs between ranks"
            torch.testing.assert_close(states[0][key], single.state_dict()[key], rtol=1e-12, atol=1e-12)
        assert_close(torch.stack([r[1][step] for r in results]).mean(), want, torch.float64, "loss", magnitude=5.0)


# -- ranks that disagree --------------------------------------------------------------------------------------

def mismatches(rank, world_size):
    """Each call goes wrong on one rank only; every rank records what it raised, then a good call runs."""
    x = unit_rows(4, D, torch.Generator().manual_seed(rank), torch.float64)
    wrong = rank == 1
    calls = {
        "dimension": lambda: flashcl.clip_loss(x[:, :5] if wrong else x, x[:, :5] if wrong else x, 2.0,
                                               group=dist.group.WORLD),
        "dtype": lambda: flashcl.clip_loss(x.float() if wrong else x, x.float() if wrong else x, 2.0,
                                           group=dist.group.WORLD),
        "device type": lambda: flashcl.clip_loss(x.to("meta") if wrong else x, x.to("meta") if wrong else x, 2.0,
                                                 group=dist.group.WORLD),
        "exclude_positive": lambda: flashcl.gamma_weighted_loss(x, x, 2.0, torch.zeros(4, dtype=torch.float64),
                                                                exclude_positive=wrong, group=dist.group.WORLD),
        "symmetric": lambda: flashcl.gamma_weighted_loss(x, x, 2.0, torch.zeros(4, dtype=torch.float64),
                                                         torch.zeros(4, dtype=torch.float64) if wrong else None,
                                                         group=dist.group.WORLD),
        "call": lambda: (flashcl.infonce_loss if wrong else flashcl.clip_loss)(x, x, 2.0, group=dist.group.WORLD),
        "bad input": lambda: flashcl.clip_loss(x, x, 2.0, "avg" if wrong else "mean", group=dist.group.WORLD),
        "targets": lambda: flashcl.infonce_loss(x, x, 2.0, torch.tensor([0, 1, 2, 8 if wrong else 7]),
                                                group=dist.group.WORLD),
    }
    raised = {}
    for name, call in calls.items():
        started = time.perf_counter()
        try:
            call()
            raised[name] = None
        except (ValueError, TypeError, RuntimeError) as error:
            raised[name] = (type(error).__name__, str(error), time.perf_counter() - started)
    raised["afterwards"] = float(flashcl.clip_loss(x, x, 2.0, group=dist.group.WORLD))
    return raised


def test_disagreeing_ranks_all_raise():
    results = run_ranks(2, mismatches)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    expected = {
        "dimension": r"ranks disagree on the feature dimension: rank \d has \d, rank \d has \d",
        "dtype": r"ranks disagree on the dtype: rank \d has torch.float\d\d, rank \d has torch.float\d\d",
        "device type": r"ranks disagree on the device type: rank \d has (cpu|meta), rank \d has (cpu|meta)",
        "exclude_positive": r"ranks disagree on the exclude_positive",
        "symmetric": r"ranks disagree on the symmetric",
        "call": r"ranks disagree on the call: rank \d has (clip_loss|infonce_loss)",
        "bad input": r"reduction must be one of|rank 1 rejected its input, so every rank stops: ValueError: "
                     r"reduction must be one of",
        "targets": r"targets must index the 8 keys of all ranks, i.e. lie in \[0, 7\], got values in \[0, 8\] on rank 1",
    }

    for rank, raised in enumerate(results):
        for name, pattern in expected.items():
            assert raised[name] is not None, f"rank {rank} did not raise for a mismatched {name}"
            kind, message, seconds = raised[name]
            assert kind == "ValueError" and re.search(pattern, message), f"rank {rank}, {name}: {message}"
            assert seconds < 5, f"rank {rank}, {name}: raised after {seconds:.1f} s"
        assert math.isfinite(raised["afterwards"])  # the group still works


def lonely_rank(rank, world_size, timeout):
    """Rank 0 passes a group of one (so it never joins), rank 1 the world group."""
    alone = dist.new_group([0])
    x = unit_rows(4, D, torch.Generator().manual_seed(rank), torch.float64)
    if rank == 0:
        loss = flashcl.clip_loss(x, x, 2.0, group=alone)
        time.sleep(timeout + 2)  # stay up while rank 1 waits, as a busy trainer would
        return float(loss)
    started = time.perf_counter()
    try:
        flashcl.clip_loss(x, x, 2.0, group=dist.group.WORLD)
    except RuntimeError as error:
        return str(error), time.perf_counter() - started
    return None


def test_a_rank_that_never_joins_fails_the_others_within_the_timeout():
    timeout = 4
    results = run_ranks(2, lonely_rank, timeout, timeout=timeout)
    assert not isinstance(results[0], RankFailed), results[0].traceback
    assert math.isfinite(results[0])  # a group of one is one process's loss
    assert results[1] is not None and not isinstance(results[1], RankFailed), results[1]
    message, seconds = results[1]
    assert "flashcl clip_loss(group=...): the signature collective failed on rank 1 of 2" in message
    assert "a rank that passed group=None or another group never joins" in message
    assert seconds < timeout + 10


@pytest.mark.scripts
def test_torchrun_example_trains():
    """The README's distributed example: DDP on 2 CPU processes with flashcl.ClipLoss(world_size=2)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_clip.py"
    run = lambda: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                  f"--master-port={port}", str(example), "--steps", "25"],
                                 capture_output=True, text=True, timeout=180)
    done = run()
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # gloo on loopback now and then aborts a process in its own threads (seen about once in a
        # few hundred gloo start-ups here, in CI and in bench_distributed, never reproduced on
        # demand): one retry on a fresh port, so only a failure that repeats fails the test.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(line.split("global loss")[1].split()[0]) for line in done.stdout.splitlines()
              if "global loss" in line]
    assert len(losses) >= 3 and losses[-1] < 0.6 * losses[0], done.stdout
    assert "replicas identical" in done.stdout


def cached_step_under_ddp(rank, world_size):
    """DDP-wrapped towers: the cached step (no_sync on all but each tower's last chunk) against the plain step."""
    from torch.nn.parallel import DistributedDataParallel

    from test_cached import Tower

    torch.manual_seed(0)
    towers = [DistributedDataParallel(Tower(10, dropout=0.0)), DistributedDataParallel(Tower(6, dropout=0.0))]
    g = torch.Generator().manual_seed(rank)
    images, texts = torch.randn(7 + 2 * rank, 10, generator=g), torch.randn(7 + 2 * rank, 6, generator=g)
    loss_fn = lambda a, b: flashcl.clip_loss(a, b, 10.0, group=dist.group.WORLD)
    steps = []
    for cached in (False, True):
        for tower in towers:
            tower.zero_grad()
        if cached:
            loss = flashcl.cached_loss(loss_fn, (towers[0], images), (towers[1], texts), chunk_size=3)
        else:
            loss = loss_fn(towers[0](images), towers[1](texts))
        loss.backward()
        steps.append([p.grad.clone() for tower in towers for p in tower.parameters()])
    return steps


def test_cached_step_under_ddp():
    results = run_ranks(2, cached_step_under_ddp)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for rank, (plain, cached) in enumerate(results):
        for i, (a, b) in enumerate(zip(cached, plain)):
            assert_norm_close(a, b, 1e-5, f"rank {rank}, parameter {i}")
        for a, b in zip(plain, results[0][0]):
            torch.testing.assert_close(a, b)  # DDP averaged: every rank holds the same gradient


# -- what a step exchanges ------------------------------------------------------------------------------------

def exchanges_per_step(rank, world_size):
    """Three training steps of several losses, counting object collectives (pickled, host round trips)
    and signature exchanges (the small integer tensor each call gathers)."""
    import flashcl.distributed as flashcl_distributed

    counts = {"objects": 0, "signatures": 0}
    gather_object, gather = dist.all_gather_object, dist.all_gather

    def counting_gather_object(*args, **kwargs):
        counts["objects"] += 1
        return gather_object(*args, **kwargs)

    def counting_gather(tensors, tensor, *args, **kwargs):
        if tensor.dtype == torch.int64 and tensor.shape == (flashcl_distributed.SIGNATURE_LENGTH,):
            counts["signatures"] += 1
        return gather(tensors, tensor, *args, **kwargs)

    dist.all_gather_object, dist.all_gather = counting_gather_object, counting_gather
    try:
        group = dist.group.WORLD
        gamma = flashcl.GammaContrastiveLoss(64, group=group)
        structure = flashcl.ModalityStructureLoss(1.0, 1.0, 1.0, group=group)
        per_step = []
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)
            x, y, z, p = (unit_rows(6 + rank, D, g).requires_grad_() for _ in range(4))
            before = dict(counts)
            losses = [flashcl.clip_loss(x, y, 5.0, group=group), flashcl.siglip_loss(x, y, 5.0, -2.0, group=group),
                      flashcl.supcon_loss(torch.stack([x, y], 1), torch.arange(6 + rank) % 3, group=group),
                      gamma(x, y, 5.0, torch.arange(6 + rank) + 8 * rank),
                      structure(x, y, 5.0, image_aug=z, image_private=p)]
            torch.stack(losses).sum().backward()
            per_step.append({k: counts[k] - before[k] for k in counts})
    finally:
        dist.all_gather_object, dist.all_gather = gather_object, gather
    return per_step


def test_a_step_exchanges_no_objects_and_one_signature_per_call():
    """Every step, the first one included: no pickled object collective, and each loss call one small
    integer tensor of metadata (clip, siglip, supcon, gamma: 1 each; the structure loss: 4 terms)."""
    results = run_ranks(2, exchanges_per_step)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for rank, per_step in enumerate(results):
        for step, counts in enumerate(per_step):
            assert counts == {"objects": 0, "signatures": 8}, f"rank {rank}, step {step}: {counts}"
