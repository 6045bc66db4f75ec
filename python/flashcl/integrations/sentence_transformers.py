"""sentence-transformers drop-ins, computed by flashcl without the batch x batch similarity matrix.

    from flashcl.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)            # instead of sentence_transformers' own
    SentenceTransformerTrainer(model=model, train_dataset=..., loss=loss).train()

Each class subclasses sentence-transformers' loss of the same name (so the trainer, model cards and
configs treat it as that loss) and replaces how the loss is computed from the embeddings:

    MultipleNegativesRankingLoss          anchors against every positive and hard negative
    MultipleNegativesSymmetricRankingLoss  the same, plus each positive against every anchor
    CachedMultipleNegativesRankingLoss    the first with flashcl.cached_loss's gradient caching

With q_i the anchors, d_j every document (the positives, then each hard-negative column), p_i
anchor i's positive, sim cosine (normalized embeddings) or the dot product, and s the scale:

    l_i = combine over directions of LSE_j(s sim(q_i, .)) - s sim(q_i, p_i)

where the directions are query_to_doc (every d_j), doc_to_query (p_i against every q_k) and
query_to_query (every q_k, k != i); "joint" combines them with one log-sum-exp, "per_direction"
averages them: sentence-transformers' definitions. Each log-sum-exp is flashcl.row_logsumexp, so
memory is O(batch) beyond the embeddings. gather_across_devices=True contrasts every rank's
embeddings (flashcl's group= with the world group), with sentence-transformers' gradients.
Not supported (a clear error): similarity functions other than cosine and dot product, the
doc_to_doc direction, hardness weighting, and mini_batch_num_tokens.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sentence_transformers import util

try:  # sentence-transformers >= 6 keeps its losses per model type
    from sentence_transformers.sentence_transformer import losses as _st_losses
except ImportError:  # pragma: no cover - older layouts
    from sentence_transformers import losses as _st_losses

from .. import checks
from ..cached import cached_loss
from ..losses import row_logsumexp

SIMILARITIES = {util.cos_sim: "cosine", util.dot_score: "dot"}
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query")


def _group(gather_across_devices: bool):
    if gather_across_devices and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def ranking_loss(embeddings, scale: float, similarity: str, directions, partition_mode: str,
                 group=None, backend: Optional[str] = None) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss from the columns' embeddings
    (anchors, positives, hard negatives...): the mean over this rank's anchors of l_i above."""
    checks.check_columns(len(embeddings))
    if similarity == "cosine":
        embeddings = [F.normalize(e, dim=-1) for e in embeddings]
    queries, positives = embeddings[0], embeddings[1]
    documents = torch.cat(embeddings[1:])
    lse = {"query_to_doc": row_logsumexp(queries, documents, scale, backend=backend, group=group)}
    if "query_to_query" in directions:
        lse["query_to_query"] = row_logsumexp(queries, queries, scale, exclude_diagonal=True, backend=backend,
                                              group=group)
    if "doc_to_query" in directions:
        lse["doc_to_query"] = row_logsumexp(positives, queries, scale, backend=backend, group=group)
    stacked = torch.stack([lse[d] for d in DIRECTIONS if d in lse])
    log_z = torch.logsumexp(stacked, dim=0) if partition_mode == "joint" else stacked.mean(0)
    positive = scale * (queries.to(log_z.dtype) * positives.to(log_z.dtype)).sum(-1)
    return (log_z - positive).mean()


def _parent_kwargs(parent, **kwargs):
    """The arguments the installed sentence-transformers' loss accepts (its signature grows)."""
    accepted = inspect.signature(parent.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


class MultipleNegativesRankingLoss(_st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss, same arguments, computed by flashcl."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode: str = "joint", hardness_mode=None,
                 hardness_strength: float = 0.0, *, backend: Optional[str] = None) -> None:
        self._similarity = checks.check_ranking_options(similarity_fct, SIMILARITIES, directions, DIRECTIONS,
                                                        hardness_mode, hardness_strength)
        super().__init__(model, **_parent_kwargs(
            _st_losses.MultipleNegativesRankingLoss, scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions, partition_mode=partition_mode,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength))
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings: list, labels: Tensor = None) -> Tensor:
        return ranking_loss(embeddings, self.scale, self._similarity, getattr(self, "directions", ("query_to_doc",)),
                            getattr(self, "partition_mode", "joint"), _group(self.gather_across_devices), self.backend)


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesSymmetricRankingLoss: anchors against every document
    and positives against every anchor, the two averaged, computed by flashcl."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim, gather_across_devices: bool = False,
                 *, backend: Optional[str] = None) -> None:
        super().__init__(model, scale, similarity_fct, gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", backend=backend)


class _Embed:
    """The loss's model as an encoder of one column's features (DDP's no_sync passed through)."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, features):
        return self.loss.model(features)["sentence_embedding"]

    def no_sync(self):
        no_sync = getattr(self.loss.model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()


class CachedMultipleNegativesRankingLoss(_st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss: embeddings in mini-batches of
    mini_batch_size with gradient caching (flashcl.cached_loss) and the loss computed by flashcl,
    so neither the encoder's activations nor the similarity matrix grow with the batch."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode: str = "joint", show_progress_bar: bool = False,
                 hardness_mode=None, hardness_strength: float = 0.0, *, backend: Optional[str] = None) -> None:
        similarity = checks.check_ranking_options(similarity_fct, SIMILARITIES, directions, DIRECTIONS,
                                                  hardness_mode, hardness_strength)
        checks.check_supported(mini_batch_num_tokens is None,
                               "mini_batch_num_tokens is not supported by flashcl's cached loss; use mini_batch_size")
        checks.check_positive_int("mini_batch_size", mini_batch_size)
        super().__init__(model, **_parent_kwargs(
            _st_losses.CachedMultipleNegativesRankingLoss, scale=scale, similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size, gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, show_progress_bar=show_progress_bar, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength))
        self._similarity, self.backend = similarity, backend

    def forward(self, sentence_features: Iterable[dict], labels: Tensor = None) -> Tensor:
        columns = list(sentence_features)
        checks.check_columns(len(columns))
        encoder = _Embed(self)
        directions = getattr(self, "directions", ("query_to_doc",))
        partition_mode = getattr(self, "partition_mode", "joint")
        group = _group(self.gather_across_devices)
        return cached_loss(
            lambda *embeddings: ranking_loss(list(embeddings), self.scale, self._similarity, directions, partition_mode,
                                             group, self.backend),
            *[(encoder, features) for features in columns], chunk_size=self.mini_batch_size,
            show_progress_bar=self.show_progress_bar)
