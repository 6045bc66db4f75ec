"""The two primitives of docs/design.md, and the one place that picks which backend computes them.

Every loss is assembled from

1. `lse(x, y, scale, rows, cols, exclude_diagonal)`: the row and/or column
   log-sum-exp of S = scale * x @ y.T, in the statistics dtype (fp32; fp64 for fp64 inputs);
2. `weighted_grad(x, y, scale, a, o, b, p, positives, exclude_diagonal, need_*, function)`:
   with G_ij = a_i f(S_ij - o_i) + b_j f(S_ij - p_j) + c_i [j == t_i] for
   positives = (t, c), it returns dx = s G y and dy = s G^T x in the input dtypes
   and ds = sum_ij G_ij (x_i . y_j) in the statistics dtype. Any of a, b, positives
   may be None; the sparse positive term lets a backend round dx and dy only once.

The weight function f is exp (the softmax family: primitive 1 is the log-sum-exp whose derivative
it is) or the logistic sigmoid (the sigmoid family, SigLIP), whose forward is primitive 1's sibling

1'. `softplus_sums(x, y, scale, bias, exclude_diagonal)`: the row sums of softplus(S_ij + bias)
    and of its derivative sigmoid(S_ij + bias) (primitive 2 with f = sigmoid, o = -bias).

Both families run through the same tile loop of each backend; `functions` names those a backend has.

exclude_diagonal leaves out the entries (i, i) for i < min(N, M): NT-Xent's self-similarity,
and, distributed, a rank's anchors against every rank's candidates with its own first.

Backends take arguments that `checks` has already validated and never see a loss.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Dict, List, Optional, Protocol, Tuple, Union

import torch
from torch import Tensor

from .backends import cuda as cuda_backend
from .backends import triton as triton_backend
from .backends.torch_tiles import TorchTiles

ENV_VAR = "FLASHCL_BACKEND"


class Backend(Protocol):
    name: str

    def lse(self, x: Tensor, y: Tensor, scale: Tensor, *, rows: bool, cols: bool,
            exclude_diagonal: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]: ...

    def weighted_grad(self, x: Tensor, y: Tensor, scale: Tensor, *, a: Optional[Tensor],
                          o: Optional[Tensor], b: Optional[Tensor], p: Optional[Tensor],
                          positives: Optional[Tuple[Tensor, Tensor]], exclude_diagonal: bool,
                          need_dx: bool, need_dy: bool, need_ds: bool, function: str = "exp",
                          values: Optional[Tuple[Tensor, Tensor]] = None
                          ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]: ...

    # the weight functions f it computes: "exp", and "sigmoid" with softplus_sums; "values" when
    # weighted_grad takes values=(vx, vy) (G multiplies them instead of x, y: docs/design.md, "Values")
    functions: Tuple[str, ...]

    def holds_whole(self, x: Tensor, y: Tensor) -> bool: ...  # S as one tile within its memory: a loss may build it

    def softplus_sums(self, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *,
                      exclude_diagonal: bool) -> Tuple[Tensor, Tensor]: ...


@dataclasses.dataclass(frozen=True)
class _Entry:
    missing: Callable[[], Optional[str]]  # why it is not installed here, or None
    unavailable: Callable[[torch.device, torch.dtype], Optional[str]]  # why not for these tensors, or None
    make: Callable[[], Backend]
    automatic: Callable[[torch.device], bool]  # may 'auto' pick it for tensors on this device
    fallback_if_missing: bool = False  # asked for but not installed: warn and use 'auto' instead of failing


def _installed() -> Optional[str]:
    return None

# In order of preference for `auto`, which takes the first that is installed, automatic and able to
# run the tensors. No GPU measurement ranks Triton against CUDA yet (benchmarks/bench_gpu.py will);
# until one does, the autotuned Triton kernels come first.
_BACKENDS: Dict[str, _Entry] = {
    # The interpreter also runs Triton on CPU tensors, but far too slowly to be chosen unasked.
    "triton": _Entry(triton_backend.missing_reason, triton_backend.unavailable_reason, triton_backend.make,
                     lambda device: device.type == "cuda"),
    # A pip install that could not build the extension is common and silent; only a user who
    # asked for it hears about it, once, and gets the next best backend.
    "cuda": _Entry(cuda_backend.extension_error, cuda_backend.unavailable_reason, cuda_backend.make,
                   lambda device: device.type == "cuda", fallback_if_missing=True),
    "torch": _Entry(_installed, lambda device, dtype: None, TorchTiles, lambda device: True),
}


def _why_not(entry: _Entry, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return entry.missing() or entry.unavailable(device, dtype)


def unavailable_reason(name: str, device: Union[str, torch.device] = "cpu",
                       dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why the backend `name` cannot compute the primitives for these tensors here, or None."""
    return _why_not(_BACKENDS[name], torch.device(device), dtype)


def backend_names() -> List[str]:
    """Every backend flashcl has, available here or not, in `auto`'s order of preference."""
    return list(_BACKENDS)


def available_backends(device: Union[str, torch.device] = "cpu",
                       dtype: torch.dtype = torch.float32) -> List[str]:
    """The backends that can compute the primitives for tensors of this device and dtype."""
    device = torch.device(device)
    return [name for name, entry in _BACKENDS.items() if _why_not(entry, device, dtype) is None]


def _auto(like: Tensor, function: str = "exp") -> Backend:
    candidates = (entry.make() for entry in _BACKENDS.values()
                  if entry.automatic(like.device) and _why_not(entry, like.device, like.dtype) is None)
    return next(backend for backend in candidates if function in backend.functions)


def resolve_backend(backend: Optional[str], like: Tensor, function: str = "exp", stacklevel: int = 2) -> Backend:
    """The backend for one loss call: `backend` if given, else $FLASHCL_BACKEND, else 'auto'.

    function: the weight function the loss needs ("exp", or "sigmoid" for the sigmoid family); a
    backend asked for by name that lacks it warns and hands over to the best one that has it.
    stacklevel: as warnings.warn's, counted from the caller of this function.
    """
    chosen = _resolve(backend, like, stacklevel + 1)
    if function not in chosen.functions:
        fallback = _auto(like, function)
        warnings.warn(f"flashcl: the {chosen.name!r} backend has no {function} kernels yet; using {fallback.name!r}",
                      RuntimeWarning, stacklevel=stacklevel + 1)
        return fallback
    return chosen


def _resolve(backend: Optional[str], like: Tensor, stacklevel: int) -> Backend:
    source = "backend" if backend is not None else ENV_VAR
    name = backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")
    if name == "auto":
        return _auto(like)
    if name not in _BACKENDS:
        choices = ", ".join(repr(n) for n in ("auto", *_BACKENDS))
        raise ValueError(f"{source}={name!r} is not a flashcl backend; choose from {choices}")
    entry = _BACKENDS[name]
    missing = entry.missing()
    if missing is not None and entry.fallback_if_missing:
        chosen = _auto(like)
        warnings.warn(f"flashcl: {source}={name!r} but {missing}; using {chosen.name!r}", RuntimeWarning,
                      stacklevel=stacklevel + 1)
        return chosen
    why_not = missing or entry.unavailable(like.device, like.dtype)
    if why_not is not None:
        here = ", ".join(available_backends(like.device, like.dtype))
        raise RuntimeError(
            f"{source}={name!r} cannot run on {like.device.type} {like.dtype} tensors: {why_not}. "
            f"Available for these tensors: {here}"
        )
    return entry.make()
