"""flashcl: exact contrastive losses that never materialize the N x M similarity matrix."""
from .backends.torch_tiles import tiling
from .gamma import GammaContrastiveLoss
from .losses import GammaWeightedLoss, clip_loss, gamma_weighted_loss, infonce_loss, nt_xent_loss
from .modules import ClipLoss, InfoNCELoss, NTXentLoss
from .primitives import available_backends

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "GammaContrastiveLoss",
    "GammaWeightedLoss",
    "InfoNCELoss",
    "NTXentLoss",
    "available_backends",
    "clip_loss",
    "gamma_weighted_loss",
    "infonce_loss",
    "nt_xent_loss",
    "tiling",
]
