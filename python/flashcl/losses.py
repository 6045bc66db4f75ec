"""InfoNCE, CLIP, NT-Xent and the gamma-weighted loss as one autograd Function over the two primitives.

With S = s * x @ y.T, r = row log-sum-exp, c = column log-sum-exp, t_i the column of row
i's positive and K the number of terms in a row's denominator, the per-anchor loss of
one direction is

    InfoNCE:        l_i = r_i - S_{i,t_i}                                (backward offset o_i = r_i)
    gamma-weighted: l_i = u_i exp(r_i - log K) - S_{i,t_i}               (backward offset o_i = log K - log u_i)

(the second is -S_{i,t_i} + u_i * mean_j exp(S_ij), linear in the denominator, for weights
u_i that carry no gradient). A symmetric loss (CLIP, t_i = i) averages the row direction
and the same over columns. In both forms d l_i / d S_ij = exp(S_ij - o_i) - [j == t_i], so
the backward is primitive 2 with a = w (or w/2), the offsets above, and the sparse positive
term -w_i at (i, t_i), where w_i = dL/dl_i. Forward saves the inputs and O(N + M) vectors.

With group= every loss runs through flashcl.distributed: a rank's anchors against every rank's
candidates (its own first), with the column statistics, weights and gradients exchanged there.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .checks import as_scale, check_log_weights, check_pair, check_reduction, check_targets
from .distributed import ShardedCall
from .primitives import resolve_backend

POSITIVE_CHUNK_ELEMENTS = 2**20


def positive_logits(x: Tensor, y: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """S_{i,t_i} = s * x_i . y_{t_i} in the statistics dtype, a chunk of rows at a time."""
    dtype = scale.dtype
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    rows_per_chunk = max(1, POSITIVE_CHUNK_ELEMENTS // x.shape[1])
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        out[rows] = (x[rows].to(dtype) * y[targets[rows]].to(dtype)).sum(dim=1)
    return out * scale


def _reduce(losses: Tensor, reduction: str, shards) -> Tensor:
    """The reduced loss; sharded, world_size times this rank's share of the global one."""
    if reduction == "mean":
        return losses.sum() / shards.mean_count(losses.shape[0])
    if reduction == "sum":
        return losses.sum() * shards.world_size
    return losses


def _anchor_weights(grad: Tensor, reduction: str, n: int, shards) -> Tensor:
    """w_i = dL/dl_i for the reduced loss L of `_reduce`."""
    if reduction == "mean":
        return (grad / shards.mean_count(n)).expand(n)
    if reduction == "sum":
        return (grad * shards.world_size).expand(n)
    return grad


def contrastive_statistics(x, keys, scale, targets, symmetric, exclude_diagonal, backend, shards):
    """(row LSE, column LSE of this rank's columns or None, positive logits) of anchors x against
    candidates `keys` (every rank's, from shards.candidates), targets in candidate order."""
    row_lse, partial_col_lse = backend.lse(x, keys, scale, rows=True, cols=symmetric,
                                           exclude_diagonal=exclude_diagonal)
    col_lse = shards.column_lse(partial_col_lse) if symmetric else None
    return row_lse, col_lse, positive_logits(x, keys, targets, scale)


def denominator_sizes(n: int, m: int, exclude_diagonal: bool):
    """(K_rows, K_cols): the terms in a row's and a column's denominator, one fewer when i == j is excluded."""
    excluded = 1 if exclude_diagonal else 0
    return m - excluded, n - excluded


def _direction(lse: Tensor, positive: Tensor, log_weights: Optional[Tensor], count: int):
    """(per-anchor loss, backward offset) of one direction: InfoNCE, or the gamma-weighted sub-loss."""
    if log_weights is None:
        return lse - positive, lse
    return torch.exp(log_weights + lse - math.log(count)) - positive, math.log(count) - log_weights


