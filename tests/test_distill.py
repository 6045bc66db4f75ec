"""CLIP distillation (flashcl.clip_distillation_loss, flashcl.DistillClipLoss) and the primitive under it,
primitive 2 with values operands: parity with open_clip's DistillClipLoss, both backends against the
float64 materialized reference, the teacher as a constant."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, TOLERANCE, backend_params, unit_rows
from distributed_ranks import RankFailed, run_ranks
from flashcl import primitives
from flashcl.backends.torch_tiles import TorchTiles, Tiling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import open_clip_loss_module  # noqa: E402

open_clip_loss = open_clip_loss_module()


def relative_error(a, b):
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


def inputs(n, d, teacher_dim, dtype, generator):
    image = unit_rows(n, d, generator, dtype)
    text = unit_rows(n, d, generator, dtype, like=image)
    teacher_image = unit_rows(n, teacher_dim, generator, dtype)
    teacher_text = unit_rows(n, teacher_dim, generator, dtype, like=teacher_image)
    return image, text, teacher_image, teacher_text


@pytest.mark.skipif(open_clip_loss is None, reason="open_clip is not installed")
@pytest.mark.parametrize("backend", backend_params(["torch", "triton"]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n,d,teacher_dim", [(13, 5, 9), (37, 16, 7)])
def test_open_clip_parity(backend, dtype, n, d, teacher_dim, generator):
    """Both values and the gradients of the student's features and scale, against open_clip's
    DistillClipLoss run in float64; ragged N, a teacher of another dimension, tiles smaller than N."""
    if backend not in flashcl.available_backends(DEVICE, dtype):
        pytest.skip(f"the {backend} backend takes no {dtype}")
    image, text, teacher_image, teacher_text = inputs(n, d, teacher_dim, dtype, generator)
    wide = torch.promote_types(dtype, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (image, text)] + [torch.tensor(7.0, dtype=wide, requires_grad=True)]
    with flashcl.tiling(block_rows=8, block_cols=16):
        out = flashcl.DistillClipLoss(backend=backend)(*leaves, teacher_image, teacher_text, 4.0, output_dict=True)
    got = torch.autograd.grad(out["contrastive_loss"] + 3 * out["distill_loss"], leaves)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want_out = open_clip_loss.DistillClipLoss()(*exact, teacher_image.double(), teacher_text.double(), 4.0,
                                                output_dict=True)
    want = torch.autograd.grad(want_out["contrastive_loss"] + 3 * want_out["distill_loss"], exact)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert set(out) == {"contrastive_loss", "distill_loss"}
    for key in out:
        assert out[key].dtype == wide
        assert relative_error(out[key], want_out[key]) <= tol, key
    for name, g, w in zip(("image", "text", "scale"), got, want):
        assert g.dtype == (dtype if name != "scale" else wide)
        assert relative_error(g, w) <= tol, name
    contrastive, distill = flashcl.DistillClipLoss(backend=backend)(image, text, 7.0, teacher_image, teacher_text, 4.0)
    assert relative_error(distill, want_out["distill_loss"]) <= tol


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_a_student_equal_to_its_teacher(reduction, generator):
    image, text, teacher_image, teacher_text = inputs(11, 6, 10, torch.float64, generator)
    got = flashcl.clip_distillation_loss(image, text, 3.0, teacher_image, teacher_text, 2.0, reduction, backend="torch")
    want = reference.clip_distillation(image, text, 3.0, teacher_image, teacher_text, 2.0, reduction)
    assert relative_error(got, want) <= 1e-12
    # A teacher identical to the student: the distillation term is the student's softmax entropy, and
    # its gradient is the entropy's (not zero: the teacher is a constant).
    same = flashcl.clip_distillation_loss(image, text, 3.0, image, text, 3.0, backend="torch")
    assert relative_error(same, reference.clip_distillation(image, text, 3.0, image, text, 3.0)) <= 1e-12


def value_terms(n, m, dtype, generator, exclude_diagonal):
    wide = torch.promote_types(dtype, torch.float32)
    vector = lambda k, shift=0.0: (torch.rand(k, generator=generator, dtype=torch.float64, device=DEVICE) + shift).to(wide)
    return dict(a=vector(n), o=vector(n, 3.0), b=vector(m), p=vector(m, 3.0),
                positives=(torch.randint(0, m, (n,), generator=generator, device=DEVICE), vector(n, -0.5)),
                exclude_diagonal=exclude_diagonal)


def make_backend(name):
    return TorchTiles(Tiling(16, 8)) if name == "torch" else primitives._BACKENDS[name].make()


@pytest.mark.parametrize("backend", backend_params(["torch", "triton"]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_weighted_grad_with_values(backend, dtype, exclude_diagonal, generator):
    """G from (x, y, s) multiplies values of another width: G vy, G^T vx and sum_ij G_ij vx_i . vy_j,
    unscaled, in the statistics dtype, against the float64 materialized G."""
    if backend not in flashcl.available_backends(DEVICE, dtype):
        pytest.skip(f"the {backend} backend takes no {dtype}")
    n, d, value_dim = 37, 5, 11
    m = n if exclude_diagonal else 29
    x, y = unit_rows(n, d, generator, dtype), unit_rows(m, d, generator, dtype)
    vx, vy = unit_rows(n, value_dim, generator, dtype), unit_rows(m, value_dim, generator, dtype)
    scale = torch.tensor(4.0, dtype=torch.promote_types(dtype, torch.float32), device=DEVICE)
    terms = value_terms(n, m, dtype, generator, exclude_diagonal)
    gy, gtx, ds = make_backend(backend).weighted_grad(x, y, scale, values=(vx, vy), need_ds=True, **terms)
    g = reference.weights(x, y, scale, **terms)
    wide = torch.promote_types(dtype, torch.float32)
    assert gy.dtype == gtx.dtype == ds.dtype == wide and gy.shape == (n, value_dim) and gtx.shape == (m, value_dim)
    tol = TOLERANCE[dtype] if dtype != torch.bfloat16 else TOLERANCE[torch.float32]  # the values are exact in fp32
    assert relative_error(gy, g @ vy.double()) <= tol
    assert relative_error(gtx, g.T @ vx.double()) <= tol
    assert relative_error(ds, (g * (vx.double() @ vy.double().T)).sum()) <= 10 * tol
    only_rows = make_backend(backend).weighted_grad(x, y, scale, values=(vx, vy), need_dy=False, **terms)
    assert only_rows[1] is None and only_rows[2] is None and torch.allclose(only_rows[0], gy)


@pytest.mark.parametrize("where", ["teacher_image_features", "teacher_text_features", "teacher_logit_scale"])
def test_a_teacher_that_requires_grad_is_an_error(where, generator):
    image, text, teacher_image, teacher_text = inputs(5, 3, 4, torch.float32, generator)
    args = dict(teacher_image_features=teacher_image, teacher_text_features=teacher_text,
                teacher_logit_scale=torch.tensor(2.0))
    args[where] = args[where].clone().requires_grad_()
    with pytest.raises(ValueError, match=rf"^{where} requires grad, .*{where}\.detach\(\) .*torch\.no_grad\(\)"):
        flashcl.clip_distillation_loss(image, text, 3.0, **args)
    with pytest.raises(ValueError, match=rf"^{where} requires grad"):
        flashcl.DistillClipLoss()(image, text, 3.0, *args.values())


def test_bad_teacher_shapes(generator):
    image, text, teacher_image, teacher_text = inputs(5, 3, 4, torch.float32, generator)
    with pytest.raises(ValueError, match="^image_features and teacher_text_features must have the same number of rows"):
        flashcl.clip_distillation_loss(image, text, 3.0, teacher_image, teacher_text[:4], 2.0)
    with pytest.raises(ValueError, match="^teacher_image_features and teacher_text_features must have the same feature"):
        flashcl.clip_distillation_loss(image, text, 3.0, teacher_image, teacher_text[:, :3], 2.0)
    with pytest.raises(TypeError, match="^image_features and teacher_image_features must have the same dtype"):
        flashcl.clip_distillation_loss(image, text, 3.0, teacher_image.double(), teacher_text.double(), 2.0)


def test_a_backend_without_values_hands_over(monkeypatch, generator):
    """A backend whose kernels take no values operands (the CUDA C++ family), asked for by name, warns
    and the best backend with them computes the loss."""
    class NoValues(TorchTiles):
        name = "no-values"
        functions = ("exp", "sigmoid")

    monkeypatch.setitem(primitives._BACKENDS, "no-values", primitives._Entry(
        lambda: None, lambda device, dtype: None, NoValues, lambda device: False))
    image, text, teacher_image, teacher_text = inputs(5, 3, 4, torch.float32, generator)
    with pytest.warns(RuntimeWarning, match=r"the 'no-values' backend has no values kernels yet; using "):
        loss = flashcl.clip_distillation_loss(image, text, 3.0, teacher_image, teacher_text, 2.0, backend="no-values")
    assert torch.equal(loss, flashcl.clip_distillation_loss(image, text, 3.0, teacher_image, teacher_text, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashcl.clip_loss(image, text, 3.0, backend="no-values")  # its own family: no warning


def test_module_options():
    with pytest.raises(RuntimeError, match=r"^DistillClipLoss\(world_size=2\) needs torch.distributed initialized"):
        flashcl.DistillClipLoss(rank=0, world_size=2)(*inputs(4, 3, 5, torch.float32, torch.Generator()), 3.0, 2.0)
    with pytest.raises(ValueError, match="use_horovod"):
        flashcl.DistillClipLoss(use_horovod=True)
    flashcl.DistillClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)


# -- world_size > 1: open_clip's four modes on 2 gloo ranks ----------------------------------------------------

MODES = [(False, False), (False, True), (True, False), (True, True)]


def distill_on_ranks(rank, world_size):
    """Each rank's two values and the gradients of its student features and log scale, of the
    distillation term alone and of contrastive + 3 distill, for open_clip's and flashcl's module in
    every (local_loss, gather_with_grad); float64, a teacher of another dimension."""
    n, d, teacher_dim = 4, 5, 7
    g = torch.Generator().manual_seed(3)
    unit = lambda k: torch.nn.functional.normalize(torch.randn(n * world_size, k, generator=g, dtype=torch.float64),
                                                   dim=1)[rank * n:(rank + 1) * n]
    image, text, teacher_image, teacher_text = unit(d), unit(d), unit(teacher_dim), unit(teacher_dim)
    outcomes = {}
    for mode in MODES:
        for make in (open_clip_loss.DistillClipLoss, flashcl.DistillClipLoss):
            loss_fn = make(*mode, rank=rank, world_size=world_size)
            leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                      torch.tensor(2.0, dtype=torch.float64, requires_grad=True)]
            out = loss_fn(leaves[0], leaves[1], leaves[2].exp(), teacher_image, teacher_text, 4.0, output_dict=True)
            distill_grads = torch.autograd.grad(out["distill_loss"], leaves, retain_graph=True)
            total_grads = torch.autograd.grad(out["contrastive_loss"] + 3 * out["distill_loss"], leaves)
            outcomes[(make.__module__.split(".")[0], *mode)] = (
                [out["contrastive_loss"].detach(), out["distill_loss"].detach()], distill_grads, total_grads)
    return outcomes


def distributed_errors(results):
    """{mode: the largest norm-wise relative error of flashcl against open_clip over ranks and quantities}.
    As for ClipLoss: each rank's values and feature gradients; the log scale's gradient per rank, except
    with (True, True), where the ranks split the same total differently: its sum over ranks."""
    errors = {}
    for mode in MODES:
        worst = 0.0
        theirs, ours = ([r[(who, *mode)] for r in results] for who in ("open_clip_loss", "flashcl"))
        for rank in range(len(results)):
            values = zip(ours[rank][0], theirs[rank][0])
            features = [(o[i], t[i]) for k in (1, 2) for o, t in [(ours[rank][k], theirs[rank][k])] for i in (0, 1)]
            worst = max([worst] + [relative_error(a, b) for a, b in [*values, *features]])
        for k in (1, 2):
            scale_grads = [(ours[r][k][2], theirs[r][k][2]) for r in range(len(results))]
            if mode == (True, True):
                scale_grads = [(sum(o for o, _ in scale_grads), sum(t for _, t in scale_grads))]
            worst = max([worst] + [relative_error(a, b) for a, b in scale_grads])
        errors[mode] = worst
    return errors


@pytest.mark.distributed
@pytest.mark.skipif(open_clip_loss is None, reason="open_clip is not installed")
@pytest.mark.skipif(not torch.distributed.is_available() or DEVICE.type != "cpu", reason="gloo on CPU processes")
def test_distributed_modes_match_open_clip():
    """world_size 2 on gloo, every (local_loss, gather_with_grad): both values on each rank and the
    gradients of each rank's student features and log scale, against open_clip's DistillClipLoss."""
    results = run_ranks(2, distill_on_ranks)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for mode, error in distributed_errors(results).items():
        assert error <= 1e-10, mode
