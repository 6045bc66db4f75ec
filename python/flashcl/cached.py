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
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable, List, Tuple, Union

import torch
from torch import Tensor, nn

from . import checks

Inputs = Union[Tensor, Mapping]  # a tensor, or a mapping of tensors: a dict, transformers' BatchEncoding
Tower = Tuple[Callable[[Inputs], Tensor], Inputs]


def _chunk(inputs: Inputs, rows: slice) -> Inputs:
    """Rows of a tensor, or of every tensor of a mapping (as a dict; other values as they are)."""
    if isinstance(inputs, Tensor):
        return inputs[rows]
    return {k: (v[rows] if isinstance(v, Tensor) else v) for k, v in inputs.items()}


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

    def __init__(self, tower: int, encoder, inputs: Inputs, rows: slice, random_state: _RandomState):
        self.tower, self.encoder, self.inputs, self.rows, self.random_state = tower, encoder, inputs, rows, random_state
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
                    out = chunk.encoder(_chunk(chunk.inputs, chunk.rows))
                torch.autograd.backward(out, upstream.to(out.dtype))
        return None, None


def _progress(enabled: bool):
    if not enabled:
        return lambda items, description: items
    from tqdm import tqdm

    return lambda items, description: tqdm(items, desc=description, unit="chunk")


def cached_loss(loss_fn: Callable[..., Tensor], *towers: Tower, chunk_size: int,
                show_progress_bar: bool = False) -> Tensor:
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

    Returns the loss; its backward gives the encoders' parameters (and any tensor loss_fn uses,
    e.g. a learnable logit scale) exactly the gradient of the same chunked forward kept whole,
    dropout included (each chunk is re-run under its first RNG state) and under torch.autocast
    (re-entered as it was). Use `.backward()`, not `torch.autograd.grad`: the encoders'
    gradients accumulate in their parameters' `.grad`, as with reentrant checkpointing. With an
    encoder wrapped in DistributedDataParallel, every chunk but its last runs under `no_sync()`,
    so DDP reduces once per step. Without grad mode it just computes the loss, chunk by chunk.
    """
    checks.check_positive_int("chunk_size", chunk_size)
    plans = [(encoder, inputs, [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)])
             for encoder, inputs, rows in checks.check_towers(towers)]
    progress = _progress(show_progress_bar)
    if not torch.is_grad_enabled():  # evaluation: nothing to replay
        return loss_fn(*[torch.cat([encoder(_chunk(inputs, r)) for r in rows]) for encoder, inputs, rows in plans])

    autocast, chunks, embeddings = _AutocastState(), [], []
    with torch.no_grad():
        for t, (encoder, inputs, rows) in enumerate(plans):
            devices, pieces = _devices(inputs), []
            for r in progress(rows, f"cached loss: tower {t}, first pass"):
                chunks.append(_Chunk(t, encoder, inputs, r, _RandomState(devices)))
                pieces.append(encoder(_chunk(inputs, r)))
            embeddings.append(torch.cat(pieces).requires_grad_())
    last = {}
    for chunk in chunks:
        last[id(chunk.encoder)] = chunk
    for chunk in last.values():
        chunk.last_of_encoder = True
    loss = checks.check_scalar_loss(loss_fn(*embeddings))
    anchor = torch.empty(0, device=loss.device, requires_grad=True)
    return _ReplayChunks.apply(anchor, (loss, embeddings, chunks, autocast, progress))


class CachedLoss(nn.Module):
    """Module form of `cached_loss`: ``CachedLoss(loss_fn, chunk_size)((encoder, inputs), ...)``."""

    def __init__(self, loss_fn: Callable[..., Tensor], chunk_size: int, show_progress_bar: bool = False):
        super().__init__()
        self.loss_fn, self.chunk_size, self.show_progress_bar = loss_fn, chunk_size, show_progress_bar

    def forward(self, *towers: Tower) -> Tensor:
        return cached_loss(self.loss_fn, *towers, chunk_size=self.chunk_size, show_progress_bar=self.show_progress_bar)
