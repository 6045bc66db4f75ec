"""flashcl.integrations.open_clip: CoCaLoss against open_clip's CoCaLoss, SigLipLoss(chunk_size=),
apply_flashcl_to_open_clip on open_clip's own create_loss, and open_clip_train's training script run
with and without it.

open_clip's package import needs torchvision, which the CPU test venv lacks: there the patch is tested
on a stand-in package holding open_clip's real loss.py and the real source of factory.create_loss. The
tests that import open_clip itself and run its training script need open_clip_torch[training] and
torchvision (the CUDA venv: make cuda-build-check); they skip without them, except under
FLASHCL_REQUIRE_OPEN_CLIP_TRAIN=1, where they fail.
"""
import ast
import importlib.util
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import flashcl
from conftest import require_peer
from distributed_ranks import RankFailed, run_ranks
from flashcl.integrations.open_clip import (CoCaLoss, apply_flashcl_to_open_clip, patched_names,
                                            revert_flashcl_patches)
from test_open_clip import load_open_clip_loss

LOG_SCALE = 2.659  # open_clip's initial logit scale, log(1 / 0.07)
REPLACED = ("ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss")


def relative_error(actual, expected):
    return (torch.linalg.vector_norm(actual.double() - expected.double())
            / torch.linalg.vector_norm(expected.double())).item()


def assert_relative(actual, expected, tol, what):
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: norm-wise relative error {error:.3g} > {tol}"


@pytest.fixture(scope="module")
def open_clip_loss():
    return load_open_clip_loss()


@pytest.fixture(autouse=True)
def no_patch_left_behind():
    yield
    revert_flashcl_patches()


# -- CoCaLoss ------------------------------------------------------------------------------------------

def coca_inputs(seed, n=6, d=8, length=5, vocab=11, pad_id=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    text = torch.nn.functional.normalize(image + 0.7 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    logits = 3 * torch.randn(n, length, vocab, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (n, length), generator=g)
    labels[:, -2:] = pad_id  # padded captions: left out of the caption mean
    return image, text, logits, labels


def coca_loss_and_gradients(loss_fn, image, text, logits, labels, output_dict):
    leaves = [t.clone().requires_grad_() for t in (image, text, logits)]
    log_scale = torch.tensor(LOG_SCALE, dtype=image.dtype, requires_grad=True)
    out = loss_fn(*leaves, labels, log_scale.exp(), output_dict=output_dict)
    if output_dict:
        assert list(out) == ["contrastive_loss", "caption_loss"]
        parts = list(out.values())
    else:
        assert isinstance(out, tuple) and len(out) == 2
        parts = list(out)
    total = sum(parts)
    grads = torch.autograd.grad(total, [*leaves, log_scale], allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [*leaves, log_scale])]
    return [p.detach() for p in parts], grads


@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 0.0), (0.0, 1.0)], ids=["both", "no-clip", "no-caption"])
@pytest.mark.parametrize("pad_id", [0, 3])
def test_coca_loss_matches_open_clip(open_clip_loss, output_dict, weights, pad_id):
    caption_weight, clip_weight = weights
    inputs = coca_inputs(seed=pad_id + 10, pad_id=pad_id)
    results = [coca_loss_and_gradients(make(caption_weight, clip_weight, pad_id=pad_id), *inputs, output_dict)
               for make in (open_clip_loss.CoCaLoss, CoCaLoss)]
    (their_parts, their_grads), (our_parts, our_grads) = results
    for what, ours, theirs in zip(("contrastive loss", "caption loss"), our_parts, their_parts):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, what
        if theirs.abs().item() == 0:
            assert ours.item() == 0, what
        else:
            assert_relative(ours, theirs, 1e-12, what)
    for what, ours, theirs in zip(("image grad", "text grad", "logits grad", "log_scale grad"), our_grads, their_grads):
        if theirs.abs().max().item() == 0:
            assert ours.abs().max().item() == 0, what
        else:
            assert_relative(ours, theirs, 1e-12, what)


