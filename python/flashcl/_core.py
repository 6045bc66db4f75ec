"""The private engine under every flashcl loss (docs/design.md, "The core").

A public loss is a short function over three things here:

1. `Call`, the one preparation step of every loss call: inside its `with` block the loss registers
   its arguments (each checked by flashcl.checks); on the way out the ranks of a process group
   exchange what they registered, and the call gets its shards, its backend and its targets as
   positions in its candidate order;
2. `Plan`, one frozen object with a call's options and where it runs, instead of positional flags;
3. the autograd Functions over the two primitives, each behind one entry point:
   `contrastive_loss` (the softmax family: InfoNCE, CLIP, NT-Xent, the gamma-weighted loss),
   `sigmoid_loss` (SigLIP), `row_logsumexp` and `distillation_loss` (CLIP distillation).

For example, the CLIP loss:

    with Call("clip_loss", group, backend) as call:
        call.features("image_features", image, "text_features", text, same_rows=True)
        call.reduction(reduction)
        scale = call.scale("logit_scale", logit_scale)
        call.targets(None)  # pair i <-> i
    plan = call.plan(reduction=reduction, symmetric=True)
    return contrastive_loss(image, text, scale, call.positions, plan).loss

With S = s * x @ y.T, r = row log-sum-exp, c = column log-sum-exp, t_i the column of row i's positive
and K the number of terms in a row's denominator, the per-anchor loss of one direction is

    InfoNCE:        l_i = r_i - S_{i,t_i}                          (backward offset o_i = r_i)
    gamma-weighted: l_i = u_i exp(r_i - log K) - S_{i,t_i}         (backward offset o_i = log K - log u_i)

and in both d l_i / d S_ij = exp(S_ij - o_i) - [j == t_i]: the backward is primitive 2 with
a = w (w/2 per direction when symmetric), the offsets above and the sparse positive term -w_i at
(i, t_i), where w_i = dL/dl_i. Forward saves the inputs and O(N + M) vectors, nothing N x M.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import checks
from .distributed import SINGLE_PROCESS, Shards
from .backends.torch_tiles import logsumexp
from .primitives import resolve_backend

POSITIVE_CHUNK_ELEMENTS = 2**20
# Errors a rank's checks raise about its own input: exchanged, so that every rank raises together.
INPUT_ERRORS = (TypeError, ValueError, RuntimeError)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything about one loss call that is not a tensor: where it runs and the options that
    change its math. Built by `Call.plan`; the autograd Functions take it whole."""

    backend: Any  # computes the primitives (flashcl.primitives)
    shards: Any  # this call's rows over a process group (flashcl.distributed)
    reduction: str = "mean"
    symmetric: bool = False  # the column direction too, averaged with the rows (CLIP)
    exclude_diagonal: bool = False  # leave out (i, i): NT-Xent's self-similarity, a negatives-only mean


