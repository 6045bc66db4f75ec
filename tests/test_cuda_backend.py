"""The CUDA C++ backend on a machine without a GPU: the build switch, the fallback when the
extension is missing or broken, and, where it was built, its registered operators and their
fake implementations. Its numerics run in the primitive and loss suites on a GPU machine.

FLASHCL_REQUIRE_CUDA_EXTENSION=1 (CI's CUDA build step) turns "not built here" skips into failures.
"""
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import flashcl
from flashcl import primitives
from flashcl.backends import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module():
    """setup.py as a module: setup() only runs under __main__, as pip runs it."""
    spec = importlib.util.spec_from_file_location("flashcl_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_built() -> bool:
    return cuda_backend.extension_error() is None


requires_extension = pytest.mark.skipif(
    not extension_built() and os.environ.get("FLASHCL_REQUIRE_CUDA_EXTENSION") != "1",
    reason="flashcl._C was not built in this environment")


@pytest.mark.parametrize("mode,facts,build,says", [
    ("auto", ("2.14.1+cu130", "13.0", "/usr/local/cuda"), True, "building the CUDA extension for torch 2.14.1"),
    ("1", ("2.14.1+cu130", "13.0", "/usr/local/cuda"), True, "building the CUDA extension"),
    ("auto", (None, None, None), False, "torch is not importable in the build environment .*--no-build-isolation"),
    ("auto", ("2.13.0+cpu", None, None), False, "torch 2.13.0\\+cpu is a CPU build"),
    ("auto", ("2.14.1+cu130", "13.0", None), False, "no CUDA toolkit found \\(set CUDA_HOME\\)"),
    ("0", ("2.14.1+cu130", "13.0", "/usr/local/cuda"), False, "FLASHCL_BUILD_CUDA=0"),
])
def test_build_plan(setup_module, mode, facts, build, says):
    decision, line = setup_module.cuda_build_plan(mode, *facts)
    assert decision is build
    assert line.startswith("flashcl: ") and "\n" not in line
    assert pytest.importorskip("re").search(says, line)


@pytest.mark.parametrize("mode,facts,says", [
    ("1", (None, None, None), "FLASHCL_BUILD_CUDA=1 but torch is not importable"),
    ("1", ("2.13.0+cpu", None, None), "FLASHCL_BUILD_CUDA=1 but torch 2.13.0\\+cpu is a CPU build"),
    ("yes", ("2.14.1+cu130", "13.0", "/usr/local/cuda"), "FLASHCL_BUILD_CUDA must be auto, 0 or 1, got 'yes'"),
])
def test_build_plan_refuses(setup_module, mode, facts, says):
    with pytest.raises(SystemExit, match=says):
        setup_module.cuda_build_plan(mode, *facts)


def test_default_architectures_carry_ptx_for_newer_gpus(setup_module):
    """Without PTX, a GPU newer than the newest listed architecture (sm_100) has no kernel image."""
    assert setup_module.DEFAULT_ARCH_LIST.split(";")[-1].endswith("+PTX")


@requires_extension
def test_built_extension_carries_ptx():
    cuobjdump = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip(f"no {cuobjdump} to list the extension's images")
    import flashcl._C

    listing = subprocess.run([str(cuobjdump), "--list-ptx", flashcl._C.__file__], capture_output=True, text=True)
    assert ".ptx" in listing.stdout, listing.stdout + listing.stderr


@pytest.fixture
def broken_extension(monkeypatch):
    """flashcl._C as if its import had failed at flashcl's import (never built, or built against another torch)."""
    monkeypatch.setitem(sys.modules, "flashcl._C", None)  # makes `import flashcl._C` raise ImportError
    monkeypatch.setattr(cuda_backend, "EXTENSION_ERROR", cuda_backend.load_extension())


def test_missing_extension_is_reported(broken_extension):
    assert "flashcl._C is not importable" in cuda_backend.extension_error()
    assert "pip install --no-build-isolation" in cuda_backend.extension_error()
    assert "cuda" not in flashcl.available_backends("cuda", torch.bfloat16)


def test_asking_for_missing_extension_warns_once_and_falls_back(broken_extension):
    x, y = torch.randn(6, 4, device="cpu"), torch.randn(6, 4, device="cpu")
    with pytest.warns(RuntimeWarning, match=r"^flashcl: backend='cuda' but the CUDA extension flashcl._C is not "
                                            r"importable .*; using 'torch'$"):
        loss = flashcl.clip_loss(x, y, 3.0, backend="cuda")
    torch.testing.assert_close(loss, flashcl.clip_loss(x, y, 3.0, backend="torch"))


def test_env_var_asking_for_missing_extension_falls_back(broken_extension, monkeypatch):
    monkeypatch.setenv(primitives.ENV_VAR, "cuda")
    with pytest.warns(RuntimeWarning, match=r"^flashcl: FLASHCL_BACKEND='cuda' but"):
        flashcl.infonce_loss(torch.randn(3, 2, device="cpu"), torch.randn(3, 2, device="cpu"), 1.0)


def test_auto_never_warns_about_the_extension(broken_extension):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashcl.clip_loss(torch.randn(3, 2, device="cpu"), torch.randn(3, 2, device="cpu"), 1.0)


@requires_extension
def test_operators_registered():
    assert extension_built(), cuda_backend.extension_error()
    assert "cuda" in flashcl.available_backends("cuda", torch.bfloat16)
    schema = str(torch.ops.flashcl.lse_forward.default._schema)
    assert schema == ("flashcl::lse_forward(Tensor a, Tensor b, Tensor scale, bool exclude_diagonal, "
                      "bool merge_columns) -> (Tensor, Tensor)")
    sums = str(torch.ops.flashcl.softplus_sums.default._schema)
    assert sums == ("flashcl::softplus_sums(Tensor a, Tensor b, Tensor scale, Tensor bias, bool exclude_diagonal) "
                    "-> (Tensor, Tensor)")
    assert str(torch.ops.flashcl.resident_rows.default._schema) == "flashcl::resident_rows(ScalarType dtype) -> int"
    products = str(torch.ops.flashcl.weighted_products.default._schema)
    assert "Tensor? pos_index" in products and "bool sigmoid=False" in products
    assert cuda_backend.make().functions == ("exp", "sigmoid")


@requires_extension
def test_cpu_tensors_are_an_error_not_a_fallback():
    """Built but given CPU tensors: the user's mistake, said plainly."""
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu torch.float32 tensors: "
                                           r"the CUDA kernels need CUDA tensors"):
        flashcl.clip_loss(torch.randn(3, 2, device="cpu"), torch.randn(3, 2, device="cpu"), 1.0, backend="cuda")


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fake_implementations_give_the_shapes(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 8, device="cuda", dtype=dtype)
        y = torch.empty(7, 8, device="cuda", dtype=dtype)
        s = torch.empty((), device="cuda")
        rows, cols = torch.ops.flashcl.lse_forward(x, y, s, False, False)
        assert (rows.shape, cols.shape, rows.dtype, rows.device.type) == ((10,), (0,), torch.float32, "cuda")
        rows, cols = torch.ops.flashcl.lse_forward(x, y, s, False, True)
        assert (rows.shape, cols.shape, cols.dtype) == ((10,), (7,), torch.float32)
        out = torch.ops.flashcl.weighted_products(x, y, s, None, None, None, None, None, None, 0, False, 2, 9)
        assert (out.shape, out.dtype) == ((7, 8), torch.float32)
        sums, slopes = torch.ops.flashcl.softplus_sums(x, y, s, s.reshape(1), False)  # the sigmoid family
        assert (sums.shape, slopes.shape, slopes.dtype) == ((10,), (10,), torch.float32)
        out = torch.ops.flashcl.weighted_products(x, y, s, None, None, None, None, None, None, 0, False, 0, 10,
                                                  sigmoid=True)
        assert out.shape == (10, 8)


