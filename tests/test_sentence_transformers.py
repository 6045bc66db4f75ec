"""flashcl's sentence-transformers drop-ins against sentence-transformers' own losses, on a tiny
randomly initialized BERT built from a config with a word-level tokenizer (no download)."""
import importlib
import importlib.util
import os
import warnings

import pytest
import torch

from conftest import assert_norm_close, require_peer
from distributed_ranks import RankFailed, run_ranks

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
    (lambda m, o: o.CachedMultipleNegativesRankingLoss(m, mini_batch_num_tokens=512),
     r"mini_batch_num_tokens is not supported"),
    (lambda m, o: o.CachedMultipleNegativesRankingLoss(m, mini_batch_size=0), r"mini_batch_size must be a positive int"),
    # sentence-transformers' own checks, as flashcl's errors naming the argument, before its constructor runs
    (lambda m, o: o.MultipleNegativesRankingLoss(m, directions=("query_to_doc", "doc_to_doc"),
                                                 partition_mode="per_direction"),
     r"partition_mode='per_direction' cannot be used with directions doc_to_doc.*partition_mode='joint'"),
    (lambda m, o: o.CachedMultipleNegativesRankingLoss(m, directions=("query_to_doc", "query_to_query"),
                                                       partition_mode="per_direction"),
     r"partition_mode='per_direction' cannot be used with directions query_to_query"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, directions=("doc_to_query",)),
     r"directions must include 'query_to_doc'"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, directions=("query_to_doc", "sideways")),
     r"directions must be a non-empty tuple .*'sideways' unknown"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, directions=()), r"directions must be a non-empty tuple"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, directions="query_to_doc"), r"directions must be a tuple"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, partition_mode="both"), r"partition_mode must be one of"),
    (lambda m, o: o.CachedMultipleNegativesRankingLoss(m, hardness_mode="hardest", hardness_strength=1.0),
     r"hardness_mode must be one of \(None, 'in_batch_negatives', 'hard_negatives', 'all_negatives'\)"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, hardness_mode="hard_negatives", hardness_strength=-1.0),
     r"hardness_strength must be a finite number >= 0"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, hardness_strength=float("nan")), r"hardness_strength must be"),
    (lambda m, o: o.MultipleNegativesRankingLoss(m, scale=0.0), r"scale must be a finite number > 0"),
    (lambda m, o: o.CachedMultipleNegativesSymmetricRankingLoss(m, scale=-20.0), r"scale must be a finite number > 0"),
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


# -- the options of sentence-transformers 6.2: hardness weighting, doc_to_doc ---------------------------------
# On the embeddings themselves (compute_loss_from_embeddings), in float64: flashcl's loss and the gradient of
# every column's embeddings against sentence-transformers' own class, within 1e-12 norm-wise.

