"""Argument validation: the one home of every check of a public argument. Each message names the
argument and what was expected (and, where a common mistake is likely, what to do instead).

Checks run before any kernel and before any state changes, so bad input is an exception here and
never a wrong number, a corrupted running estimate or a crash deep in a backend. Checks that need a
tensor's values (a range, a sign) read them only where that is free: Python numbers and CPU tensors.
On an accelerator they are asynchronous device-side assertions (`torch._assert_async`, as an
out-of-range index in any PyTorch gather is): no step waits for them, and a failure surfaces at a
later synchronization and leaves the CUDA context unusable; FLASHCL_SYNC_CHECKS=1 reads the values
instead, for debugging. Meta tensors hold no values, and a compiled graph reads none
(docs/design.md, "Validation").
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scales, LSEs and accumulators for inputs of `dtype`: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


SYNC_CHECKS_ENV = "FLASHCL_SYNC_CHECKS"


def values_free(tensor: Tensor) -> bool:
    """Whether a check may read this tensor's values: on the CPU (no device waits for it), outside a
    compiled graph; on any device with values when FLASHCL_SYNC_CHECKS=1."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or (tensor.device.type != "meta" and os.environ.get(SYNC_CHECKS_ENV) == "1")


def device_assert(ok: Tensor, message: str) -> None:
    """A value check of an accelerator tensor, asynchronous: `ok` (all true) is asserted on the device."""
    if ok.device.type not in ("cpu", "meta") and not torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"flashcl: {message}")


# -- Python numbers and choices ----------------------------------------------------------------------------

def _describe_interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf and high_open:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high == math.inf:
        return f"a number {'>' if low_open else '>='} {low:g} or float('inf')"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = True, high_open: bool = True, meaning: str = "") -> float:
    """A Python int or float (not a bool) in the interval given, as a float; NaN never passes."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be {_describe_interval(low, high, low_open, high_open)}{meaning}, "
                         f"got {value!r}")
    return float(value)


def check_positive_number(name: str, value: Any) -> float:
    """A finite number > 0 (a temperature, a width, a time scale)."""
    return check_number(name, value, 0.0)


def check_weight(name: str, value: Any) -> float:
    """A finite number >= 0 (a loss term's weight: 0 switches it off)."""
    return check_number(name, value, 0.0, low_open=False)


def check_label_smoothing(value: Any) -> float:
    """F.cross_entropy's label_smoothing: a Python float (or int) in [0, 1], as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"label_smoothing must be a Python float in [0, 1] (as in F.cross_entropy), "
                        f"got {type(value).__name__}")
    return check_number("label_smoothing", value, 0.0, 1.0, low_open=False, high_open=False,
                        meaning=" (the weight of the uniform distribution over the candidates, as in F.cross_entropy)")


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_reduction(reduction: str) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_rank(rank: Any, world_size: Any) -> None:
    """open_clip's (rank, world_size) of a loss module."""
    check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def check_supported(supported: bool, message: str) -> None:
    """An option flashcl does not implement: a ValueError whose message names it and says what to use instead."""
    if not supported:
        raise ValueError(message)


# -- feature tensors -----------------------------------------------------------------------------------------

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


def check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor, same_rows: bool = False, same_dim: bool = True) -> None:
    """Two feature matrices that can be multiplied: same dim, dtype and device (and rows if asked;
    without `same_dim`, features of two models for the same rows, e.g. a student's and a teacher's)."""
    check_features(name_a, a)
    check_features(name_b, b)
    if same_dim and a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature dimension, "
                         f"got {a.shape[1]} and {b.shape[1]}")
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of rows, "
                         f"got {a.shape[0]} and {b.shape[0]}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def check_constant(name: str, value: Any) -> None:
    """An input the loss treats as a constant (a teacher's features or scale): no gradient may be asked of it."""
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(f"{name} requires grad, but the loss takes no gradient through it: pass {name}.detach() "
                         "(or compute it under torch.no_grad())")


def check_all_or_none(arguments: dict) -> bool:
    """Arguments that only make sense together (a guide's features and thresholds): all given, or none.
    Returns whether they are given."""
    given = [name for name, value in arguments.items() if value is not None]
    if given and len(given) != len(arguments):
        missing = [name for name in arguments if name not in given]
        raise ValueError(f"{', '.join(given)} given without {', '.join(missing)}: pass all of "
                         f"{', '.join(arguments)}, or none")
    return bool(given)


