"""flashcl against its peers on a GPU: symmetric CLIP loss (or SigLIP's, --loss siglip), forward +
backward, one process.

Contenders, each run on the same random unit-norm bf16 features with a learnable logit scale:
  triton    flashcl.clip_loss(backend="triton")
  cuda      flashcl.clip_loss(backend="cuda") (skipped if the extension is not built)
  textbook  the materialized loss in eager PyTorch (open_clip's single-process math)
  open_clip open_clip's ClipLoss, loaded from its loss.py (skipped if not installed)
  inf_cl    Inf-CL, two calls of cal_inf_loss (q, k) and (k, q) (skipped if not installed)
With --loss siglip: flashcl.siglip_loss on triton and cuda, "textbook" the materialized sigmoid
loss, open_clip its SigLipLoss, siglip_kernel the siglip-kernel package's fused_siglip_loss (its
automatic backend); logit bias -10, learnable (inf_cl has no sigmoid loss).

Reports the median time of forward + backward (triton.testing.do_bench), for flashcl's
backends also of the forward alone, the peak memory above inputs and gradients, and the
fraction of the floor of docs/design.md:
  floor = max(8 N M D / matmul rate, 2 N M / exp rate)
with both rates measured in this run on this device. Out-of-memory is a result ("OOM").
The JSON also records the Triton configs the autotuner chose, for tuning the grid.

    python benchmarks/bench_gpu.py                    # the issue's grid
    python benchmarks/bench_gpu.py --dims 768 --batch-sizes 4096 --contenders triton textbook
    python benchmarks/bench_gpu.py --loss siglip --dims 768 --batch-sizes 16384 65536 --extra

Writes <out>.json (the harness's results schema) and <out>.png. Without CUDA it runs on the CPU with wall-clock
timing, for smoke tests only.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import flashcl
import harness
from peers import clip_loss_textbook, open_clip_loss_module

RESULTS = Path(__file__).resolve().parent / "results"
FLASHCL_BACKENDS = ("triton", "cuda")
CONTENDERS = (*FLASHCL_BACKENDS, "textbook", "open_clip", "inf_cl", "siglip_kernel")


def load_contender(name, device, dtype, loss="clip"):
    """The loss function (image, text, scale) of a contender, or None when it cannot run here."""
    if loss == "siglip":
        return load_siglip_contender(name, device, dtype)
    if name in FLASHCL_BACKENDS:
        # available_backends, not backend="cuda" alone: that falls back, with a warning, to another backend
        if name not in flashcl.available_backends(device, dtype):
            return None
        return functools.partial(flashcl.clip_loss, backend=name)
    if name == "textbook":
        return clip_loss_textbook
    if name == "open_clip":
        module = open_clip_loss_module()
        return None if module is None else module.ClipLoss()
    if name == "siglip_kernel":
        return None  # a sigmoid loss only
    if name == "inf_cl":
        if importlib.util.find_spec("inf_cl") is None:
            return None
        from inf_cl import cal_inf_loss

        return lambda image, text, scale: (cal_inf_loss(image, text, scale=scale) +
                                           cal_inf_loss(text, image, scale=scale)) / 2
    raise ValueError(name)


def load_siglip_contender(name, device, dtype):
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    if name in FLASHCL_BACKENDS:
        if name not in flashcl.available_backends(device, dtype):
            return None
        return lambda image, text, scale: flashcl.siglip_loss(image, text, scale, bias, backend=name)
    if name == "textbook":
        def textbook(image, text, scale):
            logits = scale * image @ text.T + bias
            labels = 2 * torch.eye(image.shape[0], device=device, dtype=logits.dtype) - 1
            return -F.logsigmoid(labels * logits).sum() / image.shape[0]

        return textbook
    if name == "open_clip":
        module = open_clip_loss_module()
        if module is None:
            return None
        siglip = module.SigLipLoss()
        return lambda image, text, scale: siglip(image, text, scale, bias)
    if name == "siglip_kernel":
        if importlib.util.find_spec("siglip_kernel") is None:
            return None
        from siglip_kernel import fused_siglip_loss

        return lambda image, text, scale: fused_siglip_loss(image, text, scale.log(), bias)  # takes log(scale)
    return None


def median_ms(fn, device, grad_to_none):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(4):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def matmul_tflops(device):
    """bf16 (fp32 on CPU) 8192^3 product rate on random data."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, device, []) * 1e-3) / 1e12