def test_coca_loss_float32_with_a_learnable_scale(open_clip_loss):
    """open_clip's training precision: fp32 features and logits, within fp32 rounding."""
    inputs = coca_inputs(seed=4, n=64, d=32, length=7, vocab=50, dtype=torch.float32)
    (their_parts, their_grads), (our_parts, our_grads) = [
        coca_loss_and_gradients(make(2.0, 1.0), *inputs, True) for make in (open_clip_loss.CoCaLoss, CoCaLoss)]
    for what, ours, theirs in zip(("contrastive", "caption", "image grad", "text grad", "logits grad", "scale grad"),
                                  our_parts + our_grads, their_parts + their_grads):
        assert_relative(ours, theirs, 1e-5, what)


def test_coca_signature_is_open_clips(open_clip_loss):
    theirs = list(inspect.signature(open_clip_loss.CoCaLoss.__init__).parameters)
    ours = list(inspect.signature(CoCaLoss.__init__).parameters)
    assert ours[: len(theirs)] == theirs
    assert (list(inspect.signature(CoCaLoss.forward).parameters)
            == list(inspect.signature(open_clip_loss.CoCaLoss.forward).parameters))
    assert issubclass(CoCaLoss, flashcl.ClipLoss)


def test_coca_errors():
    image, text, logits, labels = coca_inputs(seed=0)
    with pytest.raises(ValueError, match="use_horovod=True.*torch.distributed"):
        CoCaLoss(2.0, 1.0, use_horovod=True)
    with pytest.raises(ValueError, match="caption_loss_weight"):
        CoCaLoss(-1.0, 1.0)
    with pytest.raises(ValueError, match="clip_loss_weight"):
        CoCaLoss(1.0, float("nan"))
    with pytest.raises(TypeError, match="pad_id"):
        CoCaLoss(1.0, 1.0, pad_id=0.0)
    loss = CoCaLoss(2.0, 1.0)
    with pytest.raises(ValueError, match=r"logits must be .*\(batch, length, vocab\)"):
        loss(image, text, logits[:, 0], labels, 10.0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        loss(image, text, logits, labels.double(), 10.0)
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(image, text, logits, labels[:, 1:], 10.0)
    with pytest.raises(ValueError, match="logit_scale"):  # flashcl's own checks of the contrastive part
        loss(image, text, logits, labels, -1.0)


def coca_on_ranks(rank, world_size):
    open_clip = load_open_clip_loss()
    n = 4
    image, text, logits, labels = coca_inputs(seed=7, n=n * world_size)
    mine = slice(rank * n, (rank + 1) * n)
    shard = [t[mine] for t in (image, text, logits, labels)]
    outcomes = {}
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            for make in (open_clip.CoCaLoss, CoCaLoss):
                loss_fn = make(2.0, 1.0, local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                               world_size=world_size)
                outcomes[(make.__module__, local_loss, gather_with_grad)] = coca_loss_and_gradients(
                    loss_fn, *shard, output_dict=True)
    return outcomes


@pytest.mark.distributed
def test_coca_loss_on_two_ranks_matches_open_clip():
    """world_size 2 on gloo, every (local_loss, gather_with_grad): each rank's losses and its gradients."""
    load_open_clip_loss()  # skips here, or fails under FLASHCL_REQUIRE_PEERS=1, if open_clip is missing
    results = run_ranks(2, coca_on_ranks)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for mode in [(False, False), (False, True), (True, False), (True, True)]:
        (their_parts, their_grads) = zip(*[r[("open_clip_loss", *mode)] for r in results])
        (our_parts, our_grads) = zip(*[r[("flashcl.integrations.open_clip", *mode)] for r in results])
        for rank in range(2):
            for what, ours, theirs in zip(("contrastive", "caption", "image grad", "text grad", "logits grad"),
                                          our_parts[rank] + our_grads[rank][:3],
                                          their_parts[rank] + their_grads[rank][:3]):
                assert_relative(ours, theirs, 1e-12, f"rank {rank} {mode} {what}")
        # The logit scale's gradient: with (True, True) the ranks split the same total differently
        # (open_clip by loss terms, flashcl by row blocks), so compare the sum over ranks there.
        ours, theirs = [g[3] for g in our_grads], [g[3] for g in their_grads]
        if mode == (True, True):
            ours, theirs = [sum(ours)], [sum(theirs)]
        for a, b in zip(ours, theirs):
            assert_relative(a, b, 1e-12, f"{mode} log_scale grad")


# -- SigLipLoss(chunk_size=) ----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 0, 1, 3, 4096])
def test_siglip_chunk_size_changes_nothing(chunk_size):
    g = torch.Generator().manual_seed(1)
    image, text = (torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2))
    expected = flashcl.SigLipLoss()(image, text, 10.0, -5.0)
    loss_fn = flashcl.SigLipLoss(chunk_size=chunk_size)
    assert loss_fn.chunk_size == chunk_size
    assert torch.equal(loss_fn(image, text, 10.0, -5.0), expected)
    # open_clip's positional order: cache_labels, rank, world_size, dist_impl, chunk_size
    assert flashcl.SigLipLoss(False, 0, 1, None, chunk_size).chunk_size == chunk_size


