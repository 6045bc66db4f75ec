"""sentence-transformers drop-ins, computed by flashcl without the batch x batch similarity matrix.

    from flashcl.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)            # instead of sentence_transformers' own
    SentenceTransformerTrainer(model=model, train_dataset=..., loss=loss).train()

or, for code (and scripts) that name sentence-transformers' classes, one call before the loss is built:

    from flashcl.integrations.sentence_transformers import apply_flashcl_to_sentence_transformers
    apply_flashcl_to_sentence_transformers()  # losses.MultipleNegativesRankingLoss(model) is now flashcl's

Each class subclasses sentence-transformers' loss of the same name (so the trainer, model cards and
configs treat it as that loss) and replaces how the loss is computed from the embeddings:

    MultipleNegativesRankingLoss                 anchors against every positive and hard negative
    MultipleNegativesSymmetricRankingLoss        the same, plus each positive against every anchor
    CachedMultipleNegativesRankingLoss           the first with flashcl.cached_loss's gradient caching
    CachedMultipleNegativesSymmetricRankingLoss  the second with it

(the two symmetric ones subclass flashcl's MultipleNegativesRankingLoss and
CachedMultipleNegativesRankingLoss with directions=("query_to_doc", "doc_to_query") and
partition_mode="per_direction", which is what sentence-transformers' deprecated classes are).

With W the world batch (this rank's batch, or every rank's with gather_across_devices), q_k the
anchors, the documents in sentence-transformers' column order d = [positives p_1..p_W | hard
negatives of column 1, n1_1..n1_W | ...] (C columns of documents in all), sim cosine (normalized
embeddings) or the dot product, s the scale, h = hardness_strength, and for this rank's anchor i
(global index i):

    l_i = LSE(the logits of every selected direction) - s sim(q_i, p_i)       ("joint"), or
    l_i = mean over the directions of LSE(that direction's logits) - s sim(q_i, p_i)  ("per_direction")

    query_to_doc    s sim(q_i, d_j) + h sg(sim(q_i, d_j)) [j penalized], every document j
    query_to_query  s sim(q_i, q_k), k != i
    doc_to_query    s sim(p_i, q_k), every k
    doc_to_doc      s sim(p_i, d_j), every document j but the C of anchor i (p_i itself and its own
                    hard negatives: column i of each block)

sg is stop-gradient: a penalized logit has the value (s + h) sim and the gradient s dsim. The
documents penalized, by hardness_mode (none without one, or with hardness_strength 0):

    "in_batch_negatives"  every document but anchor i's own C (column i of each block)
    "hard_negatives"      anchor i's own hard negatives only (column i of each hard-negative block)
    "all_negatives"       every document but p_i

The loss is the mean of l_i over this rank's anchors: sentence-transformers' definitions (6.2). Every
log-sum-exp is computed per block of W documents by flashcl.row_logsumexp: a block whose logits are
all penalized or none is one call at scale s + h (its gradient scaled by s / (s + h)) or s, a block
where anchor i's own document is treated apart (doc_to_doc, and the penalties around the own
documents) one call with exclude_diagonal=True plus the own document's logit, an O(W D) product;
the blocks and directions are then combined with torch.logsumexp over (W,) vectors. Memory is O(batch)
beyond the embeddings, with no W x W matrix. gather_across_devices=True contrasts every rank's
embeddings (flashcl's group= with the world group, which puts this rank's shard first, so a block's
diagonal is each anchor's own document), with sentence-transformers' gradients (each rank's
embeddings get the gradient of every rank's loss).

Not supported (a clear error): similarity functions other than cosine and dot product, and
mini_batch_num_tokens of the cached losses. scale is a number, as sentence-transformers documents
it (a float: 1 / temperature). Invalid options (scale, a direction, the partition mode, the hardness
mode or strength, partition_mode="per_direction" with query_to_query or doc_to_doc, which
sentence-transformers refuses too) are a ValueError naming the argument, at construction.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sentence_transformers import util

try:  # sentence-transformers >= 6 keeps its losses per model type
    from sentence_transformers.sentence_transformer import losses as _st_losses
except ImportError:  # pragma: no cover - older layouts
    from sentence_transformers import losses as _st_losses

try:  # sentence-transformers >= 6 embeds the candidate columns of a loss in one merged forward
    from sentence_transformers.base.losses.merged_forward import embed_columns as _embed_columns
except ImportError:  # pragma: no cover - older versions: a forward per column
    def _embed_columns(model, columns):
        return [model(features)["sentence_embedding"] for features in columns]

from .. import checks
from ..cached import cached_loss
from ..gist import gist_loss
from ..losses import row_logsumexp

SIMILARITIES = {util.cos_sim: "cosine", util.dot_score: "dot"}
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")
PARTITION_MODES = ("joint", "per_direction")

# sentence-transformers' own loss classes, by name, as its losses namespace held them when flashcl was
# imported: kept before apply_flashcl_to_sentence_transformers replaces the names (flashcl's classes
# subclass them, and their constructors are what flashcl's pass arguments on to).
_ST_CLASSES: Dict[str, type] = {name: value for name, value in vars(_st_losses).items() if isinstance(value, type)}


def _group(gather_across_devices: bool):
    if gather_across_devices and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _penalties(hardness_mode: Optional[str], hardness_strength: float, block: int) -> Tuple[float, float]:
    """(others, own): the hardness penalty of block `block`'s documents (0: the positives) other than the
    anchor's own one, and of its own one (column i of the block)."""
    if hardness_mode is None or not hardness_strength > 0:
        return 0.0, 0.0
    h = float(hardness_strength)
    if hardness_mode == "in_batch_negatives":
        return h, 0.0
    if hardness_mode == "hard_negatives":
        return (0.0, 0.0) if block == 0 else (0.0, h)
    return (h, 0.0) if block == 0 else (h, h)  # all_negatives: every document but the positive