class Call:
    """The preparation of one loss call, the same for every loss.

    Inside ``with Call(name, group, backend, function) as call:`` the loss registers its
    arguments through the methods below; each validates one argument (flashcl.checks) and
    records what the ranks of a group must agree on. On leaving the block the ranks exchange
    those records, so a rank's bad input, or ranks that disagree, raise on every rank before any
    real collective (without a group nothing is exchanged and nothing is read from the device).
    Then the call holds

        shards   the layout of the rows over the group (distributed.SINGLE_PROCESS without one);
        backend  what computes the primitives for these features and the weight function
                 `function` ("exp", "sigmoid", or None for a loss that needs no backend);
        positions  the registered targets as positions in this rank's candidate order.
    """

    def __init__(self, name: str, group=None, backend: Optional[str] = None, function: Optional[str] = "exp"):
        if group is not None and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{name}: group= needs torch.distributed initialized (init_process_group), "
                               "or group=None for one process")
        self.name, self.group, self.function = name, group, function
        self.sharded = group is not None and dist.get_world_size(group) > 1
        self._backend_choice = backend
        self._anchors = self._keys = self._anchor_count = None
        self._given_targets, self._default_targets = None, False
        self._fields = {}
        self.shards, self.backend, self.positions = SINGLE_PROCESS, None, None

    # -- what a loss registers ----------------------------------------------------------------------------
    def features(self, name_a: str, a: Tensor, name_b: str, b: Tensor, *, same_rows: bool = False) -> None:
        """Anchors and candidates (two feature matrices that multiply); they set the rows' layout."""
        checks.check_pair(name_a, a, name_b, b, same_rows)
        self.layout(a, b)

    def layout(self, anchors: Tensor, keys: Tensor, anchor_count: Optional[int] = None) -> None:
        """The rows split over ranks: this rank's anchors and candidates (anchor_count: the anchors'
        rows when they are not anchors.shape[0], e.g. NT-Xent's two views of each sample)."""
        self._anchors, self._keys = anchors, keys
        self._anchor_count = anchors.shape[0] if anchor_count is None else anchor_count

    def scale(self, name: str, value) -> Tensor:
        """A finite positive scalar (float or 0-d tensor) as a 0-d tensor in the statistics dtype."""
        tensor = checks.as_scale(name, value, self._anchors)
        self._fields[f"{name} requires_grad"] = tensor.requires_grad
        return tensor

    def bias(self, name: str, value) -> Tensor:
        """A finite scalar of any sign, as `scale` makes it."""
        tensor = checks.as_bias(name, value, self._anchors)
        self._fields[f"{name} requires_grad"] = tensor.requires_grad
        return tensor

    def reduction(self, reduction: str) -> None:
        self._fields["reduction"] = checks.check_reduction(reduction)

    def targets(self, targets: Optional[Tensor]) -> None:
        """Each anchor's positive among the candidates (global indices with a group); None pairs
        anchor i with candidate i. Checked against every rank's candidates."""
        n, m = self._anchor_count, self._keys.shape[0]
        self._default_targets = targets is None
        self._given_targets = checks.check_targets(targets, n, None if self.sharded else m, self._anchors)

    def agree(self, **fields) -> None:
        """Options every rank must pass the same (flags, constants of the loss)."""
        self._fields.update(fields)

    # -- what a loss gets -----------------------------------------------------------------------------------
    def plan(self, **options) -> Plan:
        return Plan(self.backend, self.shards, **options)

    def __enter__(self) -> "Call":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None and self.function is not None:
            try:
                self.backend = resolve_backend(self._backend_choice, self._anchors, self.function, stacklevel=3)
            except INPUT_ERRORS as backend_error:
                error = backend_error
        if self.sharded and (error is None or isinstance(error, INPUT_ERRORS)):
            # Every rank gets here, with its description or its error: a failure anywhere raises everywhere.
            self.shards = Shards(self.group, self.name, None if error is not None else self._description(), error)
        if error is not None:
            if kind is None:
                raise error  # the backend choice failed
            return False  # this rank's own error propagates
        if self._given_targets is not None:
            self.positions = self._candidate_positions()
        return False

    def _description(self) -> dict:
        anchors, keys = self._anchors, self._keys
        return {
            "fields": {"call": self.name, "feature dimension": anchors.shape[1], "dtype": anchors.dtype,
                       "device type": anchors.device.type, "anchors need gradients": anchors.requires_grad,
                       "keys need gradients": keys.requires_grad, **self._fields},
            "anchors": self._anchor_count, "keys": keys.shape[0], "default_targets": self._default_targets,
            "target_range": None if self._default_targets or self._given_targets is None
            else checks.index_range(self._given_targets),
        }

    def _candidate_positions(self) -> Tensor:
        """Targets as positions in this rank's candidate order (its own shard first). A default
        target pairs the global anchor i with the global candidate i."""
        targets = self._given_targets
        if not self.sharded:
            return targets
        if self._default_targets:
            return self.shards.candidate_positions(targets + self.shards.anchor_offset)
        if checks.index_range(targets) is None:  # not read on the host: its range, on the device
            checks.device_assert((targets >= 0) & (targets < self.shards.keys), "targets must index every rank's keys")
        return self.shards.candidate_positions(targets)


# -- autocast -----------------------------------------------------------------------------------------------

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


def autocast_active(device: torch.device) -> bool:
    return device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type)


def matmul_inputs(*features: Optional[Tensor]):
    """Features as torch.matmul would multiply them: inside torch.autocast, fp32 features (open_clip
    normalizes its features in fp32 under autocast) in autocast's dtype, differentiably; otherwise as
    given. The statistics stay fp32 either way."""
    device = next(f for f in features if f is not None).device
    if not autocast_active(device):
        return features
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(f.to(dtype) if f is not None and f.dtype == torch.float32 else f for f in features)