@pytest.mark.parametrize("chunk_size", [-1, 2.0, True, "8"])
def test_siglip_chunk_size_is_validated(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 0"):
        flashcl.SigLipLoss(chunk_size=chunk_size)


# -- apply_flashcl_to_open_clip on open_clip's create_loss ------------------------------------------------

def open_clip_root():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        require_peer("open_clip")
    return Path(spec.origin).parent


def load_training_params():
    """open_clip_train's params.py on its own (argparse only): the training script's real arguments."""
    spec = importlib.util.find_spec("open_clip_train")
    if spec is None:
        require_peer("open_clip_train")  # open_clip_torch ships it
    path = Path(spec.submodule_search_locations[0]) / "params.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_train_params", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture
def stand_in_open_clip(monkeypatch):
    """An `open_clip` package in sys.modules without torchvision: open_clip's own loss.py as open_clip.loss,
    and an open_clip.factory holding the real source of factory.create_loss and the loss names factory.py
    imports (so the names create_loss reads are exactly the real module's)."""
    root = open_clip_root()
    loss = load_open_clip_loss()
    tree = ast.parse((root / "factory.py").read_text())
    factory = types.ModuleType("open_clip.factory")
    package = types.ModuleType("open_clip")
    package.__path__ = []
    init = ast.parse((root / "__init__.py").read_text())
    for module, source in ((factory, tree), (package, init)):
        for node in source.body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "loss":
                for alias in node.names:
                    setattr(module, alias.asname or alias.name, getattr(loss, alias.name))
    create_loss = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "create_loss"]
    assert create_loss, "open_clip.factory has no create_loss"
    exec(compile(ast.Module(body=create_loss, type_ignores=[]), str(root / "factory.py"), "exec"), factory.__dict__)
    package.create_loss, package.factory, package.loss = factory.create_loss, factory, loss
    for name, module in (("open_clip", package), ("open_clip.factory", factory), ("open_clip.loss", loss)):
        monkeypatch.setitem(sys.modules, name, module)
    return package


def training_args(*argv, rank=0, world_size=1):
    """open_clip_train's parsed arguments, with what main() adds before create_loss (rank, world_size)."""
    args = load_training_params().parse_args(["--model", "ViT-B-32", *argv])
    args.rank, args.world_size = rank, world_size
    args.distill = args.distill_model is not None and args.distill_pretrained is not None  # as main() sets it
    return args