def check_guide_features(features: dict, guide: dict) -> None:
    """A guide mask's features (docs/design.md, "Guide mask"): for each of the (name: tensor) features,
    the guide model's features of the same rows, in the same order, of the guide's own dimension,
    constants on the features' device."""
    guide_items = list(guide.items())
    for (guide_name, guide_features), (name, rows) in zip(guide_items, features.items()):
        check_pair(guide_items[0][0], guide_items[0][1], guide_name, guide_features)
        check_constant(guide_name, guide_features)
        if guide_features.shape[0] != rows.shape[0]:
            raise ValueError(f"{guide_name} must have a row per row of {name} ({rows.shape[0]}), "
                             f"got {guide_features.shape[0]}")
        if guide_features.device != rows.device:
            raise ValueError(f"{guide_name} is on {guide_features.device} but {name} is on {rows.device}")


def check_thresholds(name: str, threshold: Any, rows_name: str, rows: Tensor) -> None:
    """One floating-point threshold per row of `rows`, a constant on its device."""
    if not isinstance(threshold, Tensor) or threshold.shape != (rows.shape[0],) or not threshold.is_floating_point():
        got = f"shape {tuple(threshold.shape)} {threshold.dtype}" if isinstance(threshold, Tensor) else \
            type(threshold).__name__
        raise ValueError(f"{name} must be a floating-point tensor of shape ({rows.shape[0]},), one per row of "
                         f"{rows_name}; got {got}")
    check_constant(name, threshold)
    if threshold.device != rows.device:
        raise ValueError(f"{name} is on {threshold.device} but {rows_name} is on {rows.device}")


def check_enough_rows(name: str, features: Tensor, other_name: str, rows: int) -> None:
    """At least as many rows in `name` as `other_name` has (`rows`): row i of one pairs with row i of the other."""
    if features.shape[0] < rows:
        raise ValueError(f"{name} needs at least as many rows as {other_name} ({rows}), got {features.shape[0]}")


def check_views(name: str, features: Tensor) -> Tensor:
    """SupCon's features: (N, V, D) (V views per sample) or (N, D) (one view), as (N, V, D)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, V, D) or (N, D), got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, V, D) (V views per sample) or (N, D), got shape "
                         f"{tuple(features.shape)}")
    views = features if features.dim() == 3 else features[:, None]
    if views.shape[1] == 0:
        raise ValueError(f"{name} has no views (shape {tuple(features.shape)})")
    check_features(name, views[:, 0])
    return views


# -- scalars that may be tensors ---------------------------------------------------------------------------

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
        tensor = (value if value.dim() == 0 else value.reshape(())).to(device=like.device, dtype=dtype)
        number = value.item() if values_free(value) else None
        if number is None:
            device_assert(torch.isfinite(tensor) & ((tensor > 0) if positive else True),
                          f"{name} must be finite{' and > 0' if positive else ''}")
    elif isinstance(value, (float, int)) and not isinstance(value, bool):
        number = float(value)
        tensor = torch.tensor(number, device=like.device, dtype=dtype)
    else:
        raise TypeError(f"{name} must be a Python float or a 0-d tensor, got {type(value).__name__}")
    if number is not None and not (math.isfinite(number) and (number > 0 or not positive)):
        hint = ""
        if positive and math.isfinite(number):  # a log-scale is the likeliest way to get here
            hint = (f"; it is the multiplier itself: if {number:g} is a log-scale (open_clip's logit_scale "
                    "parameter), pass logit_scale.exp()")
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {number}{hint}")
    return tensor


# -- integer tensors ---------------------------------------------------------------------------------------

def check_integers(name: str, values, n: int, like: Optional[Tensor], meaning: str, like_name: str) -> Tensor:
    """An integer tensor of shape (n,) (on like's device, unless like is None), as int64."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape ({n},), got {type(values).__name__}")
    if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {values.dtype}")
    if values.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) ({meaning}), got {tuple(values.shape)}")
    if like is not None and values.device != like.device:
        raise ValueError(f"{name} is on {values.device} but {like_name} are on {like.device}")
    return values.long()


def check_index_range(name: str, values: Tensor, size: int, what: str) -> None:
    """Every entry of an index tensor lies in [0, size); `what` says what it indexes."""
    if not values_free(values):
        device_assert((values >= 0) & (values < size), f"{name} must lie in [0, {size - 1}] ({what})")
    elif values.numel():
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= size:
            raise ValueError(f"{name} must lie in [0, {size - 1}] ({what}), got values in [{low}, {high}]")