def autocast_off(device: torch.device):
    """Inside the primitives autocast has done its work (matmul_inputs): the tiles' own products
    must not be cast again."""
    if not autocast_active(device):
        return contextlib.nullcontext()  # entering torch.autocast costs tens of microseconds: a small batch's share
    return torch.autocast(device.type, enabled=False)


def without_autocast(backward):
    """A Function's backward, run with autocast off (a backward called inside torch.autocast would
    otherwise cast the recomputed tiles); ctx.device, set in forward, says on which device."""
    @functools.wraps(backward)
    def run(ctx, *grads):
        with autocast_off(ctx.device):
            return backward(ctx, *grads)
    return run


# -- reductions --------------------------------------------------------------------------------------------

def reduce(losses: Tensor, plan: Plan) -> Tensor:
    """The reduced loss; sharded, world_size times this rank's share of the global one."""
    if plan.reduction == "mean":
        return losses.sum() / plan.shards.mean_count(losses.shape[0])
    if plan.reduction == "sum":
        return losses.sum() * plan.shards.world_size
    return losses


def anchor_weights(grad: Tensor, n: int, plan: Plan) -> Tensor:
    """w_i = dL/dl_i for the reduced loss L of `reduce`."""
    if plan.reduction == "mean":
        return (grad / plan.shards.mean_count(n)).expand(n)
    if plan.reduction == "sum":
        return (grad * plan.shards.world_size).expand(n)
    return grad