GTE_FULL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def ranking_embeddings(n, negatives, seed, d=6):
    """Anchors and their documents (positive, then the hard-negative columns), correlated with the anchors so
    that every penalty and exclusion moves the loss."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [queries] + [queries + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64)
                        for _ in range(1 + negatives)]


def embedding_loss_and_gradients(loss_fn, embeddings):
    leaves = [e.clone().requires_grad_() for e in embeddings]
    loss = loss_fn.compute_loss_from_embeddings(leaves, None)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def embedding_parity(n=7, negatives=2, seed=0, **kwargs):
    """(flashcl's, sentence-transformers') loss and embedding gradients for MultipleNegativesRankingLoss(**kwargs)."""
    require_peer("sentence_transformers")
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    embeddings = ranking_embeddings(n, negatives, seed)
    placeholder = torch.nn.Identity()  # the model: compute_loss_from_embeddings never calls it
    return [embedding_loss_and_gradients(make(placeholder, **kwargs), embeddings)
            for make in (ours.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss)]


def assert_exact(ours, theirs, tol=1e-12):
    assert_norm_close(ours[0], theirs[0], tol, "loss")
    assert_norm_close(ours[1], theirs[1], tol, "embedding gradients")


@pytest.mark.parametrize("strength", [1.5, 9.0])
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
def test_hardness_weighting_matches(mode, negatives, strength):
    ours, theirs = embedding_parity(negatives=negatives, seed=negatives, hardness_mode=mode,
                                    hardness_strength=strength)
    assert_exact(ours, theirs)
    unweighted, _ = embedding_parity(negatives=negatives, seed=negatives)
    if mode == "hard_negatives" and negatives == 0:  # nothing to penalize: sentence-transformers' loss as is
        assert_exact(ours, unweighted, 0.0)
    else:  # the penalty moves the loss, so the agreement above is not that of two unweighted losses
        assert (ours[0] - unweighted[0]).abs() > 1e-3


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("hardness", [None, "all_negatives"])
@pytest.mark.parametrize("directions", [("query_to_doc", "doc_to_doc"), GTE_FULL, ("query_to_doc", "query_to_query")],
                         ids=["doc_to_doc", "gte-full", "query_to_query"])
def test_joint_directions_match(directions, hardness, negatives):
    ours, theirs = embedding_parity(negatives=negatives, seed=10 + negatives, directions=directions,
                                    hardness_mode=hardness, hardness_strength=5.0 if hardness else 0.0,
                                    scale=20.0)
    assert_exact(ours, theirs)


@pytest.mark.parametrize("negatives", [0, 1])
def test_per_direction_with_hardness_matches(negatives):
    from sentence_transformers import util

    ours, theirs = embedding_parity(negatives=negatives, seed=20, directions=("query_to_doc", "doc_to_query"),
                                    partition_mode="per_direction", hardness_mode="in_batch_negatives",
                                    hardness_strength=9.0, similarity_fct=util.dot_score, scale=1.0)
    assert_exact(ours, theirs)


def test_a_batch_of_one():
    """One anchor: query_to_query and doc_to_doc have no candidate left (a log-sum-exp of nothing, -inf)
    and the hardness penalties have no in-batch document to fall on; loss and gradients as
    sentence-transformers' (absolutely: its gradient is 0 up to rounding)."""
    for negatives in (0, 1):
        ours, theirs = embedding_parity(n=1, negatives=negatives, seed=30, directions=GTE_FULL,
                                        hardness_mode="in_batch_negatives", hardness_strength=9.0)
        assert torch.isfinite(ours[0]) and all(torch.isfinite(g).all() for g in ours[1])
        assert abs(ours[0] - theirs[0]).item() <= 1e-12
        assert max((a - b).abs().max().item() for a, b in zip(ours[1], theirs[1])) <= 1e-12


