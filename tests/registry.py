"""The one registry of flashcl's public losses, for every cross-cutting test.

Each entry says how to call one public loss or loss module on a `Batch` of inputs, its float64
materialized reference, and what it supports (reductions, backend=, group=, a learnable scale).
The compile, memory, dispatch, error, property and reliability tests parametrize over REGISTRY;
tests/test_registry.py fails when a name in flashcl.__all__ is neither registered here nor listed
in NOT_LOSSES with the reason. A new loss is one entry here (and one reference in reference.py).
"""
import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple

import torch

import flashcl
import reference
from conftest import DEVICE, unit_rows

REDUCTIONS = ("mean", "sum", "none")

# Public names that are not losses, and why the loss tests do not apply to them.
NOT_LOSSES = {
    "available_backends": "lists the backends; tested in test_dispatch.py",
    "tiling": "the torch backend's tile scope; tested in test_primitives.py and test_compile.py",
    "GammaWeightedLoss": "the named tuple gamma_weighted_loss returns (registered through that function)",
    "cached_loss": "runs any loss with gradient caching; its backward re-runs encoders, so it is tested with "
                   "the registered losses in test_cached.py",
    "CachedLoss": "the module form of cached_loss",
}


@dataclasses.dataclass
class Batch:
    """Every input a registered loss takes: paired rows x, y, z (row i of each from one example), extra
    candidates, labels, dataset indices, log-weights, private features, and the logit scale."""

    x: torch.Tensor
    y: torch.Tensor
    z: torch.Tensor
    keys: torch.Tensor
    private: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    log_u: torch.Tensor
    scale: torch.Tensor

    FEATURES = ("x", "y", "z", "keys", "private")  # the floating inputs that may take gradients

    def replace(self, **tensors) -> "Batch":
        """A copy with some inputs replaced (by hand, not dataclasses.replace: torch.compile traces this)."""
        return Batch(**{field: tensors.get(field, getattr(self, field)) for field in FIELDS})

    def leaves(self, scale_grad: bool = True) -> "Batch":
        """A copy whose features (and scale, if scale_grad) are fresh leaves that require grad."""
        return self.replace(**{k: getattr(self, k).detach().clone().requires_grad_() for k in self.FEATURES},
                            scale=self.scale.detach().clone().requires_grad_(scale_grad))

    def on(self, device) -> "Batch":
        """Every tensor on `device` (e.g. "meta", whose tensors hold no values)."""
        return Batch(**{field: getattr(self, field).to(device) for field in FIELDS})

    def to(self, dtype) -> "Batch":
        """Features in dtype (the scale in the statistics dtype), as fresh leaves."""
        wide = torch.promote_types(dtype, torch.float32)
        return self.replace(**{k: getattr(self, k).detach().to(dtype) for k in self.FEATURES},
                            log_u=self.log_u.to(wide), scale=self.scale.detach().to(wide))


FIELDS = [field.name for field in dataclasses.fields(Batch)]


def make_batch(n: int = 24, d: int = 8, m: Optional[int] = None, dtype=torch.float32, scale: float = 7.0,
               seed: int = 0) -> Batch:
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = unit_rows(n, d, g, torch.float64)
    return Batch(x=x, y=unit_rows(n, d, g, torch.float64, like=x), z=unit_rows(n, d, g, torch.float64, like=x, noise=0.3),
                 keys=unit_rows(n + 8 if m is None else m, d, g, torch.float64),
                 private=unit_rows(n, d, g, torch.float64),
                 labels=torch.randint(0, 3, (n,), generator=g, device=DEVICE),
                 index=torch.arange(n, device=DEVICE), log_u=torch.randn(n, generator=g, device=DEVICE) - 1,
                 scale=torch.tensor(scale, device=DEVICE)).to(dtype)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One public loss: `arguments` gives the positional and keyword arguments of a call on a batch;
    `options` (reduction, backend, group) go to the function, or to a module's constructor."""

    name: str
    arguments: Callable[[Batch], Tuple[tuple, dict]]
    reference: Callable[..., torch.Tensor]  # (float64 batch[, reduction]) -> the materialized loss
    first_argument: str  # the name flashcl's messages give the first positional argument
    reductions: Tuple[str, ...] = ()  # the values of its reduction= option; () when it has none
    dtypes: Tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # of its features
    magnitude: float = 20.0  # bounds the terms that cancel in its value and gradients on make_batch()'s inputs
    takes_backend: bool = True
    takes_group: bool = True
    learnable_scale: bool = True  # Batch.scale is an argument, and gets a gradient
    softmax_logits: bool = False  # its value is a softmax cross-entropy of scale * x . y logits alone
    function: str = "exp"  # the primitives' weight function
    constructor: Dict = dataclasses.field(default_factory=dict)  # a module's own arguments
    output: Callable = staticmethod(lambda out: out)  # the loss tensor from what the call returns
    # The dtype whose tolerance its float64 results meet (GammaContrastiveLoss keeps fp32 running estimates).
    exact_as: torch.dtype = torch.float64
    # Options that put its own state on a device (GammaContrastiveLoss's running estimates).
    state_on: Callable = staticmethod(lambda device: {})

    @property
    def public(self):
        return getattr(flashcl, self.name)

    @property
    def is_module(self) -> bool:
        return isinstance(self.public, type)

    def loss_fn(self, **options) -> Callable:
        """The configured callable: the function with its options, or a module built with them."""
        if self.is_module:
            return self.public(**{**self.constructor, **options})
        return lambda *args, **kwargs: self.public(*args, **kwargs, **options)

    def expected(self, batch: Batch, reduction: Optional[str] = None) -> torch.Tensor:
        """The float64 reference on this batch (with its reduction, where the loss has the option)."""
        return self.reference(batch) if reduction is None else self.reference(batch, reduction=reduction)

    def __call__(self, batch: Batch, **options) -> torch.Tensor:
        args, kwargs = self.arguments(batch)
        return self.output(self.loss_fn(**options)(*args, **kwargs))


