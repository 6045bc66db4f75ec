"""Argument validation for the public losses: every message names the argument and what was expected.

Runs before any kernel, so bad input is an exception here and never a wrong number or
a crash deep in a backend.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scales, LSEs and accumulators for inputs of `dtype`: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_features(name: str, features: Tensor) -> Tensor:
    """A 2-D (batch, dim) floating tensor with at least one row and one column."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(features.shape)}")
    if features.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have dtype {names}; got {features.dtype}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(features.shape)}); need at least one row")
    if features.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(features.shape)}); need dim >= 1")
    return features


def check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor, same_rows: bool = False) -> None:
    """Two feature matrices that can be multiplied: same dim, dtype and device (and rows if asked)."""
    check_features(name_a, a)
    check_features(name_b, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature dimension, "
                         f"got {a.shape[1]} and {b.shape[1]}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of rows, "
                         f"got {a.shape[0]} and {b.shape[0]}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def as_scale(name: str, scale: Union[float, Tensor], like: Tensor) -> Tensor:
    """A finite positive scalar as a 0-d tensor on `like`'s device in the statistics dtype.

    A tensor keeps its autograd graph (a learnable logit scale gets its exact gradient);
    a 0-d CPU tensor is accepted with features on any device, as torch ops accept it.
    """
    return _as_scalar(name, scale, like, positive=True)


def as_bias(name: str, bias: Union[float, Tensor], like: Tensor) -> Tensor:
    """A finite scalar of any sign (a logit bias), as `as_scale` makes it."""
    return _as_scalar(name, bias, like, positive=False)


def _as_scalar(name: str, value: Union[float, Tensor], like: Tensor, positive: bool) -> Tensor:
    dtype = statistics_dtype(like.dtype)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a Python float or a 0-d tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        # Reading the value syncs with the device and breaks a torch.compile graph, so
        # compiled code skips this one check (as it skips the range check of targets).
        number = None if torch.compiler.is_compiling() else float(value.detach())
        tensor = value.reshape(()).to(device=like.device, dtype=dtype)
    elif isinstance(value, (float, int)) and not isinstance(value, bool):
        number = float(value)
        tensor = torch.tensor(number, device=like.device, dtype=dtype)
    else:
        raise TypeError(f"{name} must be a Python float or a 0-d tensor, got {type(value).__name__}")
    if number is not None and not (math.isfinite(number) and (number > 0 or not positive)):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {number}")
    return tensor


def check_targets(targets: Optional[Tensor], n: int, m: Optional[int], like: Tensor) -> Tensor:
    """int64 indices of each query's positive key, shape (n,), values in [0, m).

    None means the i-th key is the positive of the i-th query, which needs m >= n. m=None skips
    the checks that need every key's count (a distributed call makes them across ranks).
    """
    if targets is None:
        if m is not None and m < n:
            raise ValueError(f"targets=None pairs query i with key i, so keys needs at least as many rows "
                             f"as queries ({n}), got {m}; pass targets explicitly")
        return torch.arange(n, device=like.device)
    targets = check_integers("targets", targets, n, like, "one index per query", "queries")
    if m is not None and not torch.compiler.is_compiling():
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= m:
            raise ValueError(f"targets must index keys, i.e. lie in [0, {m - 1}], got values in [{low}, {high}]")
    return targets


def check_integers(name: str, values, n: int, like: Tensor, meaning: str, like_name: str) -> Tensor:
    """An integer tensor of shape (n,) on like's device, as int64."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({n},), got {type(values).__name__}")
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {values.dtype}")
    if values.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) ({meaning}), got {tuple(values.shape)}")
    if values.device != like.device:
        raise ValueError(f"{name} is on {values.device} but {like_name} are on {like.device}")
    return values.long()


def check_log_weights(name: str, log_weights: Tensor, n: int, like: Tensor) -> Tensor:
    """Per-anchor log u: shape (n,), floating, on like's device, never NaN or +inf (log 0 = -inf is u = 0).

    Returned detached in the statistics dtype: the weights carry no gradient.
    """
    if not isinstance(log_weights, Tensor) or not log_weights.is_floating_point():
        what = log_weights.dtype if isinstance(log_weights, Tensor) else type(log_weights).__name__
        raise TypeError(f"{name} must be a floating-point tensor of shape ({n},), got {what}")
    if log_weights.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one log-weight per anchor), got {tuple(log_weights.shape)}")
    if log_weights.device != like.device:
        raise ValueError(f"{name} is on {log_weights.device} but the features are on {like.device}")
    if not torch.compiler.is_compiling() and bool(torch.isnan(log_weights).any() | (log_weights == math.inf).any()):
        raise ValueError(f"{name} must not hold NaN or +inf (a weight u = exp(log u) must be finite)")
    return log_weights.detach().to(statistics_dtype(like.dtype))
