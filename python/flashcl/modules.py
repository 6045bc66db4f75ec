"""nn.Module wrappers of the losses, for users who compose losses as modules."""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _core, checks
from .distributed import collective, sum_over_ranks
from .losses import clip_loss, infonce_loss, nt_xent_loss
from .siglip import siglip_loss
from .supcon import supcon_loss

DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")  # open_clip's SigLipLoss exchanges


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss``, without the N x N logits (nor, distributed, the
    N_global x N_global ones).

    Construct it with open_clip's arguments and call it the same way:
    ``loss = ClipLoss()(image_features, text_features, logit_scale)``, where logit_scale
    is the multiplier (open_clip passes ``model.logit_scale.exp()``).

    With world_size > 1 (torch.distributed initialized; `group` defaults to the world group)
    every rank passes its own features and gets open_clip's loss value and open_clip's
    gradients for its local features, for each (local_loss, gather_with_grad):

    - (True, True), open_clip's recommended setting: each rank's local loss (its images against
      every text and its texts against every image); the gradients are exact: DDP's average
      over ranks is the gradient of the global loss. flashcl computes exactly this as
      ``clip_loss(..., group=group)``, each direction's products once over all ranks.
    - (False, False), open_clip's default: the global loss on every rank, with gradients of
      1/world_size of the exact ones after DDP's average (each rank differentiates only through
      its own features). Matched, since learning rates are tuned to it; flashcl does not compute
      the global loss on every rank but all-reduces the ranks' shares.
    - (False, True): the global loss on every rank, exact gradients.
    - (True, False): each rank's local loss, differentiated only through its own features as
      anchors (every gathered feature, its own included, is a constant), which misses their
      role as candidates: open_clip's gradient, reproduced with two InfoNCE passes against the
      gathered features.

    label_smoothing (not one of open_clip's arguments; keyword only, default 0) is `flashcl.clip_loss`'s:
    ``F.cross_entropy``'s label smoothing in both directions, over every rank's candidates in the
    modes above that compute the global or the gathered loss, and over the gathered candidates in
    (True, False).

    cache_labels has nothing to cache here; use_horovod is not supported (torch.distributed only).
    A constant logit_bias cancels inside softmax cross-entropy: it changes neither the loss nor
    any gradient, and gets no gradient.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, label_smoothing: float = 0.0, backend: Optional[str] = None,
                 group=None):
        super().__init__()
        checks.check_supported(not use_horovod, "use_horovod=True: flashcl.ClipLoss runs on torch.distributed only; "
                               "initialize a torch.distributed process group and pass world_size and rank")
        checks.check_rank(rank, world_size)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.label_smoothing = checks.check_label_smoothing(label_smoothing)
        self.backend, self.group = backend, group

    def _process_group(self):
        return checks.check_process_group("ClipLoss", self.rank, self.world_size, self.group)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                logit_bias: Optional[Tensor] = None, output_dict: bool = False
                ) -> Union[Tensor, Dict[str, Tensor]]:
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, label_smoothing=self.label_smoothing,
                             backend=self.backend)
        elif self.local_loss and not self.gather_with_grad:
            loss = self._local_loss_own_gradients(image_features, text_features, logit_scale)
        elif self.local_loss:  # gather_with_grad: world_size times this rank's share, exact gradients
            loss = clip_loss(image_features, text_features, logit_scale, label_smoothing=self.label_smoothing,
                             backend=self.backend, group=self._process_group())
        else:
            loss = self._global_loss_on_every_rank(image_features, text_features, logit_scale)
        return {"contrastive_loss": loss} if output_dict else loss

    def _global_loss_on_every_rank(self, image_features, text_features, logit_scale):
        group = self._process_group()
        return global_loss_on_every_rank(
            "ClipLoss", lambda x, y, s: clip_loss(x, y, s, label_smoothing=self.label_smoothing, backend=self.backend,
                                                  group=group),
            image_features, text_features, logit_scale, group, self.world_size, self.gather_with_grad)

    def _local_loss_own_gradients(self, image_features, text_features, logit_scale):
        with _core.Call("ClipLoss(local_loss=True, gather_with_grad=False)", self._process_group(),
                        function=None) as call:
            call.features("image_features", image_features, "text_features", text_features, same_rows=True)
        shards = call.shards
        all_images, all_texts = shards.gather_detached(image_features), shards.gather_detached(text_features)
        targets = torch.arange(image_features.shape[0], device=image_features.device) + shards.key_offset
        options = dict(label_smoothing=self.label_smoothing, backend=self.backend)
        return 0.5 * (infonce_loss(image_features, all_texts, logit_scale, targets, **options)
                      + infonce_loss(text_features, all_images, logit_scale, targets, **options))


