"""Guided in-batch negatives (GISTEmbed, sentence-transformers' GISTEmbedLoss) without any N x N matrix.

A guide model (frozen; its features G of their own dimension D') scores every pair a student's loss
contrasts. Candidates the guide finds more similar to an anchor than the anchor's own positive
(suspected false negatives) are left out of the anchor's denominator:

    l_i = LSE over the kept candidates k of s a_i . k   -  s a_i . p_i

with the candidates of anchor i drawn from four blocks: every positive p_j (its own always kept), and
optionally every anchor a_j (contrast_anchors), every positive against p_i (contrast_positives: the
logit s p_i . p_j) and every hard negative n_j (any number of them). In each block the candidate k is left out where the
guide similarity of the block's pair exceeds anchor i's threshold

    theta_i = g_i - margin                (margin_strategy="absolute")
    theta_i = g_i - |g_i| margin          (margin_strategy="relative"),   g_i = G(a_i) . G(p_i).

Each block is primitive 1 with a guide mask (docs/design.md, "Guide mask"), differentiable through
`_core.row_logsumexp`; the blocks combine with one log-sum-exp per anchor, O(N) work.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _core, checks
from .distributed import SINGLE_PROCESS

MARGIN_STRATEGIES = ("absolute", "relative")


def gist_loss(
    anchors: Tensor,
    positives: Tensor,
    guide_anchors: Tensor,
    guide_positives: Tensor,
    scale: Union[float, Tensor],
    negatives: Optional[Tensor] = None,
    guide_negatives: Optional[Tensor] = None,
    *,
    margin: float = 0.0,
    margin_strategy: str = "absolute",
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    reduction: str = "mean",
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """GISTEmbed's loss: InfoNCE of anchors against positives (and, optionally, anchors, positives and
    hard negatives as extra candidates) with the candidates a guide scores above the positive left out.

    Args:
        anchors: (N, D) the student's anchor features, row i paired with row i of positives.
        positives: (N, D) the student's positive features.
        guide_anchors: (N, D') the guide model's features of the anchors, a constant (compute it under
            torch.no_grad()); D' may differ from D.
        guide_positives: (N, D') the guide's features of the positives, a constant.
        scale: the multiplier of the student's logits (1 / temperature), a float or 0-d tensor.
        negatives: (M, D) hard negatives, candidates of every anchor (several per anchor as
            concatenated columns); with guide_negatives, or neither.
        guide_negatives: (M, D') the guide's features of the negatives, a constant.
        margin: candidate k of anchor i is left out where its guide similarity exceeds
            theta_i = g_i - margin ("absolute") or g_i - |g_i| margin ("relative"), g_i the guide
            similarity of anchor i and its positive; a candidate whose guide similarity equals theta_i
            is kept. The anchor's own positive is always kept.
        margin_strategy: "absolute" | "relative", as above.
        contrast_anchors: anchors are candidates of each other (a_i . a_j, a_i against itself included
            unless the guide leaves it out, as sentence-transformers does).
        contrast_positives: positives are candidates of anchor i through p_i . p_j (likewise).
        reduction: "mean" | "sum" | "none" (per anchor, shape (N,)).
        backend: as for every flashcl loss; the CUDA C++ kernels have no guide mask yet and hand over
            to the next best backend with a warning.
        group (torch.distributed.ProcessGroup | None): each rank passes its shard of rows; positives and
            negatives (and their guide features) are every rank's, anchors contrast with this rank's
            anchors only (sentence-transformers' gather_across_devices), and each rank gets its share
            times the world size (see flashcl.distributed).

    Features are used as given: normalize student and guide features first for GISTEmbed's cosine
    similarity. The guide similarities are computed from the guide features rounded to the student
    features' dtype (under torch.autocast, autocast's), accumulated in fp32 (fp64 for fp64): with
    half-precision features a candidate within that rounding of its threshold may fall on the other
    side than in an fp32 computation. Memory O((N + M)(D + D')) beyond the inputs; no N x N matrix.
    """
    with _core.Call("gist_loss", group, backend, function="guide") as call:
        call.features("anchors", anchors, "positives", positives, same_rows=True)
        has_negatives = checks.check_all_or_none({"negatives": negatives, "guide_negatives": guide_negatives})
        call.reduction(reduction)
        scale = call.scale("scale", scale)
        features = {"anchors": anchors, "positives": positives}
        guide = {"guide_anchors": guide_anchors, "guide_positives": guide_positives}
        if has_negatives:
            checks.check_pair("anchors", anchors, "negatives", negatives)
            features["negatives"], guide["guide_negatives"] = negatives, guide_negatives
        checks.check_guide_features(features, guide)
        margin = checks.check_number("margin", margin, meaning=" (how far below the positive's guide similarity "
                                     "a candidate's may reach before it is left out)")
        checks.check_choice("margin_strategy", margin_strategy, MARGIN_STRATEGIES)
        call.agree(margin=margin, margin_strategy=margin_strategy, contrast_anchors=bool(contrast_anchors),
                   contrast_positives=bool(contrast_positives), negatives=has_negatives)
    plan = call.plan(reduction=reduction)

    anchors, positives, negatives = _core.matmul_inputs(anchors, positives, negatives)
    guide_anchors, guide_positives, guide_negatives = (
        None if g is None else g.to(anchors.dtype) for g in (guide_anchors, guide_positives, guide_negatives))
    pairs = torch.arange(anchors.shape[0], device=anchors.device)
    guide_positive = _core.positive_logits(guide_anchors, guide_positives, pairs, torch.ones_like(scale))
    threshold = guide_positive - margin * (1.0 if margin_strategy == "absolute" else guide_positive.abs())

    def block(queries, keys, plan, guide_queries, guide_keys):
        return _core.row_logsumexp(queries, keys, scale, plan, (guide_queries, guide_keys, threshold))

    positive = _core.positive_logits(anchors, positives, pairs, scale)
    # Against the positives the own positive is never left out: its term joins the others' directly.
    lse = [torch.logaddexp(block(anchors, positives, _core.Plan(plan.backend, plan.shards, exclude_diagonal=True),
                                 guide_anchors, guide_positives), positive)]
    if contrast_anchors:  # this rank's anchors only, as sentence-transformers gathers no anchors
        lse.append(block(anchors, None, _core.Plan(plan.backend, SINGLE_PROCESS), guide_anchors, None))
    if contrast_positives:
        lse.append(block(positives, None, plan, guide_positives, None))
    if has_negatives:
        lse.append(block(anchors, negatives, plan, guide_anchors, guide_negatives))
    losses = torch.logsumexp(torch.stack(lse), dim=0) - positive
    return _core.reduce(losses, plan)
