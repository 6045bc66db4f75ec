"""Gradient caching (GradCache; sentence-transformers' Cached* losses): a whole batch's loss and
exact gradients with one chunk's encoder activations in memory.

A contrastive loss couples every row of the batch, so a batch is usually limited by the encoders'
activations, not by the loss. `cached_loss` splits the step in two:

1. embed each tower's inputs a chunk at a time without a graph, recording each chunk's RNG state;
2. compute the loss on the whole batch's embeddings (flashcl's losses: O(N) extra memory) and,
   when it is back-propagated, its gradient with respect to every embedding; then re-run each
   chunk with a graph, under the RNG state and autocast setting it first ran with (so dropout
   draws the same masks), and back-propagate that chunk's slice of the embedding gradient.

Peak memory is one chunk's activations plus the embeddings and their gradients, whatever the batch.
The gradients are those of the same chunked forward kept whole; the price is a second forward.

Tokenized text (a mapping with an ``attention_mask``) is padded to the batch's longest row; each
chunk is cut to its own longest row (trailing all-padding columns dropped, as sentence-transformers'
cached losses do), which saves the encoder's work on padding and changes nothing where the encoder
masks padding. The chunks' widths are read in one device-to-host transfer before the first pass.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import checks

Inputs = Union[Tensor, Mapping]  # a tensor, or a mapping of tensors: a dict, transformers' BatchEncoding
Tower = Tuple[Callable[[Inputs], Tensor], Inputs]


def _chunk(inputs: Inputs, rows: slice, width: Optional[int] = None) -> Inputs:
    """Rows of a tensor, or of every tensor of a mapping (as a dict; other values as they are); with
    `width`, a mapping's tensors whose second dimension is the attention mask's sequence length are
    cut to their first `width` columns."""
    if isinstance(inputs, Tensor):
        return inputs[rows]
    if width is None:
        return {k: (v[rows] if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    length = inputs["attention_mask"].shape[1]
    return {k: (v if not isinstance(v, Tensor) else v[rows, :width] if v.dim() >= 2 and v.shape[1] == length
                else v[rows]) for k, v in inputs.items()}


def _padding_mask(inputs: Inputs) -> Optional[Tensor]:
    """The (N, L) attention mask of a mapping of inputs, if it has one."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def _chunk_widths(plans) -> List[List[Optional[int]]]:
    """Per tower, per chunk: the chunk's longest row (one past the last column where its attention
    mask has a nonzero), or None to keep the whole width (no mask, nothing to cut, or a chunk whose
    mask is all zeros). Computed where the masks live and read back in one transfer per device, so
    an accelerator is synchronized once per step, before the first pass, not once per chunk."""
    lengths = {}  # tower -> its chunks' lengths, on the device of its mask
    for t, (_, inputs, rows) in enumerate(plans):
        mask = _padding_mask(inputs)
        if mask is None or mask.shape[1] == 0 or not rows:
            continue
        n, length = mask.shape
        size = rows[0].stop - rows[0].start
        columns = torch.arange(1, length + 1, device=mask.device)
        row_lengths = torch.where(mask != 0, columns, 0).amax(dim=1)  # 0 for a row of padding only
        padded = row_lengths.new_zeros(len(rows) * size)
        padded[:n] = row_lengths
        lengths[t] = padded.view(len(rows), size).amax(dim=1)
    by_device = {}
    for t, chunk_lengths in lengths.items():
        by_device.setdefault(chunk_lengths.device, []).append(t)
    host = {}
    for towers in by_device.values():
        values = torch.cat([lengths[t] for t in towers]).tolist()  # the one device-to-host read
        for t in towers:
            host[t], values = values[:len(lengths[t])], values[len(lengths[t]):]
    widths = []
    for t, (_, inputs, rows) in enumerate(plans):
        if t not in host:
            widths.append([None] * len(rows))
            continue
        full = _padding_mask(inputs).shape[1]
        widths.append([width if 0 < width < full else None for width in host[t]])
    return widths


def _devices(inputs: Inputs) -> List[int]:
    tensors = [inputs] if isinstance(inputs, Tensor) else [v for v in inputs.values() if isinstance(v, Tensor)]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