def exp_rate(device):
    """Exponentials per second when nothing else limits them: a Triton kernel doing chains of exps in registers."""
    if device.type != "cuda":
        x = torch.randn(2**22)
        return x.numel() / (median_ms(lambda: torch.exp(x), device, []) * 1e-3)
    import triton
    import triton.language as tl

    @triton.jit
    def exp_chain(x_ptr, n_exps: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs)
        for _ in range(n_exps):
            v = tl.exp(-v * v)  # stays in (0, 1]: no overflow, no denormals
        tl.store(x_ptr + offs, v)

    block, n_exps = 1024, 256
    x = torch.rand(132 * 64 * block, device=device)
    ms = median_ms(lambda: exp_chain[(x.numel() // block,)](x, n_exps, BLOCK=block), device, [])
    return x.numel() * n_exps / (ms * 1e-3)


def measure(loss_fn, n, d, device, dtype, forward_alone=False):
    generator = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, device=device, generator=generator), dim=1)
    image, text = image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    leaves = [image, text, log_scale]

    def step():
        loss = loss_fn(image, text, log_scale.exp())
        loss.backward()
        return loss

    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        loss = step().item()
        grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves)
        peak = torch.cuda.max_memory_allocated() - baseline - grads if device.type == "cuda" else None
        ms = median_ms(step, device, leaves)
        forward_ms = None
        if forward_alone:
            with torch.no_grad():
                forward_ms = median_ms(lambda: loss_fn(image, text, log_scale.exp()), device, [])
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        for t in leaves:
            t.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"median_s": ms / 1e3, "forward_median_s": None if forward_ms is None else forward_ms / 1e3, "loss": loss,
            "peak_bytes": peak}


def triton_choices():
    """Per kernel: the config the autotuner chose for each key (D and dtypes), and the
    timings (median, 20th, 80th percentile ms) of every config at the last key it tuned."""
    try:
        from flashcl.triton_kernels import lse_forward, softplus_sums, weighted_products
    except ImportError:
        return {}
    tuned = {"lse_forward": lse_forward._lse_forward_tuned, "softplus_sums": softplus_sums._softplus_sums_tuned,
             "weighted_products": weighted_products._weighted_products_tuned}
    return {name: {"chosen": {str(key): str(config) for key, config in kernel.cache.items()}
                   or {"(one config)": str(kernel.configs[0])},
                   "last_timings_ms": {str(config): ms for config, ms in getattr(kernel, "configs_timings", {}).items()}}
            for name, kernel in tuned.items()}


def peer_versions():
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package, distribution in (("inf_cl", "inf-cl"), ("open_clip", "open_clip_torch"),
                                  ("siglip_kernel", "siglip-kernel")):
        if importlib.util.find_spec(package) is not None:
            try:
                versions[package] = version(distribution)
            except PackageNotFoundError:
                versions[package] = "unknown"
    return versions


