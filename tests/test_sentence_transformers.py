"""flashcl's sentence-transformers drop-ins against sentence-transformers' own losses, on a tiny
randomly initialized BERT built from a config with a word-level tokenizer (no download)."""
import importlib.util
import os

import pytest
import torch

from conftest import assert_norm_close, require_peer

pytestmark = pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu", reason="CPU model")

WORDS = ("the a cat dog sat ran on under mat rug red blue big small quick lazy fox jumps over home park tree "
         "car road sun rain day night old new happy sad").split()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    require_peer("sentence_transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from sentence_transformers import SentenceTransformer

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    path = tmp_path_factory.mktemp("tiny-bert")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    return SentenceTransformer(str(path), device="cpu")


def sentences(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),),
                                                     generator=g)) for _ in range(count)]


def columns(model, count, negatives):
    texts = [sentences(12, seed) for seed in range(2 + negatives)]
    return [model.preprocess(t) for t in texts[:2 + negatives]]


def loss_and_gradients(loss_fn, model, features):
    model.zero_grad()
    loss = loss_fn([{k: v.clone() if torch.is_tensor(v) else v for k, v in f.items()} for f in features], None)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(ours, theirs):
    """Loss and every parameter's gradient against sentence-transformers' fp32 ones, norm-wise: the two
    sum in different orders (and the order moves with the thread count)."""
    assert_norm_close(ours[0], theirs[0], 1e-5, "loss")
    assert_norm_close(ours[1], theirs[1], 1e-5, "parameter gradients")


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("variant", ["default", "symmetric", "gte-style"])
def test_multiple_negatives_ranking_loss_matches(model, negatives, similarity, variant):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    kwargs = dict(scale=20.0 if similarity == "cos_sim" else 1.0, similarity_fct=getattr(util, similarity))
    kwargs.update({"default": {}, "symmetric": dict(directions=("query_to_doc", "doc_to_query"),
                                                    partition_mode="per_direction"),
                   "gte-style": dict(directions=("query_to_doc", "query_to_query", "doc_to_query"))}[variant])
    features = columns(model, 12, negatives)
    theirs = loss_and_gradients(st_losses.MultipleNegativesRankingLoss(model, **kwargs), model, features)
    mine = loss_and_gradients(ours.MultipleNegativesRankingLoss(model, **kwargs), model, features)
    assert_same(mine, theirs)


def test_symmetric_ranking_loss_matches(model):
    import warnings

    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    features = columns(model, 12, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sentence-transformers deprecates its class
        theirs = loss_and_gradients(st_losses.MultipleNegativesSymmetricRankingLoss(model), model, features)
    assert_same(loss_and_gradients(ours.MultipleNegativesSymmetricRankingLoss(model), model, features), theirs)


@pytest.mark.parametrize("negatives", [0, 1])
def test_cached_ranking_loss_matches(model, negatives):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    features = columns(model, 12, negatives)
    theirs = loss_and_gradients(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5), model, features)
    mine = loss_and_gradients(ours.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5), model, features)
    assert_same(mine, theirs)
    plain = loss_and_gradients(st_losses.MultipleNegativesRankingLoss(model), model, features)
    assert_same(mine, plain)


def test_cached_loss_takes_the_models_own_features(model):
    """model.preprocess() (and the deprecated model.tokenize()) return transformers' BatchEncoding, a
    mapping but not a dict: the cached drop-in takes it as sentence-transformers' own loss does."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    texts = [sentences(12, seed) for seed in range(3)]
    results = []
    for make in (lambda: st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5),
                 lambda: ours.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5)):
        features = [model.preprocess(t) for t in texts]
        assert not isinstance(features[0], dict), type(features[0])
        model.zero_grad()
        loss = make()(features, None)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert_same(results[1], results[0])


@pytest.mark.parametrize("make,message", [
    (lambda m, o: o.MultipleNegativesRankingLoss(m, similarity_fct=lambda a, b: a @ b.T),
     r"similarity_fct=<lambda>: flashcl fuses cosine similarity \(util.cos_sim\) and the dot product"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, directions=("query_to_doc", "doc_to_doc")),
     r"flashcl supports .* not \['doc_to_doc'\]"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, hardness_mode="in_batch_negatives", hardness_strength=5.0),
     r"hardness_mode='in_batch_negatives' is not supported"),
    (lambda m, o: o.CachedMultipleNegativesRankingLoss(m, mini_batch_num_tokens=512),
     r"mini_batch_num_tokens is not supported"),
    (lambda m, o: o.CachedMultipleNegativesRankingLoss(m, mini_batch_size=0), r"mini_batch_size must be a positive int"),
])
def test_unsupported_options_are_clear_errors(model, make, message):
    from flashcl.integrations import sentence_transformers as ours

    with pytest.raises(ValueError, match=message):
        make(model, ours)


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_one_trainer_step(model, tmp_path, name):
    if importlib.util.find_spec("datasets") is None:
        require_peer("datasets")
    from datasets import Dataset

    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from flashcl.integrations import sentence_transformers as ours

    kwargs = dict(mini_batch_size=3) if name.startswith("Cached") else {}
    loss = getattr(ours, name)(model, **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    data = Dataset.from_dict({"anchor": sentences(8, 1), "positive": sentences(8, 2), "negative": sentences(8, 3)})
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                                report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