@pytest.mark.skipif(not torch.cuda.is_available() or not extension_built(), reason="needs a GPU and flashcl._C")
@pytest.mark.parametrize("call,message", [
    (lambda x, s: torch.ops.flashcl.lse_forward(x, x, s.double(), False, False),
     "scale must be a float32 scalar"),
    (lambda x, s: torch.ops.flashcl.weighted_products(x, x, s, None, None, None, None, None, None, 0, False, 4, 9),
     r"rows \[4, 9\) must lie in \[0, 5\)"),
    (lambda x, s: torch.ops.flashcl.weighted_products(x, x, s, torch.ones(4, device="cuda"), torch.ones(4, device="cuda"),
                                                      None, None, None, None, 0, False, 0, 5),
     r"row_w must have shape \(5,\), got \[4\]"),
    (lambda x, s: torch.ops.flashcl.lse_forward(x.double(), x.double(), s, False, False),
     "float16, bfloat16 or float32 features"),
    (lambda x, s: torch.ops.flashcl.softplus_sums(x, x, s, s.double().reshape(1), False),
     "bias must be a one-element float32 tensor"),
])
def test_kernel_arguments_are_checked(call, message):
    x, s = torch.randn(5, 4, device="cuda"), torch.tensor(2.0, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        call(x, s)


def test_positives_layouts_agree_with_the_python_side():
    """weighted_products' positives_by values live in flashcl.backends.fused (the Triton kernel reads
    them there); the CUDA header has its own copy, which must say the same."""
    import re

    from flashcl.backends import fused

    header = (ROOT / "csrc" / "launchers.h").read_text()
    found = dict(re.findall(r"(kNoPositives|kPositivesByRow|kPositivesByColumn) = (\d+)", header))
    assert {name: int(value) for name, value in found.items()} == {
        "kNoPositives": fused.NO_POSITIVES, "kPositivesByRow": fused.POSITIVES_BY_ROW,
        "kPositivesByColumn": fused.POSITIVES_BY_COLUMN}