def index_range(values: Tensor) -> Optional[tuple]:
    """(min, max) of an index tensor, for the ranks of a group to check a global range; None where reading
    it is not free (the caller then asserts the range on the device once it is known)."""
    return (int(values.min()), int(values.max())) if values_free(values) and values.numel() else None


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
    if m is not None:
        check_index_range("targets", targets, m, "indices of keys")
    return targets


def check_dataset_index(index, n: int, num_samples: int) -> Tensor:
    """GammaContrastiveLoss's index: each row's dataset index, in [0, num_samples), on any device."""
    index = check_integers("index", index, n, None, "one dataset index per row", "")
    check_index_range("index", index, num_samples, f"num_samples={num_samples}")
    return index


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
    valid = ~torch.isnan(log_weights) & (log_weights != math.inf)
    if values_free(log_weights) and not bool(valid.all()):
        raise ValueError(f"{name} must not hold NaN or +inf (a weight u = exp(log u) must be finite)")
    device_assert(valid, f"{name} must not hold NaN or +inf")
    return log_weights.detach().to(statistics_dtype(like.dtype))


# -- gradient caching's towers -----------------------------------------------------------------------------

def batch_size(name: str, inputs: Any) -> int:
    """Rows of an encoder's inputs: a tensor, or a mapping of tensors (tokenized text: a dict, or
    transformers' BatchEncoding) that share their first dimension. Never an empty batch."""
    if isinstance(inputs, Tensor):
        rows = inputs.shape[0] if inputs.dim() else None
        if rows is None:
            raise ValueError(f"{name}: the inputs must have a batch dimension, got a 0-d tensor")
    elif isinstance(inputs, Mapping):
        sizes = {v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim()}
        if len(sizes) != 1:
            raise ValueError(f"{name}: the tensors of a mapping of inputs must share their first (batch) dimension, "
                             f"got {sorted(sizes) or 'no tensors'}")
        rows = sizes.pop()
    else:
        raise TypeError(f"{name}: inputs must be a tensor or a mapping of tensors (e.g. tokenized text: a dict or a "
                        f"BatchEncoding), got {type(inputs).__name__}")
    if rows == 0:
        raise ValueError(f"{name}: the inputs are an empty batch")
    return rows


def check_towers(towers: Iterable, name: str = "towers", required: bool = True) -> list:
    """cached_loss's (encoder, inputs) pairs, each with its batch size: [(encoder, inputs, rows)]."""
    checked = []
    for t, tower in enumerate(towers):
        if not (isinstance(tower, (tuple, list)) and len(tower) == 2 and callable(tower[0])):
            raise TypeError(f"{name}[{t}] must be an (encoder, inputs) pair with a callable encoder, "
                            f"got {type(tower).__name__}")
        checked.append((tower[0], tower[1], batch_size(f"{name}[{t}]", tower[1])))
    if required and not checked:
        raise ValueError(f"cached_loss needs at least one (encoder, inputs) tower in {name}")
    return checked


