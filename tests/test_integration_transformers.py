"""flashcl.integrations.transformers: each patched CLIP-family model class of transformers against the same
class unpatched, on tiny randomly initialized models built from configs (no download): the loss and every
parameter's gradient, the outputs in eval mode, nothing batch x batch in training, one Trainer step, the
global loss over 2 gloo ranks, and the argument errors."""
import inspect
import math
import os

import pytest
import torch
import torch.distributed as dist

import flashcl
from conftest import assert_norm_close, require_peer
from distributed_ranks import RankFailed, run_ranks
from test_memory import LargestAllocation  # records the largest tensor any aten op creates

pytestmark = pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu", reason="CPU models")

SCALE, BIAS = 7.0, -3.0  # not the models' initial values, so that their gradients are not trivially zero
VOCAB, LENGTH = 64, 7
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=8)
BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # so that training mode is deterministic


def configs():
    """name -> (model class, config), for every model family the integration covers."""
    import transformers as tf

    return {
        "clip": (tf.CLIPModel, tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
        "metaclip_2": (tf.MetaClip2Model, tf.MetaClip2Config(text_config=TEXT, vision_config=VISION,
                                                             projection_dim=16)),
        "clipseg": (tf.CLIPSegModel, tf.CLIPSegConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
        "chinese_clip": (tf.ChineseCLIPModel, tf.ChineseCLIPConfig(text_config={**TEXT, **BERT}, vision_config=VISION,
                                                                   projection_dim=16)),
        "altclip": (tf.AltCLIPModel, tf.AltCLIPConfig(text_config={**TEXT, **BERT, "project_dim": 24},
                                                      vision_config=VISION, projection_dim=16)),
        "siglip": (tf.SiglipModel, tf.SiglipConfig(text_config=TEXT, vision_config=VISION)),
        "siglip2": (tf.Siglip2Model, tf.Siglip2Config(text_config=TEXT, vision_config={**VISION, "num_patches": 4})),
    }


NAMES = ["clip", "metaclip_2", "clipseg", "chinese_clip", "altclip", "siglip", "siglip2"]
SIGMOID = {"siglip", "siglip2"}


def build(name, seed=0):
    require_peer("transformers")
    cls, config = configs()[name]
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(SCALE))
        if name in SIGMOID:
            model.logit_bias.fill_(BIAS)
    return model


def batch(name, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(3, VOCAB, (n, LENGTH), generator=g)}
    if name == "siglip2":  # patches flattened: (batch, patches, channels * patch * patch), a 2 x 2 grid
        inputs.update(pixel_values=torch.randn(n, 4, 3 * 8 * 8, generator=g),
                      pixel_attention_mask=torch.ones(n, 4, dtype=torch.long),
                      spatial_shapes=torch.tensor([[2, 2]] * n))
    else:
        inputs["pixel_values"] = torch.randn(n, 3, 16, 16, generator=g)
    return inputs


def apply(name, **options):
    from flashcl.integrations import transformers as integration

    getattr(integration, f"apply_flashcl_to_{name}")(**options)


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with transformers' own classes."""
    from flashcl.integrations.transformers import revert_flashcl_patches

    revert_flashcl_patches()
    yield
    revert_flashcl_patches()


def assert_same_gradients(ours, theirs, name):
    """Every parameter's gradient, norm-wise over all of them together (conftest's convention: a parameter
    whose gradient nearly cancels, as attention keys' do, carries the rounding of the terms that cancel), and
    the scale's and the bias's each on its own."""
    assert ours.keys() == theirs.keys()
    assert_norm_close([ours[p] for p in theirs], list(theirs.values()), 1e-4, "parameter gradients")
    for parameter in ["logit_scale", "logit_bias"] if name in SIGMOID else ["logit_scale"]:
        assert theirs[parameter].abs().sum() > 0
        assert_norm_close(ours[parameter], theirs[parameter], 1e-4, f"gradient of {parameter}")


def loss_and_gradients(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    output = model(**inputs, return_loss=True, **kwargs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("skip_logits", [None, False], ids=["logits skipped", "logits kept"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradients_match_the_model(name, skip_logits):
    """Training mode: flashcl's loss and every parameter's gradient (scale and bias included) are the model's."""
    model, inputs = build(name).train(), batch(name, 6)
    theirs, their_grads = loss_and_gradients(model, inputs)
    apply(name, skip_logits=skip_logits)
    ours, our_grads = loss_and_gradients(model, inputs)
    assert_norm_close(ours.loss, theirs.loss, 1e-5, "loss")
    assert_same_gradients(our_grads, their_grads, name)
    torch.testing.assert_close(ours.text_embeds, theirs.text_embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.image_embeds, theirs.image_embeds, rtol=0, atol=0)
    if skip_logits is None:  # training and a loss: skipped
        assert ours.logits_per_image is None and ours.logits_per_text is None
        assert "logits_per_image" not in ours and list(ours.keys())[0] == "loss"
    else:
        assert torch.equal(ours.logits_per_image, theirs.logits_per_image)
        assert torch.equal(ours.logits_per_text, theirs.logits_per_text)
    assert list(ours.keys()) == [k for k in theirs.keys() if skip_logits is False or not k.startswith("logits")]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_skip_logits_true_skips_in_eval_too(name):
    model, inputs = build(name).eval(), batch(name, 5)
    with torch.no_grad():
        theirs = model(**inputs, return_loss=True)
        apply(name, skip_logits=True)
        ours = model(**inputs, return_loss=True)
    assert ours.logits_per_image is None and ours.logits_per_text is None
    assert_norm_close(ours.loss, theirs.loss, 1e-5, "loss")


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_and_no_loss_are_unchanged(name):
    """Eval mode (with a loss) and return_loss=False (in training too): the model's own outputs, identically."""
    model, inputs = build(name), batch(name, 5)
    runs = [("eval", dict(return_loss=True)), ("train", dict(return_loss=False)), ("train", {})]
    theirs = [getattr(model, mode)()(**inputs, **kwargs) for mode, kwargs in runs]
    apply(name)
    ours = [getattr(model, mode)()(**inputs, **kwargs) for mode, kwargs in runs]
    for (mode, kwargs), a, b in zip(runs, ours, theirs):
        assert list(a.keys()) == list(b.keys()), (mode, kwargs)
        for key in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
            assert torch.equal(a[key], b[key]), (mode, kwargs, key)
    assert_norm_close(ours[0].loss, theirs[0].loss, 1e-5, "eval loss")
    assert ours[1].loss is None and ours[2].loss is None
    as_tuple = model.eval()(**inputs, return_loss=True, return_dict=False)  # return_dict honoured as before
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(ours[0].to_tuple())
    assert_norm_close(as_tuple[0], ours[0].loss, 1e-6, "the loss first")
    assert torch.equal(as_tuple[1], ours[0].to_tuple()[1])


@pytest.mark.parametrize("name", ["clip", "siglip", "altclip"])
def test_nothing_batch_by_batch_in_training(name):
    """Forward and backward at N = 1024 in training mode: the patched model allocates nothing with N * N
    elements; the unpatched model does (so the recorder would see it). The torch backend is held to tiles
    here: within its memory budget (flashcl.tiling) it builds a small S whole by design, and 1024 x 1024 fp32
    is within the default budget."""
    n = 1024
    model, inputs = build(name).train(), batch(name, n)
    for patched in (False, True):
        if patched:
            apply(name)
        model.zero_grad(set_to_none=True)
        with flashcl.tiling(block_rows=128, block_cols=128), LargestAllocation() as recorder:
            model(**inputs, return_loss=True).loss.backward()
        assert (recorder.numel >= n * n) == (not patched), (patched, recorder.numel)


def test_patching_is_idempotent_and_reverts():
    from transformers import CLIPModel, SiglipModel

    from flashcl.integrations import transformers as integration

    own_clip, own_siglip = CLIPModel.__dict__["forward"], SiglipModel.__dict__["forward"]
    integration.apply_flashcl_to_clip()
    patched = CLIPModel.__dict__["forward"]
    integration.apply_flashcl_to_clip(skip_logits=False)  # new options, the same single wrapper
    assert CLIPModel.__dict__["forward"] is patched and patched is not own_clip
    assert patched.__wrapped__.__wrapped__ is own_clip  # can_return_tuple over functools.wraps over the own forward
    assert integration._PATCHES[CLIPModel].skip_logits is False
    integration.apply_flashcl_to_siglip()
    assert set(integration.patched_classes()) == {CLIPModel, SiglipModel}
    integration.revert_flashcl_patches(CLIPModel)
    assert CLIPModel.__dict__["forward"] is own_clip and SiglipModel.__dict__["forward"] is not own_siglip
    integration.revert_flashcl_patches()
    assert SiglipModel.__dict__["forward"] is own_siglip and not integration.patched_classes()
    integration.apply_flashcl_to_clip()
    assert inspect.signature(CLIPModel.forward) == inspect.signature(own_clip)  # what Trainer inspects


@pytest.mark.parametrize("options, error, match", [
    (dict(skip_logits="yes"), TypeError, "skip_logits"),
    (dict(skip_logits=1), TypeError, "skip_logits"),
    (dict(group=3), TypeError, "group"),
    (dict(group="everyone"), ValueError, "group"),
    (dict(group=True), TypeError, "group"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_arguments_name_the_argument(options, error, match):
    from transformers import CLIPModel

    from flashcl.integrations import transformers as integration

    own = CLIPModel.__dict__["forward"]
    with pytest.raises(error, match=match):
        integration.apply_flashcl_to_clip(**options)
    assert CLIPModel.__dict__["forward"] is own and not integration.patched_classes()  # nothing patched


def test_trainer_step(tmp_path):
    """One transformers.Trainer step on the patched model: the loss is flashcl's, the logits skipped, and the
    parameters move."""
    from transformers import Trainer, TrainingArguments

    from flashcl.integrations import transformers as integration

    apply("clip")
    model = build("clip")
    inputs = batch("clip", 8)
    dataset = [{k: v[i] for k, v in inputs.items()} for i in range(8)]
    collate = lambda rows: {**{k: torch.stack([r[k] for r in rows]) for k in rows[0]}, "return_loss": True}
    calls, outputs = [], []
    clip_loss = integration.clip_loss
    integration.clip_loss = lambda *args, **kwargs: calls.append(1) or clip_loss(*args, **kwargs)
    model.register_forward_hook(lambda module, args, output: outputs.append(output))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        result = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate).train()
    finally:
        integration.clip_loss = clip_loss
    assert calls == [1] and outputs[0].logits_per_image is None and math.isfinite(result.training_loss)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "logit_scale" in moved and len(moved) > len(before) // 2


# -- a global loss across processes ---------------------------------------------------------------------------

SHARDS = (5, 3)  # ragged


def global_steps_on_a_shard(rank, world_size, names):
    """Rank `rank`'s shard of the global batch through each patched model, with group="world"."""
    results = {}
    for name in names:
        apply(name, group="world")
        model = build(name).train()
        inputs = batch(name, sum(SHARDS))
        start = sum(SHARDS[:rank])
        output, grads = loss_and_gradients(model, {k: v[start:start + SHARDS[rank]] for k, v in inputs.items()})
        results[name] = output.loss.detach(), grads
    return results


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed")
def test_global_loss_across_ranks():
    """2 gloo ranks, ragged shards, CLIP and SigLIP: the mean of the ranks' losses is the single-process loss
    of the concatenated batch, and the mean of their gradients (DDP's average) is its gradient, the
    learnable scale and bias included."""
    names = ["clip", "siglip"]
    results = run_ranks(len(SHARDS), global_steps_on_a_shard, names)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for name in names:
        model = build(name).train()
        theirs, their_grads = loss_and_gradients(model, batch(name, sum(SHARDS)))
        ranks = [r[name] for r in results]
        assert_norm_close(sum(loss for loss, _ in ranks) / len(ranks), theirs.loss.detach(), 1e-5, f"{name} loss")
        averaged = {p: sum(grads[p] for _, grads in ranks) / len(ranks) for p in ranks[0][1]}
        assert_same_gradients(averaged, their_grads, name)
