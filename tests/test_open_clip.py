"""Agreement with open_clip's ClipLoss, the loss flashcl.ClipLoss replaces."""
import importlib.util
from pathlib import Path

import pytest
import torch

import flashcl
from conftest import DEVICE, assert_close, require_peer, unit_rows


def load_open_clip_loss():
    """open_clip's loss.py loaded on its own: the package import needs torchvision, loss.py does not."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        require_peer("open_clip")  # skips, or fails under FLASHCL_REQUIRE_PEERS=1
    path = Path(spec.origin).parent / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def open_clip_loss():
    return load_open_clip_loss()


LOG_SCALE = 2.659  # open_clip's initial logit scale, log(1 / 0.07)


@pytest.mark.parametrize("n,d", [(1, 8), (33, 64), (256, 512), (1000, 129)])
@pytest.mark.parametrize("output_dict", [False, True])
def test_loss_and_gradients_match(open_clip_loss, n, d, output_dict, generator):
    image = unit_rows(n, d, generator)
    text = unit_rows(n, d, generator, like=image, noise=1.0)
    results = []
    for loss_module in (open_clip_loss.ClipLoss(), flashcl.ClipLoss()):
        img, txt = image.clone().requires_grad_(), text.clone().requires_grad_()
        log_scale = torch.tensor(LOG_SCALE, device=DEVICE, requires_grad=True)
        out = loss_module(img, txt, log_scale.exp(), output_dict=output_dict)
        loss = out["contrastive_loss"] if output_dict else out
        loss.backward()
        results.append((loss, img.grad, txt.grad, log_scale.grad))
    # Both compute in fp32, in different orders: they agree to fp32 rounding of the logits
    # (the loss is a difference of two terms of the size of the scale).
    scale = float(torch.tensor(LOG_SCALE).exp())
    for name, theirs, ours in zip(("loss", "image grad", "text grad", "log_scale grad"), *results):
        assert_close(ours, theirs, torch.float32, name, magnitude=scale if name == "loss" else 0.0)


def test_logit_bias_does_not_change_the_loss(open_clip_loss, generator):
    image, text = unit_rows(16, 8, generator), unit_rows(16, 8, generator)
    bias = torch.tensor(-3.0, device=DEVICE)
    theirs = open_clip_loss.ClipLoss()(image, text, 10.0, logit_bias=bias)
    ours = flashcl.ClipLoss()(image, text, 10.0, logit_bias=bias)
    torch.testing.assert_close(ours, theirs)


def test_constructor_arguments_match(open_clip_loss):
    import inspect
    theirs = list(inspect.signature(open_clip_loss.ClipLoss.__init__).parameters)
    ours = list(inspect.signature(flashcl.ClipLoss.__init__).parameters)
    assert ours[: len(theirs)] == theirs
    theirs_fwd = list(inspect.signature(open_clip_loss.ClipLoss.forward).parameters)
    assert list(inspect.signature(flashcl.ClipLoss.forward).parameters) == theirs_fwd
