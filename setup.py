"""Package layout: the sources of `flashcl` live under python/flashcl.

The Triton kernels (top-level triton_kernels/) install as flashcl.triton_kernels; they
compile at first use, so the install stays pure Python. The CUDA extension (csrc/)
joins here when its backend lands.
"""
from setuptools import setup

setup(
    package_dir={"flashcl": "python/flashcl", "flashcl.triton_kernels": "triton_kernels"},
    packages=["flashcl", "flashcl.backends", "flashcl.triton_kernels"],
)
