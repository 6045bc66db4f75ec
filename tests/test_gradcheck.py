"""torch.autograd.gradcheck in float64: finite differences against the analytic backward."""
import pytest
import torch

import flashcl
from conftest import DEVICE, unit_rows


@pytest.fixture(params=[{}, dict(block_rows=2, block_cols=3)], ids=["one tile", "tiles"])
def tiles(request):
    with flashcl.tiling(**request.param):
        yield


def leaf(t):
    return t.double().requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infonce(tiles, reduction, generator):
    q, k = leaf(unit_rows(5, 4, generator)), leaf(unit_rows(7, 4, generator))
    s = torch.tensor(3.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    targets = torch.tensor([6, 0, 0, 3, 1], device=DEVICE)
    assert torch.autograd.gradcheck(lambda q, k, s: flashcl.infonce_loss(q, k, s, targets, reduction), (q, k, s))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_clip(tiles, reduction, generator):
    a, b = leaf(unit_rows(6, 3, generator)), leaf(unit_rows(6, 3, generator))
    s = torch.tensor(5.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: flashcl.clip_loss(a, b, s, reduction), (a, b, s))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nt_xent(tiles, reduction, generator):
    a, b = leaf(unit_rows(4, 5, generator)), leaf(unit_rows(4, 5, generator))
    s = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: flashcl.nt_xent_loss(a, b, s, reduction), (a, b, s))


def test_unnormalized_features(generator):
    """Nothing in the math assumes unit norm."""
    a = (torch.randn(5, 3, generator=generator, dtype=torch.float64, device=DEVICE) * 3).requires_grad_()
    b = torch.randn(5, 3, generator=generator, dtype=torch.float64, device=DEVICE).requires_grad_()
    s = torch.tensor(0.7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: flashcl.clip_loss(a, b, s), (a, b, s))
