"""Hugging Face transformers: CLIP-family models whose ``return_loss=True`` loss flashcl computes, in one call.

    from flashcl.integrations.transformers import apply_flashcl_to_clip
    apply_flashcl_to_clip()                          # before the model is built or wrapped (Trainer, DDP)
    model = CLIPModel.from_pretrained(...)
    loss = model(**batch, return_loss=True).loss     # flashcl.clip_loss: no batch x batch logits in training

Liger-Kernel's convention (``apply_liger_kernel_to_llama()``): each ``apply_flashcl_to_*`` patches a model
class, not an instance, so every model of the class (built before or after) computes its loss with
flashcl. Only calls with ``return_loss`` true change; the towers, projections and normalization run
as the model runs them, and the loss is computed from the model's own normalized embeddings with its
own ``logit_scale.exp()`` (and SigLIP's ``logit_bias``):

    CLIP loss (flashcl.clip_loss)      CLIPModel, MetaClip2Model, CLIPSegModel, ChineseCLIPModel, AltCLIPModel
    SigLIP loss (flashcl.siglip_loss)  SiglipModel, Siglip2Model

skip_logits: None (default) leaves out logits_per_image / logits_per_text (None in the output) when
the model is in training mode and the loss is asked for, so nothing batch x batch exists; True leaves
them out of every call with return_loss, False never does. Where the logits are computed the model's
own forward computes them, so the output is what the unpatched model returns, its loss flashcl's.

group: None (this process), "world" (torch.distributed's default group when it is initialized, this
process alone otherwise; resolved at each call, so the patch may come before init_process_group) or a
torch.distributed ProcessGroup. With a group each rank passes its shard of the batch and the loss is
that of every rank's pairs together (flashcl's convention: a rank returns its share times the world
size, so DDP's gradient average is exactly the global loss's gradient, the learnable scale and bias
included). ``revert_flashcl_patches()`` restores the classes' own forward.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Optional, Tuple

import torch.distributed as dist
from transformers.utils.generic import can_return_tuple

from .. import checks, primitives
from ..losses import clip_loss
from ..siglip import siglip_loss


@dataclasses.dataclass(frozen=True)
class _Family:
    """How one model class's forward computes its normalized embeddings (read from its source)."""

    module: str  # transformers.models.<name>.modeling_<name>
    model: str  # the model class
    output: str  # its output class
    loss: str  # "clip" | "siglip"
    image: Tuple[str, Tuple[str, ...]]  # the forward's image-tower call: (model attribute, forward arguments)
    text: Tuple[str, Tuple[str, ...]]
    projected: bool = False  # the forward projects the towers' pooled outputs itself (AltCLIP)
    vector_norm: bool = True  # normalizes by the module's _get_vector_norm, else by tensor.norm(p=2, dim=-1)


_CLIP_IMAGE = ("get_image_features", ("pixel_values", "interpolate_pos_encoding"))
_CLIP_TEXT = ("get_text_features", ("input_ids", "attention_mask", "position_ids"))
_BERT_TEXT = ("input_ids", "attention_mask", "token_type_ids", "position_ids")

FAMILIES = {
    "clip": _Family("clip", "CLIPModel", "CLIPOutput", "clip", _CLIP_IMAGE, _CLIP_TEXT),
    "metaclip_2": _Family("metaclip_2", "MetaClip2Model", "MetaClip2Output", "clip", _CLIP_IMAGE, _CLIP_TEXT),
    "clipseg": _Family("clipseg", "CLIPSegModel", "CLIPSegOutput", "clip", _CLIP_IMAGE, _CLIP_TEXT),
    "chinese_clip": _Family("chinese_clip", "ChineseCLIPModel", "ChineseCLIPOutput", "clip", _CLIP_IMAGE,
                            ("get_text_features", _BERT_TEXT)),
    "altclip": _Family("altclip", "AltCLIPModel", "AltCLIPOutput", "clip",
                       ("vision_model", ("pixel_values", "interpolate_pos_encoding")), ("text_model", _BERT_TEXT),
                       projected=True),
    "siglip": _Family("siglip", "SiglipModel", "SiglipOutput", "siglip",
                      ("vision_model", ("pixel_values", "interpolate_pos_encoding")),
                      ("text_model", ("input_ids", "attention_mask", "position_ids")), vector_norm=False),
    "siglip2": _Family("siglip2", "Siglip2Model", "Siglip2Output", "siglip",
                       ("vision_model", ("pixel_values", "pixel_attention_mask", "spatial_shapes")),
                       ("text_model", ("input_ids", "attention_mask", "position_ids")), vector_norm=False),
}


@dataclasses.dataclass
class _Patch:
    family: _Family
    original: object  # the class's own forward, restored by revert_flashcl_patches
    skip_logits: Optional[bool]
    group: object
    backend: Optional[str]


_PATCHES: dict = {}  # model class -> _Patch


def _modeling(family: _Family):
    name = f"transformers.models.{family.module}.modeling_{family.module}"
    try:
        return importlib.import_module(name)
    except ImportError as error:
        import transformers

        raise ImportError(f"flashcl: {family.model} is not in the installed transformers {transformers.__version__} "
                          f"({name}: {error})") from error


def _resolve_group(group):
    if isinstance(group, str):  # "world"
        initialized = dist.is_available() and dist.is_initialized()
        return dist.group.WORLD if initialized and dist.get_world_size() > 1 else None
    return group


