"""SigLIP's sigmoid loss: loss and every gradient (features, logit scale, logit bias) against the
float64 materialized reference on every backend, open_clip parity, gradcheck, and the sigmoid
family of the primitives themselves."""
import warnings

import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, TOLERANCE, assert_close, backend_cases, unit_rows
from flashcl import primitives
from flashcl.backends.torch_tiles import TorchTiles

CASES = backend_cases([torch.float64, torch.float32, torch.float16, torch.bfloat16],
                      tilings=({}, dict(block_rows=16, block_cols=48)))
SHAPES = [(1, 1), (7, 3), (33, 70), (130, 17)]


def siglip_and_reference(n, d, dtype, scale, bias, reduction, backend, tiles, generator):
    """(flashcl's, reference's) (loss, dx, dy, dscale, dbias), with a random upstream gradient."""
    image = unit_rows(n, d, generator)
    text = unit_rows(n, d, generator, like=image)
    upstream = torch.randn(n if reduction == "none" else (), generator=generator, dtype=torch.float64, device=DEVICE)
    results = []
    for mine in (True, False):
        x = image.to(dtype if mine else torch.float64).requires_grad_()
        y = text.to(dtype if mine else torch.float64).requires_grad_()
        wide = torch.float64 if not mine or dtype == torch.float64 else torch.float32
        s = torch.tensor(scale, dtype=wide, device=DEVICE, requires_grad=True)
        b = torch.tensor(bias, dtype=wide, device=DEVICE, requires_grad=True)
        if mine:
            with flashcl.tiling(**tiles):
                loss = flashcl.siglip_loss(x, y, s, b, reduction, backend=backend)
        else:
            loss = reference.sigmoid_pairs(x, y, s, b, reduction)
        results.append([loss, *torch.autograd.grad(loss, (x, y, s, b), upstream.to(loss.dtype))])
    return results


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (30.0, 4.0)])
@pytest.mark.parametrize("backend,dtype,tiles", CASES)
def test_matches_reference(backend, dtype, tiles, n, d, scale, bias, generator):
    for reduction in ("mean", "sum", "none"):
        ours, ref = siglip_and_reference(n, d, dtype, scale, bias, reduction, backend, tiles, generator)
        weight = 1.0 / n if reduction == "mean" else 1.0 if reduction == "sum" else ref[0].abs().max().item() / n + 1
        logit = scale + abs(bias) + 1  # the size of a logit, and of each softplus
        assert ours[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        # Per image a sum of n softplus terms; its gradient a sum of n sigmoid-weighted rows.
        assert_close(ours[0], ref[0], dtype, f"{reduction} loss", magnitude=logit * n * (n if reduction == "sum" else 1))
        for name, got, want, size in (("dx", ours[1], ref[1], scale), ("dy", ours[2], ref[2], scale),
                                      ("dscale", ours[3], ref[3], n), ("dbias", ours[4], ref[4], n)):
            assert_close(got, want, dtype, f"{reduction} {name}", magnitude=2 * size * n * weight)


def test_gradcheck(generator):
    image = unit_rows(9, 4, generator, torch.float64)
    text = unit_rows(9, 4, generator, torch.float64, like=image).requires_grad_()
    image.requires_grad_()
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    with flashcl.tiling(block_rows=4, block_cols=5):
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda *a: flashcl.siglip_loss(*a, reduction=reduction, backend="torch"), (image, text, s, b))


@pytest.mark.parametrize("n,d", [(1, 4), (24, 16), (100, 33)])
@pytest.mark.parametrize("output_dict", [False, True])
def test_open_clip_parity(n, d, output_dict, generator):
    from test_open_clip import load_open_clip_loss

    open_clip = load_open_clip_loss()
    image = unit_rows(n, d, generator, torch.float64)
    text = unit_rows(n, d, generator, torch.float64, like=image)
    outcomes = []
    for loss_fn in (open_clip.SigLipLoss(), flashcl.SigLipLoss()):
        x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
        log_scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
        out = loss_fn(x, y, log_scale.exp(), bias, output_dict=output_dict)
        loss = out["contrastive_loss"] if output_dict else out
        outcomes.append([loss, *torch.autograd.grad(loss, (x, y, log_scale, bias))])
    for what, a, b in zip(("loss", "image grad", "text grad", "log scale grad", "bias grad"), *outcomes):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=lambda m: f"{what}: {m}")


def test_no_bias_is_a_zero_bias(generator):
    x, y = unit_rows(6, 3, generator), unit_rows(6, 3, generator)
    assert torch.equal(flashcl.siglip_loss(x, y, 4.0), flashcl.siglip_loss(x, y, 4.0, 0.0))
    from test_open_clip import load_open_clip_loss

    torch.testing.assert_close(flashcl.SigLipLoss()(x, y, 4.0, None),
                               load_open_clip_loss().SigLipLoss()(x, y, 4.0, None))


@pytest.mark.parametrize("backend,dtype,tiles", backend_cases([torch.float32, torch.float16, torch.bfloat16]))
def test_softplus_sums_far_from_zero(backend, dtype, tiles, generator):
    """softplus of a very negative logit is e^z, not 0 (log1p, not log(1 + .)); of a large one, z."""
    x, y = unit_rows(40, 8, generator, dtype), unit_rows(50, 8, generator, dtype)
    for bias in (-60.0, 60.0):
        b = primitives.resolve_backend(backend, x, "sigmoid")
        sums, slopes = b.softplus_sums(x, y, torch.tensor(5.0, device=DEVICE), torch.tensor(bias, device=DEVICE))
        logits = 5.0 * x.double() @ y.double().T + bias
        want = torch.nn.functional.softplus(logits, threshold=1000).sum(1)
        tol = TOLERANCE[torch.float32]
        torch.testing.assert_close(sums.double(), want, rtol=tol, atol=0)  # relative even at e^-55
        torch.testing.assert_close(slopes.double(), torch.sigmoid(logits).sum(1), rtol=tol, atol=0)


def test_a_backend_without_sigmoid_kernels_hands_over(monkeypatch, generator):
    """A backend without the sigmoid family, asked for by name, warns and the best backend with it
    computes the loss (a torch backend that claims exp only stands in for one)."""
    class ExpOnly(TorchTiles):
        name = "exp-only"
        functions = ("exp",)

    monkeypatch.setitem(primitives._BACKENDS, "exp-only", primitives._Entry(
        lambda: None, lambda device, dtype: None, ExpOnly, lambda device: False))
    x, y = unit_rows(5, 3, generator), unit_rows(5, 3, generator)
    with pytest.warns(RuntimeWarning, match=r"the 'exp-only' backend has no sigmoid kernels yet; using "):
        loss = flashcl.siglip_loss(x, y, 3.0, -1.0, backend="exp-only")
    assert torch.equal(loss, flashcl.siglip_loss(x, y, 3.0, -1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashcl.clip_loss(x, y, 3.0, backend="exp-only")  # its own family: no warning