class ContrastiveLoss(torch.autograd.Function):
    """Returns (reduced loss, row LSE, column LSE or None); the LSEs carry no gradient.

    y=None means y is x (NT-Xent's self-similarity). log_weights = (row log u, column log u or
    None) selects the gamma-weighted form. statistics = (row LSE, column LSE, positive logits)
    of these very inputs, when the caller computed them already (GammaContrastiveLoss does,
    to update its state before it samples the weights). shards: flashcl.distributed's layout
    of this call (distributed.SINGLE_PROCESS without a group); targets index its candidate order.
    """

    @staticmethod
    def forward(ctx, x, y, scale, targets, log_weights, statistics, symmetric, exclude_diagonal, reduction,
                backend, shards):
        keys = shards.candidates(x if y is None else y)
        if statistics is None:
            statistics = contrastive_statistics(x, keys, scale, targets, symmetric, exclude_diagonal, backend, shards)
        row_lse, col_lse, positive = statistics
        row_log_u, col_log_u = log_weights if log_weights is not None else (None, None)
        row_count, col_count = denominator_sizes(shards.global_anchors(x.shape[0]), keys.shape[0], exclude_diagonal)
        losses, row_offset = _direction(row_lse, positive, row_log_u, row_count)
        col_offset = None
        if symmetric:
            col_losses, col_offset = _direction(col_lse, positive, col_log_u, col_count)
            losses = 0.5 * (losses + col_losses)
        ctx.save_for_backward(x, y, keys, scale, targets, row_offset, col_offset)
        ctx.symmetric, ctx.exclude_diagonal = symmetric, exclude_diagonal
        ctx.reduction, ctx.backend, ctx.shards = reduction, backend, shards
        ctx.mark_non_differentiable(*(t for t in (row_lse, col_lse) if t is not None))
        return _reduce(losses, reduction, shards), row_lse, col_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _row_lse_grad, _col_lse_grad):
        x, y, keys, scale, targets, row_offset, col_offset = ctx.saved_tensors
        shards, self_similarity = ctx.shards, y is None
        weights = _anchor_weights(grad, ctx.reduction, x.shape[0], shards)
        share = weights * 0.5 if ctx.symmetric else weights
        # Every candidate's column weight and offset, from the rank that owns its column loss.
        col_weights = shards.gather_columns(share.contiguous()) if ctx.symmetric else None
        col_offsets = shards.gather_columns(col_offset) if ctx.symmetric else None
        need_keys = ctx.needs_input_grad[0] if self_similarity else ctx.needs_input_grad[1]
        dx, dkeys, ds = ctx.backend.exp_weighted_grad(
            x, keys, scale, a=share, o=row_offset, b=col_weights, p=col_offsets,
            positives=(targets, -weights), exclude_diagonal=ctx.exclude_diagonal,
            need_dx=ctx.needs_input_grad[0], need_dy=need_keys, need_ds=ctx.needs_input_grad[2])
        dy = shards.candidate_grads(dkeys) if need_keys else None
        if self_similarity and dx is not None:
            dx, dy = dx.add_(dy), None  # x sits on both sides of S
        return dx, dy, ds, None, None, None, None, None, None, None, None


class RowLogSumExp(torch.autograd.Function):
    """r_i = log sum_j exp(S_ij) for S = s * x @ y.T, differentiable in x, y and s.

    Backward is primitive 2 with a = dL/dr and o = r: d r_i / d S_ij = exp(S_ij - r_i). With
    shards, y is this rank's shard of the candidates and the sum runs over every rank's.
    """

    @staticmethod
    def forward(ctx, x, y, scale, exclude_diagonal, backend, shards):
        keys = shards.candidates(y)
        row_lse, _ = backend.lse(x, keys, scale, rows=True, cols=False, exclude_diagonal=exclude_diagonal)
        ctx.save_for_backward(x, keys, scale, row_lse)
        ctx.exclude_diagonal, ctx.backend, ctx.shards = exclude_diagonal, backend, shards
        return row_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, keys, scale, row_lse = ctx.saved_tensors
        # A row whose every entry is excluded (one sample against itself) has an empty sum: no
        # entry to weight, and -inf - (-inf) must not become a NaN weight of an excluded entry.
        offsets = torch.where(row_lse == -torch.inf, 0.0, row_lse)
        dx, dkeys, ds = ctx.backend.exp_weighted_grad(
            x, keys, scale, a=grad.contiguous(), o=offsets, exclude_diagonal=ctx.exclude_diagonal,
            need_dx=ctx.needs_input_grad[0], need_dy=ctx.needs_input_grad[1], need_ds=ctx.needs_input_grad[2])
        return dx, ctx.shards.candidate_grads(dkeys) if dkeys is not None else None, ds, None, None, None


