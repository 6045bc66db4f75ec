"""nn.Module wrappers of the losses, for users who compose losses as modules."""
from __future__ import annotations

from typing import Dict, Optional, Union

from torch import Tensor, nn

from .losses import clip_loss, infonce_loss, nt_xent_loss


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss`` on one process, without the N x N logits.

    Construct it with open_clip's arguments and call it the same way:
    ``loss = ClipLoss()(image_features, text_features, logit_scale)``, where logit_scale
    is the multiplier (open_clip passes ``model.logit_scale.exp()``). ``world_size > 1``
    and horovod raise NotImplementedError: the distributed loss is a later flashcl issue.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        if world_size > 1 or use_horovod:
            raise NotImplementedError(
                "flashcl.ClipLoss does not gather features across processes yet "
                f"(world_size={world_size}, use_horovod={use_horovod}); use world_size=1 "
                "or open_clip's ClipLoss until flashcl's distributed loss lands")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                logit_bias: Optional[Tensor] = None, output_dict: bool = False
                ) -> Union[Tensor, Dict[str, Tensor]]:
        # A constant added to every logit cancels inside softmax cross-entropy, so open_clip's
        # logit_bias changes neither the loss nor any gradient; it gets no gradient here.
        loss = clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(nn.Module):
    """Module form of `flashcl.infonce_loss`; forward(queries, keys, scale, targets=None)."""

    def __init__(self, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, queries: Tensor, keys: Tensor, scale: Union[float, Tensor],
                targets: Optional[Tensor] = None) -> Tensor:
        return infonce_loss(queries, keys, scale, targets, self.reduction, backend=self.backend)


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent with a fixed temperature; forward(z1, z2) on (normalized) views."""

    def __init__(self, temperature: float = 0.5, reduction: str = "mean", *, backend: Optional[str] = None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent_loss(z1, z2, 1.0 / self.temperature, self.reduction, backend=self.backend)
