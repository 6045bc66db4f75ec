"""Backend choice: argument, then $FLASHCL_BACKEND, then 'auto'; clear errors otherwise."""
import pytest
import torch

import flashcl
from flashcl import primitives


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


def test_every_public_function_takes_backend():
    x = torch.randn(4, 3, device="cpu")
    for call in (lambda b: flashcl.infonce_loss(x, x, 2.0, backend=b),
                 lambda b: flashcl.clip_loss(x, x, 2.0, backend=b),
                 lambda b: flashcl.nt_xent_loss(x, x, 2.0, backend=b),
                 lambda b: flashcl.ClipLoss(backend=b)(x, x, 2.0),
                 lambda b: flashcl.InfoNCELoss(backend=b)(x, x, 2.0),
                 lambda b: flashcl.NTXentLoss(backend=b)(x, x)):
        assert torch.isfinite(call("torch"))
        with pytest.raises(ValueError, match="backend='nope'"):
            call("nope")


def test_triton_not_installed_is_an_error_naming_it(monkeypatch):
    from flashcl.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "INSTALLED", False)
    assert triton_backend.missing_reason() == "Triton is not installed (pip install triton)"
    assert "triton" not in flashcl.available_backends("cuda")
    with pytest.raises(RuntimeError, match=r"^backend='triton' cannot run on cpu torch.float32 tensors: "
                                           r"Triton is not installed \(pip install triton\)"):
        flashcl.clip_loss(torch.randn(3, 2, device="cpu"), torch.randn(3, 2, device="cpu"), 1.0, backend="triton")
