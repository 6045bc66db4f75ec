"""Loss values and gradients (features and scale) against the float64 materialized reference."""
import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, TILINGS, assert_close, check_against_reference, slow_if_large, unit_rows

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


INFONCE_SHAPES = [(1, 1, 1), (1, 7, 64), (7, 7, 3), (7, 129, 64), (64, 1000, 129), (129, 129, 1000),
                  (1000, 1000, 7), (129, 64, 7)]


@pytest.mark.parametrize("n,m,d", slow_if_large(INFONCE_SHAPES, rows=129))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tiles", TILINGS)
def test_infonce(n, m, d, dtype, tiles, generator):
    queries = unit_rows(n, d, generator)
    keys = unit_rows(m, d, generator)
    if m >= n:
        keys[:n] = unit_rows(n, d, generator, like=queries)
        targets = None
    else:
        targets = torch.randint(0, m, (n,), generator=generator, device=DEVICE)
    for scale, reduction in [(1.0, "mean"), (20.0, "none"), (100.0, "sum")]:
        check_against_reference(flashcl.infonce_loss, reference.infonce, [queries, keys], scale, dtype,
                                reduction, tiles, targets=targets)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infonce_explicit_targets_with_repeats(dtype, generator):
    queries, keys = unit_rows(50, 33, generator), unit_rows(70, 33, generator)
    targets = torch.randint(0, 5, (50,), generator=generator, device=DEVICE)  # many queries share a positive
    check_against_reference(flashcl.infonce_loss, reference.infonce, [queries, keys], 30.0, dtype,
                            "mean", "tiles", targets=targets)


CLIP_SHAPES = [(1, 1), (1, 64), (7, 1000), (64, 7), (129, 129), (1000, 64), (1000, 1000)]


@pytest.mark.parametrize("n,d", slow_if_large(CLIP_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tiles", TILINGS)
def test_clip(n, d, dtype, tiles, generator):
    image = unit_rows(n, d, generator)
    text = unit_rows(n, d, generator, like=image)
    for scale, reduction in [(1.0, "none"), (14.3, "mean"), (100.0, "mean"), (100.0, "sum")]:
        check_against_reference(flashcl.clip_loss, reference.clip, [image, text], scale, dtype,
                                reduction, tiles)


@pytest.mark.parametrize("n,d", slow_if_large([(1, 7), (7, 1), (64, 129), (129, 64), (500, 1000)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tiles", TILINGS)
def test_nt_xent(n, d, dtype, tiles, generator):
    z1 = unit_rows(n, d, generator)
    z2 = unit_rows(n, d, generator, like=z1)
    for scale, reduction in [(2.0, "mean"), (10.0, "none"), (100.0, "sum")]:
        check_against_reference(flashcl.nt_xent_loss, reference.nt_xent, [z1, z2], scale, dtype,
                                reduction, tiles)


def test_reduction_none_shapes(generator):
    x, y = unit_rows(5, 8, generator), unit_rows(9, 8, generator)
    assert flashcl.infonce_loss(x, y, 3.0, reduction="none").shape == (5,)
    assert flashcl.clip_loss(x, y[:5], 3.0, reduction="none").shape == (5,)
    assert flashcl.nt_xent_loss(x, y[:5], 3.0, reduction="none").shape == (10,)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_strided_and_expanded_inputs(layout, generator):
    base = unit_rows(40, 24, generator)
    if layout == "transposed":
        image = base.T.contiguous().T  # column-major storage
    elif layout == "sliced":
        image = unit_rows(40, 48, generator)[:, ::2]
    else:
        image = base[:1].expand(40, 24)  # stride 0: every row the same tensor memory
    text = unit_rows(40, 24, generator, like=base)
    assert not image.is_contiguous()
    check_against_reference(flashcl.clip_loss, reference.clip, [image, text], 10.0, torch.float32,
                            "mean", "tiles")


def test_learnable_scale_gets_gradient_through_exp(generator):
    """open_clip stores log(scale) and passes its exp(); the gradient must reach the parameter."""
    image, text = unit_rows(30, 16, generator), unit_rows(30, 16, generator)
    log_scale = torch.tensor(2.5, device=DEVICE, requires_grad=True)
    flashcl.clip_loss(image, text, log_scale.exp()).backward()
    ref_log_scale = torch.tensor(2.5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    reference.clip(image.double(), text.double(), ref_log_scale.exp()).backward()
    assert_close(log_scale.grad, ref_log_scale.grad, torch.float32, "d loss / d log_scale")


def test_no_grad_needed_for_frozen_side(generator):
    image = unit_rows(20, 8, generator).requires_grad_()
    text = unit_rows(20, 8, generator)  # a frozen tower: no grad
    flashcl.clip_loss(image, text, 5.0).backward()
    ref_image = image.detach().double().requires_grad_()
    reference.clip(ref_image, text.double(), 5.0).backward()
    assert_close(image.grad, ref_image.grad, torch.float32, "image grad")
    assert text.grad is None


@pytest.mark.parametrize("loss_fn,ref_fn,m", [(flashcl.infonce_loss, reference.infonce, 96),
                                               (flashcl.clip_loss, reference.clip, 64),
                                               (flashcl.nt_xent_loss, reference.nt_xent, 64)])
def test_large_scale_does_not_overflow(loss_fn, ref_fn, m, generator):
    """At scale 1e4, exp(S) overflows even fp64 (above e^709); the online LSE must stay exact.

    fp64 is checked for exactness; fp32 cannot resolve a softmax better than eps * scale
    (~6e-4 here) for anyone, so it is checked for finiteness only.
    """
    x = unit_rows(64, 16, generator)
    y = unit_rows(m, 16, generator)
    y[:64] = unit_rows(64, 16, generator, like=x)
    check_against_reference(loss_fn, ref_fn, [x, y], 1e4, torch.float64, "mean", "tiles")
    x32 = x.clone().requires_grad_()
    loss = loss_fn(x32, y, 1e4)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x32.grad).all()


def test_torch_backend_is_deterministic(generator):
    x, y = unit_rows(100, 32, generator).requires_grad_(), unit_rows(100, 32, generator).requires_grad_()
    runs = []
    for _ in range(2):
        with flashcl.tiling(block_rows=16, block_cols=16):
            loss = flashcl.clip_loss(x, y, 20.0)
        gx, gy = torch.autograd.grad(loss, [x, y])
        runs.append((loss, gx, gy))
    assert all(torch.equal(first, second) for first, second in zip(*runs))
