"""Small batch to large batch: the textbook (materialized) CLIP loss against flashcl.

Forward + backward of the symmetric CLIP loss on unit-norm random features, with a
learnable logit scale. Each (implementation, batch, dim) point runs in a fresh
subprocess so peak memory is its own: the RSS high-water mark above the RSS after the
inputs were made (CPU), or torch.cuda.max_memory_allocated above the inputs (CUDA).
Time is the median of several runs after one warm-up.

    python benchmarks/bench_clip_loss.py                  # CPU unless a GPU is present
    python benchmarks/bench_clip_loss.py --batch-sizes 256 1024 --dims 256

Writes <out>.json (every measurement plus the machine), <out>.png (log-log plot) and
<out>.md (the table the README quotes).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("textbook", "flashcl")
RESULTS = Path(__file__).resolve().parent / "results"


def clip_loss_textbook(image, text, logit_scale):
    """open_clip's single-process ClipLoss: the full N x N logits, twice."""
    import torch
    import torch.nn.functional as F

    logits_per_image = logit_scale * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def current_rss() -> int:
    """Resident bytes now, after handing freed heap back to the OS: memory freed earlier
    would otherwise be reused silently and hide part of the next allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl: str, batch: int, dim: int, device: str, dtype: str, repeats: int) -> dict:
    """One point, in its own process; returns peak bytes above the inputs and run times."""
    import torch
    import torch.nn.functional as F

    import flashcl

    loss_fn = clip_loss_textbook if impl == "textbook" else flashcl.clip_loss
    # One tiny call first, so one-time set-up (thread pools, lazy library loads) is not counted.
    tiny = torch.randn(8, dim, device=device, requires_grad=True)
    loss_fn(tiny, tiny.detach(), torch.tensor(10.0, device=device)).backward()
    generator = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(batch, dim, device=device, generator=generator), dim=1)
    image = image.to(getattr(torch, dtype)).requires_grad_()
    text = text.to(getattr(torch, dtype)).requires_grad_()
    logit_scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    cuda = device.startswith("cuda")

    def step():
        image.grad = text.grad = logit_scale.grad = None
        loss_fn(image, text, logit_scale).backward()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = current_rss()
    times = []
    try:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"peak_bytes": peak, "times_s": times[1:], "median_s": statistics.median(times[1:])}


def git_commit() -> str:
    """This checkout's commit, marked -dirty when it has uncommitted changes."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> dict:
    import torch

    import flashcl

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor())
    return {
        "device": name, "device_type": device, "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "torch": torch.__version__, "flashcl": flashcl.__version__,
        "python": platform.python_version(),
    }


def run_point(impl, batch, dim, device, dtype, repeats) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--batch-sizes", str(batch), "--dims", str(dim),
           "--device", device, "--dtype", dtype, "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        # A process killed for memory (the textbook loss at large batch) is a result, not a crash.
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(points: list[dict]) -> str:
    """Markdown: one row per (batch, dim), both implementations side by side."""
    rows = ["| batch | dim | textbook time | flashcl time | time ratio | textbook peak | flashcl peak | memory ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(p["batch"], p["dim"], p["impl"]): p for p in points}
    for batch, dim in sorted({(p["batch"], p["dim"]) for p in points}, key=lambda k: (k[1], k[0])):
        tb, fc = by_key.get((batch, dim, "textbook"), {}), by_key.get((batch, dim, "flashcl"), {})

        def t(p):
            return f"{p['median_s'] * 1e3:.1f} ms" if "median_s" in p else p.get("error", "-")

        def mem(p):
            return f"{p['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in p else "-"

        ratio_t = f"{fc['median_s'] / tb['median_s']:.2f}x" if "median_s" in tb and "median_s" in fc else "-"
        ratio_m = (f"{100 * fc['peak_bytes'] / tb['peak_bytes']:.1f}%"
                   if "peak_bytes" in tb and "peak_bytes" in fc and tb["peak_bytes"] > 0 else "-")
        rows.append(f"| {batch} | {dim} | {t(tb)} | {t(fc)} | {ratio_t} | {mem(tb)} | {mem(fc)} | {ratio_m} |")
    return "\n".join(rows)


def plot(points: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"textbook": dict(color="tab:red", marker="o"), "flashcl": dict(color="tab:blue", marker="s")}
    for impl in IMPLEMENTATIONS:
        for dim, line in zip(sorted({p["dim"] for p in points}), ("-", "--", ":")):
            ok = sorted((p for p in points if p["impl"] == impl and p["dim"] == dim and "median_s" in p),
                        key=lambda p: p["batch"])
            if not ok:
                continue
            batches = [p["batch"] for p in ok]
            label = f"{impl}, D={dim}"
            ax_mem.plot(batches, [max(p["peak_bytes"], 1) / 2**20 for p in ok], linestyle=line, label=label,
                        **styles[impl])
            ax_time.plot(batches, [p["median_s"] * 1e3 for p in ok], linestyle=line, label=label, **styles[impl])
    for ax, ylabel in ((ax_mem, "peak memory above inputs (MiB)"), (ax_time, "forward + backward (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N = M")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"CLIP loss, {meta['dtype']}, {meta['device']} ({meta['device_type']}, "
                 f"{meta['cpu_threads']} threads), torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    parser.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point, after one warm-up")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/clip_loss_<device>)")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_sizes[0], args.dims[0], args.device, args.dtype,
                                args.repeats)))
        return

    from tqdm import tqdm

    meta = {**machine(args.device), "dtype": args.dtype, "repeats": args.repeats}
    grid = [(impl, batch, dim) for dim in args.dims for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    points = []
    for impl, batch, dim in tqdm(grid, desc="clip loss points", unit="point"):
        points.append({"impl": impl, "batch": batch, "dim": dim,
                       **run_point(impl, batch, dim, args.device, args.dtype, args.repeats)})

    stem = args.out or RESULTS / f"clip_loss_{args.device.split(':')[0]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"machine": meta, "points": points}, indent=2) + "\n")
    markdown = table(points)
    header = (f"CLIP loss forward + backward, {args.dtype}, {meta['device']} ({meta['cpu_threads']} threads), "
              f"torch {meta['torch']}, flashcl {meta['commit']}, {meta['date'][:10]}; "
              f"median of {args.repeats} runs; peak memory above the inputs.")
    stem.with_suffix(".md").write_text(header + "\n\n" + markdown + "\n")
    plot(points, meta, stem.with_suffix(".png"))
    print(header + "\n\n" + markdown)
    print(f"\nwrote {stem.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
