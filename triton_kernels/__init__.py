"""Triton kernels of the two primitives; imported lazily by flashcl.backends.triton."""
