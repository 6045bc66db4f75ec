"""The gamma-weighted contrastive loss of "Why do we need large batch sizes in contrastive learning?
A gradient-bias perspective" (NeurIPS 2022): small batches that follow the large-batch gradient.

Anchor i's InfoNCE loss -S_ii + log Z_i, Z_i = mean_j exp(S_ij), is the log of a ratio, so
a minibatch estimate of Z_i gives a biased gradient (Jensen). The identity
1/Z^a = 1/Gamma(a) int u^(a-1) exp(-u Z) du augments each anchor with u_i; given u the loss
-S_ii + u_i Z_i is linear in Z_i and any minibatch estimates its gradient without bias.
Training is a stochastic EM, one round per forward:

  1. statistics: the batch's estimate log Zb_i = LSE_i - log K (primitive 1, one product);
  2. state: per dataset index, log Z^_i <- log((1 - momentum) Z^_i + momentum Zb_i), a
     first visit taking Zb_i (SogCLR's order: the estimate includes this batch);
  3. E-step: u_i ~ Gamma(shape a, rate a Z^_i), so E[u_i] = 1/Z^_i and Var[u_i] = 1/(a Z^_i^2);
     a = inf is the point estimate u_i = 1/Z^_i of SogCLR / FastCLIP (LibAUC's GCLoss);
  4. M-step: flashcl's gamma-weighted loss, whose gradient is the u-weighted gradient.

Everything runs in the log domain, so no weight overflows at any scale.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import _core, checks


def sample_log_weights(log_z: Tensor, shape: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """log u for u ~ Gamma(shape, rate = shape * exp(log_z)); shape = inf gives exactly -log_z.

    Sampled as u = g / (shape * Z) with g ~ Gamma(shape, 1), so only g is random.
    """
    if math.isinf(shape):
        return -log_z
    g = torch._standard_gamma(torch.full_like(log_z, shape), generator=generator)
    return torch.log(g) - math.log(shape) - log_z


def ema_log(log_old: Tensor, log_new: Tensor, momentum: float) -> Tensor:
    """log((1 - momentum) exp(log_old) + momentum exp(log_new)), without leaving the log domain."""
    if momentum == 1.0:
        return log_new.clone()
    return torch.logaddexp(log_old + math.log1p(-momentum), log_new + math.log(momentum))


def _log_mean_by_group(values: Tensor, keep: Tensor, groups: Tensor) -> Tensor:
    """Per row, log mean exp(values) over the kept rows of its group (-inf for a group with none kept):
    the one batch estimate of an index seen several times. groups holds group ids in [0, len(values))."""
    n = values.shape[0]
    kept = torch.where(keep, values, -math.inf)
    peak = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device).scatter_reduce(0, groups, kept, "amax")
    safe_peak = torch.where(torch.isinf(peak), 0.0, peak)[groups]
    total = torch.zeros_like(peak).index_add_(0, groups, torch.where(keep, torch.exp(kept - safe_peak), 0.0))
    count = torch.zeros_like(peak).index_add_(0, groups, keep.to(values.dtype))
    return (safe_peak + torch.log(total[groups]) - torch.log(count[groups])).where(count[groups] > 0, -math.inf)


class GammaContrastiveLoss(nn.Module):
    """Gamma-weighted contrastive loss with per-sample running estimates of the denominators.

    Args:
        num_samples: dataset size; forward's `index` holds each row's dataset index in [0, num_samples).
        shape: the gamma shape a > 0, or float("inf") for the point estimate u = 1/Z^ (SogCLR).
        momentum: weight of the batch estimate in the running estimate, in (0, 1] (as in
            BatchNorm and LibAUC's GCLoss gamma; 1 keeps only the latest batch).
        symmetric: image/text-style loss, 1/2 (a->b + b->a), one estimate per direction;
            False: a->b only, and features_b may hold extra rows (extra negatives).
        exclude_positive: means over negatives only (j != i), the paper's and SogCLR's objective
            and the one whose in-batch estimate is unbiased (needs paired rows).
        state_device: where the estimates live ("cpu" for datasets too large for the GPU).
        generator: a torch.Generator on state_device for the E-step (seed it to reproduce; seed
            each rank differently, or the ranks' draws are the same numbers).
        backend: as for every flashcl loss.
        group (torch.distributed.ProcessGroup | None): a process group: each rank passes its shard of the batch (and its
            rows' dataset indices); the loss is the global batch's (rows of the concatenated
            features_a pair with rows of the concatenated features_b, every rank's rows are
            negatives), and every rank folds every rank's estimates into its state in rank order,
            so the states (and state_dicts) stay identical on all ranks.

    forward(features_a, features_b, scale, index, output_dict=False) pairs row i of features_a
    with row i of features_b. Its return value's gradient is the gamma-weighted gradient; with
    output_dict=True it returns {"loss", "infonce" (the batch's ordinary InfoNCE value, free,
    for logging), "skipped" (rows whose statistics were non-finite and left the state alone)}.
    """

    def __init__(self, num_samples: int, shape: float = 1.0, momentum: float = 0.9, symmetric: bool = True,
                 exclude_positive: bool = True, state_device: Union[str, torch.device] = "cpu",
                 generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None, group=None):
        super().__init__()
        self.num_samples = checks.check_positive_int("num_samples", num_samples)
        self.shape = checks.check_number("shape", shape, 0.0, math.inf, high_open=False)
        self.momentum = checks.check_number("momentum", momentum, 0.0, 1.0, high_open=False)
        self.symmetric, self.exclude_positive = symmetric, exclude_positive
        self.generator, self.backend, self.group = generator, backend, group
        state_device = torch.device(state_device)
        directions = ("a", "b") if symmetric else ("a",)
        for d in directions:
            self.register_buffer(f"log_z_{d}", torch.zeros(num_samples, device=state_device))
            self.register_buffer(f"visited_{d}", torch.zeros(num_samples, dtype=torch.bool, device=state_device))
        self._directions = directions

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, shape={self.shape}, momentum={self.momentum}, "
                f"symmetric={self.symmetric}, exclude_positive={self.exclude_positive}")

    @torch.no_grad()
    def _update(self, direction: str, index: Tensor, log_z_batch: Tensor) -> Tensor:
        """Folds this batch's estimates into the state; returns how many rows it skipped as non-finite.

        Written without data-dependent shapes (no boolean indexing, no unique), so it compiles into
        the training step's graph: every row writes its index's new value, and rows of the same index
        write the same value, their group's."""
        log_z, visited = getattr(self, f"log_z_{direction}"), getattr(self, f"visited_{direction}")
        log_z_batch = log_z_batch.to(log_z.device, log_z.dtype)
        finite = torch.isfinite(log_z_batch)
        batch = _log_mean_by_group(log_z_batch, finite, _core.group_ids(index))
        seen, old = visited[index], log_z[index]
        moved = batch != -math.inf  # the index had a finite row in this batch
        new = torch.where(seen, ema_log(old, batch, self.momentum), batch)
        log_z.index_put_((index,), torch.where(moved, new, old))
        visited.index_put_((index,), seen | moved)
        return (~finite).sum()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for d in self._directions:
            key = f"{prefix}log_z_{d}"
            if key in state_dict and state_dict[key].shape != (self.num_samples,):
                error_msgs.append(f"{key} holds {tuple(state_dict[key].shape)} running estimates but this "
                                  f"GammaContrastiveLoss has num_samples={self.num_samples}; the state was not loaded")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, features_a: Tensor, features_b: Tensor, scale: Union[float, Tensor], index: Tensor,
                output_dict: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        with _core.Call("GammaContrastiveLoss", self.group, self.backend) as call:
            call.features("features_a", features_a, "features_b", features_b,
                          same_rows=self.symmetric or self.exclude_positive)
            n = features_a.shape[0]
            checks.check_enough_rows("features_b", features_b, "features_a", n)  # row i pairs with row i
            index = checks.check_dataset_index(index, n, self.num_samples).to(self.log_z_a.device)
            scale = call.scale("scale", scale)
            call.targets(None)
            call.agree(symmetric=self.symmetric, exclude_positive=self.exclude_positive, num_samples=self.num_samples,
                       shape=self.shape, momentum=self.momentum)
        plan = call.plan(symmetric=self.symmetric, exclude_diagonal=self.exclude_positive)
        shards = plan.shards

        with torch.no_grad():
            keys = _core.candidates(features_a, features_b, plan)
            statistics = _core.contrastive_statistics(features_a, keys, scale.detach(), call.positions, plan)
        row_lse, col_lse, positive = statistics
        counts = _core.denominator_sizes(shards.global_anchors(n), keys.shape[0], self.exclude_positive)
        log_weights, skipped, infonce = [], 0, []
        for direction, lse, count in zip(self._directions, (row_lse, col_lse), counts):
            # Every rank folds in every rank's estimates, in rank order: the states stay identical.
            skipped = skipped + self._update(
                direction, shards.gather_anchors(index.to(features_a.device)).to(index.device),
                shards.gather_anchors(lse) - math.log(count))
            log_z = getattr(self, f"log_z_{direction}")[index]
            log_weights.append(sample_log_weights(log_z, self.shape, self.generator).to(row_lse))
            # The ordinary InfoNCE, positive included in its denominator, for logging.
            with_positive = torch.logaddexp(lse, positive) if self.exclude_positive else lse
            infonce.append((with_positive - positive).mean())
        if checks.values_free(skipped) and int(skipped):  # the state lives on the CPU by default
            warnings.warn(f"GammaContrastiveLoss: {int(skipped)} rows had non-finite statistics; their running "
                          "estimates were left unchanged", RuntimeWarning, stacklevel=2)

        loss = _core.contrastive_loss(features_a, features_b, scale, call.positions, plan, statistics=statistics,
                                      log_weights=(log_weights[0], log_weights[1] if self.symmetric else None)).loss
        if not output_dict:
            return loss
        return {"loss": loss, "infonce": torch.stack(infonce).mean(), "skipped": skipped}
