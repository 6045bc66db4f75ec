"""The compiled backends end to end: Triton (on CPU through Triton's interpreter, on CUDA when run
there) and the CUDA extension (on a GPU machine where it was built)."""

import importlib

import pytest
import torch

import flashcl
import reference
from conftest import DEVICE, assert_close, backend_params, check_against_reference, unit_rows
from flashcl.backends import cuda as cuda_backend, fused, triton as triton_backend
from flashcl.primitives import resolve_backend

MAKE = {"triton": triton_backend.make, "cuda": cuda_backend.make}
COMPILED = list(MAKE)  # each a skip line where it cannot run (conftest.backend_params)
HALF_AND_FP32 = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_AND_FP32, ids=str)
@pytest.mark.parametrize("n,m,d", [(1, 7, 3), (33, 130, 48), (130, 33, 100)])
@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_infonce(backend, dtype, n, m, d, generator):
    queries, keys = unit_rows(n, d, generator), unit_rows(m, d, generator)
    targets = torch.randint(0, m, (n,), generator=generator, device=DEVICE)
    check_against_reference(flashcl.infonce_loss, reference.infonce, [queries, keys], 100.0, dtype, "mean",
                            backend=backend, targets=targets)


@pytest.mark.parametrize("dtype", HALF_AND_FP32, ids=str)
@pytest.mark.parametrize("n,d", [(7, 3), (130, 48)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_clip(backend, dtype, n, d, reduction, generator):
    image = unit_rows(n, d, generator)
    text = unit_rows(n, d, generator, like=image)
    check_against_reference(flashcl.clip_loss, reference.clip, [image, text], 30.0, dtype, reduction,
                            backend=backend)


@pytest.mark.parametrize("dtype", HALF_AND_FP32, ids=str)
@pytest.mark.parametrize("n,d", [(1, 5), (33, 100)])
@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_nt_xent(backend, dtype, n, d, generator):
    z1 = unit_rows(n, d, generator)
    z2 = unit_rows(n, d, generator, like=z1)
    check_against_reference(flashcl.nt_xent_loss, reference.nt_xent, [z1, z2], 10.0, dtype, "sum",
                            backend=backend)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_strided_inputs(backend, layout, generator):
    base = unit_rows(40, 24, generator)
    image = {"transposed": lambda: base.T.contiguous().T,
             "sliced": lambda: unit_rows(40, 48, generator)[:, ::2],
             "expanded": lambda: base[:1].expand(40, 24)}[layout]()
    text = unit_rows(40, 24, generator, like=base)
    assert not image.is_contiguous()
    check_against_reference(flashcl.clip_loss, reference.clip, [image, text], 10.0, torch.float32, "mean",
                            backend=backend)


@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_deterministic_mode_is_bit_identical_and_agrees(backend, generator):
    x, y, s = unit_rows(70, 20, generator), unit_rows(50, 20, generator), torch.tensor(20.0, device=DEVICE)
    exact = resolve_backend("torch", x)
    deterministic = MAKE[backend](deterministic=True)
    merged = MAKE[backend](deterministic=False)
    first, second = deterministic.lse(x, y, s, rows=True, cols=True), deterministic.lse(x, y, s, rows=True, cols=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    want = exact.lse(x, y, s, rows=True, cols=True)
    for got in (first, merged.lse(x, y, s, rows=True, cols=True)):
        assert_close(got[0], want[0], torch.float32, "rows", magnitude=20.0)
        assert_close(got[1], want[1], torch.float32, "cols", magnitude=20.0)
    grads = [deterministic.weighted_grad(x, y, s, a=torch.ones(70, device=DEVICE), o=want[0], b=torch.ones(50, device=DEVICE), p=want[1],
                                             need_ds=True) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_deterministic_follows_torch_setting(backend):
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert MAKE[backend]().deterministic
        torch.use_deterministic_algorithms(False)
        assert not MAKE[backend]().deterministic
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_large_chunked_backward_matches(backend, generator, monkeypatch):
    """Rows beyond one scratch chunk: the chunk loop must cover every row exactly once."""
    monkeypatch.setattr(fused, "SCRATCH_BYTES", 4 * 16 * 128)  # 128-row chunks at D = 16
    x, y, s = unit_rows(300, 16, generator), unit_rows(290, 16, generator), torch.tensor(5.0, device=DEVICE)
    rows, cols = reference.lse(x.double(), y.double(), s.double())
    a, b = torch.randn(300, generator=generator, device=DEVICE), torch.randn(290, generator=generator, device=DEVICE)
    terms = dict(a=a, o=rows.float(), b=b, p=cols.float())
    got = resolve_backend(backend, x).weighted_grad(x, y, s, **terms, need_ds=True)
    want = reference.weighted_grad(x, y, s, **terms)
    for name, g, w in zip(("dx", "dy", "ds"), got, want):
        assert_close(g, w, torch.float32, name, magnitude=10 * float(a.abs().max() + b.abs().max()))


def test_chunks_are_whole_waves_of_resident_programs():
    assert fused.rows_per_chunk(768) == fused.SCRATCH_BYTES // (4 * 768) == 10922  # no GPU: the budget
    # Triton on 132 multiprocessors: 128-row programs, one each. The budget's 10922 rows would launch
    # 86 programs: rounded up to one wave, 16896.
    wave = 128 * 132
    assert fused.rows_per_chunk(768, wave) == wave
    assert fused.rows_per_chunk(256, wave) == 2 * wave  # 32768 rows in the budget: two waves
    # CUDA C++ with 4 resident 64-row blocks per multiprocessor: 33792 rows a wave.
    assert fused.rows_per_chunk(768, 4 * 64 * 132) == 4 * 64 * 132
    assert fused.rows_per_chunk(768, wave, rows=5000) == 5000  # never more than there are
    assert fused.rows_per_chunk(2**20) == fused.MIN_CHUNK_ROWS
    for dim in (3, 100, 768, 4096):  # at most one wave past the budget
        assert fused.rows_per_chunk(dim, wave) * 4 * dim < max(fused.SCRATCH_BYTES, 4 * dim * fused.MIN_CHUNK_ROWS) \
            + 4 * dim * wave


@pytest.mark.skipif(triton_backend.missing_reason() is not None, reason="Triton is not installed")
def test_triton_waves_cover_the_tallest_config():
    from flashcl.triton_kernels import _config

    tallest = max(max(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_C"]) for configs in (
        _config.lse_configs, _config.softplus_configs, _config.backward_configs) for c in configs())
    assert tallest <= _config.MAX_TILE_SIDE
    assert triton_backend.resident_rows(torch.bfloat16) == max(c.kwargs["BLOCK_R"] for c in _config.backward_configs())


@pytest.mark.skipif(triton_backend.missing_reason() is not None, reason="Triton is not installed")
def test_triton_kernels_refuse_row_counts_past_32_bits():
    from flashcl.triton_kernels import lse_forward, softplus_sums, weighted_products

    from flashcl.triton_kernels._config import MAX_ROWS, MAX_TILE_SIDE, check_row_counts

    assert MAX_ROWS == 2**31 - MAX_TILE_SIDE
    check_row_counts(MAX_ROWS)  # the last tile's indices reach 2**31 - 1: fine
    huge = torch.zeros(1, 4, device=DEVICE).expand(MAX_ROWS + 1, 4)  # no memory behind the rows
    small, scale = torch.zeros(3, 4, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    message = rf"at most 2\*\*31 - {MAX_TILE_SIDE} rows per operand .*, got {MAX_ROWS + 1}"
    with pytest.raises(ValueError, match=message):
        lse_forward.lse_forward(small, huge, scale, False, True)
    with pytest.raises(ValueError, match=message):
        weighted_products.weighted_products(huge, small, scale, *[None] * 6, 0, False, 0, 3)
    with pytest.raises(ValueError, match=message):
        softplus_sums.softplus_sums(small, huge, scale, scale.reshape(1), False)


@pytest.mark.skipif(triton_backend.missing_reason() is not None, reason="Triton is not installed")
def test_triton_unavailable_reasons(monkeypatch):
    assert "float16, bfloat16 or float32" in triton_backend.unavailable_reason(torch.device("cpu"), torch.float64)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run on cpu torch.float64 tensors: .*"
                                           r"Available for these tensors: torch"):
        cpu64 = torch.randn(3, 2, dtype=torch.float64, device="cpu")
        flashcl.clip_loss(cpu64, cpu64, 1.0, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "need CUDA tensors" in triton_backend.unavailable_reason(torch.device("cpu"), torch.float32)


def test_auto_does_not_pick_the_triton_interpreter():
    assert resolve_backend("auto", torch.randn(2, 2, device="cpu")).name == "torch"


requires_triton = pytest.mark.skipif(triton_backend.missing_reason() is not None, reason="Triton is not installed")
AUTOTUNING = triton_backend.INSTALLED and importlib.import_module("flashcl.triton_kernels._config").AUTOTUNE


@pytest.fixture
def float32_precision_settings():
    """Restores torch's fp32 matmul precision settings, new API and legacy, after a test changes them."""
    matmul, generic = torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision
    yield
    torch.backends.fp32_precision = generic
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.get_float32_matmul_precision()  # consistent again: the legacy getter no longer raises


@requires_triton
@pytest.mark.parametrize("setting,expected", [
    (lambda: None, "ieee"),
    (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
    (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), "tf32"),
    (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"), "ieee"),
    (lambda: setattr(torch.backends, "fp32_precision", "tf32"), "tf32"),  # cuda.matmul "none" defers to it
])
def test_float32_precision_follows_either_torch_api(float32_precision_settings, setting, expected, generator):
    """torch's new per-backend API makes the legacy getter raise once used: reading the precision must
    not, and an fp32 loss through the Triton kernels must still run."""
    from flashcl.triton_kernels import _config

    setting()
    assert _config.dot_precision(torch.float32) == expected
    assert _config.dot_precision(torch.bfloat16) == "ieee"
    x, y = unit_rows(20, 8, generator), unit_rows(20, 8, generator)
    torch.testing.assert_close(flashcl.clip_loss(x, y, 5.0, backend="triton"), flashcl.clip_loss(x, y, 5.0, backend="torch"))


class _Launches:
    """A Triton kernel's stand-in: `kernel[grid](*args, **kwargs)` records the keyword arguments."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


class _Autotuned(_Launches):
    """An autotuned kernel's stand-in: its configs, and the jit function it wraps as .fn."""

    def __init__(self, configs):
        super().__init__()
        self.configs, self.fn = configs, _Launches()


@requires_triton
def test_fixed_config_launches_the_first_config_on_the_tensors_device(monkeypatch):
    """Deterministic runs launch one config (the autotuner's pick can differ between processes, and
    with it the summation order), and every launch happens under the tensors' device."""
    import triton

    from flashcl.triton_kernels import _config

    entered = []

    class RecordingDeviceGuard:  # torch.cuda.device needs a GPU to enter
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    monkeypatch.setattr(torch.cuda, "device", RecordingDeviceGuard)
    configs = [triton.Config(dict(BLOCK_R=64), num_warps=8), triton.Config(dict(BLOCK_R=32), num_warps=4)]
    tuned = _Autotuned(configs)
    _config.launch(tuned, (1,), (1, 2), dict(FLAG=True), fixed_config=False, device=torch.device("cuda:1"))
    _config.launch(tuned, (1,), (1, 2), dict(FLAG=True), fixed_config=True, device=torch.device("cuda:1"))
    assert tuned.calls == [dict(FLAG=True)]  # the autotuner chose
    assert tuned.fn.calls == [dict(FLAG=True, **configs[0].all_kwargs())]  # the first config, pinned
    assert entered == [torch.device("cuda:1"), None] * 2
    _config.launch(tuned, (1,), (), {}, fixed_config=False, device=torch.device("cpu"))  # the interpreter: no guard
    assert len(entered) == 4


@requires_triton
def test_deterministic_backend_pins_the_config():
    for deterministic in (True, False):
        kernels = triton_backend.make(deterministic=deterministic)
        assert kernels.deterministic is deterministic
        assert kernels._lse_forward.keywords == kernels._products.keywords == kernels._softplus_sums.keywords \
            == dict(fixed_config=deterministic)


@requires_triton
def test_autotuning_keys_on_problem_size_and_kernel_flags():
    """A choice tuned at N = 4096 must not be reused at 65536, nor one for the merged forward
    for the rows-only one; a ragged batch shares its power-of-two bucket's choice."""
    from flashcl.triton_kernels import _config, lse_forward, softplus_sums, weighted_products

    assert set(lse_forward._lse_forward_tuned.keys) >= {"dim", "rows_bucket", "cols_bucket", "EXCLUDE_DIAGONAL",
                                                        "MERGE_COLUMNS", "PRECISION"}
    assert set(softplus_sums._softplus_sums_tuned.keys) >= {"dim", "rows_bucket", "cols_bucket", "EXCLUDE_DIAGONAL",
                                                            "PRECISION"}
    assert set(weighted_products._weighted_products_tuned.keys) >= {
        "dim", "rows_bucket", "cols_bucket", "HAS_ROW_TERM", "HAS_COL_TERM", "POSITIVES", "EXCLUDE_DIAGONAL",
        "PRECISION"}
    assert [_config.size_bucket(n) for n in (1, 4000, 4096, 4097, 65536)] == [1, 4096, 4096, 8192, 65536]


@pytest.mark.skipif(DEVICE.type != "cuda" or not AUTOTUNING, reason="autotuning runs on a GPU with FLASHCL_TRITON_AUTOTUNE=1 (gpu_suite.sh's test phase)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autotuned_kernels_match(dtype, generator):
    """The autotuner times every config on the real buffers, zeroing the column statistics, locks
    and accumulators between runs (reset_to_zero): the first call, which tunes, and the next,
    which reuses the choice, both give the exact loss and gradients."""
    from flashcl.triton_kernels import lse_forward, weighted_products

    image = unit_rows(3000, 256, generator)
    text = unit_rows(3000, 256, generator, like=image)
    for _ in range(2):
        check_against_reference(flashcl.clip_loss, reference.clip, [image, text], 30.0, dtype, "mean",
                                backend="triton")
    assert lse_forward._lse_forward_tuned.cache and weighted_products._weighted_products_tuned.cache


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", backend_params(COMPILED))
def test_tensors_on_another_device_than_the_current_one(backend, generator):
    """Kernels launch on the tensors' device and its current stream, not the current device's."""
    image = unit_rows(200, 64, generator).to("cuda:1").requires_grad_()
    text = unit_rows(200, 64, generator, like=image).to("cuda:1")
    with torch.cuda.device(0):
        loss = flashcl.clip_loss(image, text, 10.0, backend=backend)
        (grad,) = torch.autograd.grad(loss, image)
    want = reference.clip(image.double(), text.double(), 10.0)
    (want_grad,) = torch.autograd.grad(want, image)
    assert_close(loss, want, torch.float32, "loss", magnitude=10.0)
    assert_close(grad, want_grad, torch.float32, "grad", magnitude=20.0 / 200)
