"""Textbook losses that materialize S, used as the float64 ground truth of every test."""
import math

import torch
import torch.nn.functional as F


def logits(x, y, scale):
    return scale * x @ y.T


def infonce(queries, keys, scale, targets=None, reduction="mean"):
    if targets is None:
        targets = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits(queries, keys, scale), targets, reduction=reduction)


def clip(image, text, scale, reduction="mean"):
    s = logits(image, text, scale)
    labels = torch.arange(image.shape[0], device=image.device)
    per_pair = 0.5 * (F.cross_entropy(s, labels, reduction="none") + F.cross_entropy(s.T, labels, reduction="none"))
    return {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()


def nt_xent(z1, z2, scale, reduction="mean"):
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    s = logits(z, z, scale)
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(s, targets, reduction=reduction)


def lse(x, y, scale, exclude_diagonal=False):
    """Row and column log-sum-exp of the materialized S."""
    s = logits(x, y, scale)
    if exclude_diagonal:
        s = s.masked_fill(torch.eye(*s.shape, dtype=torch.bool, device=s.device), float("-inf"))
    return s.logsumexp(1), s.logsumexp(0)


WEIGHT_FUNCTIONS = {"exp": torch.exp, "sigmoid": torch.sigmoid}


def weights(x, y, scale, a=None, o=None, b=None, p=None, positives=None, exclude_diagonal=False, function="exp"):
    """The materialized G of primitive 2, in float64: a_i f(S_ij - o_i) + b_j f(S_ij - p_j) + the positives."""
    x, y, scale = x.double(), y.double(), scale.double()
    f = WEIGHT_FUNCTIONS[function]
    s = logits(x, y, scale)
    g = torch.zeros_like(s)
    if a is not None:
        g += a.double()[:, None] * f(s - o.double()[:, None])
    if b is not None:
        g += b.double()[None, :] * f(s - p.double()[None, :])
    if exclude_diagonal:
        g.fill_diagonal_(0)
    if positives is not None:
        targets, coeff = positives
        g[torch.arange(x.shape[0]), targets] += coeff.double()
    return g


def weighted_grad(x, y, scale, **terms):
    """dx, dy, ds of primitive 2 from the materialized G."""
    x, y, scale = x.double(), y.double(), scale.double()
    g = weights(x, y, scale, **terms)
    return scale * g @ y, scale * g.T @ x, (g * (x @ y.T)).sum()


def softplus_sums(x, y, scale, bias, exclude_diagonal=False):
    """Primitive 1': the row sums of softplus(S + bias) and of sigmoid(S + bias), materialized."""
    z = logits(x.double(), y.double(), scale.double()) + bias
    keep = ~torch.eye(*z.shape, dtype=torch.bool, device=z.device) if exclude_diagonal else torch.ones_like(z, dtype=torch.bool)
    return ((F.softplus(z, threshold=1000) * keep).sum(1), (torch.sigmoid(z) * keep).sum(1))


def squared_distances(a, b):
    """|a_i - b_j|^2 from the differences themselves (n * m * d elements: small inputs only)."""
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def geometric_consistency(image, text, image_aug=None, text_aug=None, distinct_pairs=False):
    """The mean over view pairs of the mean over pairs (j, k) of the two squared differences, materialized."""
    def one(v, t):
        n = v.shape[0]
        cross = (v @ t.T - (v @ t.T).T) ** 2
        within = (v @ v.T - t @ t.T) ** 2
        total = cross + within
        if distinct_pairs:
            return total.masked_fill(torch.eye(n, dtype=torch.bool, device=v.device), 0).sum() / max(n * (n - 1), 1)
        return total.mean()

    images = [image] + ([image_aug] if image_aug is not None else [])
    texts = [text] + ([text_aug] if text_aug is not None else [])
    return torch.stack([one(v, t) for v in images for t in texts]).mean()


def brownian_bridge(image, text, image_aug, t=0.25, sigma=1.0, contrastive=True, reduction="mean"):
    means = (1 - t) * image + t * text
    logits = -squared_distances(image_aug, means) / (2 * sigma**2 * t * (1 - t))
    if contrastive:
        return F.cross_entropy(logits, torch.arange(image.shape[0], device=image.device), reduction=reduction)
    losses = -logits.diagonal()
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


def feature_separation(shared, private, uniformity_t=2.0, orthogonality_weight=1.0, uniformity_weight=1.0):
    n = private.shape[0]
    orthogonality = ((shared * private).sum(1) ** 2).mean()
    distances = squared_distances(private, private)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=private.device)
    uniformity = torch.log(torch.exp(-uniformity_t * distances)[off_diagonal].mean())
    return orthogonality_weight * orthogonality + uniformity_weight * uniformity


