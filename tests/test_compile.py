"""torch.compile traces every loss on every backend in one graph, and the compiled code computes the same."""
import pytest
import torch

import flashcl
from conftest import DEVICE, unit_rows

LOSSES = {
    "infonce": lambda x, y, s, backend: flashcl.infonce_loss(x, y, s, torch.arange(x.shape[0], device=x.device).flip(0),
                                                             backend=backend),
    "clip": lambda x, y, s, backend: flashcl.clip_loss(x, y, s, backend=backend),
    "nt_xent": lambda x, y, s, backend: flashcl.nt_xent_loss(x, y, s, reduction="sum", backend=backend),
}


@pytest.mark.parametrize("backend", flashcl.available_backends(DEVICE))
@pytest.mark.parametrize("name", LOSSES)
def test_one_graph_and_same_numbers(backend, name, generator):
    torch._dynamo.reset()
    x, y = unit_rows(48, 16, generator).requires_grad_(), unit_rows(48, 16, generator).requires_grad_()
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)

    def step(x, y, s):
        return LOSSES[name](x, y, s, backend)

    explanation = torch._dynamo.explain(step)(x, y, s)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    # aot_eager traces forward and backward through the operators' fake implementations.
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want = step(x, y, s)
    got = compiled(x, y, s)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, (x, y, s)), torch.autograd.grad(want, (x, y, s))):
        torch.testing.assert_close(g, w)


def test_tiling_scopes_nest():
    from flashcl.backends.torch_tiles import Tiling, _tiling_scopes

    with flashcl.tiling(block_rows=8):
        with flashcl.tiling():
            assert _tiling_scopes[-1] == Tiling()
        assert _tiling_scopes[-1] == Tiling(block_rows=8)
    assert _tiling_scopes == [Tiling()]