def row_logsumexp(
    queries: Tensor,
    keys: Tensor,
    scale: Union[float, Tensor],
    *,
    exclude_diagonal: bool = False,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """``torch.logsumexp(scale * queries @ keys.T, dim=1)`` without the (N, M) matrix, differentiable.

    Args:
        queries: (N, D); keys: (M, D); scale: a float or a 0-d tensor (may require grad).
        exclude_diagonal: leave out j == i (needs N == M), e.g. a sample against its own batch.
        backend: as for every flashcl loss.
        group: a torch.distributed process group: each rank passes its shard of queries and of
            keys, and gets its queries' log-sum-exp over every rank's keys (exclude_diagonal then
            leaves out a query's own key, the paired shards having equal sizes).

    Returns the (N,) row log-sum-exp in fp32 (fp64 for fp64 inputs); gradients reach queries,
    keys and scale exactly, with O(N + M) extra memory. The building block of losses whose
    denominator is not InfoNCE's (a uniformity term, a global log-partition).
    """
    with ShardedCall(group, "row_logsumexp") as call:
        check_pair("queries", queries, "keys", keys, same_rows=exclude_diagonal)
        scale = as_scale("scale", scale, queries)
        call.describe(queries, keys, exclude_diagonal=exclude_diagonal, scale_needs_gradient=scale.requires_grad)
    return RowLogSumExp.apply(queries, keys, scale, exclude_diagonal, resolve_backend(backend, queries), call.shards)


def infonce_loss(
    queries: Tensor,
    keys: Tensor,
    scale: Union[float, Tensor],
    targets: Optional[Tensor] = None,
    reduction: str = "mean",
    *,
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
        backend: "auto" | "torch"; default $FLASHCL_BACKEND or "auto".
        group: a torch.distributed process group (None: this process only). Each rank passes its
            shard of the rows; the loss is that of the concatenation of every rank's shards in rank
            order, and each rank gets back its share times the world size, so DDP's average over
            ranks is exactly the global loss and gradient (see flashcl.distributed).

    Equals ``F.cross_entropy(scale * queries @ keys.T, targets, reduction=reduction)`` without
    the (N, M) matrix. Features are used as given: normalize them first for cosine logits.
    The loss is returned in fp32 (fp64 for fp64 inputs); gradients in the input dtype.
    """
    with ShardedCall(group, "infonce_loss") as call:
        check_pair("queries", queries, "keys", keys)
        check_reduction(reduction)
        scale = as_scale("scale", scale, queries)
        given = targets is not None
        # Sharded, the range and the default's key count are checked over every rank's keys.
        targets = check_targets(targets, queries.shape[0], None if call.sharded else keys.shape[0], queries)
        call.describe(queries, keys, targets=targets if given else None, default_targets=not given,
                      reduction=reduction, scale_needs_gradient=scale.requires_grad)
    shards = call.shards
    if call.sharded:
        targets = shards.candidate_positions(targets if given else targets + shards.anchor_offset)
    return ContrastiveLoss.apply(queries, keys, scale, targets, None, None, False, False, reduction,
                                 resolve_backend(backend, queries), shards)[0]


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """Symmetric CLIP loss: 1/2 (image->text + text->image cross-entropy), pair i matching i.

    Args:
        image_features, text_features: (N, D) each, row i of one the positive of row i of the other.
        logit_scale: the multiplier itself (open_clip's ``logit_scale.exp()``), a float or 0-d tensor.
        reduction: "mean" | "sum" | "none" (per-pair losses 1/2 (l_i2t + l_t2i), shape (N,)).
        backend: "auto" | "torch"; default $FLASHCL_BACKEND or "auto".
        group: a torch.distributed process group (None: this process only). Each rank passes its
            shard of the rows; the loss is that of the concatenation of every rank's shards in rank
            order, and each rank gets back its share times the world size, so DDP's average over
            ranks is exactly the global loss and gradient (see flashcl.distributed).

    Features are used as given; CLIP-style callers L2-normalize them first.
    """
    with ShardedCall(group, "clip_loss") as call:
        check_pair("image_features", image_features, "text_features", text_features, same_rows=True)
        check_reduction(reduction)
        logit_scale = as_scale("logit_scale", logit_scale, image_features)
        call.describe(image_features, text_features, reduction=reduction,
                      scale_needs_gradient=logit_scale.requires_grad)
    targets = torch.arange(image_features.shape[0], device=image_features.device)  # own shard first
    return ContrastiveLoss.apply(image_features, text_features, logit_scale, targets, None, None, True, False,
                                 reduction, resolve_backend(backend, image_features), call.shards)[0]


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
        z1, z2: (N, D) the two views, row i of each from the same example.
        scale: inverse temperature 1/tau, a float or 0-d tensor.
        reduction: "mean" | "sum" | "none" (shape (2N,): anchors z1 then z2).
        backend: "auto" | "torch"; default $FLASHCL_BACKEND or "auto".
        group: a torch.distributed process group (None: this process only). Each rank passes its
            shard of the rows; the loss is that of the concatenation of every rank's shards in rank
            order, and each rank gets back its share times the world size, so DDP's average over
            ranks is exactly the global loss and gradient (see flashcl.distributed). With a group every rank's samples are negatives of every anchor, and
            reduction="none" returns this rank's anchors (its z1, then its z2).

    Features are used as given; SimCLR's cosine similarity means normalizing them first.
    """
    with ShardedCall(group, "nt_xent_loss") as call:
        check_pair("z1", z1, "z2", z2, same_rows=True)
        check_reduction(reduction)
        scale = as_scale("scale", scale, z1)
        samples = torch.cat([z1, z2])
        call.describe(samples, samples, reduction=reduction, scale_needs_gradient=scale.requires_grad)
    n = z1.shape[0]
    other_view = torch.arange(2 * n, device=z1.device).roll(n)  # own samples first, so local indices
    return ContrastiveLoss.apply(samples, None, scale, other_view, None, None, False, True, reduction,
                                 resolve_backend(backend, samples), call.shards)[0]


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
    with ShardedCall(group, "gamma_weighted_loss") as call:
        check_pair("features_a", features_a, "features_b", features_b, same_rows=log_weights_b is not None)
        check_reduction(reduction)
        n, m = features_a.shape[0], features_b.shape[0]
        if exclude_positive and (targets is not None or n != m):
            raise ValueError("exclude_positive=True needs pairs i <-> i: targets=None and as many rows in "
                             f"features_b as in features_a, got targets={'given' if targets is not None else None}, "
                             f"{n} and {m} rows")
        if log_weights_b is not None and targets is not None:
            raise ValueError("a symmetric loss (log_weights_b given) pairs row i with row i; pass targets=None")
        given = targets is not None
        targets = check_targets(targets, n, None if call.sharded else m, features_a)
        log_weights_a = check_log_weights("log_weights_a", log_weights_a, n, features_a)
        if log_weights_b is not None:
            log_weights_b = check_log_weights("log_weights_b", log_weights_b, m, features_a)
        scale = as_scale("scale", scale, features_a)
        call.describe(features_a, features_b, targets=targets if given else None, default_targets=not given,
                      reduction=reduction,
                      symmetric=log_weights_b is not None, exclude_positive=exclude_positive,
                      scale_needs_gradient=scale.requires_grad)
    shards = call.shards
    if call.sharded:
        targets = shards.candidate_positions(targets if given else targets + shards.anchor_offset)
    return GammaWeightedLoss(*ContrastiveLoss.apply(
        features_a, features_b, scale, targets, (log_weights_a, log_weights_b), None,
        log_weights_b is not None, exclude_positive, reduction, resolve_backend(backend, features_a), shards))
