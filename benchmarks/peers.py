"""What flashcl is measured against: the textbook losses and the peers' own code, loaded once here
for every benchmark."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def clip_loss_textbook(image, text, logit_scale):
    """open_clip's single-process ClipLoss: the full N x N logits, twice."""
    import torch
    import torch.nn.functional as F

    logits_per_image = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def open_clip_loss_module(required: bool = False):
    """open_clip's loss.py on its own (the package import needs torchvision, loss.py does not);
    None when open_clip is not installed, unless `required`."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        if required:
            raise SystemExit("open_clip is needed: pip install --no-deps open_clip_torch==3.3.0")
        return None
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", Path(spec.origin).parent / "loss.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
