"""InfoNCE, CLIP and NT-Xent as one autograd Function over the two primitives.

With S = s * x @ y.T, r = row log-sum-exp, c = column log-sum-exp and t_i the column
of row i's positive, the per-anchor loss is

    one-directional (InfoNCE, NT-Xent):  l_i = r_i - S_{i,t_i}
    symmetric (CLIP, t_i = i):           l_i = 1/2 (r_i - S_ii) + 1/2 (c_i - S_ii)

and dl_i/dS_ij is a softmax minus the positive's indicator. With w_i = dL/dl_i the
backward is primitive 2 with a = w (or w/2), o = r, b = w/2, p = c and the sparse
positive term -w_i at (i, t_i). Forward saves the inputs and O(N + M) statistics.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .checks import as_scale, check_pair, check_reduction, check_targets
from .primitives import resolve_backend

POSITIVE_CHUNK_ELEMENTS = 2**20


def _positive_logits(x: Tensor, y: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """S_{i,t_i} = s * x_i . y_{t_i} in the statistics dtype, a chunk of rows at a time."""
    dtype = scale.dtype
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    rows_per_chunk = max(1, POSITIVE_CHUNK_ELEMENTS // x.shape[1])
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        out[rows] = (x[rows].to(dtype) * y[targets[rows]].to(dtype)).sum(dim=1)
    return out * scale


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _anchor_weights(grad: Tensor, reduction: str, n: int) -> Tensor:
    """w_i = dL/dl_i for the reduced loss L."""
    if reduction == "mean":
        return (grad / n).expand(n)
    if reduction == "sum":
        return grad.expand(n)
    return grad


class ContrastiveLoss(torch.autograd.Function):
    """The per-anchor losses above, reduced. y=None means y is x (NT-Xent's self-similarity)."""

    @staticmethod
    def forward(ctx, x, y, scale, targets, symmetric, exclude_diagonal, reduction, backend):
        keys = x if y is None else y
        row_lse, col_lse = backend.lse(x, keys, scale, rows=True, cols=symmetric,
                                       exclude_diagonal=exclude_diagonal)
        positive = _positive_logits(x, keys, targets, scale)
        losses = row_lse - positive
        if symmetric:
            losses = 0.5 * (losses + (col_lse - positive))
        ctx.save_for_backward(x, y, scale, targets, row_lse, col_lse)
        ctx.symmetric, ctx.exclude_diagonal = symmetric, exclude_diagonal
        ctx.reduction, ctx.backend = reduction, backend
        return _reduce(losses, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, scale, targets, row_lse, col_lse = ctx.saved_tensors
        self_similarity = y is None
        weights = _anchor_weights(grad, ctx.reduction, x.shape[0])
        share = weights * 0.5 if ctx.symmetric else weights
        dx, dy, ds = ctx.backend.exp_weighted_grad(
            x, x if self_similarity else y, scale,
            a=share, o=row_lse,
            b=share if ctx.symmetric else None, p=col_lse,
            positives=(targets, -weights),
            exclude_diagonal=ctx.exclude_diagonal,
            need_dx=ctx.needs_input_grad[0],
            need_dy=ctx.needs_input_grad[0] if self_similarity else ctx.needs_input_grad[1],
            need_ds=ctx.needs_input_grad[2],
        )
        if self_similarity and dx is not None:
            dx, dy = dx.add_(dy), None  # x sits on both sides of S
        return dx, dy, ds, None, None, None, None, None


def infonce_loss(
    queries: Tensor,
    keys: Tensor,
    scale: Union[float, Tensor],
    targets: Optional[Tensor] = None,
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """One-directional InfoNCE: cross-entropy of `scale * queries @ keys.T` against `targets`.

    Args:
        queries: (N, D) anchors, one per row.
        keys: (M, D) candidates; M may exceed N (extra negatives, a queue).
        scale: inverse temperature, a float or a 0-d tensor (may require grad).
        targets: (N,) integer index of each query's positive key; default i -> i (needs M >= N).
        reduction: "mean" | "sum" | "none" (per-query losses, shape (N,)).
        backend: "auto" | "torch"; default $FLASHCL_BACKEND or "auto".

    Equals ``F.cross_entropy(scale * queries @ keys.T, targets, reduction=reduction)`` without
    the (N, M) matrix. Features are used as given: normalize them first for cosine logits.
    The loss is returned in fp32 (fp64 for fp64 inputs); gradients in the input dtype.
    """
    check_pair("queries", queries, "keys", keys)
    check_reduction(reduction)
    targets = check_targets(targets, queries.shape[0], keys.shape[0], queries)
    scale = as_scale("scale", scale, queries)
    return ContrastiveLoss.apply(queries, keys, scale, targets, False, False, reduction,
                                 resolve_backend(backend, queries))


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Symmetric CLIP loss: 1/2 (image->text + text->image cross-entropy), pair i matching i.

    Args:
        image_features, text_features: (N, D) each, row i of one the positive of row i of the other.
        logit_scale: the multiplier itself (open_clip's ``logit_scale.exp()``), a float or 0-d tensor.
        reduction: "mean" | "sum" | "none" (per-pair losses 1/2 (l_i2t + l_t2i), shape (N,)).
        backend: "auto" | "torch"; default $FLASHCL_BACKEND or "auto".

    Features are used as given; CLIP-style callers L2-normalize them first.
    """
    check_pair("image_features", image_features, "text_features", text_features, same_rows=True)
    check_reduction(reduction)
    logit_scale = as_scale("logit_scale", logit_scale, image_features)
    targets = torch.arange(image_features.shape[0], device=image_features.device)
    return ContrastiveLoss.apply(image_features, text_features, logit_scale, targets, True, False,
                                 reduction, resolve_backend(backend, image_features))


def nt_xent_loss(
    z1: Tensor,
    z2: Tensor,
    scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """SimCLR's NT-Xent over the 2N samples [z1; z2]: each sample's positive is its other view,
    its negatives the other 2N - 2 samples, never itself.

    Args:
        z1, z2: (N, D) the two views, row i of each from the same example.
        scale: inverse temperature 1/tau, a float or 0-d tensor.
        reduction: "mean" | "sum" | "none" (shape (2N,): anchors z1 then z2).
        backend: "auto" | "torch"; default $FLASHCL_BACKEND or "auto".

    Features are used as given; SimCLR's cosine similarity means normalizing them first.
    """
    check_pair("z1", z1, "z2", z2, same_rows=True)
    check_reduction(reduction)
    scale = as_scale("scale", scale, z1)
    n = z1.shape[0]
    samples = torch.cat([z1, z2])
    other_view = torch.arange(2 * n, device=z1.device).roll(n)
    return ContrastiveLoss.apply(samples, None, scale, other_view, False, True, reduction,
                                 resolve_backend(backend, samples))