@pytest.mark.parametrize("options", [
    dict(directions=GTE_FULL, hardness_mode="in_batch_negatives", hardness_strength=9.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", hardness_mode="hard_negatives",
         hardness_strength=5.0),
], ids=["gte-full-in_batch", "per_direction-hard"])
def test_cached_loss_options_match(model, options):
    """The options reach flashcl's cached loss (on the model, fp32): as sentence-transformers' cached loss."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    features = columns(model, 12, 1)
    theirs = loss_and_gradients(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5, **options),
                                model, features)
    mine = loss_and_gradients(ours.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5, **options), model,
                              features)
    assert_same(mine, theirs)


def test_cached_symmetric_ranking_loss_matches(model):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    features = columns(model, 12, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sentence-transformers deprecates its class
        original = st_losses.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=5)
    theirs = loss_and_gradients(original, model, features)
    loss = ours.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=5)
    assert (loss.directions, loss.partition_mode) == (("query_to_doc", "doc_to_query"), "per_direction")
    assert_same(loss_and_gradients(loss, model, features), theirs)


def ranking_on_ranks(rank, world_size):
    """Each rank's loss and embedding gradients with gather_across_devices=True, flashcl's and
    sentence-transformers', on this rank's shard of one global batch."""
    n, negatives = 3, 1
    embeddings = ranking_embeddings(n * world_size, negatives, seed=40)
    shard = [e[rank * n:(rank + 1) * n] for e in embeddings]
    outcomes = {}
    for name, options in {"gte-full, in_batch_negatives": dict(directions=GTE_FULL, hardness_mode="in_batch_negatives",
                                                                hardness_strength=9.0),
                          "per_direction, all_negatives": dict(directions=("query_to_doc", "doc_to_query"),
                                                               partition_mode="per_direction",
                                                               hardness_mode="all_negatives", hardness_strength=5.0),
                          }.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, theirs = embedding_parity_on(shard, gather_across_devices=True, **options)
        outcomes[name] = ours, theirs
    return outcomes


def embedding_parity_on(embeddings, **kwargs):
    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as ours

    placeholder = torch.nn.Identity()
    return [embedding_loss_and_gradients(make(placeholder, **kwargs), embeddings)
            for make in (ours.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss)]


@pytest.mark.distributed
def test_gather_across_devices_on_two_ranks_matches():
    """gather_across_devices=True on 2 gloo ranks, doc_to_doc and hardness weighting included: each rank's loss
    and its embeddings' gradients (every rank's loss differentiated, as sentence-transformers' gather with
    gradient gives them) within 1e-12; the penalties and exclusions fall on each anchor's own documents, which
    sit at a different global column on each rank."""
    require_peer("sentence_transformers")
    results = run_ranks(2, ranking_on_ranks)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for rank, outcomes in enumerate(results):
        for name, (ours, theirs) in outcomes.items():
            assert_norm_close(ours[0], theirs[0], 1e-12, f"rank {rank} {name} loss")
            assert_norm_close(ours[1], theirs[1], 1e-12, f"rank {rank} {name} embedding gradients")
    # the two ranks' losses differ: each contrasts its own anchors against the whole batch
    assert all((results[0][k][0][0] - results[1][k][0][0]).abs() > 1e-6 for k in results[0])


# -- apply_flashcl_to_sentence_transformers: both module layouts -----------------------------------------------

PATCHED = ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss",
           "CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss", "GISTEmbedLoss",
           "CachedGISTEmbedLoss")


@pytest.fixture
def st_patch():
    require_peer("sentence_transformers")
    from flashcl.integrations import sentence_transformers as ours

    yield ours
    ours.revert_flashcl_patches()


def reachable(name):
    """sentence-transformers' class `name` by every path code reaches it: the new and the old package
    namespaces, the defining submodule, and the old per-class module path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old paths warn, as sentence-transformers says
        import sentence_transformers.losses as old_losses
        from sentence_transformers import losses as package_losses
        from sentence_transformers.sentence_transformer import losses as new_losses

        defining = importlib.import_module(new_losses.__name__ + "." + {
            "MultipleNegativesRankingLoss": "multiple_negatives_ranking",
            "MultipleNegativesSymmetricRankingLoss": "multiple_negatives_symmetric_ranking",
            "CachedMultipleNegativesRankingLoss": "cached_multiple_negatives_ranking",
            "CachedMultipleNegativesSymmetricRankingLoss": "cached_multiple_negatives_symmetric_ranking",
            "GISTEmbedLoss": "gist_embed", "CachedGISTEmbedLoss": "cached_gist_embed"}[name])
        old_module = importlib.import_module(f"sentence_transformers.losses.{name}")
        namespace = {}
        exec(f"from sentence_transformers.losses import {name}", namespace)
        exec(f"from sentence_transformers.sentence_transformer.losses import {name}", namespace)
    return {"sentence_transformers.losses": getattr(old_losses, name),
            "from sentence_transformers import losses": getattr(package_losses, name),
            "sentence_transformers.sentence_transformer.losses": getattr(new_losses, name),
            "defining module": getattr(defining, name),
            "sentence_transformers.losses.<Name>": getattr(old_module, name),
            "from ... import": namespace[name]}


def test_apply_patches_both_layouts_and_reverts(st_patch, model):
    ours = st_patch
    originals = {name: reachable(name)["sentence_transformers.sentence_transformer.losses"] for name in PATCHED}
    assert not any(issubclass(originals[name], getattr(ours, name)) for name in PATCHED)  # not yet patched
    patched = ours.apply_flashcl_to_sentence_transformers()
    assert ours.apply_flashcl_to_sentence_transformers() == patched == ours.patched_names()  # idempotent
    ours_patched = [path for path in patched if path.rsplit(".", 1)[1] in PATCHED]
    assert len(ours_patched) == 2 * len(PATCHED), patched  # the losses namespace and the defining module, each
    assert ("sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking."
            "MultipleNegativesRankingLoss") in patched
    for name in PATCHED:
        for path, found in reachable(name).items():
            assert found is getattr(ours, name), f"{path}.{name} is {found}"
    # losses.X(model) builds flashcl's, through the originals' constructors (no recursion)
    from sentence_transformers import losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        built = [losses.MultipleNegativesRankingLoss(model), losses.MultipleNegativesSymmetricRankingLoss(model),
                 losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
                 losses.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=4)]
    assert [type(b) for b in built] == [getattr(ours, name) for name in PATCHED[:4]]
    features = columns(model, 12, 1)
    assert_same(loss_and_gradients(built[2], model, features),
                loss_and_gradients(originals["CachedMultipleNegativesRankingLoss"](model, mini_batch_size=4), model,
                                   features))

    restored = ours.revert_flashcl_patches()
    assert restored == patched and ours.patched_names() == [] and ours.revert_flashcl_patches() == []
    for name in PATCHED:
        for path, found in reachable(name).items():
            assert found is originals[name], f"{path}.{name} not restored"