def _views(b):
    return torch.stack([b.x, b.y], 1)


SUPCON_TEMPERATURE = 0.1
BIAS = -4.0


def _gamma_module_reference(b):
    """GammaContrastiveLoss(shape=inf) on a fresh state: u = 1 / (this batch's estimate), so each
    direction's term u_i exp(LSE_i - log K) - S_ii is 1 - S_ii, and the gradient is the negatives-only
    (decoupled) InfoNCE's, both directions averaged."""
    s = b.scale * b.x @ b.y.T
    off = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    decoupled = 0.5 * ((s.masked_fill(off, -math.inf).logsumexp(1) - s.diagonal()).mean()
                       + (s.masked_fill(off, -math.inf).logsumexp(0) - s.diagonal()).mean())
    return decoupled - decoupled.detach() + (1 - s.diagonal()).mean().detach()


def _modality_structure_reference(b):
    return (reference.clip(b.x, b.y, b.scale) + reference.geometric_consistency(b.x, b.y, b.z)
            + reference.brownian_bridge(b.x, b.y, b.z) + reference.feature_separation(b.x, b.private))


TEACHER_SCALE = 5.0


def _teacher(b):
    """A teacher's features for the batch's pairs, of their own dimension (2 D), constants (detached)."""
    return torch.cat([b.z, b.private], 1).detach(), torch.cat([b.y, b.z.roll(1, 0)], 1).detach()


GIST_MARGIN = 0.5


def _guide(b):
    """A guide's features for the batch's anchors, positives and negatives: one-hot classes (exact in
    every dtype, so the guide similarity ties nothing by rounding). With GIST_MARGIN, every other
    same-class candidate is left out; the negatives' classes are the next row's."""
    classes = torch.nn.functional.one_hot(b.labels, 3).to(b.x.dtype)
    return classes, classes, classes.roll(1, 0)


def _gist_arguments(b):
    guide_anchors, guide_positives, guide_negatives = _guide(b)
    return (b.x, b.y, guide_anchors, guide_positives, b.scale, b.z, guide_negatives), {"margin": GIST_MARGIN}


