"""Package layout, and the optional CUDA extension flashcl._C.

The sources of `flashcl` live under python/flashcl; the Triton kernels (top-level
triton_kernels/) install as flashcl.triton_kernels and compile at first use. The CUDA
kernels (csrc/) build into flashcl._C when torch with CUDA and a CUDA toolkit are present
in the build environment, which for pip means `pip install --no-build-isolation .` (an
isolated build cannot see your torch, as with flash-attn):

    FLASHCL_BUILD_CUDA=auto   build when possible, else install pure Python (default)
    FLASHCL_BUILD_CUDA=1      build or fail
    FLASHCL_BUILD_CUDA=0      never build
    TORCH_CUDA_ARCH_LIST      target architectures (default "8.0;9.0+PTX": A100, H100/H200, and PTX
                              of the newest, which the driver compiles for later GPUs)
"""
import os
import sys
from typing import Optional, Tuple

from setuptools import setup

PACKAGE_DIRS = {"flashcl": "python/flashcl", "flashcl.triton_kernels": "triton_kernels"}
CUDA_SOURCES = ["csrc/ops.cpp", "csrc/lse_forward.cu", "csrc/softplus_sums.cu", "csrc/weighted_products.cu"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def cuda_build_plan(mode: str, torch_version: Optional[str], torch_cuda: Optional[str],
                    cuda_home: Optional[str]) -> Tuple[bool, str]:
    """(build flashcl._C?, the one line that says why) from FLASHCL_BUILD_CUDA and what the build can see."""
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"flashcl: FLASHCL_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "flashcl: FLASHCL_BUILD_CUDA=0, installing without the CUDA extension"
    if torch_version is None:
        reason = ("torch is not importable in the build environment "
                  "(pip install --no-build-isolation . builds against your torch)")
    elif torch_cuda is None:
        reason = f"torch {torch_version} is a CPU build"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        return True, f"flashcl: building the CUDA extension for torch {torch_version} with the toolkit at {cuda_home}"
    if mode == "1":
        raise SystemExit(f"flashcl: FLASHCL_BUILD_CUDA=1 but {reason}")
    return False, f"flashcl: installing without the CUDA extension: {reason}"


def cuda_extension_kwargs() -> dict:
    """setup() arguments for flashcl._C, or none when the plan says not to build."""
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # torch would guess nvcc's PATH entry, often /usr/local
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
        facts = (torch.__version__, torch.version.cuda, CUDA_HOME)
    except ImportError:
        facts = (None, None, None)
    build, line = cuda_build_plan(os.environ.get("FLASHCL_BUILD_CUDA", "auto"), *facts)
    print(line, file=sys.stderr)
    if not build:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # With no GPU to ask, torch's arch detection fails; name the targets.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    extension = CUDAExtension(
        "flashcl._C", CUDA_SOURCES,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return dict(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})


if __name__ == "__main__":
    setup(package_dir=PACKAGE_DIRS, packages=list(PACKAGE_DIRS) + ["flashcl.backends", "flashcl.integrations"],
          **cuda_extension_kwargs())
