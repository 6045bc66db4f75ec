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
    with pytest.raises(NotImplementedError, match="world_size > 1"):
        flashcl.DistillClipLoss(rank=0, world_size=2)
    with pytest.raises(ValueError, match="use_horovod"):
        flashcl.DistillClipLoss(use_horovod=True)
    flashcl.DistillClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)
