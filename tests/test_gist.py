"""flashcl.gist_loss and the guide mask of row_logsumexp: the boundary cases of the rule
"leave out a candidate whose guide similarity exceeds the threshold" against the materialized
reference (tests/reference.py), gradcheck, and the arguments' errors. The registry-wide tests
(dtypes, backends, compile, memory, distributed) cover gist_loss through tests/registry.py."""
import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, assert_norm_close, unit_rows

N, D, SCALE = 12, 6, 9.0


def features(count=3, n=N, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    return [unit_rows(n, D, g, torch.float64).requires_grad_() for _ in range(count)]


def loss_and_grads(fn, inputs):
    loss = fn(*inputs)
    return loss.detach(), torch.autograd.grad(loss, [t for t in inputs if t.requires_grad])


def assert_matches_reference(inputs, guide, **options):
    anchors, positives, negatives = inputs
    ours = loss_and_grads(lambda a, p, n: flashcl.gist_loss(a, p, guide[0], guide[1], SCALE, n, guide[2], **options),
                          inputs)
    want = loss_and_grads(lambda a, p, n: reference.gist(a, p, guide[0], guide[1], SCALE, n, guide[2], **options),
                          inputs)
    assert_norm_close(ours[0], want[0], 1e-12, "loss")
    for got, expected, name in zip(ours[1], want[1], ("anchors", "positives", "negatives")):
        assert_norm_close(got, expected, 1e-12, f"grad of {name}")
    return ours


def test_a_tie_with_the_positive_is_kept_and_anything_above_it_left_out():
    """Guide similarities are small integers (exact): candidates tied with the positive's stay in, those
    one above go, and the loss differs from the one where the ties go too."""
    inputs = features()
    g = torch.Generator(DEVICE).manual_seed(1)
    guide = [torch.randint(-1, 2, (N, 4), generator=g, device=DEVICE).double() for _ in range(3)]
    ties = (guide[0] @ guide[1].T == (guide[0] * guide[1]).sum(1, keepdim=True)).fill_diagonal_(False)
    assert ties.any(), "the guide must tie some candidate with the positive"
    kept, _ = assert_matches_reference(inputs, guide, margin=0.0)
    ties_out, _ = assert_matches_reference(inputs, guide, margin=0.5, margin_strategy="absolute")
    assert not torch.allclose(kept, ties_out)


def test_every_candidate_left_out_leaves_a_zero_loss_and_no_gradient():
    """The same guide feature for every row: every candidate's guide similarity is the positive's, so a
    margin leaves out all but the positive (anchors against themselves too): l_i = 0, zero gradients."""
    inputs = features()
    guide = [torch.ones(N, 3, dtype=torch.float64, device=DEVICE)] * 3
    loss, grads = assert_matches_reference(inputs, guide, margin=0.25)
    assert loss.item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_a_guide_that_leaves_nothing_out_is_plain_infonce():
    anchors, positives, _ = features()
    guide = [torch.randn(N, 5, dtype=torch.float64, device=DEVICE) for _ in range(2)]
    loss = flashcl.gist_loss(anchors, positives, *guide, SCALE, margin=-1e6, contrast_anchors=False,
                             contrast_positives=False)
    assert_norm_close(loss, flashcl.infonce_loss(anchors, positives, SCALE), 1e-12, "loss")


@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize("contrast", [(True, True), (False, True), (True, False)])
def test_random_guides_of_another_dimension(strategy, contrast):
    inputs = features(seed=3)
    g = torch.Generator(DEVICE).manual_seed(4)
    guide = [torch.nn.functional.normalize(torch.randn(N, 10, generator=g, dtype=torch.float64, device=DEVICE), dim=1)
             for _ in range(3)]
    assert_matches_reference(inputs, guide, margin=0.1, margin_strategy=strategy, contrast_anchors=contrast[0],
                             contrast_positives=contrast[1])


def test_gradcheck():
    anchors, positives, negatives = [f.detach()[:5].requires_grad_() for f in features()]
    g = torch.Generator(DEVICE).manual_seed(5)
    guide = [torch.randn(5, 3, generator=g, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    scale = torch.tensor(2.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fn = lambda a, p, n, s: flashcl.gist_loss(a, p, guide[0], guide[1], s, n, guide[2], margin=0.2)
    assert torch.autograd.gradcheck(fn, (anchors, positives, negatives, scale))


def test_row_logsumexp_guide_is_the_masked_logsumexp():
    queries, keys = features(2, seed=6)
    g = torch.Generator(DEVICE).manual_seed(7)
    guide_q, guide_k = (torch.randn(N, 4, generator=g, dtype=torch.float64, device=DEVICE) for _ in range(2))
    threshold = torch.randn(N, generator=g, dtype=torch.float64, device=DEVICE).abs()  # no row left empty
    upstream = torch.randn(N, generator=g, dtype=torch.float64, device=DEVICE)
    with flashcl.tiling(block_rows=5, block_cols=7):  # several tiles: each masks its own part
        got = loss_and_grads(lambda q, k: flashcl.row_logsumexp(q, k, SCALE, guide_queries=guide_q, guide_keys=guide_k,
                                                                guide_threshold=threshold) @ upstream, [queries, keys])
    masked = lambda q, k: (reference.logits(q, k, SCALE).masked_fill(guide_q @ guide_k.T > threshold[:, None],
                                                                     -torch.inf).logsumexp(1) @ upstream)
    want = loss_and_grads(masked, [queries, keys])
    for a, b, name in zip([got[0], *got[1]], [want[0], *want[1]], ("value", "grad of queries", "grad of keys")):
        assert_norm_close(a, b, 1e-12, name)


@pytest.mark.parametrize("change, message", [
    (dict(guide_keys=None), "guide_queries, guide_threshold given without guide_keys"),
    (dict(guide_threshold=torch.zeros(N + 1)), r"guide_threshold must be a floating-point tensor of shape \(12,\)"),
    (dict(guide_queries=torch.zeros(N, 4, requires_grad=True)), r"guide_queries requires grad.*detach"),
    (dict(guide_keys=torch.zeros(N, 5)), "same feature dimension"),
    (dict(guide_keys=torch.zeros(N - 1, 4)), r"guide_keys must have a row per row of keys \(12\)"),
])
def test_row_logsumexp_guide_errors_name_the_argument(change, message):
    queries, keys = (torch.randn(N, D) for _ in range(2))
    guide = dict(guide_queries=torch.zeros(N, 4), guide_keys=torch.zeros(N, 4), guide_threshold=torch.zeros(N))
    with pytest.raises((ValueError, TypeError), match=message):
        flashcl.row_logsumexp(queries, keys, SCALE, **{**guide, **change})


@pytest.mark.parametrize("change, message", [
    (dict(negatives=torch.zeros(N, D)), "negatives given without guide_negatives"),
    (dict(margin_strategy="percent"), "margin_strategy must be one of"),
    (dict(margin=float("nan")), "margin must be"),
    (dict(guide_positives=torch.zeros(N, 3)), "same feature dimension"),
])
def test_gist_errors_name_the_argument(change, message):
    arguments = dict(anchors=torch.randn(N, D), positives=torch.randn(N, D), guide_anchors=torch.zeros(N, 4),
                     guide_positives=torch.zeros(N, 4), scale=SCALE)
    with pytest.raises((ValueError, TypeError), match=message):
        flashcl.gist_loss(**{**arguments, **change})
