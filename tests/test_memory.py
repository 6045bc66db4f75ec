"""Nothing N x M is ever allocated, in forward or backward, by any public loss (tests/registry.py):
every tensor any op creates is recorded."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flashcl
from registry import REGISTRY, ids, make_batch


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
# Largest allowed besides a tile: an O((N + M) D) matrix (NT-Xent's [z1; z2], SupCon's 2N views and
# their class sums, the gathered candidates).
LINEAR = 2 * max(N, M) * D


def forward_backward(entry, dtype=torch.float32, reference=False):
    batch = make_batch(N, D, m=M, dtype=torch.float64 if reference else dtype)
    batch = batch.leaves(entry.learnable_scale)
    loss_fn = None if reference else entry.loss_fn()  # a module's state is allocated outside the recording
    with LargestAllocation() as largest:
        if reference:
            loss = entry.expected(batch)
        else:
            args, kwargs = entry.arguments(batch)
            loss = entry.output(loss_fn(*args, **kwargs))
        loss.sum().backward()
    return largest


@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
def test_detector_sees_the_materialized_matrix(entry):
    """The recorder would catch an N x M tensor: the textbook loss trips it."""
    assert forward_backward(entry, reference=True).numel >= N * N


@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forced_tiles_bound_every_allocation(entry, dtype):
    with flashcl.tiling(block_rows=32, block_cols=64):
        largest = forward_backward(entry, dtype)
    assert largest.numel <= max(32 * 64, LINEAR)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
@pytest.mark.parametrize("budget", [2**16, 2**18])
def test_memory_budget_bounds_every_tile(entry, budget):
    with flashcl.tiling(memory_budget=budget):
        largest = forward_backward(entry)
    tile_elements = budget // (4 * flashcl.backends.torch_tiles.TILE_BUFFERS)
    assert largest.numel <= max(tile_elements, LINEAR)
    assert largest.numel < N * N // 4