def _gradient_scaled(lse: Tensor, scale, penalty: float) -> Tensor:
    """A log-sum-exp of logits (s + h) sim, with the gradient of s sim + h sg(sim): the same value, and
    the gradient times s / (s + h), exactly (every logit's gradient is (s + h) dsim times its softmax weight)."""
    if not penalty:
        return lse
    c = scale / (scale + penalty)
    return lse * c + (lse * (1 - c)).detach()


def _pair_similarity(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """sim(a_i, b_i) for every row i, in the log-sum-exps' dtype: O(N D)."""
    return (a.to(dtype) * b.to(dtype)).sum(-1)


def _lse(x: Tensor, keys: Tensor, scale, group, backend, *, others: float = 0.0, own: Optional[float] = None,
         exclude_own: bool = False) -> Tensor:
    """Row i's log-sum-exp over one block of keys (this rank's shard; every rank's with a group), where key i
    (row i's own, this rank's shard coming first) has the logit (s + own) sim, or is left out (exclude_own),
    and every other key (s + others) sim, each penalty without gradient."""
    if not exclude_own and (own is None or own == others):
        return _gradient_scaled(row_logsumexp(x, keys, scale + others, backend=backend, group=group), scale, others)
    rest = _gradient_scaled(row_logsumexp(x, keys, scale + others, exclude_diagonal=True, backend=backend,
                                          group=group), scale, others)
    if exclude_own:
        return rest
    similarity = _pair_similarity(x, keys, rest.dtype)
    return torch.logaddexp(rest, scale * similarity + own * similarity.detach())


def ranking_loss(embeddings, scale: float, similarity: str, directions, partition_mode: str,
                 group=None, backend: Optional[str] = None, hardness_mode: Optional[str] = None,
                 hardness_strength: float = 0.0) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss from the columns' embeddings
    (anchors, positives, hard negatives...): the mean over this rank's anchors of l_i above."""
    checks.check_columns(len(embeddings))
    if similarity == "cosine":
        embeddings = [F.normalize(e, dim=-1) for e in embeddings]
    queries, blocks = embeddings[0], embeddings[1:]
    positives = blocks[0]
    parts: Dict[str, List[Tensor]] = {d: [] for d in DIRECTIONS if d in directions}

    # query_to_doc: the blocks whose documents share one penalty in one call, the others one call each
    uniform: Dict[float, List[Tensor]] = {}
    for b, block in enumerate(blocks):
        others, own = _penalties(hardness_mode, hardness_strength, b)
        if others == own:
            uniform.setdefault(others, []).append(block)
        else:
            parts["query_to_doc"].append(_lse(queries, block, scale, group, backend, others=others, own=own))
    for penalty, same in uniform.items():
        keys = same[0] if len(same) == 1 else torch.cat(same)
        parts["query_to_doc"].append(_lse(queries, keys, scale, group, backend, others=penalty))
    if "query_to_query" in parts:
        parts["query_to_query"].append(_lse(queries, queries, scale, group, backend, exclude_own=True))
    if "doc_to_query" in parts:
        parts["doc_to_query"].append(_lse(positives, queries, scale, group, backend))
    if "doc_to_doc" in parts:
        parts["doc_to_doc"] = [_lse(positives, block, scale, group, backend, exclude_own=True) for block in blocks]

    def combine(pieces: List[Tensor]) -> Tensor:
        return pieces[0] if len(pieces) == 1 else torch.logsumexp(torch.stack(pieces), dim=0)

    if partition_mode == "joint":
        log_z = combine([piece for d in DIRECTIONS if d in parts for piece in parts[d]])
    else:
        log_z = torch.stack([combine(parts[d]) for d in DIRECTIONS if d in parts]).mean(0)
    positive = scale * _pair_similarity(queries, positives, log_z.dtype)
    return (log_z - positive).mean()


def _parent_kwargs(parent, **kwargs):
    """The arguments the installed sentence-transformers' loss accepts (its signature grows)."""
    accepted = inspect.signature(parent.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def _keep_options(loss, **options) -> None:
    """Options an older sentence-transformers' constructor does not take (nor store): kept on the loss."""
    for name, value in options.items():
        if not hasattr(loss, name):
            setattr(loss, name, value)


def _options(loss) -> dict:
    """The loss's options as it holds them now (sentence-transformers lets them be reassigned)."""
    return dict(directions=tuple(loss.directions), partition_mode=loss.partition_mode,
                hardness_mode=loss.hardness_mode, hardness_strength=loss.hardness_strength)


class MultipleNegativesRankingLoss(_ST_CLASSES["MultipleNegativesRankingLoss"]):
    """sentence-transformers' MultipleNegativesRankingLoss, same arguments, computed by flashcl."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode: str = "joint", hardness_mode=None,
                 hardness_strength: float = 0.0, *, backend: Optional[str] = None) -> None:
        self._similarity = checks.check_ranking_options(similarity_fct, SIMILARITIES, scale, directions, DIRECTIONS,
                                                        partition_mode, PARTITION_MODES, hardness_mode,
                                                        HARDNESS_MODES, hardness_strength)
        super().__init__(model, **_parent_kwargs(
            _ST_CLASSES["MultipleNegativesRankingLoss"], scale=scale, similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices, directions=directions, partition_mode=partition_mode,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength))
        _keep_options(self, directions=tuple(directions), partition_mode=partition_mode, hardness_mode=hardness_mode,
                      hardness_strength=hardness_strength)
        self.backend = backend

    def compute_loss_from_embeddings(self, embeddings: list, labels: Tensor = None) -> Tensor:
        return ranking_loss(embeddings, self.scale, self._similarity, group=_group(self.gather_across_devices),
                            backend=self.backend, **_options(self))


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


class CachedMultipleNegativesRankingLoss(_ST_CLASSES["CachedMultipleNegativesRankingLoss"]):
    """sentence-transformers' CachedMultipleNegativesRankingLoss: embeddings in mini-batches of
    mini_batch_size with gradient caching (flashcl.cached_loss) and the loss computed by flashcl,
    so neither the encoder's activations nor the similarity matrix grow with the batch."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode: str = "joint", show_progress_bar: bool = False,
                 hardness_mode=None, hardness_strength: float = 0.0, *, backend: Optional[str] = None) -> None:
        similarity = checks.check_ranking_options(similarity_fct, SIMILARITIES, scale, directions, DIRECTIONS,
                                                  partition_mode, PARTITION_MODES, hardness_mode, HARDNESS_MODES,
                                                  hardness_strength)
        checks.check_supported(mini_batch_num_tokens is None,
                               "mini_batch_num_tokens is not supported by flashcl's cached loss; use mini_batch_size")
        checks.check_positive_int("mini_batch_size", mini_batch_size)
        super().__init__(model, **_parent_kwargs(
            _ST_CLASSES["CachedMultipleNegativesRankingLoss"], scale=scale, similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size, gather_across_devices=gather_across_devices, directions=directions,
            partition_mode=partition_mode, show_progress_bar=show_progress_bar, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength))
        _keep_options(self, directions=tuple(directions), partition_mode=partition_mode, hardness_mode=hardness_mode,
                      hardness_strength=hardness_strength)
        self._similarity, self.backend = similarity, backend

    def forward(self, sentence_features: Iterable[dict], labels: Tensor = None) -> Tensor:
        columns = list(sentence_features)
        checks.check_columns(len(columns))
        encoder = _Embed(self)
        options = _options(self)
        group = _group(self.gather_across_devices)
        return cached_loss(
            lambda *embeddings: ranking_loss(list(embeddings), self.scale, self._similarity, group=group,
                                             backend=self.backend, **options),
            *[(encoder, features) for features in columns], chunk_size=self.mini_batch_size,
            show_progress_bar=self.show_progress_bar)


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesSymmetricRankingLoss (deprecated there in favour of
    CachedMultipleNegativesRankingLoss with these directions): anchors against every document and
    positives against every anchor, the two averaged, with flashcl's gradient caching."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=util.cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, gather_across_devices: bool = False,
                 show_progress_bar: bool = False, *, backend: Optional[str] = None) -> None:
        super().__init__(model, scale, similarity_fct, mini_batch_size, mini_batch_num_tokens, gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         show_progress_bar=show_progress_bar, backend=backend)


