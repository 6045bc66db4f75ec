"""Package layout: the sources of `flashcl` live under python/flashcl.

Plain pure-Python install today; the Triton kernels (triton_kernels/) and the CUDA
extension (csrc/) join the package here as their backends land.
"""
from setuptools import setup

setup(
    package_dir={"flashcl": "python/flashcl"},
    packages=["flashcl", "flashcl.backends"],
)
