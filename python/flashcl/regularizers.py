"""The modality-structure regularizers of "Understanding and constructing latent modality structures
in multi-modal representation learning" (Jiang et al., CVPR 2023), with no N x N matrix.

Exact alignment of two modalities discards what only one of them carries; the paper regularizes
CLIP-style training towards a meaningful latent structure instead. With v_i, t_i the image and
text embeddings of pair i (rows of V, T: N x D):

- geometric consistency: the pairwise similarity structure is the same across and within
  modalities, (<v_j,t_k> - <v_k,t_j>)^2 + (<v_j,v_k> - <t_j,t_k>)^2 averaged over pairs. Both
  sums are Frobenius products of D x D Grams, so the loss is exact in O(N D^2) time and
  O(D^2) memory when N > D, and from the N x N products (no larger than D x D) otherwise.
- Brownian bridge: an augmented image lies on the bridge from its image (time 0) to its text
  (time 1) at time t, N((1 - t) v_i + t t_i, sigma^2 t (1 - t) I), contrasted against the
  other pairs' bridges. -|a - mu_j|^2 = 2 a.mu_j - |mu_j|^2 - |a|^2, where the last term is
  constant in j and the middle one is one extra coordinate: it is an InfoNCE on flashcl's kernels.
- deep feature separation: a second, "private" head per modality, orthogonal to the shared
  features (<z_i, z~_i>^2) and spread out by Wang & Isola's uniformity
  log mean_{j != k} exp(-u |z~_j - z~_k|^2): a log-sum-exp with the diagonal excluded, so
  primitive 1 again.

Losses are returned in fp32 (fp64 for fp64 inputs), gradients in the input dtype.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import _core, checks
from .checks import statistics_dtype
from .losses import clip_loss

BRIDGE_TIME = "the bridge time of the augmented image"


def _pair_consistency(v: Tensor, t: Tensor, distinct_pairs: bool, shards) -> Tensor:
    """sum over pairs (j, k) of (<v_j,t_k> - <v_k,t_j>)^2 + (<v_j,v_k> - <t_j,t_k>)^2, over the pair count."""
    local, d = v.shape
    n = shards.global_anchors(local)
    dtype = statistics_dtype(v.dtype)
    v, t = v.to(dtype), t.to(dtype)
    # the j == k terms: (|v_j|^2 - |t_j|^2)^2 (the cross term vanishes there)
    diagonal = ((v * v).sum(1) - (t * t).sum(1)).square().sum() if distinct_pairs else v.new_zeros(())
    if n > d or shards.world_size > 1:  # D x D Grams, summed over ranks: O(N D^2) time, O(D^2) memory
        packed = shards.sum(torch.cat([(v.T @ v).flatten(), (t.T @ t).flatten(), (v.T @ t).flatten(),
                                       diagonal.reshape(1)]))
        vv, tt, vt = packed[:-1].view(3, d, d)
        diagonal = packed[-1]
        cross = 2 * (vv * tt).sum() - 2 * (vt * vt.T).sum()
        within = (vv * vv).sum() + (tt * tt).sum() - 2 * (vt * vt).sum()
    else:  # the N x N products are no larger than the Grams, and cheaper: O(N^2 D)
        vt = v @ t.T
        cross = ((vt - vt.T) ** 2).sum()
        within = ((v @ v.T - t @ t.T) ** 2).sum()
    if distinct_pairs:
        return (cross + within - diagonal) / max(n * (n - 1), 1)
    return (cross + within) / (n * n)


def geometric_consistency_loss(
    image: Tensor,
    text: Tensor,
    image_aug: Optional[Tensor] = None,
    text_aug: Optional[Tensor] = None,
    *,
    distinct_pairs: bool = False,
    group=None,
) -> Tensor:
    """Geometric consistency (CVPR 2023): similarities agree across and within modalities.

    For each pair of views (V, T) (the features, and the augmented views where given: (V', T),
    (V, T'), (V', T')), over the N^2 ordered pairs (j, k)

        L(V, T) = 1/N^2 sum_jk [ (<v_j,t_k> - <v_k,t_j>)^2 + (<v_j,v_k> - <t_j,t_k>)^2 ]

    and the loss is the mean of L over the view pairs. The j == k terms are 0 for unit-norm
    features; distinct_pairs=True leaves them out (sum over j != k, divided by N(N - 1)).

    Computed exactly with no N x N matrix when N > D: 2<V'V, T'T> - 2 tr((T'V)^2) and
    |V'V|^2 + |T'T|^2 - 2 |V'T|^2 (X' the transpose), O(N D^2) time and O(D^2) memory; when
    N <= D from the N x N products, which are then no larger. Like every difference of large
    terms, its fp32 error is relative to the terms (~ N^2 |v|^2 |t|^2), not to a small result.

    With group= (each rank its shard of the rows) the loss is the global batch's, exact, from one
    all-reduce of the three D x D Grams per view pair; every rank returns it, with the world size
    times its gradient, as every flashcl loss does for DDP's average.
    """
    with _core.Call("geometric_consistency_loss", group, function=None) as call:
        call.features("image", image, "text", text, same_rows=True)
        images, texts = [image], [text]
        if image_aug is not None:
            checks.check_pair("image", image, "image_aug", image_aug, same_rows=True)
            images.append(image_aug)
        if text_aug is not None:
            checks.check_pair("text", text, "text_aug", text_aug, same_rows=True)
            texts.append(text_aug)
        call.agree(image_aug=image_aug is not None, text_aug=text_aug is not None, distinct_pairs=distinct_pairs)
    terms = [_pair_consistency(v, t, distinct_pairs, call.shards) for v in images for t in texts]
    return torch.stack(terms).mean()


def brownian_bridge_loss(
    image: Tensor,
    text: Tensor,
    image_aug: Tensor,
    t: float = 0.25,
    *,
    sigma: float = 1.0,
    contrastive: bool = True,
    reduction: str = "mean",
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """Brownian bridge (CVPR 2023): an augmented image lies on the bridge from its image to its text.

    Bridge i runs from v_i (time 0) to t_i (time 1); at time t it is Gaussian with mean
    mu_i = (1 - t) v_i + t t_i and variance sigma^2 t (1 - t) per coordinate. The loss is the
    augmented image a_i's negative log-likelihood under its own bridge, contrasted against the
    other pairs' bridges (a softmax over bridges):

        l_i = -log softmax_j( -|a_i - mu_j|^2 / (2 sigma^2 t (1 - t)) )_i

    computed as an InfoNCE of [a_i, 1] against [mu_j, -|mu_j|^2 / 2] at scale 1/(sigma^2 t (1 - t)),
    with O(N) extra memory. contrastive=False gives the pointwise form
    l_i = |a_i - mu_i|^2 / (2 sigma^2 t (1 - t)) (the likelihood alone, up to a constant).
    Gradients reach all three inputs. With group= the bridges of every rank are contrasted, as
    flashcl's InfoNCE does with a group.
    """
    with _core.Call("brownian_bridge_loss", group, backend) as call:
        checks.check_pair("image", image, "text", text, same_rows=True)
        checks.check_pair("image", image, "image_aug", image_aug, same_rows=True)
        call.layout(image_aug, image)
        call.reduction(reduction)
        t = checks.check_number("t", t, 0.0, 1.0, meaning=", " + BRIDGE_TIME)
        sigma = checks.check_positive_number("sigma", sigma)
        scale = call.scale("1 / (sigma^2 t (1 - t))", 1.0 / (sigma**2 * t * (1 - t)))
        call.targets(None)  # each augmented image's own bridge
        call.agree(t=t, sigma=sigma, contrastive=contrastive)
    plan = call.plan(reduction=reduction)
    dtype = statistics_dtype(image.dtype)
    means = (1 - t) * image.to(dtype) + t * text.to(dtype)
    if not contrastive:
        return _core.reduce(0.5 * scale * (image_aug.to(dtype) - means).square().sum(1), plan)
    queries = torch.cat([image_aug, image_aug.new_ones(image_aug.shape[0], 1)], dim=1)
    keys = torch.cat([means, -0.5 * means.square().sum(1, keepdim=True)], dim=1).to(image.dtype)
    return _core.contrastive_loss(queries, keys, scale, call.positions, plan).loss


def feature_separation_loss(
    shared: Tensor,
    private: Tensor,
    *,
    uniformity_t: float = 2.0,
    orthogonality_weight: float = 1.0,
    uniformity_weight: float = 1.0,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """Deep feature separation (CVPR 2023) for one modality: private features orthogonal to the
    shared ones, and spread out.

        L = orthogonality_weight * 1/N sum_i <z_i, p_i>^2
            + uniformity_weight * log( 1/(N(N - 1)) sum_{j != k} exp(-u |p_j - p_k|^2) )

    with z = shared (the contrastive features), p = private (a second head's), u = uniformity_t
    (Wang & Isola's t = 2). The uniformity term is a log-sum-exp of
    -u |p_j - p_k|^2 = 2u (p_j.p_k - |p_j|^2/2 - |p_k|^2/2) with the diagonal excluded, exact for
    features of any norm (for unit vectors, scale 2u = 4 on p_j.p_k), with O(N) extra memory.
    The paper L2-normalizes both; pass them normalized to follow it. Needs N >= 2.
    With group= the uniformity runs over every rank's private features (each rank's row block of
    the pairs, merged with two scalar all-reduces) and the orthogonality over every rank's rows.
    """
    with _core.Call("feature_separation_loss", group, backend) as call:
        checks.check_pair("shared", shared, "private", private, same_rows=True)
        call.layout(private, private)
        if private.shape[0] < 2 and not call.sharded:
            raise ValueError(f"private needs at least 2 rows for the uniformity term (pairs j != k), "
                             f"got {private.shape[0]}")
        uniformity_t = checks.check_positive_number("uniformity_t", uniformity_t)
        orthogonality_weight = checks.check_weight("orthogonality_weight", orthogonality_weight)
        uniformity_weight = checks.check_weight("uniformity_weight", uniformity_weight)
        scale = call.scale("2 * uniformity_t", 2 * uniformity_t)
        call.agree(uniformity_t=uniformity_t, orthogonality_weight=orthogonality_weight,
                   uniformity_weight=uniformity_weight)
    plan = call.plan(exclude_diagonal=True)
    shards = plan.shards
    dtype = statistics_dtype(shared.dtype)
    local = private.shape[0]
    orthogonality = (shared.to(dtype) * private.to(dtype)).sum(1).square().sum() / shards.mean_count(local)
    n = shards.global_anchors(local)
    half_norms = 0.5 * private.to(dtype).square().sum(1, keepdim=True)
    ones = torch.ones_like(half_norms)
    left = torch.cat([private, (-half_norms).to(private.dtype), ones.to(private.dtype)], dim=1)
    right = torch.cat([private, ones.to(private.dtype), (-half_norms).to(private.dtype)], dim=1)
    row_lse = _core.row_logsumexp(left, right, scale, plan)
    block_lse = torch.logsumexp(row_lse, dim=0)  # this rank's rows; then over every rank's
    peak = shards.max(block_lse)
    uniformity = peak + torch.log(shards.sum(torch.exp(block_lse - peak))) - math.log(n * (n - 1))
    return orthogonality_weight * orthogonality + uniformity_weight * uniformity


class ModalityStructureLoss(nn.Module):
    """CLIP loss plus the CVPR 2023 modality-structure regularizers, one call per training step.

    Args:
        geometric: the weight of `geometric_consistency_loss` (0 switches it off).
        bridge: the weight of `brownian_bridge_loss` (0 switches it off).
        separation: the weight of `feature_separation_loss` (0 switches it off).
        bridge_t: `brownian_bridge_loss`'s t.
        bridge_sigma: `brownian_bridge_loss`'s sigma.
        uniformity_t: `feature_separation_loss`'s u.
        distinct_pairs: `geometric_consistency_loss`'s option.
        backend: as for every flashcl loss.
        group (torch.distributed.ProcessGroup | None): a process group for every term (each rank its shard of the rows).

    forward(image_features, text_features, logit_scale, image_aug=None, text_aug=None,
    image_private=None, text_private=None, output_dict=False) returns

        clip_loss + geometric * geometric_consistency_loss(image, text, image_aug, text_aug)
                  + bridge * brownian_bridge_loss(image, text, image_aug)
                  + separation * mean over the modalities with private features of
                                 feature_separation_loss(shared, private)

    or, with output_dict=True, open_clip's convention: a dict of the weighted terms
    ({"contrastive_loss", "geometric_loss", "bridge_loss", "separation_loss"}, only those with
    a weight above 0) whose values sum to the total. The bridge needs image_aug; separation
    needs image_private or text_private.
    """

    def __init__(self, geometric: float = 0.0, bridge: float = 0.0, separation: float = 0.0, *,
                 bridge_t: float = 0.25, bridge_sigma: float = 1.0, uniformity_t: float = 2.0,
                 distinct_pairs: bool = False, backend: Optional[str] = None, group=None):
        super().__init__()
        self.geometric = checks.check_weight("geometric", geometric)
        self.bridge = checks.check_weight("bridge", bridge)
        self.separation = checks.check_weight("separation", separation)
        self.bridge_t = checks.check_number("bridge_t", bridge_t, 0.0, 1.0, meaning=", " + BRIDGE_TIME)
        self.bridge_sigma = checks.check_positive_number("bridge_sigma", bridge_sigma)
        self.uniformity_t = checks.check_positive_number("uniformity_t", uniformity_t)
        self.distinct_pairs, self.backend, self.group = distinct_pairs, backend, group

    def extra_repr(self) -> str:
        return (f"geometric={self.geometric}, bridge={self.bridge}, separation={self.separation}, "
                f"bridge_t={self.bridge_t}, bridge_sigma={self.bridge_sigma}, uniformity_t={self.uniformity_t}")

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Union[float, Tensor],
                image_aug: Optional[Tensor] = None, text_aug: Optional[Tensor] = None,
                image_private: Optional[Tensor] = None, text_private: Optional[Tensor] = None,
                output_dict: bool = False) -> Union[Tensor, Dict[str, Tensor]]:
        if self.bridge > 0 and image_aug is None:
            raise ValueError(f"image_aug is needed for the Brownian bridge term (bridge={self.bridge}); "
                             "pass the augmented images' features or set bridge=0")
        privates = [(shared, private) for shared, private in ((image_features, image_private),
                                                              (text_features, text_private)) if private is not None]
        if self.separation > 0 and not privates:
            raise ValueError(f"image_private or text_private is needed for the separation term "
                             f"(separation={self.separation}); pass a private head's features or set separation=0")
        group, backend = self.group, self.backend
        losses = {"contrastive_loss": clip_loss(image_features, text_features, logit_scale, backend=backend,
                                                group=group)}
        if self.geometric > 0:
            losses["geometric_loss"] = self.geometric * geometric_consistency_loss(
                image_features, text_features, image_aug, text_aug, distinct_pairs=self.distinct_pairs, group=group)
        if self.bridge > 0:
            losses["bridge_loss"] = self.bridge * brownian_bridge_loss(
                image_features, text_features, image_aug, self.bridge_t, sigma=self.bridge_sigma, backend=backend,
                group=group)
        if self.separation > 0:
            terms = [feature_separation_loss(shared, private, uniformity_t=self.uniformity_t, backend=backend,
                                             group=group) for shared, private in privates]
            losses["separation_loss"] = self.separation * torch.stack(terms).mean()
        return losses if output_dict else sum(losses.values())
