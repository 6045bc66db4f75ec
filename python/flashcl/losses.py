"""The softmax-family losses: InfoNCE, CLIP, NT-Xent, the gamma-weighted loss, and the differentiable
row log-sum-exp they share, each a short function over flashcl._core (docs/design.md, "The losses").

With group= every loss runs through flashcl.distributed: a rank's anchors against every rank's
candidates (its own first), with the column statistics, weights and gradients exchanged there.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _core
from .checks import (check_all_or_none, check_gamma_pairing, check_guide_features, check_label_smoothing,
                     check_log_weights, check_thresholds)


def row_logsumexp(
    queries: Tensor,
    keys: Tensor,
    scale: Union[float, Tensor],
    *,
    exclude_diagonal: bool = False,
    guide_queries: Optional[Tensor] = None,
    guide_keys: Optional[Tensor] = None,
    guide_threshold: Optional[Tensor] = None,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """``torch.logsumexp(scale * queries @ keys.T, dim=1)`` without the (N, M) matrix, differentiable.

    Args:
        queries: (N, D); keys: (M, D); scale: a float or a 0-d tensor (may require grad).
        exclude_diagonal: leave out j == i (needs N == M), e.g. a sample against its own batch.
        guide_queries: a guide mask's features of the queries, (N, D'), D' of its own: another model's
            features of the same rows, a constant. With guide_keys and guide_threshold (all three or
            none), key j is left out of query i's sum where
            ``guide_queries[i] @ guide_keys[j] > guide_threshold[i]`` (GISTEmbed's suspected false
            negatives; see `flashcl.gist_loss`). The guide similarity is computed from the guide
            features in the queries' dtype, accumulated in fp32 (fp64 for fp64).
        guide_keys: the guide's features of the keys, (M, D'), a constant; with a group, this rank's
            rows, gathered as the keys are.
        guide_threshold: (N,) one threshold per query, a constant.
        backend: as for every flashcl loss.
        group (torch.distributed.ProcessGroup | None): a process group: each rank passes its shard of queries and of
            keys, and gets its queries' log-sum-exp over every rank's keys (exclude_diagonal then
            leaves out a query's own key, the paired shards having equal sizes).

    Returns the (N,) row log-sum-exp in fp32 (fp64 for fp64 inputs); gradients reach queries,
    keys and scale exactly, with O(N + M) extra memory. The building block of losses whose
    denominator is not InfoNCE's (a uniformity term, a global log-partition).
    """
    guide = {"guide_queries": guide_queries, "guide_keys": guide_keys, "guide_threshold": guide_threshold}
    any_guide = any(value is not None for value in guide.values())
    with _core.Call("row_logsumexp", group, backend, function="guide" if any_guide else "exp") as call:
        call.features("queries", queries, "keys", keys, same_rows=exclude_diagonal)
        guided = check_all_or_none(guide)
        if guided:
            check_guide_features({"queries": queries, "keys": keys},
                                 {"guide_queries": guide_queries, "guide_keys": guide_keys})
            check_thresholds("guide_threshold", guide_threshold, "queries", queries)
        scale = call.scale("scale", scale)
        call.agree(exclude_diagonal=exclude_diagonal, guided=guided)
    return _core.row_logsumexp(queries, keys, scale, call.plan(exclude_diagonal=exclude_diagonal),
                               (guide_queries, guide_keys, guide_threshold) if guided else None)


def infonce_loss(
    queries: Tensor,
    keys: Tensor,
    scale: Union[float, Tensor],
    targets: Optional[Tensor] = None,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """One-directional InfoNCE: cross-entropy of `scale * queries @ keys.T` against `targets`.

    Args:
        queries: (N, D) anchors, one per row.
        keys: (M, D) candidates; M may exceed N (extra negatives, a queue).
        scale: inverse temperature, a float or a 0-d tensor (may require grad).
        targets: (N,) integer index of each query's positive key; default i -> i (needs M >= N).
            With a group, indices into the concatenation of every rank's keys.
        reduction: "mean" | "sum" | "none" (per-query losses, shape (N,)).
        label_smoothing: eps, a float in [0, 1], as in ``F.cross_entropy``: each query's target puts
            1 - eps on its positive and eps / C on every one of the C = M candidates (with a group,
            every rank's), so l_i = r_i - (1 - eps) S_{i,t_i} - (eps / C) sum_j S_ij. 0 (the
            default) is plain InfoNCE. It costs O(N D) more work (with a group, a sum over ranks of
            the queries' positive keys and of the keys' sum).
        backend: "auto" | "triton" | "cuda" | "torch"; default $FLASHCL_BACKEND or "auto".
        group (torch.distributed.ProcessGroup | None): a process group (None: this process only). Each rank passes its
            shard of the rows; the loss is that of the concatenation of every rank's shards in rank
            order, and each rank gets back its share times the world size, so DDP's average over
            ranks is exactly the global loss and gradient (see flashcl.distributed).

    Equals ``F.cross_entropy(scale * queries @ keys.T, targets, reduction=reduction,
    label_smoothing=label_smoothing)`` without the (N, M) matrix. Features are used as given:
    normalize them first for cosine logits.
    The loss is returned in fp32 (fp64 for fp64 inputs); gradients in the input dtype.
    """
    with _core.Call("infonce_loss", group, backend) as call:
        call.features("queries", queries, "keys", keys)
        call.reduction(reduction)
        scale = call.scale("scale", scale)
        call.targets(targets)
        label_smoothing = check_label_smoothing(label_smoothing)
        call.agree(label_smoothing=label_smoothing)
    plan = call.plan(reduction=reduction)
    loss = _core.contrastive_loss(queries, keys, scale, call.positions, plan).loss
    if not label_smoothing:
        return loss
    x, y = _core.matmul_inputs(queries, keys)  # the features the core multiplied (autocast's dtype)
    with _core.autocast_off(x.device):
        shards, dtype = call.shards, scale.dtype
        count = shards.keys if call.sharded else y.shape[0]
        positives = _positive_keys(y, targets, call, dtype)
        terms = _smoothing_terms(x, positives, shards.sum(y.sum(0, dtype=dtype)), count, scale)
    return loss + _core.reduce(label_smoothing * terms, plan)


def _smoothing_terms(anchors: Tensor, positives: Tensor, candidate_sum: Tensor, count: int, scale: Tensor) -> Tensor:
    """Label smoothing's addition to each anchor's InfoNCE, before its weight eps:
    S_{i,t_i} - mean_j S_ij = s x_i . (y_{t_i} - sum_j y_j / C), O(N D), in the statistics dtype."""
    dtype = scale.dtype
    return scale * (anchors.to(dtype) * (positives.to(dtype) - candidate_sum / count)).sum(1)


def _positive_keys(keys: Tensor, targets: Optional[Tensor], call: _core.Call, dtype: torch.dtype) -> Tensor:
    """Each anchor's positive key y_{t_i}, differentiably. With a group the positive may sit on any rank:
    every rank fills, for every rank's anchors (their global targets gathered), the rows it holds, and a
    sum over ranks assembles them, whose backward brings each key its gradient from every rank."""
    if not call.sharded:
        return keys[call.positions]
    shards, n = call.shards, call.positions.shape[0]
    if targets is None:  # global anchor i against global key i
        targets = torch.arange(n, device=keys.device) + shards.anchor_offset
    rows = shards.gather_anchors(targets.long()) - shards.key_offset  # every anchor's target, as a row here
    held = (rows >= 0) & (rows < keys.shape[0])
    filled = torch.where(held[:, None], keys[rows.clamp(0, keys.shape[0] - 1)].to(dtype), 0.0)
    return shards.sum(filled)[shards.anchor_offset:shards.anchor_offset + n]


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """Symmetric CLIP loss: 1/2 (image->text + text->image cross-entropy), pair i matching i.

    Args:
        image_features: (N, D), row i the positive of row i of text_features.
        text_features: (N, D), row i the positive of row i of image_features.
        logit_scale: the multiplier itself (open_clip's ``logit_scale.exp()``), a float or 0-d tensor.
        reduction: "mean" | "sum" | "none" (per-pair losses 1/2 (l_i2t + l_t2i), shape (N,)).
        label_smoothing: eps, a float in [0, 1], as in ``F.cross_entropy``, in both directions: each
            image's target puts 1 - eps on its text and eps / N on every text, each text's likewise
            over the images (N: every rank's pairs with a group). 0 (the default) is plain CLIP.
            It costs O(N D) more work (with a group, a sum over ranks of the features' sums).
        backend: "auto" | "triton" | "cuda" | "torch"; default $FLASHCL_BACKEND or "auto".
        group (torch.distributed.ProcessGroup | None): a process group (None: this process only). Each rank passes its
            shard of the rows; the loss is that of the concatenation of every rank's shards in rank
            order, and each rank gets back its share times the world size, so DDP's average over
            ranks is exactly the global loss and gradient (see flashcl.distributed).

    With S = logit_scale * image_features @ text_features.T and labels 0..N-1, equals
    ``(F.cross_entropy(S, labels, label_smoothing=eps) + F.cross_entropy(S.T, labels, label_smoothing=eps)) / 2``
    (reduction "mean") without the (N, N) matrix. Features are used as given; CLIP-style callers
    L2-normalize them first.
    """
    with _core.Call("clip_loss", group, backend) as call:
        call.features("image_features", image_features, "text_features", text_features, same_rows=True)
        call.reduction(reduction)
        logit_scale = call.scale("logit_scale", logit_scale)
        call.targets(None)
        label_smoothing = check_label_smoothing(label_smoothing)
        call.agree(label_smoothing=label_smoothing)
    plan = call.plan(reduction=reduction, symmetric=True)
    loss = _core.contrastive_loss(image_features, text_features, logit_scale, call.positions, plan).loss
    if not label_smoothing:
        return loss
    x, y = _core.matmul_inputs(image_features, text_features)  # the features the core multiplied
    with _core.autocast_off(x.device):
        dtype, count = logit_scale.dtype, call.shards.global_anchors(x.shape[0])
        text_sum, image_sum = call.shards.sum(torch.stack([y.sum(0, dtype=dtype), x.sum(0, dtype=dtype)]))
        terms = 0.5 * (_smoothing_terms(x, y, text_sum, count, logit_scale)  # image -> text, over the texts
                       + _smoothing_terms(y, x, image_sum, count, logit_scale))  # text -> image, over the images
    return loss + _core.reduce(label_smoothing * terms, plan)


def nt_xent_loss(
    z1: Tensor,
    z2: Tensor,
    scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """SimCLR's NT-Xent over the 2N samples [z1; z2]: each sample's positive is its other view,
    its negatives the other 2N - 2 samples, never itself.

    Args:
        z1: (N, D) the first view, row i from example i.
        z2: (N, D) the second view, row i from the same example as row i of z1.
        scale: inverse temperature 1/tau, a float or 0-d tensor.
        reduction: "mean" | "sum" | "none" (shape (2N,): anchors z1 then z2).
        backend: "auto" | "triton" | "cuda" | "torch"; default $FLASHCL_BACKEND or "auto".
        group (torch.distributed.ProcessGroup | None): a process group (None: this process only). Each rank passes its
            shard of the rows; the loss is that of the concatenation of every rank's shards in rank
            order, and each rank gets back its share times the world size, so DDP's average over
            ranks is exactly the global loss and gradient (see flashcl.distributed). With a group every rank's samples are negatives of every anchor, and
            reduction="none" returns this rank's anchors (its z1, then its z2).

    Features are used as given; SimCLR's cosine similarity means normalizing them first.
    """
    with _core.Call("nt_xent_loss", group, backend) as call:
        call.features("z1", z1, "z2", z2, same_rows=True)
        samples = torch.cat([z1, z2])
        call.layout(samples, samples)
        call.reduction(reduction)
        scale = call.scale("scale", scale)
    n = z1.shape[0]
    other_view = torch.arange(2 * n, device=z1.device).roll(n)  # own samples first, so local indices
    plan = call.plan(reduction=reduction, exclude_diagonal=True)
    return _core.contrastive_loss(samples, None, scale, other_view, plan).loss


class GammaWeightedLoss(NamedTuple):
    loss: Tensor  # the reduced gamma-weighted loss; its gradient is the decomposed gradient
    row_lse: Tensor  # log sum_j exp(S_ij) over each row's denominator, no gradient
    col_lse: Optional[Tensor]  # the same over columns (symmetric only)


def gamma_weighted_loss(
    features_a: Tensor,
    features_b: Tensor,
    scale: Union[float, Tensor],
    log_weights_a: Tensor,
    log_weights_b: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    reduction: str = "mean",
    exclude_positive: bool = False,
    *,
    backend: Optional[str] = None,
    group=None,
) -> GammaWeightedLoss:
    """The decomposed contrastive loss of the NeurIPS 2022 gamma-weighting (its M-step).

    Per anchor i of features_a: l_i = -S_{i,t_i} + u_i * mean_j exp(S_ij), S = scale * a @ b.T,
    with u_i = exp(log_weights_a[i]) held fixed (no gradient). Given u the loss is linear in
    the denominator, so a minibatch estimates its gradient without bias; u_i = 1 / mean_j exp(S_ij)
    gives exactly the InfoNCE gradient. With log_weights_b (N = M, pairs i <-> i) the loss is
    symmetric, 1/2 (a->b + b->a), each direction with its own weights. exclude_positive=True
    takes the mean over negatives only (j != i; pairs only): the objective of the paper and of
    SogCLR, and the one whose in-batch estimate is unbiased.

    With a group (each rank its shard of anchors, candidates and weights; targets then index every
    rank's candidates, default the paired one), the means run over every rank's candidates and
    row_lse / col_lse are this rank's anchors' / candidates'.

    Returns (loss, row_lse, col_lse): the batch's log-sum-exp statistics come for free, for
    running estimates of the denominators. Backward is primitive 2 with offsets log K - log u.
    """
    symmetric = log_weights_b is not None
    with _core.Call("gamma_weighted_loss", group, backend) as call:
        call.features("features_a", features_a, "features_b", features_b, same_rows=symmetric)
        call.reduction(reduction)
        n, m = features_a.shape[0], features_b.shape[0]
        check_gamma_pairing(targets, n, m, symmetric, exclude_positive)
        call.targets(targets)
        log_weights_a = check_log_weights("log_weights_a", log_weights_a, n, features_a)
        if symmetric:
            log_weights_b = check_log_weights("log_weights_b", log_weights_b, m, features_a)
        scale = call.scale("scale", scale)
        call.agree(symmetric=symmetric, exclude_positive=exclude_positive)
    plan = call.plan(reduction=reduction, symmetric=symmetric, exclude_diagonal=exclude_positive)
    return GammaWeightedLoss(*_core.contrastive_loss(features_a, features_b, scale, call.positions, plan,
                                                     log_weights=(log_weights_a, log_weights_b)))
