"""Supervised contrastive loss (Khosla et al. 2020, "SupCon") with O(N D) memory.

Views are stacked view-major as in the reference implementation: contrast = [view 0; view 1; ...]
(V N rows); the anchors are all of them ("all") or view 0 ("one"), anchor k being contrast row k.
With S = contrast features scaled by 1/T (S_ka = x_k . x_a / T), P(k) the other contrast rows of
k's label, per anchor

    l_k = (T / T_base) (LSE_{a != k} S_ka - (1/|P(k)|) sum_{p in P(k)} S_kp).

The denominator is primitive 1 with the diagonal excluded (flashcl.row_logsumexp's Function). The
positive term needs no pairwise product at all: sum_{p in P(k)} x_p = C_{y_k} - x_k with C_c the
sum of label c's contrast features, so it is O(N D) work that autograd differentiates. Classes are
numbered by sorting the labels (_core.group_ids), so no shape depends on the labels' values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _core, checks

CONTRAST_MODES = ("all", "one")


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
        temperature: S = x . x' / temperature (the reference's default: 0.07).
        base_temperature: the loss is scaled by temperature / base_temperature (the reference's
            default: 0.07).
        contrast_mode: "all" (every view is an anchor) | "one" (view 0 only).
        reduction: "mean" over the anchors that have a positive | "sum" | "none" (per anchor, in
            the reference's order: view 0 of every sample, then view 1, ...; 0 where no positive).
        backend: as for every flashcl loss.
        group (torch.distributed.ProcessGroup | None): as for every flashcl loss. With a group each
            rank passes its shard of samples (and their labels); every rank's views are candidates
            of every anchor.

    Equals the reference SupConLoss(temperature, contrast_mode, base_temperature)(features, labels)
    where every anchor has a positive; where some have none the reference still counts them in
    its mean (as zeros), flashcl leaves them out of it. The reference's `mask=` (an N x N matrix)
    has no counterpart: express the positives as labels.
    """
    with _core.Call("supcon_loss", group, backend) as call:
        views = checks.check_views("features", features)
        n, view_count, dim = views.shape
        if labels is not None:
            labels = checks.check_integers("labels", labels, n, views, "one label per sample", "features")
        elif view_count < 2:
            raise ValueError("labels=None makes each sample its own class, so its positives are its other views: "
                             f"features needs V >= 2 views (N, V, D), got shape {tuple(features.shape)}")
        checks.check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
        temperature = checks.check_positive_number("temperature", temperature)
        base_temperature = checks.check_positive_number("base_temperature", base_temperature)
        call.reduction(reduction)
        contrast = views.transpose(0, 1).reshape(view_count * n, dim)
        anchors = contrast if contrast_mode == "all" else contrast[:n]
        call.layout(anchors, contrast)
        scale = call.scale("1 / temperature", 1.0 / temperature)
        call.agree(views=view_count, labelled=labels is not None, contrast_mode=contrast_mode,
                   temperature=temperature, base_temperature=base_temperature)
    plan = call.plan(exclude_diagonal=True)
    shards = plan.shards
    # "all": the contrast rows against themselves (one tensor, not the same one twice).
    row_lse = _core.row_logsumexp(anchors, None if contrast_mode == "all" else contrast, scale, plan)

    # Every rank's contrast rows' labels (a sample without a label: its own class), numbered the same
    # way on every rank; the class sums run over every rank's rows.
    sample_labels = labels if labels is not None else torch.arange(n, device=contrast.device) + shards.key_offset
    every_label = shards.gather_detached(sample_labels.repeat(view_count))
    every_class = _core.group_ids(every_label)
    own_class = every_class[shards.key_offset:shards.key_offset + contrast.shape[0]]
    dtype = scale.dtype
    class_sums = shards.sum(contrast.new_zeros(every_label.shape[0], dim, dtype=dtype)
                            .index_add(0, own_class, contrast.to(dtype)))
    class_sizes = torch.zeros(every_label.shape[0], dtype=dtype, device=contrast.device).index_add_(
        0, every_class, torch.ones_like(every_class, dtype=dtype))
    anchor_class = own_class[:anchors.shape[0]]
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
    counted = shards.sum(has_positive.sum().to(dtype))
    return losses.sum() * shards.world_size / counted.clamp(min=1)