# -- GISTEmbed: guided in-batch negatives -----------------------------------------------------------------

class _Guide:
    """The guide model as an encoder of the student's tokenized features: re-tokenized from the decoded text
    when the two tokenizers differ (or the guide reads shorter sequences), as sentence-transformers does."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, features):
        loss = self.loss
        if loss.must_retokenize:
            input_ids = features["input_ids"]
            if "cu_seq_lens_q" in features:  # packed rows (flash attention's unpadded layout)
                flat, bounds = input_ids[0].tolist(), features["cu_seq_lens_q"].tolist()
                input_ids = [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
            text = loss.model.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            tokenize = getattr(loss.guide, "preprocess", None) or loss.guide.tokenize  # sentence-transformers < 6
            features = util.batch_to_device(tokenize(text), loss.guide.device)
        return loss.guide(features)["sentence_embedding"]


def guided_loss(embeddings, guide_embeddings, loss) -> Tensor:
    """sentence-transformers' GIST loss from the columns' embeddings (anchors, positives, hard negatives...)
    and the guide's: flashcl.gist_loss on the cosine similarities (both models' embeddings normalized),
    the hard-negative columns concatenated as extra candidates."""
    checks.check_columns(len(embeddings))
    student = [F.normalize(e, dim=-1) for e in embeddings]
    guide = [F.normalize(e.detach(), dim=-1).to(student[0].dtype) for e in guide_embeddings]
    negatives = (torch.cat(student[2:]), torch.cat(guide[2:])) if len(student) > 2 else ()
    return gist_loss(student[0], student[1], guide[0], guide[1], 1.0 / loss.temperature, *negatives,
                     margin=loss.margin, margin_strategy=loss.margin_strategy, contrast_anchors=loss.contrast_anchors,
                     contrast_positives=loss.contrast_positives, group=_group(loss.gather_across_devices),
                     backend=loss.backend)


class GISTEmbedLoss(_ST_CLASSES["GISTEmbedLoss"]):
    """sentence-transformers' GISTEmbedLoss, same arguments (the guide model included), computed by
    flashcl.gist_loss: no batch x batch similarity matrix of the student or of the guide."""

    def __init__(self, model, guide, temperature: float = 0.01, margin_strategy: str = "absolute",
                 margin: float = 0.0, contrast_anchors: bool = True, contrast_positives: bool = True,
                 gather_across_devices: bool = False, *, backend: Optional[str] = None) -> None:
        checks.check_positive_number("temperature", temperature)
        super().__init__(model, guide, **_parent_kwargs(
            _ST_CLASSES["GISTEmbedLoss"], temperature=temperature, margin_strategy=margin_strategy, margin=margin,
            contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices))
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict], labels: Tensor = None) -> Tensor:
        columns = list(sentence_features)
        checks.check_columns(len(columns))
        guide, guide_columns = _Guide(self), [dict(features) for features in columns]
        embeddings = _embed_columns(self.model, columns)
        with torch.no_grad():
            guide_embeddings = [guide(features) for features in guide_columns]
        return guided_loss(embeddings, guide_embeddings, self)


class CachedGISTEmbedLoss(_ST_CLASSES["CachedGISTEmbedLoss"]):
    """sentence-transformers' CachedGISTEmbedLoss: the student's embeddings in mini-batches of
    mini_batch_size with gradient caching (flashcl.cached_loss), the guide's in the same mini-batches
    without a graph (cached_loss's frozen towers), and the loss computed by flashcl.gist_loss."""

    def __init__(self, model, guide, temperature: float = 0.01, mini_batch_size: int = 32,
                 mini_batch_num_tokens: Optional[int] = None, show_progress_bar: bool = False,
                 margin_strategy: str = "absolute", margin: float = 0.0, contrast_anchors: bool = True,
                 contrast_positives: bool = True, gather_across_devices: bool = False, *,
                 backend: Optional[str] = None) -> None:
        checks.check_positive_number("temperature", temperature)
        checks.check_supported(mini_batch_num_tokens is None,
                               "mini_batch_num_tokens is not supported by flashcl's cached loss; use mini_batch_size")
        checks.check_positive_int("mini_batch_size", mini_batch_size)
        super().__init__(model, guide, **_parent_kwargs(
            _ST_CLASSES["CachedGISTEmbedLoss"], temperature=temperature, mini_batch_size=mini_batch_size,
            show_progress_bar=show_progress_bar, margin_strategy=margin_strategy, margin=margin,
            contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices))
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict], labels: Tensor = None) -> Tensor:
        columns = list(sentence_features)
        checks.check_columns(len(columns))
        encoder, guide, count = _Embed(self), _Guide(self), len(columns)
        return cached_loss(
            lambda *embeddings: guided_loss(list(embeddings[:count]), list(embeddings[count:]), self),
            *[(encoder, features) for features in columns], chunk_size=self.mini_batch_size,
            show_progress_bar=self.show_progress_bar, frozen=[(guide, features) for features in columns])


