"""torch.compile traces every public loss (tests/registry.py) forward and backward into one graph
(fullgraph=True) on every backend, and the compiled code computes the same numbers."""
import pytest
import torch

import flashcl
from conftest import backend_params
from registry import REGISTRY, Batch, ids, make_batch

BACKENDS = backend_params()


def differentiable(batch, entry):
    return batch.leaves(entry.learnable_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
def test_one_graph_and_same_numbers(entry, backend):
    if backend != "torch" and not entry.takes_backend:
        pytest.skip(f"{entry.name} runs no primitive")
    torch._dynamo.reset()
    options = dict(backend=backend) if entry.takes_backend else {}
    eager_fn, compiled_fn = entry.loss_fn(**options), entry.loss_fn(**options)  # modules may hold state

    def step(loss_fn, x, y, z, keys, private, scale):
        args, kwargs = entry.arguments(batch.replace(x=x, y=y, z=z, keys=keys, private=private, scale=scale))
        return entry.output(loss_fn(*args, **kwargs))

    batch = differentiable(make_batch(n=24, d=8), entry)
    tensors = [getattr(batch, k) for k in (*Batch.FEATURES, "scale")]
    # aot_eager traces forward and backward through the operators' fake implementations.
    compiled = torch.compile(lambda *t: step(compiled_fn, *t), backend="aot_eager", fullgraph=True)
    want, got = step(eager_fn, *tensors), compiled(*tensors)
    torch.testing.assert_close(got, want)
    wrt = [t for t in tensors if t.requires_grad]
    got_grads = torch.autograd.grad(got.sum(), wrt, allow_unused=True)
    want_grads = torch.autograd.grad(want.sum(), wrt, allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w)
    if isinstance(eager_fn, torch.nn.Module):  # state updated alike (GammaContrastiveLoss's running estimates)
        for (key, a), b in zip(eager_fn.state_dict().items(), compiled_fn.state_dict().values()):
            torch.testing.assert_close(a, b, msg=lambda m: f"{key}: {m}")


def test_tiling_scopes_nest():
    from flashcl.backends.torch_tiles import Tiling, _tiling_scopes

    with flashcl.tiling(block_rows=8):
        with flashcl.tiling():
            assert _tiling_scopes[-1] == Tiling()
        assert _tiling_scopes[-1] == Tiling(block_rows=8)
    assert _tiling_scopes == [Tiling()]