REGISTRY = [
    Entry("infonce_loss", lambda b: ((b.x, b.keys, b.scale), {}),
          lambda b, reduction="mean": reference.infonce(b.x, b.keys, b.scale, reduction=reduction),
          "queries", REDUCTIONS, softmax_logits=True),
    Entry("clip_loss", lambda b: ((b.x, b.y, b.scale), {}),
          lambda b, reduction="mean": reference.clip(b.x, b.y, b.scale, reduction), "image_features", REDUCTIONS,
          softmax_logits=True),
    Entry("nt_xent_loss", lambda b: ((b.x, b.y, b.scale), {}),
          lambda b, reduction="mean": reference.nt_xent(b.x, b.y, b.scale, reduction), "z1", REDUCTIONS,
          softmax_logits=True),
    Entry("siglip_loss", lambda b: ((b.x, b.y, b.scale, BIAS), {}),
          lambda b, reduction="mean": reference.sigmoid_pairs(b.x, b.y, b.scale, BIAS, reduction), "image_features",
          REDUCTIONS, function="sigmoid", magnitude=200.0),  # an image's loss sums n softplus terms
    Entry("supcon_loss", lambda b: ((_views(b), b.labels, SUPCON_TEMPERATURE), {}),
          lambda b, reduction="mean": reference.supcon(_views(b), b.labels, SUPCON_TEMPERATURE, reduction=reduction),
          "features", REDUCTIONS, learnable_scale=False, magnitude=40.0),
    Entry("row_logsumexp", lambda b: ((b.x, b.keys, b.scale), {}),
          lambda b: reference.row_logsumexp(b.x, b.keys, b.scale), "queries"),
    Entry("gamma_weighted_loss", lambda b: ((b.x, b.y, b.scale, b.log_u), {"exclude_positive": True}),
          lambda b, reduction="mean": reference.gamma_weighted(b.x, b.y, b.scale, b.log_u.double(), None, None,
                                                               reduction, True),
          "features_a", REDUCTIONS, output=lambda out: out.loss),
    Entry("geometric_consistency_loss", lambda b: ((b.x, b.y, b.z), {}),
          lambda b: reference.geometric_consistency(b.x, b.y, b.z), "image",
          takes_backend=False, learnable_scale=False),
    Entry("brownian_bridge_loss", lambda b: ((b.x, b.y, b.z), {}),
          lambda b, reduction="mean": reference.brownian_bridge(b.x, b.y, b.z, reduction=reduction), "image",
          REDUCTIONS, learnable_scale=False, magnitude=40.0),
    Entry("feature_separation_loss", lambda b: ((b.x, b.private), {}),
          lambda b: reference.feature_separation(b.x, b.private), "shared", learnable_scale=False),
    Entry("ClipLoss", lambda b: ((b.x, b.y, b.scale), {}),
          lambda b: reference.clip(b.x, b.y, b.scale), "image_features", takes_group=False, softmax_logits=True),
    Entry("InfoNCELoss", lambda b: ((b.x, b.keys, b.scale), {}),
          lambda b, reduction="mean": reference.infonce(b.x, b.keys, b.scale, reduction=reduction), "queries",
          REDUCTIONS, takes_group=False, softmax_logits=True),
    Entry("NTXentLoss", lambda b: ((b.x, b.y), {}),
          lambda b, reduction="mean": reference.nt_xent(b.x, b.y, 2.0, reduction), "z1", REDUCTIONS,  # 1 / 0.5
          takes_group=False, learnable_scale=False),
    Entry("SigLipLoss", lambda b: ((b.x, b.y, b.scale, BIAS), {}),
          lambda b: reference.sigmoid_pairs(b.x, b.y, b.scale, BIAS), "image_features",
          takes_group=False, function="sigmoid", magnitude=200.0),
    Entry("SupConLoss", lambda b: ((_views(b), b.labels), {}),
          lambda b, reduction="mean": reference.supcon(_views(b), b.labels, SUPCON_TEMPERATURE, reduction=reduction),
          "features", REDUCTIONS, learnable_scale=False, constructor=dict(temperature=SUPCON_TEMPERATURE),
          magnitude=40.0),
    Entry("GammaContrastiveLoss", lambda b: ((b.x, b.y, b.scale, b.index), {}), _gamma_module_reference,
          "features_a", constructor=dict(num_samples=1024, shape=math.inf), exact_as=torch.float32,
          state_on=lambda device: dict(state_device=device)),
    Entry("ModalityStructureLoss",
          lambda b: ((b.x, b.y, b.scale), dict(image_aug=b.z, image_private=b.private)),
          _modality_structure_reference, "image_features", constructor=dict(geometric=1.0, bridge=1.0, separation=1.0),
          magnitude=100.0),
    Entry("clip_distillation_loss", lambda b: ((b.x, b.y, b.scale, *_teacher(b), TEACHER_SCALE), {}),
          lambda b, reduction="mean": reference.clip_distillation(b.x, b.y, b.scale, *_teacher(b), TEACHER_SCALE,
                                                                  reduction),
          "image_features", REDUCTIONS, function="values"),
    Entry("DistillClipLoss", lambda b: ((b.x, b.y, b.scale, *_teacher(b), TEACHER_SCALE), {}),
          lambda b: reference.clip(b.x, b.y, b.scale) + reference.clip_distillation(b.x, b.y, b.scale, *_teacher(b),
                                                                                    TEACHER_SCALE),
          "image_features", takes_group=False, function="values", output=lambda out: out[0] + out[1]),
    Entry("gist_loss", _gist_arguments,
          lambda b, reduction="mean": reference.gist(*_gist_arguments(b)[0], margin=GIST_MARGIN, reduction=reduction),
          "anchors", REDUCTIONS, function="guide"),
]
REGISTRY_BY_NAME = {entry.name: entry for entry in REGISTRY}


def ids(entries):
    return [entry.name for entry in entries]