def check_scalar_loss(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {loss if not isinstance(loss, Tensor) else loss.shape}")
    return loss


def check_gamma_pairing(targets: Optional[Tensor], n: int, m: int, symmetric: bool, exclude_positive: bool) -> None:
    """The gamma-weighted loss's pairing: a negatives-only mean and a symmetric loss need pairs i <-> i."""
    if exclude_positive and (targets is not None or n != m):
        raise ValueError("exclude_positive=True needs pairs i <-> i: targets=None and as many rows in "
                         f"features_b as in features_a, got targets={'given' if targets is not None else None}, "
                         f"{n} and {m} rows")
    if symmetric and targets is not None:
        raise ValueError("a symmetric loss (log_weights_b given) pairs row i with row i; pass targets=None")


def check_process_group(owner: str, rank: int, world_size: int, group):
    """The group an open_clip-style loss with world_size > 1 runs over, checked against its rank and size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}(world_size={world_size}) needs torch.distributed initialized (init_process_group)")
    group = group or dist.group.WORLD
    actual = (dist.get_rank(group), dist.get_world_size(group))
    if actual != (rank, world_size):
        raise ValueError(f"{owner}(rank={rank}, world_size={world_size}) but this process is rank "
                         f"{actual[0]} of a group of {actual[1]}")
    return group


# -- the sentence-transformers drop-ins ----------------------------------------------------------------------

def check_ranking_options(similarity_fct, similarities: Mapping, scale, directions, valid_directions: Sequence,
                          partition_mode, partition_modes: Sequence, hardness_mode, hardness_modes: Sequence,
                          hardness_strength) -> str:
    """MultipleNegativesRankingLoss's options (sentence-transformers' checks, each error naming its
    argument), and the similarity flashcl fuses; returns the similarity's kind ("cosine" or "dot")."""
    kind = similarities.get(similarity_fct)
    name = getattr(similarity_fct, "__name__", repr(similarity_fct))
    check_supported(kind is not None, f"similarity_fct={name}: flashcl fuses cosine similarity (util.cos_sim) and "
                    "the dot product (util.dot_score) only; use sentence_transformers' own loss for other similarities")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or not scale > 0:
        raise ValueError(f"scale must be a finite number > 0 (1 / temperature, a Python float as in "
                         f"sentence-transformers), got {scale!r}")
    if isinstance(directions, str) or not isinstance(directions, Iterable):
        raise ValueError(f"directions must be a tuple of directions among {tuple(valid_directions)}, "
                         f"got {directions!r}")
    directions = tuple(directions)
    invalid = [d for d in directions if d not in valid_directions]
    if not directions or invalid:
        raise ValueError(f"directions must be a non-empty tuple of directions among {tuple(valid_directions)}, got "
                         f"{directions!r}" + (f" ({', '.join(map(repr, invalid))} unknown)" if invalid else ""))
    if valid_directions[0] not in directions:
        raise ValueError(f"directions must include {valid_directions[0]!r} (it holds the positive pair), got "
                         f"{directions!r}")
    check_choice("partition_mode", partition_mode, partition_modes)
    same_type = [d for d in directions if d in ("query_to_query", "doc_to_doc")]
    if partition_mode == "per_direction" and same_type:
        raise ValueError(f"partition_mode='per_direction' cannot be used with directions {', '.join(same_type)}: "
                         "their candidates never include the positive pair, so a loss per direction is ill-defined "
                         "(sentence-transformers refuses it too); use partition_mode='joint'")
    check_choice("hardness_mode", hardness_mode, (None, *hardness_modes))
    check_number("hardness_strength", hardness_strength, 0.0, low_open=False,
                 meaning=" (the hardness penalty's alpha; 0 switches it off)")
    return kind


def check_columns(count: int) -> None:
    """A ranking loss's columns: the anchors', the positives' and any hard negatives' embeddings."""
    if count < 2:
        raise ValueError(f"expected the anchors' and at least the positives' columns, got {count}")


# -- the transformers patches (flashcl.integrations.transformers) ------------------------------------------

def check_optional_bool(name: str, value: Any) -> Optional[bool]:
    """None, True or False (None: a default chosen at each call)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None, True or False, got {value!r}")
    return value


def check_group_option(name: str, value: Any):
    """A process group option: None (this process), "world" (the default group, resolved when the loss runs)
    or a torch.distributed.ProcessGroup."""
    import torch.distributed as dist

    if value is None or (isinstance(value, str) and value == "world"):
        return value
    if isinstance(value, str):
        raise ValueError(f'{name} must be None, "world" or a torch.distributed.ProcessGroup, got {value!r}')
    if not (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        raise TypeError(f'{name} must be None, "world" or a torch.distributed.ProcessGroup, got '
                        f"{type(value).__name__}")
    return value


# -- open_clip's arguments (flashcl.SigLipLoss, flashcl.integrations.open_clip) -----------------------------

def check_chunk_size(chunk_size: Any) -> Optional[int]:
    """open_clip's SigLipLoss(chunk_size=): None or an int >= 0 (open_clip's rows per chunk; 0, its
    default, means no chunking). flashcl's tiles bound the memory whatever it is, so it changes nothing."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(f"chunk_size must be None or an int >= 0 (open_clip's rows per chunk, 0 for none; flashcl "
                         f"ignores it), got {chunk_size!r}")
    return chunk_size


def check_token_id(name: str, value: Any) -> int:
    """A token id (any int, e.g. a padding id left out of a cross-entropy)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (a token id), got {value!r}")
    return value


def check_caption(logits: Any, labels: Any) -> None:
    """CoCa's caption inputs: the decoder's (batch, length, vocab) floating logits and the (batch, length)
    integer labels, on one device."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        what = f"shape {tuple(logits.shape)}, {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating tensor of shape (batch, length, vocab), got {what}")
    if (not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        what = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of token ids (e.g. torch.long), got {what}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels must have shape (batch, length) = {tuple(logits.shape[:2])} (logits' first two "
                         f"dimensions), got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
