"""SigLIP's pairwise sigmoid loss over the sigmoid family of the primitives.

With S'_ij = s * x_i . y_j + b (logit scale s, logit bias b) and labels z_ii = +1, z_ij = -1,

    L = -(1/N) sum_ij log sigmoid(z_ij S'_ij) = (1/N) sum_i l_i,   l_i = sum_j softplus(S'_ij) - S'_ii

since -log sigmoid(-u) = softplus(u) and -log sigmoid(u) = softplus(u) - u. Forward is primitive 1'
(the row sums of softplus(S') and of sigmoid(S')); dL/dS' = (1/N) (sigmoid(S') - I), so backward is
primitive 2 with f = sigmoid, a = w, o = -b and the positive term -w_i at (i, i), and
dL/db = sum_i w_i (sum_j sigmoid(S'_ij) - 1) from the forward's sigmoid sums. Nothing N x N exists.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor

from . import _core


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    logit_bias: Union[float, Tensor, None] = None,
    reduction: str = "mean",
    *,
    backend: Optional[str] = None,
    group=None,
) -> Tensor:
    """SigLIP's sigmoid loss: -(1/N) sum_ij log sigmoid(z_ij (s x_i . y_j + b)), z_ii = 1, z_ij = -1.

    Args:
        image_features: (N, D), row i paired with row i of text_features.
        text_features: (N, D), row i paired with row i of image_features.
        logit_scale: the multiplier s itself (open_clip's ``logit_scale.exp()``), a float or 0-d tensor.
        logit_bias: the additive b (SigLIP initializes it at -10), a float or 0-d tensor (may require
            grad); None means 0, as in open_clip.
        reduction: "mean" (open_clip's: the sum over all N x N pairs divided by N) | "sum" |
            "none" (per image: sum_j softplus(S'_ij) - S'_ii, shape (N,)).
        backend: "auto" | "triton" | "cuda" | "torch", as for every flashcl loss.
        group (torch.distributed.ProcessGroup | None): a process group: each rank passes its shard
            of pairs, every rank's texts are negatives of every image, and each rank gets its share
            times the world size (see flashcl.distributed). With equal shards that is open_clip's SigLipLoss with
            world_size > 1 exactly, in value and gradients, whichever dist_impl.

    Equals open_clip's ``SigLipLoss()(image, text, s, b)`` without the (N, N) logits. The loss is fp32
    (fp64 for fp64 inputs); gradients in the input dtype.
    """
    with _core.Call("siglip_loss", group, backend, function="sigmoid") as call:
        call.features("image_features", image_features, "text_features", text_features, same_rows=True)
        call.reduction(reduction)
        logit_scale = call.scale("logit_scale", logit_scale)
        logit_bias = call.bias("logit_bias", 0.0 if logit_bias is None else logit_bias)
    return _core.sigmoid_loss(image_features, text_features, logit_scale, logit_bias, call.plan(reduction=reduction))