def check_create_loss(open_clip):
    """What create_loss builds before, during and after the patch, with the training script's arguments."""
    factory = sys.modules["open_clip.factory"]
    originals = {name: getattr(sys.modules["open_clip.loss"], name) for name in REPLACED}
    cases = {"clip": training_args("--local-loss", "--gather-with-grad", rank=1, world_size=4),
             "siglip": training_args("--siglip", "--loss-dist-impl", "gather", rank=1, world_size=4),
             "coca": training_args("--coca-caption-loss-weight", "3.0", "--coca-contrastive-loss-weight", "0.5")}
    cases["coca"].model = "coca_ViT-B-32"
    ours = {"clip": flashcl.ClipLoss, "siglip": flashcl.SigLipLoss, "coca": CoCaLoss}
    theirs = {"clip": originals["ClipLoss"], "siglip": originals["SigLipLoss"], "coca": originals["CoCaLoss"]}

    for name, args in cases.items():
        assert type(open_clip.create_loss(args)) is theirs[name], name
    patched = apply_flashcl_to_open_clip()
    assert "open_clip.factory.ClipLoss" in patched and "open_clip.loss.SigLipLoss" in patched
    assert apply_flashcl_to_open_clip() == patched == patched_names()  # idempotent
    for name, args in cases.items():
        loss = open_clip.create_loss(args)
        assert type(loss) is ours[name], name
        assert isinstance(loss, flashcl.ClipLoss if name != "siglip" else flashcl.SigLipLoss)
        assert (loss.rank, loss.world_size) == (args.rank, args.world_size)
    clip, siglip, coca = (open_clip.create_loss(cases[name]) for name in ("clip", "siglip", "coca"))
    assert (clip.local_loss, clip.gather_with_grad, clip.cache_labels) == (True, True, True)
    assert siglip.dist_impl == "gather"
    assert (coca.caption_loss_weight, coca.clip_loss_weight) == (3.0, 0.5)
    assert factory.ClipLoss is flashcl.ClipLoss and sys.modules["open_clip.loss"].CoCaLoss is CoCaLoss
    # --horovod: a clear error from the loss, not a silent fallback
    with pytest.raises(ValueError, match="use_horovod=True"):
        open_clip.create_loss(training_args("--horovod"))
    # --distill: flashcl's DistillClipLoss, with the script's arguments, computing open_clip's losses
    distill = training_args("--distill-model", "ViT-B-32", "--distill-pretrained", "openai")
    assert distill.distill
    loss = open_clip.create_loss(distill)
    assert type(loss) is flashcl.DistillClipLoss and factory.DistillClipLoss is flashcl.DistillClipLoss
    assert (loss.local_loss, loss.gather_with_grad, loss.cache_labels) == (False, False, True)
    check_distill_values(loss, originals["DistillClipLoss"](cache_labels=True))

    restored = revert_flashcl_patches()
    assert restored == patched and patched_names() == [] and revert_flashcl_patches() == []
    for name, args in {**cases, "distill": distill}.items():
        assert type(open_clip.create_loss(args)) is {**theirs, "distill": originals["DistillClipLoss"]}[name], name
    assert all(getattr(sys.modules["open_clip.loss"], name) is originals[name] for name in REPLACED)


def check_distill_values(ours, theirs, n=6, d=8, teacher_d=5):
    """A DistillClipLoss against open_clip's on random float64 features (the teacher's a constant, of another
    dimension): both losses and the gradients of the student's features and log scale, within 1e-12."""
    g = torch.Generator().manual_seed(3)
    image, text, teacher_image, teacher_text = (
        torch.nn.functional.normalize(torch.randn(n, width, generator=g, dtype=torch.float64), dim=1)
        for width in (d, d, teacher_d, teacher_d))
    results = []
    for loss_fn in (ours, theirs):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor(LOG_SCALE, dtype=torch.float64, requires_grad=True)]
        out = loss_fn(leaves[0], leaves[1], leaves[2].exp(), teacher_image, teacher_text, torch.tensor(3.0).double(),
                      output_dict=True)
        assert list(out) == ["contrastive_loss", "distill_loss"]
        results.append(([v.detach() for v in out.values()], torch.autograd.grad(sum(out.values()), leaves)))
    (our_values, our_grads), (their_values, their_grads) = results
    for what, a, b in zip(("contrastive", "distill", "image grad", "text grad", "log_scale grad"),
                          our_values + list(our_grads), their_values + list(their_grads)):
        assert_relative(a, b, 1e-12, what)


