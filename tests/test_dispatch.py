"""Backend choice: argument, then $FLASHCL_BACKEND, then 'auto'; clear errors otherwise."""
import pytest
import torch

import flashcl
from flashcl import primitives
from conftest import DEVICE, REQUIRED_BACKENDS
from registry import REGISTRY, ids, make_batch


def test_required_backends_run_here():
    """FLASHCL_REQUIRE_BACKENDS (CI sets torch,triton): a backend that cannot run is a failure, not a skip."""
    missing = {name: primitives.unavailable_reason(name, DEVICE) for name in sorted(REQUIRED_BACKENDS)
               if primitives.unavailable_reason(name, DEVICE) is not None}
    assert not missing, f"required backends that cannot run here: {missing}"


def test_torch_backend_always_available():
    assert "torch" in flashcl.available_backends("cpu", torch.float32)
    assert "torch" in flashcl.available_backends("cpu", torch.bfloat16)


def test_auto_and_explicit(monkeypatch):
    monkeypatch.delenv(primitives.ENV_VAR, raising=False)
    x = torch.randn(3, 2, device="cpu")
    # On CPU tensors auto is the torch backend (the Triton interpreter is for tests only).
    assert primitives.resolve_backend(None, x).name == "torch"
    assert primitives.resolve_backend("auto", x).name == "torch"
    assert primitives.resolve_backend("torch", x).name == "torch"


def test_env_var_forces_and_argument_wins(monkeypatch):
    x = torch.randn(3, 2, device="cpu")
    monkeypatch.setenv(primitives.ENV_VAR, "torch")
    assert primitives.resolve_backend(None, x).name == "torch"
    monkeypatch.setenv(primitives.ENV_VAR, "nonsense")
    assert primitives.resolve_backend("torch", x).name == "torch"
    with pytest.raises(ValueError, match=r"^FLASHCL_BACKEND='nonsense' is not a flashcl backend; choose from 'auto', 'triton', 'cuda', 'torch'"):
        flashcl.clip_loss(x, x, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_prefers_triton_on_cuda():
    if "triton" in flashcl.available_backends("cuda"):
        assert primitives.resolve_backend("auto", torch.randn(3, 2, device="cuda")).name == "triton"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"^backend='tpu' is not a flashcl backend; choose from 'auto', 'triton', 'cuda', 'torch'$"):
        flashcl.clip_loss(torch.randn(3, 2, device="cpu"), torch.randn(3, 2, device="cpu"), 1.0, backend="tpu")


def test_unavailable_backend_names_what_is_available(monkeypatch):
    """A backend that exists but cannot run here (e.g. a GPU backend on CPU tensors)."""
    monkeypatch.setitem(primitives._BACKENDS, "gpu-only", primitives._Entry(
        lambda: None, lambda device, dtype: None if device.type == "cuda" else "needs CUDA tensors", None,
        lambda device: False))
    with pytest.raises(RuntimeError, match=r"^backend='gpu-only' cannot run on cpu torch.float64 tensors: "
                                           r"needs CUDA tensors. Available for these tensors: torch$"):
        flashcl.infonce_loss(torch.randn(3, 2, dtype=torch.float64, device="cpu"), torch.randn(3, 2, dtype=torch.float64, device="cpu"), 1.0,
                             backend="gpu-only")
    assert "gpu-only" not in flashcl.available_backends("cpu")
    assert "gpu-only" in flashcl.available_backends("cuda")


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.takes_backend], ids=ids([e for e in REGISTRY
                                                                                    if e.takes_backend]))
def test_every_public_loss_takes_backend(entry):
    batch = make_batch(6, 3)
    assert torch.isfinite(entry(batch, backend="torch")).all()
    with pytest.raises(ValueError, match=r"^backend='nope' is not a flashcl backend"):
        entry(batch, backend="nope")


def test_losses_without_a_backend_say_so():
    """A loss that runs no primitive takes no backend= argument (the registry says which)."""
    for entry in REGISTRY:
        if not entry.takes_backend:
            with pytest.raises(TypeError, match="backend"):
                entry(make_batch(6, 3), backend="torch")


def test_triton_not_installed_is_an_error_naming_it(monkeypatch):
    from flashcl.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "INSTALLED", False)
    assert triton_backend.missing_reason() == "Triton is not installed (pip install triton)"
    assert "triton" not in flashcl.available_backends("cuda")
    with pytest.raises(RuntimeError, match=r"^backend='triton' cannot run on cpu torch.float32 tensors: "
                                           r"Triton is not installed \(pip install triton\)"):
        flashcl.clip_loss(torch.randn(3, 2, device="cpu"), torch.randn(3, 2, device="cpu"), 1.0, backend="triton")
