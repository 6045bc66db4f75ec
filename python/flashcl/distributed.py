"""The distributed composition: one layer every loss uses when it is given a process group.

Each rank of `group` holds a shard of the rows; the loss is that of the concatenation of the shards
in rank order. A loss call on rank r

1. exchanges a small signature, one all-gather of eight integers per rank over gloo (a digest of the
   call, its flags, D, dtype, device type and which inputs need gradients; its row counts; its
   targets' range), so ranks that disagree all raise the same error before any real collective,
   and every rank learns every shard's size (shards may be ragged). Only when something is wrong do
   the ranks exchange their full descriptions, as objects, to say what;
2. all-gathers the candidates once, in "rank-r order": its own shard first, then the others in
   rank order. A loss is invariant to the order of its candidates, and with its own shard first
   its anchors' own candidates sit on the diagonal: NT-Xent's self-similarity and the paired
   positives need no offset. Each rank computes its row block of S against every candidate;
3. merges the partial column statistics across ranks (two all-reduces of M floats);
4. in backward, all-gathers the column weights and offsets (M floats each), computes dx of its
   rows (complete) and its rows' contributions to every candidate's gradient, which a
   reduce-scatter sums at their owners.

Summed over ranks that is the single-process count of products, and O(M D) traffic per step.
Convention: the value a rank returns is its share of the global loss times the world size, and
its backward delivers the world size times the exact gradient of the global loss with respect to
its own tensors; DDP's averaging over ranks then gives exactly the global loss and gradient, for
ragged shards too. With reduction="none" a rank returns its anchors' losses, and its backward
the exact gradient of the sum over ranks of what they back-propagate.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# torch >= 2.12 names it reduce_scatter_single (and deprecates the older name).
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# A call's signature, one row of integers per rank: whether its checks failed, a digest of the options
# every rank must share, its row counts, and its targets' range (where reading it was free).
FAILED, DIGEST, ANCHORS, KEYS, DEFAULT_TARGETS, HAS_RANGE, LOW, HIGH = range(8)
SIGNATURE_LENGTH = 8
_METADATA_GROUPS = {}


def digest(fields: dict) -> int:
    """A 63-bit digest of a call's options, the same in every process (Python's hash() of a str is not)."""
    text = repr(sorted((name, repr(value)) for name, value in fields.items()))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def metadata_group(group):
    """The group a call's signature travels over: the group itself under gloo; for another backend
    (NCCL), a gloo group of the same ranks, made once, by those ranks only."""
    if dist.get_backend(group) == "gloo":
        return group
    if group not in _METADATA_GROUPS:
        _METADATA_GROUPS[group] = dist.new_group(dist.get_process_group_ranks(group), backend="gloo",
                                                 use_local_synchronization=True)
    return _METADATA_GROUPS[group]


class SingleProcess:
    """This process holds every row: every step of the distributed composition is the identity."""

    world_size = 1
    key_offset = 0

    def candidates(self, keys: Tensor) -> Tensor:
        return keys

    def gather_detached(self, local: Tensor) -> Tensor:
        return local.detach()

    def gather_candidates_detached(self, keys: Tensor) -> Tensor:
        return keys.detach()

    def column_lse(self, partial: Tensor) -> Tensor:
        return partial

    def gather_columns(self, values: Tensor) -> Tensor:
        return values

    def candidate_grads(self, grads: Tensor) -> Tensor:
        return grads

    def mean_count(self, local_anchors: int) -> float:
        return local_anchors

    def global_anchors(self, local_anchors: int) -> int:
        return local_anchors

    def candidate_positions(self, global_index: Tensor) -> Tensor:
        return global_index

    def gather_anchors(self, values: Tensor) -> Tensor:
        return values

    def sum(self, value: Tensor) -> Tensor:
        return value

    def max(self, value: Tensor) -> Tensor:
        return value.detach()


SINGLE_PROCESS = SingleProcess()


class Shards:
    """How one call's rows are split over a process group, and the collectives the losses need.

    Built by flashcl._core.Call after every rank's checks: the ranks exchange their signatures
    (`description`, or the error this rank's checks raised), and a disagreement, or a rank whose
    input was rejected, raises on every rank.
    """

    def __init__(self, group, call: str, description: Optional[dict], local_error: Optional[BaseException]):
        self.group, self.call = group, call
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._gathered = self._gathered_constants = None
        every = self._exchange(description, local_error)
        if local_error is not None:
            return  # the caller re-raises this rank's own error
        self.anchor_sizes = [int(theirs[ANCHORS]) for theirs in every]
        self.key_sizes = [int(theirs[KEYS]) for theirs in every]
        self.anchors, self.keys = sum(self.anchor_sizes), sum(self.key_sizes)
        self.key_offset = sum(self.key_sizes[:self.rank])
        self.anchor_offset = sum(self.anchor_sizes[:self.rank])
        for rank, theirs in enumerate(every):  # global indices, checked where every rank sees them
            low, high = int(theirs[LOW]), int(theirs[HIGH])
            if theirs[HAS_RANGE] and (low < 0 or high >= self.keys):
                raise ValueError(f"flashcl {call}(group=...): targets must index the {self.keys} keys of all ranks, "
                                 f"i.e. lie in [0, {self.keys - 1}], got values in [{low}, {high}] on rank {rank}")
        if description["default_targets"] and self.keys < self.anchors:
            raise ValueError(f"flashcl {call}(group=...): targets=None pairs query i with key i over all ranks, so "
                             f"the ranks need at least {self.anchors} keys in all, got {self.keys}; pass targets")

    def _exchange(self, description: Optional[dict], local_error: Optional[BaseException]) -> List[List[int]]:
        """Every rank's signature, as rows of integers: one all-gather of a small CPU tensor (on a group of
        another backend, over a gloo group of the same ranks: the host exchanges it, the device stream
        never waits). Only when some rank failed or the ranks disagree do they exchange their full
        descriptions, as objects, to say what went wrong; then every rank raises."""
        mine = [0] * SIGNATURE_LENGTH
        if local_error is not None:
            mine[FAILED] = 1
        else:
            target_range = description["target_range"]
            mine[DIGEST] = digest(description["fields"])
            mine[ANCHORS], mine[KEYS] = description["anchors"], description["keys"]
            mine[DEFAULT_TARGETS] = int(description["default_targets"])
            if target_range is not None:
                mine[HAS_RANGE], mine[LOW], mine[HIGH] = 1, *target_range
        group = metadata_group(self.group)
        local = torch.tensor(mine, dtype=torch.int64)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self._collective("signature", lambda: dist.all_gather(gathered, local, group=group))
        every = [row.tolist() for row in gathered]
        if any(theirs[FAILED] for theirs in every) or len({theirs[DIGEST] for theirs in every}) > 1:
            self._explain(group, description, local_error)
        return every

    def _explain(self, group, description: Optional[dict], local_error: Optional[BaseException]) -> None:
        """Some rank failed or the ranks disagree: every rank learns which and how, and raises (the failed
        rank returns, to raise its own error)."""
        failure = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
        every = [None] * self.world_size
        self._collective("signature explanation",
                         lambda: dist.all_gather_object(every, (description, failure), group=group))
        if local_error is not None:
            return
        for rank, (_, theirs) in enumerate(every):
            if theirs is not None:
                raise ValueError(f"flashcl {self.call}(group=...): rank {rank} rejected its input, so every rank "
                                 f"stops: {theirs}")
        for name, value in description["fields"].items():
            differ = next((r for r, (theirs, _) in enumerate(every) if theirs["fields"].get(name) != value), None)
            if differ is not None:
                raise ValueError(
                    f"flashcl {self.call}(group=...): ranks disagree on the {name}: rank {self.rank} has {value}, "
                    f"rank {differ} has {every[differ][0]['fields'].get(name)}")
        raise ValueError(f"flashcl {self.call}(group=...): ranks disagree on the call's options: "
                         f"{[theirs['fields'] for theirs, _ in every]}")

    def _collective(self, what: str, run):
        return collective(self.call, what, self.group, run)

    def global_anchors(self, local_anchors: int) -> int:
        return self.anchors

    # -- layout -----------------------------------------------------------------------------------
    def _rank_order(self, blocks: List[Tensor]) -> Tensor:
        """Per-rank blocks (global order) as this rank's candidate order: its own first."""
        return torch.cat([blocks[self.rank], *blocks[:self.rank], *blocks[self.rank + 1:]])

    def _global_order(self, values: Tensor) -> List[Tensor]:
        """The per-rank blocks, in rank order, of a tensor in this rank's candidate order."""
        sizes = [self.key_sizes[self.rank], *self.key_sizes[:self.rank], *self.key_sizes[self.rank + 1:]]
        pieces = list(values.split(sizes))
        own = pieces.pop(0)
        return pieces[:self.rank] + [own] + pieces[self.rank:]

    def candidate_positions(self, global_index: Tensor) -> Tensor:
        """Where candidates with these global indices sit in this rank's candidate order."""
        start, end = self.key_offset, self.key_offset + self.key_sizes[self.rank]
        local = (global_index >= start) & (global_index < end)
        return torch.where(local, global_index - start,
                           torch.where(global_index < start, global_index + (end - start), global_index))

    def mean_count(self, local_anchors: int) -> float:
        """What a rank divides its anchors' loss sum by for "mean": its share, times the world size."""
        return self.anchors / self.world_size

    # -- collectives --------------------------------------------------------------------------------
    def _all_gather_rows(self, local: Tensor, sizes: List[int], what: str) -> List[Tensor]:
        """Every rank's rows of a (sizes[rank], ...) tensor, padded for the collective, trimmed back."""
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:local.shape[0]] = local
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(blocks, padded.contiguous(), group=self.group))
        return [block[:size] for block, size in zip(blocks, sizes)]

    def candidates(self, keys: Tensor) -> Tensor:
        """Every rank's candidates, this rank's first: (M, D). Gathered once per call and tensor."""
        if self._gathered is None or self._gathered[0] is not keys:
            self._gathered = (keys, self._rank_order(self._all_gather_rows(keys, self.key_sizes, "candidate all-gather")))
        return self._gathered[1]

    def gather_anchors(self, values: Tensor) -> Tensor:
        """A per-anchor tensor from every rank, in rank order (the same on every rank)."""
        return torch.cat(self._all_gather_rows(values, self.anchor_sizes, "anchor all-gather"))

    def gather_detached(self, local: Tensor) -> Tensor:
        """Every rank's rows of a (key_sizes[rank], ...) tensor in rank order, as constants."""
        with torch.no_grad():
            return torch.cat(self._all_gather_rows(local.detach(), self.key_sizes, "feature all-gather"))

    def gather_candidates_detached(self, keys: Tensor) -> Tensor:
        """Every rank's rows of a per-candidate tensor in this rank's candidate order (its own first), as constants."""
        if self._gathered_constants is None or self._gathered_constants[0] is not keys:  # once per call and tensor
            with torch.no_grad():
                gathered = self._rank_order(self._all_gather_rows(keys.detach(), self.key_sizes, "guide all-gather"))
            self._gathered_constants = (keys, gathered)
        return self._gathered_constants[1]

    def gather_columns(self, values: Tensor) -> Tensor:
        """A per-candidate vector from every rank's local entries, in this rank's candidate order."""
        return self._rank_order(self._all_gather_rows(values, self.key_sizes, "column all-gather"))

    def column_lse(self, partial: Tensor) -> Tensor:
        """This rank's columns' log-sum-exp over every rank's rows, from each rank's partial one."""
        partial = torch.cat(self._global_order(partial))
        peak = partial.clone()
        self._collective("column max", lambda: dist.all_reduce(peak, dist.ReduceOp.MAX, group=self.group))
        safe = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
        total = torch.exp(partial - safe)
        self._collective("column sum", lambda: dist.all_reduce(total, group=self.group))
        lse = safe + torch.log(total)
        return lse[self.key_offset:self.key_offset + self.key_sizes[self.rank]]

    def candidate_grads(self, grads: Tensor) -> Tensor:
        """This rank's candidates' gradient: every rank's contributions (in its own candidate order), summed."""
        longest = max(self.key_sizes)
        blocks = self._global_order(grads)
        stacked = grads.new_zeros((self.world_size, longest, *grads.shape[1:]))
        for r, block in enumerate(blocks):
            stacked[r, :block.shape[0]] = block
        mine = grads.new_empty((longest, *grads.shape[1:]))
        self._collective("gradient reduce-scatter", lambda: REDUCE_SCATTER(
            mine, stacked.reshape(self.world_size * longest, *grads.shape[1:]), group=self.group))
        return mine[:self.key_sizes[self.rank]]

    def sum(self, value: Tensor) -> Tensor:
        """The sum over ranks, with the backward of a sum over ranks (see SumOverRanks)."""
        return sum_over_ranks(value, self.group, self.call)

    def max(self, value: Tensor) -> Tensor:
        """The largest over ranks, detached (a shift that keeps exponentials in range)."""
        peak = value.detach().clone()
        self._collective("max", lambda: dist.all_reduce(peak, dist.ReduceOp.MAX, group=self.group))
        return peak


def sum_over_ranks(value: Tensor, group, call: str) -> Tensor:
    """The sum over the ranks of `group`, with the backward of a sum over ranks (see SumOverRanks)."""
    return SumOverRanks.apply(value, group, call)


class SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is one too: each rank computes the same function of the sum,
    so the gradient reaching a rank's term is the sum over ranks of their upstream gradients."""

    @staticmethod
    def forward(ctx, value, group, call):
        ctx.group, ctx.call = group, call
        total = value.detach().clone()
        collective(call, "sum", group, lambda: dist.all_reduce(total, group=group))
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        collective(ctx.call, "gradient sum", ctx.group, lambda: dist.all_reduce(total, group=ctx.group))
        return total, None, None


def collective(call: str, what: str, group, run):
    """run(), a collective of `call`; a failure (a timeout, a peer that left) says which call and why."""
    try:
        return run()
    except RuntimeError as error:
        raise RuntimeError(
            f"flashcl {call}(group=...): the {what} collective failed on rank {dist.get_rank(group)} of "
            f"{dist.get_world_size(group)} ({error}). Every rank of the group must make the same flashcl call with "
            "the same group; a rank that passed group=None or another group never joins") from error
