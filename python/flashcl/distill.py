"""CLIP distillation (open_clip's DistillClipLoss) without the N x N logits of student or teacher.

With S = s x y^T (the student's logits) and T = t x' y'^T (the teacher's, its features of their own
dimension D', a constant), open_clip's distillation term is

    1/2 (dist(T, S) + dist(T^T, S^T)),   dist(T, S) = -(1/N) sum_i sum_j softmax(T_i)_j log softmax(S_i)_j.

Per row, -sum_j pT_ij log pS_ij = r_i - sum_j pT_ij S_ij = r_i - s x_i . V_i, with r the student's row
log-sum-exp (primitive 1) and V_i = sum_j pT_ij y_j, pT_ij = exp(T_ij - q_i), q the teacher's row
log-sum-exp: primitive 2 with G computed from the teacher's tile and the student's features as its
values (docs/design.md, "Values"). Columns alike. The gradient is CLIP's backward without its
positives minus the same weights on the teacher's tile, again primitive 2 with values.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import _core, checks
from .distributed import SINGLE_PROCESS
from .modules import ClipLoss, global_loss_on_every_rank


def clip_distillation_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    teacher_image_features: Tensor,
    teacher_text_features: Tensor,
    teacher_logit_scale: Union[float, Tensor],
    reduction: str = "mean",
    *,
    group=None,
    backend: Optional[str] = None,
) -> Tensor:
    """open_clip's distillation term: the cross-entropy of the teacher's softmax against the student's,
    1/2 (image->text + text->image), without the (N, N) logits of either model.

    Args:
        image_features: the student's image features (N, D), row i paired with row i of text_features.
        text_features: the student's text features (N, D).
        logit_scale: the student's multiplier (``logit_scale.exp()``), a float or 0-d tensor (may require grad).
        teacher_image_features: the teacher's image features (N, D') for the same rows, D' of its own;
            the student's dtype and device. A constant: no gradient flows to it, and a tensor that
            requires grad is an error (pass ``.detach()``, or compute the teacher under torch.no_grad()).
        teacher_text_features: the teacher's text features (N, D'), a constant as above.
        teacher_logit_scale: the teacher's multiplier, a float or 0-d tensor (a constant, as above).
        reduction: "mean" (open_clip's distill_loss) | "sum" | "none" (per pair
            1/2 (-sum_j pT_ij log pS_ij - sum_j pT(col)_ji log pS(col)_ji), shape (N,)).
        group (torch.distributed.ProcessGroup | None): a process group: each rank passes its shard of
            pairs (student and teacher alike); the loss is that of the concatenated batch, each rank
            getting its share times the world size (see flashcl.distributed).
        backend: "auto" | "triton" | "torch" | "cuda" (whose kernels have no values operands yet: it
            hands over to the next best backend, with a warning).

    Returns the distillation term only, not the contrastive one (add ``flashcl.clip_loss`` for that, as
    `DistillClipLoss` does); fp32 (fp64 for fp64 inputs). Gradients reach the student's features and scale.
    """
    with _core.Call("clip_distillation_loss", group, backend, function="values") as call:
        logit_scale, teacher_logit_scale = _register(call, image_features, text_features, logit_scale,
                                                     teacher_image_features, teacher_text_features,
                                                     teacher_logit_scale, reduction)
    plan = call.plan(reduction=reduction, symmetric=True)
    return _core.distillation_loss(image_features, text_features, logit_scale, teacher_image_features,
                                   teacher_text_features, teacher_logit_scale, plan)


def _register(call, image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
              teacher_logit_scale, reduction):
    """The checks of a distillation call (inside its `_core.Call`): the student's and teacher's
    features and scales; returns both scales as tensors."""
    call.features("image_features", image_features, "text_features", text_features, same_rows=True)
    call.reduction(reduction)
    logit_scale = call.scale("logit_scale", logit_scale)
    for name, teacher in (("teacher_image_features", teacher_image_features),
                          ("teacher_text_features", teacher_text_features)):
        checks.check_pair("image_features", image_features, name, teacher, same_rows=True, same_dim=False)
        checks.check_constant(name, teacher)
    checks.check_pair("teacher_image_features", teacher_image_features,
                      "teacher_text_features", teacher_text_features, same_rows=True)
    checks.check_constant("teacher_logit_scale", teacher_logit_scale)
    teacher_logit_scale = checks.as_scale("teacher_logit_scale", teacher_logit_scale, image_features)
    call.agree(**{"teacher feature dimension": teacher_image_features.shape[1]})
    return logit_scale, teacher_logit_scale


def _distillation_rows(queries: Tensor, keys: Tensor, scale: Tensor, teacher_queries: Tensor,
                       teacher_keys: Tensor, teacher_scale: Tensor, backend) -> Tensor:
    """One direction against constant keys (every rank's, gathered): per query
    -sum_j pT_ij log pS_ij = r_i - s q_i . V_i, V_i = sum_j pT_ij k_j a constant (the teacher's softmax
    over the keys). The gradient reaches the queries and the scale only."""
    plan = _core.Plan(backend, SINGLE_PROCESS)
    row_lse = _core.row_logsumexp(queries, keys, scale, plan)
    queries, keys, teacher_queries, teacher_keys = _core.matmul_inputs(queries, keys, teacher_queries, teacher_keys)
    with torch.no_grad(), _core.autocast_off(queries.device):
        teacher_row, _ = backend.lse(teacher_queries, teacher_keys, teacher_scale, rows=True, cols=False)
        v, _, _ = backend.weighted_grad(teacher_queries, teacher_keys, teacher_scale, a=torch.ones_like(teacher_row),
                                        o=teacher_row, values=(queries.detach(), keys), need_dx=True, need_dy=False)
    return row_lse - scale * (queries.to(row_lse.dtype) * v).sum(dim=1)


class DistillClipLoss(nn.Module):
    """Drop-in for open_clip's ``DistillClipLoss``, without the N x N logits of student or teacher.

    ``contrastive, distill = DistillClipLoss()(image_features, text_features, logit_scale,
    dist_image_features, dist_text_features, dist_logit_scale)`` (a dict with output_dict=True), the
    scales the multipliers (open_clip passes ``logit_scale.exp()``). The contrastive term is
    `flashcl.clip_loss`, the distillation term `flashcl.clip_distillation_loss`; the teacher's
    features and scale are constants (detach them, or compute the teacher under torch.no_grad()).

    With world_size > 1 (torch.distributed initialized; `group` defaults to the world group) every rank
    passes its shard of pairs, student and teacher alike, and gets open_clip's two values and open_clip's
    gradients of its student features and scale in each (local_loss, gather_with_grad), as
    `flashcl.ClipLoss` (whose mode mapping computes the contrastive term): (True, True) is
    ``clip_distillation_loss(..., group=group)``; local_loss=False the global term on every rank (the
    features' gradients 1/world_size of the exact ones without gather_with_grad); (True, False) each
    rank's local term differentiated through its own features as anchors only, against every rank's
    gathered features as constants. The teacher's features are gathered without gradient.
    cache_labels has nothing to cache; use_horovod is not supported.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: Optional[str] = None, group=None):
        super().__init__()
        checks.check_supported(not use_horovod, "use_horovod=True: flashcl.DistillClipLoss runs on "
                                                "torch.distributed only; initialize a torch.distributed process "
                                                "group and pass world_size and rank")
        checks.check_rank(rank, world_size)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend, self.group = backend, group
        # The contrastive term: ClipLoss's own mapping of open_clip's modes.
        self.contrastive = ClipLoss(local_loss, gather_with_grad, cache_labels, rank, world_size, backend=backend,
                                    group=group)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                dist_image_features: Tensor, dist_text_features: Tensor, dist_logit_scale: Union[float, Tensor],
                output_dict: bool = False) -> Union[Tuple[Tensor, Tensor], Dict[str, Tensor]]:
        teacher = (dist_image_features, dist_text_features, dist_logit_scale)
        if self.world_size == 1:
            distill_loss = clip_distillation_loss(image_features, text_features, logit_scale, *teacher,
                                                  backend=self.backend)
        else:
            group = checks.check_process_group("DistillClipLoss", self.rank, self.world_size, self.group)
            if self.local_loss and not self.gather_with_grad:
                distill_loss = self._local_loss_own_gradients(image_features, text_features, logit_scale, *teacher,
                                                              group=group)
            elif self.local_loss:  # gather_with_grad: world_size times this rank's share, exact gradients
                distill_loss = clip_distillation_loss(image_features, text_features, logit_scale, *teacher,
                                                      backend=self.backend, group=group)
            else:
                distill_loss = global_loss_on_every_rank(
                    "DistillClipLoss",
                    lambda x, y, s: clip_distillation_loss(x, y, s, *teacher, backend=self.backend, group=group),
                    image_features, text_features, logit_scale, group, self.world_size, self.gather_with_grad)
        contrastive_loss = self.contrastive(image_features, text_features, logit_scale)
        if output_dict:
            return {"contrastive_loss": contrastive_loss, "distill_loss": distill_loss}
        return contrastive_loss, distill_loss

    def _local_loss_own_gradients(self, image_features, text_features, logit_scale, teacher_image_features,
                                  teacher_text_features, teacher_logit_scale, *, group):
        """open_clip's (True, False): this rank's rows in both directions against every rank's gathered
        features, all constants (its own included): the gradient reaches its features as anchors only."""
        with _core.Call("DistillClipLoss(local_loss=True, gather_with_grad=False)", group, self.backend,
                        function="values") as call:
            scale, teacher_scale = _register(call, image_features, text_features, logit_scale,
                                             teacher_image_features, teacher_text_features, teacher_logit_scale,
                                             "mean")
        gather = call.shards.gather_detached
        rows = _distillation_rows(image_features, gather(text_features), scale, teacher_image_features,
                                  gather(teacher_text_features), teacher_scale, call.backend)
        cols = _distillation_rows(text_features, gather(image_features), scale, teacher_text_features,
                                  gather(teacher_image_features), teacher_scale, call.backend)
        return 0.5 * (rows.mean() + cols.mean())
