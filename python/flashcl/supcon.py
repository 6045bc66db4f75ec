"""Supervised contrastive loss (Khosla et al. 2020, "SupCon") with O(N + C D) memory.

Views are stacked view-major as in the reference implementation: contrast = [view 0; view 1; ...]
(V N rows); the anchors are all of them ("all") or view 0 ("one"), anchor k being contrast row k.
With S = contrast features scaled by 1/T (S_ka = x_k . x_a / T), P(k) the other contrast rows of
k's label, per anchor

    l_k = (T / T_base) (LSE_{a != k} S_ka - (1/|P(k)|) sum_{p in P(k)} S_kp).

The denominator is primitive 1 with the diagonal excluded (flashcl.row_logsumexp's Function). The
positive term needs no pairwise product at all: sum_{p in P(k)} x_p = C_{y_k} - x_k with C_c the
sum of label c's contrast features, so it is O(N D + C D) work that autograd differentiates.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import as_scale, check_features, check_integers, check_reduction, statistics_dtype
from .distributed import ShardedCall
from .losses import RowLogSumExp
from .primitives import resolve_backend

CONTRAST_MODES = ("all", "one")


def _as_views(features: Tensor) -> Tensor:
    """(N, V, D) from (N, V, D) or (N, D) (one view)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor of shape (N, V, D) or (N, D), got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be (N, V, D) (V views per sample) or (N, D), got shape "
                         f"{tuple(features.shape)}")
    views = features if features.dim() == 3 else features[:, None]
    if views.shape[1] == 0:
        raise ValueError(f"features has no views (shape {tuple(features.shape)})")
    check_features("features", views[:, 0])
    return views


def supcon_loss(
    features: Tensor,
    labels: Optional[Tensor] = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrast_mode: str = "all",
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """Supervised contrastive loss: every other sample (or view) with the same label is a positive.

    Args:
        features: (N, V, D), V views of each of N samples (normalize them first, as SupCon does),
            or (N, D) with labels.
        labels: (N,) integer class of each sample; None makes each sample its own class (SimCLR's
            loss over the views, which needs V >= 2).
        temperature, base_temperature: S = x . x' / temperature, the loss scaled by
            temperature / base_temperature (the reference's defaults: 0.07 and 0.07).
        contrast_mode: "all" (every view is an anchor) | "one" (view 0 only).
        reduction: "mean" over the anchors that have a positive | "sum" | "none" (per anchor, in
            the reference's order: view 0 of every sample, then view 1, ...; 0 where no positive).
        backend, group: as for every flashcl loss. With a group each rank passes its shard of
            samples (and their labels); every rank's views are candidates of every anchor.

    Equals the reference SupConLoss(temperature, contrast_mode, base_temperature)(features, labels)
    where every anchor has a positive; where some have none the reference still counts them in
    its mean (as zeros), flashcl leaves them out of it. The reference's `mask=` (an N x N matrix)
    has no counterpart: express the positives as labels.
    """
    with ShardedCall(group, "supcon_loss") as call:
        views = _as_views(features)
        n, view_count = views.shape[0], views.shape[1]
        if labels is not None:
            labels = check_integers("labels", labels, n, views, "one label per sample", "features")
        if contrast_mode not in CONTRAST_MODES:
            raise ValueError(f"contrast_mode must be one of {CONTRAST_MODES}, got {contrast_mode!r}")
        for name, value in (("temperature", temperature), ("base_temperature", base_temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
        if labels is None and view_count < 2:
            raise ValueError("labels=None makes each sample its own class, so its positives are its other views: "
                             f"features needs V >= 2 views (N, V, D), got shape {tuple(features.shape)}")
        check_reduction(reduction)
        contrast = views.transpose(0, 1).reshape(view_count * n, views.shape[2])
        anchors = contrast if contrast_mode == "all" else contrast[:n]
        call.describe(anchors, contrast, views=view_count, labelled=labels is not None, contrast_mode=contrast_mode,
                      temperature=temperature, base_temperature=base_temperature, reduction=reduction)
    shards = call.shards
    dtype = statistics_dtype(contrast.dtype)
    scale = as_scale("1 / temperature", 1.0 / temperature, contrast)
    row_lse = RowLogSumExp.apply(anchors, contrast, scale, True, resolve_backend(backend, contrast), shards)

    # Labels as indices into the classes of every rank (a sample without a label: its own class).
    sample_labels = labels if labels is not None else torch.arange(n, device=contrast.device) + shards.key_offset
    contrast_labels = sample_labels.repeat(view_count)
    classes = torch.unique(shards.gather_detached(contrast_labels))
    contrast_class = torch.searchsorted(classes, contrast_labels)
    class_sums = shards.sum(torch.zeros(len(classes), contrast.shape[1], dtype=dtype, device=contrast.device)
                            .index_add(0, contrast_class, contrast.to(dtype)))
    class_sizes = shards.sum(torch.bincount(contrast_class, minlength=len(classes)))
    anchor_class = contrast_class[:anchors.shape[0]]
    positives = class_sizes[anchor_class] - 1  # the anchor's own row is in its class, not a positive of it
    anchor_features = anchors.to(dtype)
    positive_sum = scale * torch.sum(anchor_features * (class_sums[anchor_class] - anchor_features), dim=1)
    has_positive = positives > 0
    losses = torch.where(has_positive, row_lse - positive_sum / positives.clamp(min=1), 0.0)
    losses = losses * (temperature / base_temperature)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum() * shards.world_size
    # Sharded: world_size times this rank's share of the mean over every rank's anchors with a positive.
    counted = shards.sum(has_positive.sum())
    return losses.sum() * shards.world_size / counted.clamp(min=1)