def group_ids(values: Tensor) -> Tensor:
    """For each entry, the id of its value among the distinct values (ids in [0, len(values)), the same
    for equal values, the same on every rank given the same values): the position in sorted order of
    the first entry equal to it. Unlike torch.unique, no shape depends on the values, so it compiles."""
    ordered, order = torch.sort(values, stable=True)
    first = torch.cat([ordered.new_ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    ids_in_order = torch.cumsum(first.long(), 0) - 1
    return torch.empty_like(ids_in_order).scatter_(0, order, ids_in_order)


# -- the softmax family ------------------------------------------------------------------------------------

class Statistics(NamedTuple):
    """A contrastive call's forward statistics (no gradient): its anchors' row LSE, its candidates'
    column LSE over every rank's anchors (symmetric only, else None), and the positive logits."""

    row_lse: Tensor
    col_lse: Optional[Tensor]
    positive: Tensor


class ContrastiveOutput(NamedTuple):
    loss: Tensor  # reduced as the plan says; differentiable
    row_lse: Optional[Tensor]  # no gradient; None from the whole-S path of InfoNCE, whose callers read only loss
    col_lse: Optional[Tensor]  # no gradient; symmetric only (and as row_lse)


def positive_logits(x: Tensor, y: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """S_{i,t_i} = s * x_i . y_{t_i} in the statistics dtype, a chunk of rows at a time."""
    dtype = scale.dtype
    rows_per_chunk = max(1, POSITIVE_CHUNK_ELEMENTS // x.shape[1])
    if rows_per_chunk >= x.shape[0]:  # one chunk (a small batch): no output buffer to fill
        return (x.to(dtype) * y[targets].to(dtype)).sum(dim=1) * scale
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        out[rows] = (x[rows].to(dtype) * y[targets[rows]].to(dtype)).sum(dim=1)
    return out * scale


def candidates(x: Tensor, y: Optional[Tensor], plan: Plan) -> Tensor:
    """Every rank's candidates, this rank's first (y=None: x is also the candidates)."""
    return plan.shards.candidates(x if y is None else y)


def contrastive_statistics(x: Tensor, keys: Tensor, scale: Tensor, targets: Tensor, plan: Plan) -> Statistics:
    """The statistics of anchors x against `keys` (from `candidates`), targets in candidate order."""
    x, keys = matmul_inputs(x, keys)
    with autocast_off(x.device):
        row_lse, partial_col_lse = plan.backend.lse(x, keys, scale, rows=True, cols=plan.symmetric,
                                                    exclude_diagonal=plan.exclude_diagonal)
    col_lse = plan.shards.column_lse(partial_col_lse) if plan.symmetric else None
    return Statistics(row_lse, col_lse, positive_logits(x, keys, targets, scale))


def denominator_sizes(n: int, m: int, exclude_diagonal: bool) -> Tuple[int, int]:
    """(K_rows, K_cols): the terms in a row's and a column's denominator, one fewer when i == j is excluded."""
    excluded = 1 if exclude_diagonal else 0
    return m - excluded, n - excluded


def _direction(lse: Tensor, positive: Tensor, log_weights: Optional[Tensor], count: int):
    """(per-anchor loss, backward offset) of one direction: InfoNCE, or the gamma-weighted sub-loss."""
    if log_weights is None:
        return lse - positive, lse
    return torch.exp(log_weights + lse - math.log(count)) - positive, math.log(count) - log_weights


class ContrastiveLoss(torch.autograd.Function):
    """(reduced loss, row LSE, column LSE or None) of anchors x against candidates y; see `contrastive_loss`."""

    @staticmethod
    def forward(ctx, x, y, scale, targets, log_weights, statistics, plan):
        keys = candidates(x, y, plan)
        if statistics is None:
            statistics = contrastive_statistics(x, keys, scale, targets, plan)
        row_lse, col_lse, positive = statistics
        row_log_u, col_log_u = log_weights if log_weights is not None else (None, None)
        row_count, col_count = denominator_sizes(plan.shards.global_anchors(x.shape[0]), keys.shape[0],
                                                 plan.exclude_diagonal)
        losses, row_offset = _direction(row_lse, positive, row_log_u, row_count)
        col_offset = None
        if plan.symmetric:
            col_losses, col_offset = _direction(col_lse, positive, col_log_u, col_count)
            losses = 0.5 * (losses + col_losses)
        ctx.save_for_backward(x, y, keys, scale, targets, row_offset, col_offset)
        ctx.plan, ctx.device = plan, x.device
        ctx.mark_non_differentiable(*(t for t in (row_lse, col_lse) if t is not None))
        return reduce(losses, plan), row_lse, col_lse

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx, grad, _row_lse_grad, _col_lse_grad):
        x, y, keys, scale, targets, row_offset, col_offset = ctx.saved_tensors
        plan, self_similarity = ctx.plan, y is None
        weights = anchor_weights(grad, x.shape[0], plan)
        share = weights * 0.5 if plan.symmetric else weights
        # Every candidate's column weight and offset, from the rank that owns its column loss.
        col_weights = plan.shards.gather_columns(share.contiguous()) if plan.symmetric else None
        col_offsets = plan.shards.gather_columns(col_offset) if plan.symmetric else None
        need_keys = ctx.needs_input_grad[0] if self_similarity else ctx.needs_input_grad[1]
        dx, dkeys, ds = plan.backend.weighted_grad(
            x, keys, scale, a=share, o=row_offset, b=col_weights, p=col_offsets,
            positives=(targets, -weights), exclude_diagonal=plan.exclude_diagonal,
            need_dx=ctx.needs_input_grad[0], need_dy=need_keys, need_ds=ctx.needs_input_grad[2])
        dy = plan.shards.candidate_grads(dkeys) if need_keys else None
        if self_similarity and dx is not None:
            dx, dy = dx.add_(dy), None  # x sits on both sides of S
        return dx, dy, ds, None, None, None, None


def contrastive_loss(x: Tensor, y: Optional[Tensor], scale: Tensor, targets: Tensor, plan: Plan, *,
                     log_weights: Optional[Tuple[Tensor, Optional[Tensor]]] = None,
                     statistics: Optional[Statistics] = None) -> ContrastiveOutput:
    """InfoNCE of anchors x against candidates y (y=None: NT-Xent's x against itself), row i's
    positive at candidate position targets[i]; with plan.symmetric the column direction too.

    log_weights = (row log u, column log u or None) selects the gamma-weighted form. statistics:
    those of these very inputs (`contrastive_statistics`), when the caller computed them already.
    """
    x, y = matmul_inputs(x, y)
    with autocast_off(x.device):
        if statistics is None and plan.shards is SINGLE_PROCESS and plan.backend.holds_whole(x, x if y is None else y):
            return _whole_contrastive_loss(x, y, scale, targets, plan, log_weights)
        return ContrastiveOutput(*ContrastiveLoss.apply(x, y, scale, targets, log_weights, statistics, plan))


def _whole_contrastive_loss(x, y, scale, targets, plan, log_weights) -> ContrastiveOutput:
    """The same composition (`_direction`, `reduce`) in autograd's own operators, from S whole: for a
    small problem, which the torch backend holds as one tile within its memory budget anyway. Its
    cost is then the textbook loss's, with no Function in Python around it (a batch of 256 spends
    more time in that Python than in its products)."""
    keys = x if y is None else y
    dtype = scale.dtype
    x_, keys_ = (t if t.dtype == dtype else t.to(dtype) for t in (x, keys))  # half inputs: fp32 products
    logits = unmasked = torch.mm(x_ * scale, keys_.T)  # the scale on the smaller operand, as the textbook's
    n, m = logits.shape
    if plan.exclude_diagonal:
        logits = logits.masked_fill(torch.eye(n, m, dtype=torch.bool, device=logits.device), -torch.inf)
    if log_weights is None:  # InfoNCE: r_i - S_{i,t_i} is cross-entropy, whose fused kernels are the textbook's
        summed = plan.reduction != "none"  # one process: "mean" is the sum over the n anchors
        losses = F.cross_entropy(logits, targets, reduction="sum" if summed else "none")
        if plan.symmetric:  # pairs: candidate i's positive is anchor i
            losses = losses + F.cross_entropy(logits.T, targets, reduction="sum" if summed else "none")
        factor = (0.5 if plan.symmetric else 1.0) / (n if plan.reduction == "mean" else 1)
        return ContrastiveOutput(losses * factor, None, None)  # no caller of InfoNCE reads its LSEs
    positive = unmasked.gather(1, targets[:, None]).squeeze(1)  # the diagonal (gone from logits) may be it
    row_count, col_count = denominator_sizes(n, m, plan.exclude_diagonal)
    row_lse = logsumexp(logits, 1)
    losses, _ = _direction(row_lse, positive, log_weights[0], row_count)
    col_lse = None
    if plan.symmetric:
        col_lse = logsumexp(logits, 0)
        col_losses, _ = _direction(col_lse, positive, log_weights[1], col_count)
        losses = 0.5 * (losses + col_losses)
    return ContrastiveOutput(reduce(losses, plan), row_lse.detach(), None if col_lse is None else col_lse.detach())


# -- the log-sum-exp alone -----------------------------------------------------------------------------------

class RowLogSumExp(torch.autograd.Function):
    """r_i = log sum_j exp(S_ij) for S = s * x @ y.T; see `row_logsumexp`.

    Backward is primitive 2 with a = dL/dr and o = r: d r_i / d S_ij = exp(S_ij - r_i). With a guide
    (guide_x, guide_keys, threshold: constants, the keys already every rank's) both primitives leave
    out the same entries, so the backward's weights are the forward's softmax.
    """

    @staticmethod
    def forward(ctx, x, y, scale, plan, guide_x=None, guide_keys=None, threshold=None):
        keys = candidates(x, y, plan)
        guide = None if guide_x is None else (guide_x, guide_keys, threshold)
        row_lse, _ = plan.backend.lse(x, keys, scale, rows=True, cols=False, exclude_diagonal=plan.exclude_diagonal,
                                      **_guided(guide))
        ctx.save_for_backward(x, y, keys, scale, row_lse, guide_x, guide_keys, threshold)
        ctx.plan, ctx.device = plan, x.device
        return row_lse

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx, grad):
        x, y, keys, scale, row_lse, guide_x, guide_keys, threshold = ctx.saved_tensors
        plan, self_similarity = ctx.plan, y is None
        guide = None if guide_x is None else (guide_x, guide_keys, threshold)
        # A row whose every entry is excluded (one sample against itself) has an empty sum: no
        # entry to weight, and -inf - (-inf) must not become a NaN weight of an excluded entry.
        offsets = torch.where(row_lse == -torch.inf, 0.0, row_lse)
        need_keys = ctx.needs_input_grad[0] if self_similarity else ctx.needs_input_grad[1]
        dx, dkeys, ds = plan.backend.weighted_grad(
            x, keys, scale, a=grad.contiguous(), o=offsets, exclude_diagonal=plan.exclude_diagonal,
            need_dx=ctx.needs_input_grad[0], need_dy=need_keys, need_ds=ctx.needs_input_grad[2], **_guided(guide))
        dy = plan.shards.candidate_grads(dkeys) if need_keys else None
        if self_similarity and dx is not None:
            dx, dy = dx.add_(dy), None
        return dx, dy, ds, None, None, None, None


def _guided(guide) -> dict:
    """The guide keyword of a primitive call, only when there is one (a backend without guides never sees it)."""
    return {} if guide is None else {"guide": guide}


def row_logsumexp(x: Tensor, y: Optional[Tensor], scale: Tensor, plan: Plan, guide=None) -> Tensor:
    """The row log-sum-exp of x against every rank's y (y=None: x against itself), differentiable.

    guide = (guide_x, guide_y, threshold), constants (guide_y=None: guide_x against itself): leave out
    key j of row i where guide_x_i . guide_y_j > threshold_i, guide_y gathered as the keys are.
    """
    x, y = matmul_inputs(x, y)
    guide_args = ()
    if guide is not None:
        guide_x, guide_y, threshold = guide
        guide_keys = plan.shards.gather_candidates_detached(guide_x if guide_y is None else guide_y)
        guide_args = (guide_x.detach().to(x.dtype), guide_keys.to(x.dtype), threshold.detach().to(scale.dtype))
    with autocast_off(x.device):
        return RowLogSumExp.apply(x, y, scale, plan, *guide_args)


# -- the sigmoid family --------------------------------------------------------------------------------------

class SigmoidLoss(torch.autograd.Function):
    """The reduced SigLIP loss of anchors x against candidates y, pair i <-> i; see `sigmoid_loss`."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, plan):
        keys = candidates(x, y, plan)
        softplus_sums, sigmoid_sums = plan.backend.softplus_sums(x, keys, scale, bias)
        pairs = torch.arange(x.shape[0], device=x.device)  # own shard first: pair i is candidate i
        losses = softplus_sums - (positive_logits(x, keys, pairs, scale) + bias)
        ctx.save_for_backward(x, keys, scale, bias, sigmoid_sums)
        ctx.plan, ctx.device = plan, x.device
        return reduce(losses, plan)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx, grad):
        x, keys, scale, bias, sigmoid_sums = ctx.saved_tensors
        plan = ctx.plan
        weights = anchor_weights(grad, x.shape[0], plan)
        pairs = torch.arange(x.shape[0], device=x.device)
        dx, dkeys, ds = plan.backend.weighted_grad(
            x, keys, scale, a=weights.contiguous(), o=(-bias).expand(x.shape[0]).contiguous(),
            positives=(pairs, -weights), exclude_diagonal=False, need_dx=ctx.needs_input_grad[0],
            need_dy=ctx.needs_input_grad[1], need_ds=ctx.needs_input_grad[2], function="sigmoid")
        dy = plan.shards.candidate_grads(dkeys) if dkeys is not None else None
        dbias = torch.sum(weights * (sigmoid_sums - 1)) if ctx.needs_input_grad[3] else None
        return dx, dy, ds, dbias, None


def sigmoid_loss(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, plan: Plan) -> Tensor:
    """With S' = s x_i . y_j + b, l_i = sum_j softplus(S'_ij) - S'_ii: forward is primitive 1' (the row
    sums of softplus(S') and sigmoid(S')), and dL/dS' = w_i (sigmoid(S') - I) makes the backward
    primitive 2 with f = sigmoid, o = -b and the positive term -w_i at (i, i); dL/db = sum_i w_i
    (sum_j sigmoid(S'_ij) - 1) comes from the forward's sigmoid sums."""
    x, y = matmul_inputs(x, y)
    with autocast_off(x.device):
        return SigmoidLoss.apply(x, y, scale, bias, plan)


# -- distillation: the student's softmax against the teacher's -----------------------------------------------

class DistillationLoss(torch.autograd.Function):
    """The symmetric cross-entropy of the teacher's softmax against the student's; see `distillation_loss`."""

    @staticmethod
    def forward(ctx, x, y, scale, teacher_x, teacher_y, teacher_scale, plan):
        keys, teacher_keys = candidates(x, y, plan), candidates(teacher_x, teacher_y, plan)
        backend, shards = plan.backend, plan.shards
        row_lse, col_lse = backend.lse(x, keys, scale, rows=True, cols=True)
        teacher_row, teacher_col = backend.lse(teacher_x, teacher_keys, teacher_scale, rows=True, cols=True)
        col_lse, teacher_col = shards.column_lse(col_lse), shards.column_lse(teacher_col)
        teacher_col_offsets = shards.gather_columns(teacher_col)
        # V_i = sum_j pT_ij y_j (the teacher's row softmax applied to the student's candidates) and
        # U_j = sum_i pT(col)_ij x_i (its column softmax to the student's anchors, summed over ranks).
        v, _, _ = backend.weighted_grad(teacher_x, teacher_keys, teacher_scale, a=torch.ones_like(teacher_row),
                                        o=teacher_row, values=(x, keys), need_dx=True, need_dy=False)
        _, u, _ = backend.weighted_grad(teacher_x, teacher_keys, teacher_scale,
                                        b=torch.ones_like(teacher_col_offsets), p=teacher_col_offsets,
                                        values=(x, keys), need_dx=False, need_dy=True)
        u = shards.candidate_grads(u)
        dtype = scale.dtype
        row_losses = row_lse - scale * (x.to(dtype) * v).sum(dim=1)
        col_losses = col_lse - scale * (y.to(dtype) * u).sum(dim=1)
        ctx.save_for_backward(x, y, keys, scale, teacher_x, teacher_keys, teacher_scale, row_lse, col_lse,
                              teacher_row, teacher_col)
        ctx.plan, ctx.device = plan, x.device
        return reduce(0.5 * (row_losses + col_losses), plan)

    @staticmethod
    @once_differentiable
    @without_autocast
    def backward(ctx, grad):
        x, y, keys, scale, teacher_x, teacher_keys, teacher_scale, row_lse, col_lse, teacher_row, teacher_col = \
            ctx.saved_tensors
        plan, shards = ctx.plan, ctx.plan.shards
        share = anchor_weights(grad, x.shape[0], plan) * 0.5
        col_weights = shards.gather_columns(share.contiguous())
        need_dx, need_dy, need_ds = ctx.needs_input_grad[:3]
        # dL/dS_ij = share_i (pS_ij - pT_ij) + share_j (pS(col)_ij - pT(col)_ij): the student's part is
        # CLIP's backward without its positives, the teacher's the same weights on the teacher's tile
        # multiplying the student's features (primitive 2 with values).
        dx, dkeys, ds = plan.backend.weighted_grad(
            x, keys, scale, a=share, o=row_lse, b=col_weights, p=shards.gather_columns(col_lse),
            need_dx=need_dx, need_dy=need_dy, need_ds=need_ds)
        tx, tkeys, tds = plan.backend.weighted_grad(
            teacher_x, teacher_keys, teacher_scale, a=share, o=teacher_row, b=col_weights,
            p=shards.gather_columns(teacher_col), values=(x, keys), need_dx=need_dx, need_dy=need_dy,
            need_ds=need_ds)
        dy = None
        if need_dx:
            dx = (dx.to(tx.dtype) - scale * tx).to(x.dtype)
        if need_dy:
            dy = shards.candidate_grads((dkeys.to(tkeys.dtype) - scale * tkeys).to(keys.dtype))
        if need_ds:
            ds = ds - tds
        return dx, dy, ds, None, None, None, None


def distillation_loss(x: Tensor, y: Tensor, scale: Tensor, teacher_x: Tensor, teacher_y: Tensor,
                      teacher_scale: Tensor, plan: Plan) -> Tensor:
    """With S = s x y^T (student) and T = t x' y'^T (teacher, a constant), the per-pair loss
    1/2 (-sum_j pT_ij log pS_ij - sum_j pT(col)_ji log pS(col)_ji), pT the teacher's row (column)
    softmax: -sum_j pT_ij log pS_ij = r_i - s x_i . V_i with V_i = sum_j pT_ij y_j, which is primitive 2
    on the teacher's tile with the student's features as values (columns alike). Nothing N x M."""
    x, y, teacher_x, teacher_y = matmul_inputs(x, y, teacher_x, teacher_y)
    with autocast_off(x.device):
        return DistillationLoss.apply(x, y, scale, teacher_x, teacher_y, teacher_scale, plan)
