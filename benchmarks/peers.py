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


def sentence_transformer_stub(key: str):
    """A stand-in for a SentenceTransformer whose encoder returns given embeddings (features[key]), so a
    sentence-transformers loss runs on the embeddings a benchmark made: the loss alone is measured. It
    has what the losses check for: a transformers tokenizer, max_seq_length, a device."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    class EmbeddingStub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            vocabulary = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
            self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="[PAD]", unk_token="[UNK]")
            self.max_seq_length = 128

        def forward(self, features):
            return {"sentence_embedding": features[key]}

        def __getitem__(self, index):  # model[0]: the first module (checked for StaticEmbedding)
            return self

        @property
        def device(self):
            return torch.device("cpu")

    return EmbeddingStub()