def tables(results):
    settings = results["settings"]
    what = "SigLIP's sigmoid loss" if settings["loss"] == "siglip" else "Symmetric CLIP loss"
    caption = (f"{what}, forward + backward, {settings['dtype']}; matmul {settings['matmul_tflops']:.3g} TFLOP/s and "
               f"{settings['exp_per_s'] / 1e12:.3g} Texp/s measured in the same run; median time; the floor is "
               f"{settings['floor']}; peak memory above the inputs and their gradients.")
    rows = results["rows"]

    def fastest_flashcl(row):
        ours = [r["median_s"] for r in rows if (r["batch"], r["dim"]) == (row["batch"], row["dim"])
                and r["impl"] in FLASHCL_BACKENDS and "median_s" in r]
        return min(ours) if ours else None

    def measured(cell):
        return lambda row: cell(row) if "median_s" in row else ""

    table = harness.markdown_table([
        ("N", lambda r: r["batch"]), ("D", lambda r: r["dim"]), ("contender", lambda r: r["impl"]),
        ("time", lambda r: harness.time_or_error(r, 2)),
        ("forward", measured(lambda r: harness.ms(r.get("forward_median_s"), 2))),
        ("% of floor", measured(lambda r: f"{100 * r['floor_s'] / r['median_s']:.0f}%")),
        ("vs fastest flashcl", measured(lambda r: harness.ratio(r["median_s"], fastest_flashcl(r)))),
        ("peak", measured(lambda r: harness.mib(r.get("peak_bytes"))))], rows, align="rrlrrrrr")
    return {settings["loss"]: caption + "\n\n" + table}


def plot(results, path):
    rows = results["rows"]
    floors = [{"impl": "floor", "batch": r["batch"], "dim": r["dim"], "median_s": r["floor_s"]}
              for r in rows if r["impl"] == rows[0]["impl"]]
    harness.plot_lines(rows + floors, path, x="batch", series=lambda r: r["impl"], facet=lambda r: f"D = {r['dim']}",
                       panels=[("median_s", "forward + backward (ms)", 1e-3)],
                       style=lambda r: {"color": "k", "linestyle": "--", "marker": ""} if r["impl"] == "floor" else {},
                       title=f"{results['settings']['loss']} loss, {results['provenance']['machine']['device']}",
                       xlabel="N = M")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 768, 1024])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--extra", nargs="*", default=["262144:768"], help="extra N:D points")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS,
                        help="default: every contender of the loss (inf_cl for clip, siglip_kernel for siglip)")
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/<loss>_loss_<device>)")
    args = parser.parse_args()
    if args.contenders is None:
        args.contenders = [c for c in CONTENDERS if c != ("inf_cl" if args.loss == "siglip" else "siglip_kernel")]

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from tqdm import tqdm

    settings = {"loss": args.loss, "dtype": str(dtype)[6:], "matmul_tflops": matmul_tflops(device),
                "exp_per_s": exp_rate(device), "floor": "max(8 N M D / matmul rate, 2 N M / exp rate)",
                "peak": "above the inputs and their gradients", "peer_versions": peer_versions()}
    results = harness.new_results(__file__, settings, str(device))
    grid = [(n, d) for d in args.dims for n in args.batch_sizes]
    grid += [tuple(int(v) for v in point.split(":")) for point in args.extra]
    loss_fns = {name: load_contender(name, device, dtype, args.loss) for name in args.contenders}
    for (n, d), name in tqdm([(shape, name) for shape in grid for name in args.contenders], desc="points"):
        floor_s = max(8 * n * n * d / (settings["matmul_tflops"] * 1e12), 2 * n * n / settings["exp_per_s"])
        row = {"impl": name, "batch": n, "dim": d, "floor_s": floor_s}
        if loss_fns[name] is None:
            row["error"] = "not available"
        elif name == "inf_cl" and d % 256:
            row["error"] = "D not a multiple of 256"
        else:
            row.update(measure(loss_fns[name], n, d, device, dtype, forward_alone=name in FLASHCL_BACKENDS))
        results["rows"].append(row)
    results["triton_configs"] = triton_choices()

    device_name = results["provenance"]["machine"]["device"].replace(" ", "_")
    harness.finish(args.out or RESULTS / f"{args.loss}_loss_{device.type}_{device_name}", results, tables, plot)


if __name__ == "__main__":
    main()