# -- sentence-transformers' own names (apply_flashcl_to_sentence_transformers) ----------------------------------

_originals: Dict[Tuple[str, str], object] = {}  # (module, name) -> what the name held before the patch


def _drop_ins() -> Dict[str, type]:
    """flashcl's drop-ins, by name: every class of this module named as one of sentence-transformers' losses
    (a drop-in added to this module is patched in with the rest)."""
    module = sys.modules[__name__]
    return {name: ours for name, original in _ST_CLASSES.items()
            if isinstance(ours := getattr(module, name, None), type) and ours is not original}


def _homes(original: type) -> Dict[str, object]:
    """The modules that expose sentence-transformers' class `original` by its name: the losses namespace
    (sentence_transformers.sentence_transformer.losses; sentence_transformers.losses is the same module
    in 6.x, and the package itself in older layouts) and the module that defines it."""
    modules = {_st_losses.__name__: _st_losses}
    legacy = sys.modules.get("sentence_transformers.losses")
    if legacy is not None and legacy is not _st_losses:
        modules[legacy.__name__] = legacy
    defining = sys.modules.get(original.__module__) or importlib.import_module(original.__module__)
    modules.setdefault(defining.__name__, defining)
    return modules


def apply_flashcl_to_sentence_transformers() -> List[str]:
    """Make sentence-transformers' loss names build flashcl's drop-ins: ``MultipleNegativesRankingLoss``,
    ``MultipleNegativesSymmetricRankingLoss``, ``CachedMultipleNegativesRankingLoss`` and
    ``CachedMultipleNegativesSymmetricRankingLoss`` in ``sentence_transformers.sentence_transformer.losses``
    (which ``sentence_transformers.losses`` is, in sentence-transformers 6) and in the submodule that
    defines each (``...losses.multiple_negatives_ranking``, ...) become this module's classes, so
    ``from sentence_transformers.losses import MultipleNegativesRankingLoss``,
    ``from sentence_transformers.sentence_transformer.losses import ...`` and
    ``losses.MultipleNegativesRankingLoss(model)`` get flashcl's. Call it before the loss is built (and
    before code imports a class by name). Idempotent; `revert_flashcl_patches` undoes it.

    Returns:
        The names patched, as "module.Name" (`patched_names()`).
    """
    for name, ours in _drop_ins().items():
        original = _ST_CLASSES[name]
        for module_name, module in _homes(original).items():
            current = getattr(module, name, None)
            if current is original:  # absent, already patched, or something else: left alone
                _originals[(module_name, name)] = current
                setattr(module, name, ours)
    return patched_names()


def revert_flashcl_patches() -> List[str]:
    """Restore sentence-transformers' own classes where `apply_flashcl_to_sentence_transformers` replaced them;
    returns the names restored, as "module.Name". Losses already built stay what they are."""
    drop_ins, restored = _drop_ins(), []
    for (module_name, name), original in list(_originals.items()):
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, name, None) is drop_ins.get(name):
            setattr(module, name, original)
            restored.append(f"{module_name}.{name}")
        del _originals[(module_name, name)]
    return sorted(restored)


def patched_names() -> List[str]:
    """The sentence-transformers names that now hold flashcl's classes, as "module.Name"."""
    drop_ins = _drop_ins()
    return sorted(f"{module_name}.{name}" for module_name, name in _originals
                  if getattr(sys.modules.get(module_name), name, None) is drop_ins.get(name))