def _loss(patch: _Patch, model, text_embeds, image_embeds):
    """The model's loss from its normalized embeddings, by flashcl, with its scale (and bias) as it applies them."""
    device = text_embeds.device
    image_embeds = image_embeds.to(device)
    scale = model.logit_scale.exp().to(device)
    group = _resolve_group(patch.group)
    if patch.family.loss == "siglip":  # logits_per_text * logit_scale.exp() + logit_bias, rows the texts
        return siglip_loss(text_embeds, image_embeds, scale, model.logit_bias.to(device), backend=patch.backend,
                           group=group)
    return clip_loss(text_embeds, image_embeds, scale, backend=patch.backend, group=group)


def _embeddings(patch: _Patch, module, model, arguments: dict, kwargs: dict):
    """The forward's tower outputs and normalized embeddings, by the calls the forward makes, without logits."""
    family = patch.family
    towers = []
    for (attribute, names), projection in ((family.image, "visual_projection"), (family.text, "text_projection")):
        outputs = getattr(model, attribute)(**{name: arguments[name] for name in names}, **kwargs)
        embeds = outputs.pooler_output
        if family.projected:
            embeds = getattr(model, projection)(embeds)
        norm = module._get_vector_norm(embeds) if family.vector_norm else embeds.norm(p=2, dim=-1, keepdim=True)
        towers.append((outputs, embeds / norm))
    return towers


def _patched_forward(cls, original):
    signature = inspect.signature(original)
    var_kwargs = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @can_return_tuple  # return_dict / config.return_dict as the model's own forward honours them
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        patch = _PATCHES.get(cls)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if patch is None or not bound.arguments.get("return_loss"):
            return original(self, *args, **kwargs)  # no loss asked for: the model's forward, untouched
        skip = self.training if patch.skip_logits is None else patch.skip_logits
        if not skip:  # the model's own output, its loss left to flashcl
            bound.arguments["return_loss"] = False
            output = original(*bound.args, return_dict=True, **bound.kwargs)
            loss = _loss(patch, self, output.text_embeds, output.image_embeds)
            return dataclasses.replace(output, loss=loss)  # rebuilt, so "loss" leads the keys and the tuple
        module = _modeling(patch.family)
        extra = dict(bound.arguments.get(var_kwargs) or {}) if var_kwargs else {}
        (vision_outputs, image_embeds), (text_outputs, text_embeds) = _embeddings(patch, module, self,
                                                                                  bound.arguments, extra)
        return getattr(module, patch.family.output)(
            loss=_loss(patch, self, text_embeds, image_embeds), logits_per_image=None, logits_per_text=None,
            text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_outputs,
            vision_model_output=vision_outputs)

    forward.__flashcl_patch__ = True
    return forward


def _apply(name: str, skip_logits, group, backend) -> None:
    checks.check_optional_bool("skip_logits", skip_logits)
    checks.check_group_option("group", group)
    checks.check_choice("backend", backend, (None, "auto", *primitives.backend_names()))
    family = FAMILIES[name]
    cls = getattr(_modeling(family), family.model)
    patch = _PATCHES.get(cls)
    if patch is not None:  # patched already: the new options replace the old, the forward stays wrapped once
        patch.skip_logits, patch.group, patch.backend = skip_logits, group, backend
        return
    original = cls.__dict__["forward"]
    _PATCHES[cls] = _Patch(family, original, skip_logits, group, backend)
    cls.forward = _patched_forward(cls, original)


def revert_flashcl_patches(*model_classes) -> None:
    """Restore the own forward of the classes given (every class an ``apply_flashcl_to_*`` patched, when none is)."""
    for cls in model_classes or list(_PATCHES):
        patch = _PATCHES.pop(cls, None)
        if patch is not None:
            cls.forward = patch.original


def patched_classes() -> list:
    """The model classes whose loss flashcl computes now."""
    return list(_PATCHES)


_ARGS = """

    Args:
        skip_logits: None: leave out the logits (None in the output) in training mode when return_loss is
            true; True: in every call with return_loss; False: never.
        group: None (this process), "world" (torch.distributed's default group when initialized, this
            process otherwise) or a torch.distributed ProcessGroup: the loss of every rank's pairs together.
        backend: None ($FLASHCL_BACKEND or "auto"), "auto", "triton", "cuda" or "torch", as for every flashcl loss.
"""


def _apply_function(name: str, what: str):
    def apply(skip_logits: Optional[bool] = None, group=None, backend: Optional[str] = None) -> None:
        _apply(name, skip_logits, group, backend)

    family = FAMILIES[name]
    apply.__name__ = apply.__qualname__ = f"apply_flashcl_to_{name}"
    loss = "flashcl.siglip_loss" if family.loss == "siglip" else "flashcl.clip_loss"
    apply.__doc__ = (f"Patch transformers' {family.model} (the class) so that {what} ``return_loss=True`` loss "
                     f"is computed by {loss}." + _ARGS)
    return apply


apply_flashcl_to_clip = _apply_function("clip", "CLIP's")
apply_flashcl_to_metaclip_2 = _apply_function("metaclip_2", "MetaCLIP 2's")
apply_flashcl_to_clipseg = _apply_function("clipseg", "CLIPSeg's (image-text, not segmentation)")
apply_flashcl_to_chinese_clip = _apply_function("chinese_clip", "Chinese-CLIP's")
apply_flashcl_to_altclip = _apply_function("altclip", "AltCLIP's")
apply_flashcl_to_siglip = _apply_function("siglip", "SigLIP's")
apply_flashcl_to_siglip2 = _apply_function("siglip2", "SigLIP 2's")

__all__ = ["apply_flashcl_to_altclip", "apply_flashcl_to_chinese_clip", "apply_flashcl_to_clip",
           "apply_flashcl_to_clipseg", "apply_flashcl_to_metaclip_2", "apply_flashcl_to_siglip",
           "apply_flashcl_to_siglip2", "patched_classes", "revert_flashcl_patches"]
