"""The registry of public losses (tests/registry.py) is complete and right: every name in
flashcl.__all__ is a registered loss or a declared non-loss, and every entry's float64 reference
agrees with flashcl, in value and in every gradient, for each reduction it supports."""
import pytest
import torch

import flashcl
from conftest import DEVICE, assert_close, backend_params
from registry import NOT_LOSSES, REGISTRY, Batch, ids, make_batch


def test_every_public_name_is_registered_or_declared_not_a_loss():
    registered = {entry.name for entry in REGISTRY}
    assert not registered & set(NOT_LOSSES), "a name is both a loss and not one"
    missing = set(flashcl.__all__) - registered - set(NOT_LOSSES)
    assert not missing, f"public names the loss tests would miss: add them to tests/registry.py: {sorted(missing)}"
    unknown = (registered | set(NOT_LOSSES)) - set(flashcl.__all__)
    assert not unknown, f"registered but not public: {sorted(unknown)}"


def gradients(entry, batch, reduction, backend=None):
    """(loss, {input: gradient}) of flashcl's call, or of the reference (backend=None) in float64."""
    leaves = batch.leaves(entry.learnable_scale)
    options = {} if reduction is None else dict(reduction=reduction)
    if backend is None:
        loss = entry.expected(leaves, reduction)
    else:
        loss = entry(leaves, **options, **(dict(backend=backend) if entry.takes_backend else {}))
    names = [*Batch.FEATURES, *(["scale"] if entry.learnable_scale else [])]
    upstream = torch.linspace(-1, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    grads = torch.autograd.grad(loss, [getattr(leaves, k) for k in names], upstream, allow_unused=True)
    return loss.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
def test_reference_agrees_in_float64(entry):
    batch = make_batch(n=13, d=5, m=17, dtype=torch.float64)
    for reduction in entry.reductions or (None,):
        loss, grads = gradients(entry, batch, reduction, backend="torch")
        want, want_grads = gradients(entry, batch, reduction)
        assert loss.dtype == torch.float64 and loss.shape == want.shape
        assert_close(loss, want, entry.exact_as, f"{entry.name} {reduction} loss", magnitude=10.0)
        for name, grad in grads.items():
            assert (grad is None) == (want_grads[name] is None), f"{entry.name}: which inputs get a gradient ({name})"
            if grad is not None:
                assert_close(grad, want_grads[name], entry.exact_as, f"{entry.name} {reduction} grad {name}",
                             magnitude=10.0)


def dtype_cases():
    cases = []
    for entry in REGISTRY:
        for backend in backend_params():
            name = backend.values[0]
            if name != "torch" and not entry.takes_backend:
                continue
            for dtype in entry.dtypes:
                cases.append(pytest.param(entry, name, dtype, id=f"{entry.name}-{backend.id}-{str(dtype)[6:]}",
                                          marks=backend.marks))
    return cases


@pytest.mark.parametrize("entry,backend,dtype", dtype_cases())
def test_every_dtype_on_every_backend(entry, backend, dtype):
    """Each dtype the registry gives a loss, on each backend: the loss in the statistics dtype, every
    gradient in its input's dtype, within the dtype's tolerance of the float64 reference."""
    if dtype not in [d for d in entry.dtypes if backend in flashcl.available_backends(DEVICE, d)]:
        pytest.skip(f"the {backend} backend takes no {dtype}")
    batch = make_batch(n=13, d=5, m=17)
    for reduction in entry.reductions or (None,):
        loss, grads = gradients(entry, batch.to(dtype), reduction, backend=backend)
        want, want_grads = gradients(entry, batch.to(torch.float64), reduction)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tolerance = max(dtype, entry.exact_as, key=lambda d: torch.finfo(d).eps)
        assert_close(loss, want, tolerance, f"{entry.name} {reduction} loss", magnitude=entry.magnitude)
        for name, grad in grads.items():
            if grad is not None:
                assert grad.dtype == (dtype if name != "scale" else loss.dtype), name
                assert_close(grad, want_grads[name], tolerance, f"{entry.name} {reduction} grad {name}",
                             magnitude=entry.magnitude)


@pytest.mark.parametrize("entry", REGISTRY, ids=ids(REGISTRY))
def test_runs_on_meta_tensors(entry):
    """No value is read back to the host in a training step: every public loss and module runs forward
    and backward on meta tensors, which hold none (Tensor.item() on one raises)."""
    batch = make_batch(n=13, d=5, m=17).on("meta")
    leaves = batch.leaves(entry.learnable_scale)
    loss = entry(leaves, **entry.state_on("meta"))
    wrt = [getattr(leaves, k) for k in Batch.FEATURES] + ([leaves.scale] if entry.learnable_scale else [])
    grads = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
    assert loss.device.type == "meta"
    assert all(g is None or (g.device.type == "meta" and g.shape == t.shape) for g, t in zip(grads, wrt))
    assert any(g is not None for g in grads)
