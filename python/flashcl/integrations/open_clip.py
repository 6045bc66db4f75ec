"""open_clip's training script on flashcl's losses, in one line, and a CoCa drop-in.

    from flashcl.integrations.open_clip import apply_flashcl_to_open_clip
    from open_clip_train.main import main

    apply_flashcl_to_open_clip()        # before main(): every loss it builds is flashcl's
    main(sys.argv[1:])

open_clip's training script builds its loss with open_clip's ``create_loss(args)`` (open_clip 3.x's
``open_clip_train.main``; newer versions build it inside the task classes of ``create_task()``).
Both look the loss classes up by name when they run: ``create_loss`` in the globals of
``open_clip.factory``, the tasks with ``from open_clip.loss import ...`` at construction.
`apply_flashcl_to_open_clip` replaces those module attributes (and the package's own exports) with
flashcl's classes of the same name and constructor, so the script passes its arguments unchanged:

    ClipLoss         flashcl.ClipLoss         local_loss, gather_with_grad, cache_labels, rank, world_size
    SigLipLoss       flashcl.SigLipLoss       cache_labels, rank, world_size, dist_impl (and newer chunk_size)
    CoCaLoss         CoCaLoss below           caption_loss_weight, clip_loss_weight, pad_id and ClipLoss's
    DistillClipLoss  flashcl.DistillClipLoss  ClipLoss's (``--distill-model``/``--distill-pretrained``)

and the model's outputs (``loss(**model_out, output_dict=True)``; with ``--distill`` the teacher's
``dist_image_features``, ``dist_text_features`` and ``dist_logit_scale``, computed under no_grad) as
open_clip's loss takes them. The losses and their gradients are open_clip's; no N x N logits exist
(neither the student's nor the teacher's). ``use_horovod=True`` (``--horovod``) is a clear error:
flashcl runs on torch.distributed only. Calling it again changes nothing; ``revert_flashcl_patches()``
restores open_clip's classes. The patch replaces names, not the classes' code: a loss built before the
call stays open_clip's, and code that imported a class by name before the call (``from open_clip.loss
import ClipLoss`` at the top of a module) keeps open_clip's.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Tuple, Union

import torch
from torch import Tensor, nn

from .. import checks
from ..distill import DistillClipLoss
from ..modules import ClipLoss, SigLipLoss

__all__ = ["CoCaLoss", "apply_flashcl_to_open_clip", "patched_names", "revert_flashcl_patches"]


class CoCaLoss(ClipLoss):
    """Drop-in for open_clip's ``CoCaLoss``: flashcl's contrastive part (`flashcl.ClipLoss`, no N x N
    logits, with every distributed mode of open_clip) plus open_clip's caption cross-entropy.

    ``CoCaLoss(caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False, gather_with_grad=False,
    cache_labels=False, rank=0, world_size=1, use_horovod=False)``, called as open_clip's:
    ``forward(image_features, text_features, logits, labels, logit_scale, output_dict=False)`` returns
    ``(clip_loss_weight * contrastive loss, caption_loss_weight * caption loss)``, or with output_dict
    ``{"contrastive_loss": ..., "caption_loss": ...}``. logits: the text decoder's (batch, length,
    vocab) logits; labels: the (batch, length) next tokens, ``pad_id`` tokens left out of the mean.
    With clip_loss_weight 0 the contrastive loss is not computed and is ``torch.tensor(0)``, as in
    open_clip. The caption loss is each rank's own mean (open_clip's), whatever world_size.
    """

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend=None, group=None):
        checks.check_supported(not use_horovod, "use_horovod=True: flashcl's CoCaLoss runs on torch.distributed "
                               "only; initialize a torch.distributed process group and pass world_size and rank")
        checks.check_weight("caption_loss_weight", caption_loss_weight)
        checks.check_weight("clip_loss_weight", clip_loss_weight)
        checks.check_token_id("pad_id", pad_id)
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, backend=backend, group=group)
        self.clip_loss_weight, self.caption_loss_weight = clip_loss_weight, caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features: Tensor, text_features: Tensor, logits: Tensor, labels: Tensor,
                logit_scale: Union[float, Tensor], output_dict: bool = False
                ) -> Union[Tuple[Tensor, Tensor], Dict[str, Tensor]]:
        checks.check_caption(logits, labels)
        if self.clip_loss_weight:
            clip_loss = self.clip_loss_weight * super().forward(image_features, text_features, logit_scale)
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss_weight * self.caption_loss(logits.permute(0, 2, 1), labels)
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


# Where open_clip's training code looks its loss classes up, by name: the package's exports,
# open_clip.factory's globals (create_loss) and open_clip.loss (newer versions' tasks import from it).
MODULES = ("open_clip", "open_clip.factory", "open_clip.loss")
REPLACEMENTS = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss, "CoCaLoss": CoCaLoss,
                "DistillClipLoss": DistillClipLoss}

_originals: Dict[Tuple[str, str], object] = {}  # (module, name) -> what the name held before the patch


def apply_flashcl_to_open_clip() -> List[str]:
    """Make open_clip's training script build flashcl's losses: open_clip's ``ClipLoss``, ``SigLipLoss``,
    ``CoCaLoss`` and ``DistillClipLoss`` names (in ``open_clip``, ``open_clip.factory`` and
    ``open_clip.loss``) become `flashcl.ClipLoss`, `flashcl.SigLipLoss`, `CoCaLoss` and
    `flashcl.DistillClipLoss`. Call it before the loss is built, e.g.
    first thing in a launcher that then calls ``open_clip_train.main.main(args)``. Idempotent;
    `revert_flashcl_patches` undoes it.

    Returns:
        The names patched, as "module.Name" (`patched_names()`).

    Raises:
        ImportError: open_clip cannot be imported (it needs torchvision).
    """
    modules = _import_open_clip()
    for module_name, module in modules.items():
        for name, ours in REPLACEMENTS.items():
            current = getattr(module, name, None)
            if current is None or current is ours:  # absent in this version, or already patched
                continue
            _originals[(module_name, name)] = current
            setattr(module, name, ours)
    return patched_names()


def revert_flashcl_patches() -> List[str]:
    """Restore open_clip's own loss classes where `apply_flashcl_to_open_clip` replaced them; returns the
    names restored, as "module.Name". Losses already built stay what they are."""
    restored = []
    for (module_name, name), original in list(_originals.items()):
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, name, None) is REPLACEMENTS[name]:
            setattr(module, name, original)
            restored.append(f"{module_name}.{name}")
        del _originals[(module_name, name)]
    return sorted(restored)


def patched_names() -> List[str]:
    """The open_clip names that now hold flashcl's classes, as "module.Name"."""
    return sorted(f"{module_name}.{name}" for module_name, name in _originals
                  if getattr(sys.modules.get(module_name), name, None) is REPLACEMENTS[name])


def _import_open_clip() -> Dict[str, object]:
    try:
        return {name: importlib.import_module(name) for name in MODULES}
    except ImportError as error:
        raise ImportError(f"apply_flashcl_to_open_clip needs open_clip and what its package imports "
                          f"(torchvision): pip install open_clip_torch[training] ({error})") from error