class _RandomState:
    """The CPU and CUDA generators' states, to run a chunk again with the same dropout masks."""

    def __init__(self, devices: List[int]):
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    @contextlib.contextmanager
    def restored(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


class _AutocastState:
    """The autocast setting of the first pass, re-entered for the second."""

    def __init__(self):
        self.settings = [(kind, torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda")
                         if torch.is_autocast_enabled(kind)]

    def entered(self):
        stack = contextlib.ExitStack()
        for kind, dtype in self.settings:
            stack.enter_context(torch.autocast(kind, dtype=dtype))
        return stack


def _no_sync(encoder, last: bool):
    """DDP reduces gradients once, after the last chunk: the others accumulate locally."""
    no_sync = getattr(encoder, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


class _Chunk:
    """One encoder call of the first pass, and what it takes to repeat it exactly."""

    def __init__(self, tower: int, encoder, inputs: Inputs, rows: slice, width: Optional[int],
                 random_state: _RandomState):
        self.tower, self.encoder, self.inputs, self.rows = tower, encoder, inputs, rows
        self.width, self.random_state = width, random_state
        self.last_of_encoder = False


class _ReplayChunks(torch.autograd.Function):
    """Returns the loss's value; its backward back-propagates the loss to the embeddings (and to
    anything else the loss depends on, e.g. a learnable logit scale), then re-runs every chunk
    with a graph and back-propagates its slice of the embedding gradient into the encoders."""

    @staticmethod
    def forward(ctx, anchor, replay):
        # `anchor` is a fresh leaf: it makes the output require grad while keeping the loss's own
        # graph out of the caller's, since this backward runs that graph itself.
        ctx.replay = replay
        return replay[0].detach().clone()

    @staticmethod
    def backward(ctx, grad):
        loss, embeddings, chunks, autocast, progress = ctx.replay
        ctx.replay = None  # the first pass's graph and embeddings go as soon as they are used
        torch.autograd.backward(loss, grad)  # every embedding's .grad, and any other input's
        for chunk in progress(chunks, "cached loss: second pass"):
            upstream = embeddings[chunk.tower].grad[chunk.rows]
            with chunk.random_state.restored(), autocast.entered(), _no_sync(chunk.encoder, chunk.last_of_encoder):
                with torch.enable_grad():
                    out = chunk.encoder(_chunk(chunk.inputs, chunk.rows, chunk.width))
                torch.autograd.backward(out, upstream.to(out.dtype))
        return None, None


def _progress(enabled: bool):
    if not enabled:
        return lambda items, description: items
    from tqdm import tqdm

    return lambda items, description: tqdm(items, desc=description, unit="chunk")


def cached_loss(loss_fn: Callable[..., Tensor], *towers: Tower, chunk_size: int,
                show_progress_bar: bool = False, trim_padding: bool = True, frozen: Sequence[Tower] = ()) -> Tensor:
    """loss_fn of every tower's embeddings, with gradient caching: call `.backward()` on the result.

    Args:
        loss_fn: takes one (N, D) embedding per tower and returns a scalar loss, e.g.
            ``lambda image, text: flashcl.clip_loss(image, text, model.logit_scale.exp())``; any
            flashcl loss (with group= for distributed training) or a sum of them. It runs once.
        towers: (encoder, inputs) pairs: encoder(inputs) -> (n, D) embeddings for a chunk of the
            batch's rows; inputs a tensor or a mapping of tensors (tokenized text: a dict, transformers'
            BatchEncoding), batch first, whose chunks reach the encoder as dicts. The same encoder
            may serve several towers (SimCLR's two views).
        chunk_size: rows per encoder call; the largest batch of activations alive at once.
        show_progress_bar: a tqdm bar over the chunks of both passes.
        trim_padding: where a tower's inputs are a mapping with an (N, L) ``attention_mask``, each
            chunk is cut to its longest row: every tensor of the mapping whose second dimension is
            L loses the columns after the last one where the chunk's mask has a nonzero (trailing
            padding only; left padding stays, a chunk whose mask is all zeros stays whole). This
            assumes the encoder masks padding, as Hugging Face encoders do (a padded column then
            contributes nothing: the result is unchanged, up to rounding); pass False for an encoder
            that does not. The widths are computed where the masks live and read back in one
            device-to-host transfer per device (a synchronization of an accelerator) before the
            first pass, not one per chunk. Other inputs are never cut.
        frozen: (encoder, inputs) pairs of models that take no gradient (a guide, a teacher): embedded
            chunk by chunk without a graph in the first pass (cut as the towers are), passed to
            loss_fn after the towers' embeddings as constants, and never run again.

    Returns the loss; its backward gives the encoders' parameters (and any tensor loss_fn uses,
    e.g. a learnable logit scale) exactly the gradient of the same chunked forward kept whole,
    dropout included (each chunk is re-run under its first RNG state) and under torch.autocast
    (re-entered as it was). Use `.backward()`, not `torch.autograd.grad`: the encoders'
    gradients accumulate in their parameters' `.grad`, as with reentrant checkpointing. With an
    encoder wrapped in DistributedDataParallel, every chunk but its last runs under `no_sync()`,
    so DDP reduces once per step. Without grad mode it just computes the loss, chunk by chunk.
    """
    checks.check_positive_int("chunk_size", chunk_size)
    frozen = list(frozen)
    plans = [(encoder, inputs, [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)])
             for encoder, inputs, rows in [*checks.check_towers(towers), *checks.check_towers(frozen, "frozen", False)]]
    # Before any encoder call: an encoder may edit its inputs in place (sentence-transformers' Pooling
    # can zero prompt tokens of the mask), and the second pass must cut the chunks as the first did.
    widths = _chunk_widths(plans) if trim_padding else [[None] * len(rows) for _, _, rows in plans]
    progress = _progress(show_progress_bar)

    def embed(t):  # tower t's embeddings, chunk by chunk
        (encoder, inputs, rows), tower_widths = plans[t], widths[t]
        return torch.cat([encoder(_chunk(inputs, r, w)) for r, w in zip(rows, tower_widths)])

    trained = len(plans) - len(frozen)
    with torch.no_grad():
        constants = [embed(t) for t in range(trained, len(plans))]
    if not torch.is_grad_enabled():  # evaluation: nothing to replay
        return loss_fn(*[embed(t) for t in range(trained)], *constants)

    autocast, chunks, embeddings = _AutocastState(), [], []
    with torch.no_grad():
        for t, ((encoder, inputs, rows), tower_widths) in enumerate(zip(plans[:trained], widths)):
            devices, pieces = _devices(inputs), []
            for r, w in progress(list(zip(rows, tower_widths)), f"cached loss: tower {t}, first pass"):
                chunks.append(_Chunk(t, encoder, inputs, r, w, _RandomState(devices)))
                pieces.append(encoder(_chunk(inputs, r, w)))
            embeddings.append(torch.cat(pieces).requires_grad_())
    last = {}
    for chunk in chunks:
        last[id(chunk.encoder)] = chunk
    for chunk in last.values():
        chunk.last_of_encoder = True
    loss = checks.check_scalar_loss(loss_fn(*embeddings, *constants))
    anchor = torch.empty(0, device=loss.device, requires_grad=True)
    return _ReplayChunks.apply(anchor, (loss, embeddings, chunks, autocast, progress))


class CachedLoss(nn.Module):
    """Module form of `cached_loss`: ``CachedLoss(loss_fn, chunk_size)((encoder, inputs), ...)``."""

    def __init__(self, loss_fn: Callable[..., Tensor], chunk_size: int, show_progress_bar: bool = False,
                 trim_padding: bool = True):
        super().__init__()
        self.loss_fn, self.chunk_size, self.show_progress_bar = loss_fn, chunk_size, show_progress_bar
        self.trim_padding = trim_padding

    def forward(self, *towers: Tower) -> Tensor:
        return cached_loss(self.loss_fn, *towers, chunk_size=self.chunk_size, show_progress_bar=self.show_progress_bar,
                           trim_padding=self.trim_padding)