def global_loss_on_every_rank(owner: str, loss, image_features: Tensor, text_features: Tensor, logit_scale,
                              group, world_size: int, gather_with_grad: bool) -> Tensor:
    """open_clip's local_loss=False for a loss of (image_features, text_features, logit_scale) whose
    group= form returns world_size times this rank's share of the global loss (``loss(x, y, s)``, called
    with the process group bound): the global loss's value on every rank, the full gradient of the logit
    scale on every rank, and the features' gradient exact (gather_with_grad) or 1/world_size of it
    (open_clip differentiates only through the rank's own features). Used by ClipLoss and DistillClipLoss."""
    if isinstance(logit_scale, Tensor) and logit_scale.requires_grad:
        # Every rank's backward then sums every rank's part of the scale's gradient.
        logit_scale = sum_over_ranks(logit_scale, group, owner) / world_size
    if not gather_with_grad:
        image_features = ScaleGradient.apply(image_features, 1.0 / world_size)
        text_features = ScaleGradient.apply(text_features, 1.0 / world_size)
    share = loss(image_features, text_features, logit_scale)
    total = share.detach().clone()
    collective(owner, "loss sum", group, lambda: dist.all_reduce(total, group=group))
    return share + (total / world_size - share).detach()  # the value of the global loss


class ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, value, factor):
        ctx.factor = factor
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class InfoNCELoss(nn.Module):
    """Module form of `flashcl.infonce_loss`; forward(queries, keys, scale, targets=None).
    label_smoothing: as `flashcl.infonce_loss`'s (``F.cross_entropy``'s), default 0."""

    def __init__(self, reduction: str = "mean", *, label_smoothing: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        self.reduction, self.backend = reduction, backend
        self.label_smoothing = checks.check_label_smoothing(label_smoothing)

    def forward(self, queries: Tensor, keys: Tensor, scale: Union[float, Tensor],
                targets: Optional[Tensor] = None) -> Tensor:
        return infonce_loss(queries, keys, scale, targets, self.reduction, label_smoothing=self.label_smoothing,
                            backend=self.backend)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent with a fixed temperature; forward(z1, z2) on (normalized) views."""

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__()
        self.temperature = checks.check_positive_number("temperature", temperature)
        self.reduction, self.backend = reduction, backend

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent_loss(z1, z2, 1.0 / self.temperature, self.reduction, backend=self.backend)


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss``, without the N x N logits: `flashcl.siglip_loss`.

    ``loss = SigLipLoss()(image_features, text_features, logit_scale, logit_bias)``, with
    logit_scale the multiplier (open_clip passes ``model.logit_scale.exp()``) and logit_bias the
    additive bias. With world_size > 1 (torch.distributed initialized; `group` defaults to the
    world group) each rank passes its shard of pairs and gets open_clip's loss and gradients:
    its images against every rank's texts, the texts' gradients back at their owners. open_clip
    exchanges the text shards around a ring (dist_impl "bidir", "shift") or gathers them ("gather",
    "reduce"); all four compute the same numbers, which flashcl computes with one all-gather.
    cache_labels has nothing to cache here. chunk_size (newer open_clip's rows per chunk of the logits;
    None, or an int >= 0) is accepted and changes nothing: flashcl's tiles already bound the memory.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, chunk_size: Optional[int] = None, *,
                 backend: Optional[str] = None, group=None):
        super().__init__()
        checks.check_rank(rank, world_size)
        checks.check_choice("dist_impl", dist_impl, DIST_IMPLS)
        self.chunk_size = checks.check_chunk_size(chunk_size)
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        self.backend, self.group = backend, group

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                logit_bias: Union[float, Tensor, None] = None, output_dict: bool = False
                ) -> Union[Tensor, Dict[str, Tensor]]:
        group = None if self.world_size == 1 else checks.check_process_group("SigLipLoss", self.rank, self.world_size,
                                                                             self.group)
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend, group=group)
        return {"contrastive_loss": loss} if output_dict else loss


class SupConLoss(nn.Module):
    """Module form of `flashcl.supcon_loss`, with the reference implementation's constructor:
    ``SupConLoss(temperature=0.07, contrast_mode="all", base_temperature=0.07)(features, labels)``."""

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all", base_temperature: float = 0.07,
                 reduction: str = "mean", *, backend: Optional[str] = None, group=None):
        super().__init__()
        self.temperature, self.contrast_mode, self.base_temperature = temperature, contrast_mode, base_temperature
        self.reduction, self.backend, self.group = reduction, backend, group

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        checks.check_supported(mask is None, "mask: flashcl never builds the N x N positive mask; give each sample's "
                               "class as labels (samples with equal labels are positives of each other)")
        return supcon_loss(features, labels, self.temperature, self.base_temperature, self.contrast_mode,
                           self.reduction, backend=self.backend, group=self.group)
