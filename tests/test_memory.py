"""Nothing N x M is ever allocated, in forward or backward: every tensor any op creates is recorded."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flashcl
import reference
from conftest import DEVICE, unit_rows


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (elements and bytes) produced by any aten op while active."""

    def __init__(self):
        super().__init__()
        self.numel = self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


N, M, D = 384, 512, 8  # N*M = 196608 elements, far above (N + M) * D = 7168

CALLS = {
    "infonce": (lambda x, y, s: flashcl.infonce_loss(x, y, s), lambda x, y, s: reference.infonce(x, y, s)),
    "clip": (lambda x, y, s: flashcl.clip_loss(x, y[:N], s), lambda x, y, s: reference.clip(x, y[:N], s)),
    "nt_xent": (lambda x, y, s: flashcl.nt_xent_loss(x, y[:N], s), lambda x, y, s: reference.nt_xent(x, y[:N], s)),
    "siglip": (lambda x, y, s: flashcl.siglip_loss(x, y[:N], s, s - 12),
               lambda x, y, s: reference.sigmoid_pairs(x, y[:N], s, s - 12)),
    # Views [x; y[:N]] of N samples in 3 classes: the class sums are 3 x D.
    "supcon": (lambda x, y, s: flashcl.supcon_loss(torch.stack([x, y[:N].to(x.dtype)], 1), LABELS, 1 / 7),
               lambda x, y, s: reference.supcon(torch.stack([x, y[:N]], 1), LABELS, 1 / 7)),
}
LABELS = torch.arange(N, device=DEVICE) % 3


def forward_backward(loss_fn, generator, dtype=torch.float32):
    x = unit_rows(N, D, generator, dtype).requires_grad_()
    y = unit_rows(M, D, generator, dtype).requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    with LargestAllocation() as largest:
        loss_fn(x, y, s).backward()
    return largest


@pytest.mark.parametrize("name", CALLS)
def test_detector_sees_the_materialized_matrix(name, generator):
    """The recorder would catch an N x M tensor: the textbook loss trips it."""
    largest = forward_backward(CALLS[name][1], generator)
    assert largest.numel >= N * N


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forced_tiles_bound_every_allocation(name, dtype, generator):
    with flashcl.tiling(block_rows=32, block_cols=64):
        largest = forward_backward(CALLS[name][0], generator, dtype)
    # Largest allowed: a 32 x 64 tile, or an O((N + M) * D) vector/matrix (NT-Xent's [z1; z2]).
    assert largest.numel <= max(32 * 64, 2 * max(N, M) * D)


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("budget", [2**16, 2**18])
def test_memory_budget_bounds_every_tile(name, budget, generator):
    with flashcl.tiling(memory_budget=budget):
        largest = forward_backward(CALLS[name][0], generator)
    tile_elements = budget // (4 * flashcl.backends.torch_tiles.TILE_BUFFERS)
    assert largest.numel <= max(tile_elements, 2 * max(N, M) * D)
    assert largest.numel < N * N // 4