def test_create_loss_builds_flashcl_losses_and_reverts(stand_in_open_clip):
    check_create_loss(stand_in_open_clip)


def test_apply_without_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what a failed import leaves: ImportError
    with pytest.raises(ImportError, match="apply_flashcl_to_open_clip needs open_clip"):
        apply_flashcl_to_open_clip()


# -- open_clip itself and its training script (needs torchvision: the CUDA venv) ---------------------------

TRAINING_MODULES = ("torchvision", "open_clip_train", "webdataset", "braceexpand", "pandas", "PIL")


def require_open_clip_train():
    missing = [name for name in TRAINING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        message = (f"open_clip's training script needs {', '.join(missing)}: "
                   "pip install torchvision open_clip_torch[training] (make cuda-build-check installs them)")
        if os.environ.get("FLASHCL_REQUIRE_OPEN_CLIP_TRAIN") == "1":
            pytest.fail(message)
        pytest.skip(message)


def test_real_open_clip_create_loss_builds_flashcl_losses_and_reverts():
    require_open_clip_train()
    import open_clip
    import open_clip_train.main

    assert open_clip_train.main.create_loss is open_clip.create_loss  # the function main() calls
    check_create_loss(open_clip)


LAUNCHER = '''
"""open_clip_train's main() three times in one process: open_clip's losses, flashcl's (one line), and
open_clip's again after the revert; each run's loss class, every step's losses and the parameters' change."""
import sys

import torch
import open_clip
import open_clip_train.main as training
from flashcl.integrations.open_clip import apply_flashcl_to_open_clip, revert_flashcl_patches

config, output, *argv = sys.argv[1:]
open_clip.add_model_config(config)
create_loss, create_model = training.create_loss, training.create_model_and_transforms
record = {}


def recording_create_loss(args):  # instrumentation only: what main() builds, and what it returns
    loss = create_loss(args)
    record["loss"] = f"{type(loss).__module__}.{type(loss).__name__}"
    loss.register_forward_hook(lambda module, inputs, out: record["steps"].append(
        {name: value.item() for name, value in out.items()}))
    return loss


def recording_create_model(*args, **kwargs):
    model, *transforms = create_model(*args, **kwargs)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None:  # open_clip 3.3.0 leaves CoCa's decoder projection torch.empty: give each run the same
        torch.nn.init.normal_(decoder.text_projection.data, std=decoder.text_projection.shape[0] ** -0.5,
                              generator=torch.Generator().manual_seed(0))
    record["model"], record["initial"] = model, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return (model, *transforms)


training.create_loss, training.create_model_and_transforms = recording_create_loss, recording_create_model
results = {}
for run in ("open_clip", "flashcl", "reverted"):
    if run == "flashcl":
        apply_flashcl_to_open_clip()            # the one line a user adds
    if run == "reverted":
        revert_flashcl_patches()
    record.clear()
    record["steps"] = []
    status = training.main([*argv, "--name", run])
    assert status in (None, 0), f"{run}: main() returned {status}"
    model, initial = record.pop("model"), record.pop("initial")
    record["change"] = {k: v.detach() - initial[k] for k, v in model.state_dict().items() if v.is_floating_point()}
    results[run] = dict(record)
torch.save(results, output)
'''

TINY_VISION = {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
TINY_TEXT = {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_MODELS = {  # open_clip's model config format; CoCa is chosen by "coca" in the model's name
    "flashcl-tiny-clip": {"embed_dim": 16, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT},
    "flashcl-tiny-coca": {
        "embed_dim": 32,  # the decoder attends to the image tokens, projected to embed_dim: its width
        "vision_cfg": {**TINY_VISION, "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 2,
                       "output_tokens": True},
        "text_cfg": {**TINY_TEXT, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {**TINY_TEXT, "layers": 1, "attn_pooler_heads": 2},
        "custom_text": True,
    },
}
WORDS = "a photo of the small red blue green cat dog bird car tree house on in under with".split()


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """n random 16 x 16 PNG images and captions of random words, as open_clip's --dataset-type csv reads them."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir()
    rows = ["filepath\ttitle"]
    for i in range(n):
        path = folder / f"{i}.png"
        Image.frombytes("RGB", (16, 16), bytes(rng.randrange(256) for _ in range(16 * 16 * 3))).save(path)
        rows.append(f"{path}\t{' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))}")
    csv = folder / "train.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.mark.slow
@pytest.mark.scripts
@pytest.mark.parametrize("loss", ["clip", "siglip", "coca"])
def test_open_clip_training_script_with_and_without_flashcl(loss, tmp_path):
    """open_clip_train's main() for 4 steps of a tiny model on a tiny CSV dataset (fp32, CPU): with
    apply_flashcl_to_open_clip() the script builds flashcl's loss, and every step's losses (which after the
    first step depend on the earlier steps' gradients) and the parameters' change over the run are
    open_clip's to fp32 rounding; after the revert, open_clip's run again, bit for bit."""
    require_open_clip_train()
    import json

    model = "flashcl-tiny-coca" if loss == "coca" else "flashcl-tiny-clip"
    config = tmp_path / f"{model}.json"
    config.write_text(json.dumps(TINY_MODELS[model]))
    csv = make_dataset(tmp_path / "data", n=32)
    (tmp_path / "launch.py").write_text(LAUNCHER)
    argv = ["--model", model, "--train-data", str(csv), "--dataset-type", "csv", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "1",
            "--workers", "0", "--precision", "fp32", "--device", "cpu", "--report-to", "", "--seed", "0",
            "--log-every-n-steps", "1", "--logs", str(tmp_path / "logs")]
    if loss == "siglip":
        argv.append("--siglip")
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(tmp_path / "launch.py"), str(config), str(tmp_path / "results.pt"),
                           *argv], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    results = torch.load(tmp_path / "results.pt")

    theirs, ours, reverted = results["open_clip"], results["flashcl"], results["reverted"]
    expected = {"clip": "flashcl.modules.ClipLoss", "siglip": "flashcl.modules.SigLipLoss",
                "coca": "flashcl.integrations.open_clip.CoCaLoss"}[loss]
    assert ours["loss"] == expected
    assert theirs["loss"].startswith("open_clip.loss.") and reverted["loss"] == theirs["loss"]
    assert len(theirs["steps"]) == len(ours["steps"]) == 4
    for step, (a, b) in enumerate(zip(ours["steps"], theirs["steps"])):
        assert list(a) == list(b)
        for name in b:
            assert abs(a[name] - b[name]) <= 1e-4 * abs(b[name]), f"step {step} {name}: {a[name]} vs {b[name]}"
    assert reverted["steps"] == theirs["steps"]
    assert_relative(trained_change(ours), trained_change(theirs), 1e-4, "parameter change")


def trained_change(run):
    """Every parameter's change over a run, flattened, less the attention key biases: softmax attention
    does not depend on them, so their exact gradient is 0 and what is computed is rounding noise, which
    AdamW's normalized steps turn into updates of the learning rate's size (in either loss's run)."""
    parts = []
    for name in sorted(run["change"]):
        change = run["change"][name].flatten()
        if name.endswith("attn.in_proj_bias"):  # (query, key, value) biases: leave out the key's third
            third = change.numel() // 3
            change = torch.cat([change[:third], change[2 * third:]])
        parts.append(change)
    return torch.cat(parts)
