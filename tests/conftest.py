import os

import pytest
import torch
import torch.nn.functional as F

# Per-dtype tolerances against a float64 reference (DESIGN.md, "Precision").
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def unit_rows(n, d, generator, dtype=torch.float32, like=None, noise=0.5):
    """n unit-norm rows; with `like`, each row is a noisy copy of like's row (a positive pair)."""
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if like is not None:
        z = like.double()[:n] + noise * z
    return F.normalize(z, dim=1).to(dtype)


def assert_close(actual, expected, dtype, what="", magnitude=0.0):
    """Relative error at most the dtype's tolerance, measured against the larger of the
    reference's largest entry and `magnitude`: the size of the terms that cancel to give
    the result (a loss r_i - S_ii of 1e-9 is the difference of two numbers near the scale).
    """
    tol = TOLERANCE[dtype]
    expected = expected.double()
    atol = tol * max(expected.abs().max().item(), magnitude, 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def require_peer(name):
    """Import a peer library; a missing peer fails the run when FLASHCL_REQUIRE_PEERS=1 (CI)."""
    if os.environ.get("FLASHCL_REQUIRE_PEERS") == "1":
        return __import__(name)
    return pytest.importorskip(name)
