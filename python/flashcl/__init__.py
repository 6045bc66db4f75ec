"""flashcl: exact contrastive losses that never materialize the N x M similarity matrix."""
from importlib.metadata import PackageNotFoundError, version

from .backends.torch_tiles import tiling
from .cached import CachedLoss, cached_loss
from .distill import DistillClipLoss, clip_distillation_loss
from .gamma import GammaContrastiveLoss
from .gist import gist_loss
from .losses import GammaWeightedLoss, clip_loss, gamma_weighted_loss, infonce_loss, nt_xent_loss, row_logsumexp
from .modules import ClipLoss, InfoNCELoss, NTXentLoss, SigLipLoss, SupConLoss
from .primitives import available_backends
from .regularizers import (ModalityStructureLoss, brownian_bridge_loss, feature_separation_loss,
                           geometric_consistency_loss)
from .siglip import siglip_loss
from .supcon import supcon_loss

try:  # the one version string is pyproject.toml's
    __version__ = version("flashcl")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "CachedLoss",
    "ClipLoss",
    "DistillClipLoss",
    "GammaContrastiveLoss",
    "GammaWeightedLoss",
    "InfoNCELoss",
    "ModalityStructureLoss",
    "NTXentLoss",
    "SigLipLoss",
    "SupConLoss",
    "available_backends",
    "brownian_bridge_loss",
    "cached_loss",
    "clip_distillation_loss",
    "clip_loss",
    "feature_separation_loss",
    "gamma_weighted_loss",
    "geometric_consistency_loss",
    "gist_loss",
    "infonce_loss",
    "nt_xent_loss",
    "row_logsumexp",
    "siglip_loss",
    "supcon_loss",
    "tiling",
]