def gamma_weighted(a, b, scale, log_u_a, log_u_b=None, targets=None, reduction="mean", exclude_positive=False):
    """-S_{i,t_i} + u_i mean_j exp(S_ij) (and its column twin with log_u_b), in the log domain so
    that large logits do not overflow the reference either."""
    s = logits(a, b, scale)
    n, m = s.shape
    targets = torch.arange(n, device=s.device) if targets is None else targets
    mask = torch.eye(n, m, dtype=torch.bool, device=s.device) if exclude_positive else torch.zeros_like(s, dtype=torch.bool)

    def direction(logits, mask, log_u, positives):
        log_mean = logits.masked_fill(mask, float("-inf")).logsumexp(1) - torch.log((~mask).sum(1).to(logits.dtype))
        return torch.exp(log_u + log_mean) - positives

    losses = direction(s, mask, log_u_a, s[torch.arange(n, device=s.device), targets])
    if log_u_b is not None:
        losses = 0.5 * (losses + direction(s.T, mask.T, log_u_b, s.diagonal()))
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()


def row_logsumexp(queries, keys, scale, exclude_diagonal=False):
    return lse(queries, keys, scale, exclude_diagonal)[0]


def sigmoid_pairs(image, text, scale, bias, reduction="mean"):
    """open_clip's SigLipLoss: -log sigmoid(z_ij (s x_i . y_j + b)) over all pairs, z = 2 I - 1."""
    s = logits(image, text, scale) + bias
    z = 2 * torch.eye(*s.shape, dtype=s.dtype, device=s.device) - 1
    per_image = -F.logsigmoid(z * s).sum(1)
    return {"mean": lambda: per_image.sum() / image.shape[0], "sum": per_image.sum, "none": lambda: per_image}[reduction]()


def supcon(features, labels=None, temperature=0.07, base_temperature=0.07, contrast_mode="all", reduction="mean",
           mean_over="anchors with a positive"):
    """Khosla et al.'s SupCon, materialized, written from the paper's definition in the reference's layout:
    views stacked view-major, the anchor's own entry out of the denominator and of its positives.
    mean_over="all anchors" is the reference code's mean (anchors without a positive count as 0)."""
    views = features if features.dim() == 3 else features[:, None]
    n, v = views.shape[:2]
    contrast = torch.cat(torch.unbind(views, dim=1))
    sample = labels if labels is not None else torch.arange(n, device=features.device)
    contrast_labels = sample.repeat(v)
    anchors = contrast if contrast_mode == "all" else views[:, 0]
    anchor_labels = contrast_labels[:anchors.shape[0]]
    s = anchors @ contrast.T / temperature
    itself = torch.zeros_like(s, dtype=torch.bool)
    itself[torch.arange(anchors.shape[0]), torch.arange(anchors.shape[0])] = True
    positive = (anchor_labels[:, None] == contrast_labels[None, :]) & ~itself
    log_prob = s - s.masked_fill(itself, float("-inf")).logsumexp(1, keepdim=True)
    count = positive.sum(1)
    mean_log_prob = (log_prob * positive).sum(1) / count.clamp(min=1)
    losses = torch.where(count > 0, -(temperature / base_temperature) * mean_log_prob, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (count > 0).sum().clamp(min=1) if mean_over == "anchors with a positive" else losses.mean()


def clip_distillation(image, text, scale, teacher_image, teacher_text, teacher_scale, reduction="mean"):
    """open_clip's DistillClipLoss distillation term, materialized: 1/2 the cross-entropy of the teacher's
    row (and column) softmax against the student's; per pair with reduction="none"."""
    s, t = logits(image, text, scale), logits(teacher_image, teacher_text, teacher_scale)
    rows = -(t.softmax(1) * s.log_softmax(1)).sum(1)
    cols = -(t.T.softmax(1) * s.T.log_softmax(1)).sum(1)
    per_pair = 0.5 * (rows + cols)
    return {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[reduction]()


def gist(anchors, positives, guide_anchors, guide_positives, scale, negatives=None, guide_negatives=None,
         margin=0.0, margin_strategy="absolute", contrast_anchors=True, contrast_positives=True, reduction="mean"):
    """sentence-transformers' GISTEmbedLoss on given (already normalized, or not) features, materialized:
    each block's candidates whose guide similarity exceeds the positive's minus the margin set to -inf
    (the positive itself never), the blocks concatenated, cross-entropy against the positive."""
    guide_positive = (guide_anchors * guide_positives).sum(1, keepdim=True)
    threshold = guide_positive - (margin if margin_strategy == "absolute" else guide_positive.abs() * margin)

    def masked(queries, keys, guide_queries, guide_keys, keep=None):
        left_out = guide_queries @ guide_keys.T > threshold
        if keep is not None:
            left_out &= ~keep
        return logits(queries, keys, scale).masked_fill(left_out, -math.inf)

    own = torch.eye(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    blocks = [masked(anchors, positives, guide_anchors, guide_positives, keep=own)]
    if contrast_anchors:
        blocks.append(masked(anchors, anchors, guide_anchors, guide_anchors))
    if contrast_positives:
        blocks.append(masked(positives, positives, guide_positives, guide_positives))
    if negatives is not None:
        blocks.append(masked(anchors, negatives, guide_anchors, guide_negatives))
    targets = torch.arange(anchors.shape[0], device=anchors.device)
    return F.cross_entropy(torch.cat(blocks, 1), targets, reduction=reduction)
