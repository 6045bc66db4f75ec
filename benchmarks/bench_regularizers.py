"""The CVPR 2023 regularizers: flashcl's exact forms against the materialized forms a user would write.

Forward + backward of each regularizer on unit-norm random features (all inputs require grad),
each (regularizer, implementation, batch, dim) point in a fresh subprocess so its peak memory is
its own (RSS high-water mark above the inputs; CUDA: max_memory_allocated above the inputs),
time the median of several runs after a warm-up. The materialized forms:

    geometric   (v t'  - (v t')')^2 and (v v' - t t')^2 as N x N matrices, averaged
    bridge      torch.cdist(augmented, bridge means)^2 as N x N logits, cross-entropy
    separation  <z_i, p_i>^2 and Wang & Isola's uniformity torch.pdist(p)^2 (N(N-1)/2 distances)

    python benchmarks/bench_regularizers.py                       # N 1024..16384, D 256 and 768
    python benchmarks/bench_regularizers.py --batch-sizes 1024 --dims 256 --repeats 1

Writes <out>.json, <out>.md (the README's table) and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_clip_loss import current_rss, machine

REGULARIZERS = ("geometric", "bridge", "separation")
IMPLEMENTATIONS = ("materialized", "flashcl")
RESULTS = Path(__file__).resolve().parent / "results"
BRIDGE_T = 0.25


def materialized(name):
    import torch
    import torch.nn.functional as F

    def geometric(v, t, _):
        vt = v @ t.T
        return ((vt - vt.T) ** 2).mean() + ((v @ v.T - t @ t.T) ** 2).mean()

    def bridge(v, t, augmented):
        means = (1 - BRIDGE_T) * v + BRIDGE_T * t
        logits = -torch.cdist(augmented, means) ** 2 / (2 * BRIDGE_T * (1 - BRIDGE_T))
        return F.cross_entropy(logits, torch.arange(v.shape[0], device=v.device))

    def separation(shared, private, _):
        uniformity = torch.pdist(private, p=2).pow(2).mul(-2.0).exp().mean().log()
        return ((shared * private).sum(1) ** 2).mean() + uniformity

    return {"geometric": geometric, "bridge": bridge, "separation": separation}[name]


def exact(name):
    import flashcl

    return {"geometric": lambda v, t, _: flashcl.geometric_consistency_loss(v, t),
            "bridge": lambda v, t, a: flashcl.brownian_bridge_loss(v, t, a, BRIDGE_T),
            "separation": lambda z, p, _: flashcl.feature_separation_loss(z, p)}[name]


def worker(name: str, impl: str, batch: int, dim: int, device: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    loss_fn = (materialized if impl == "materialized" else exact)(name)
    loss_fn(*[torch.randn(8, dim, device=device, requires_grad=True) for _ in range(3)]).backward()  # set-up
    generator = torch.Generator(device=device).manual_seed(0)
    first = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=1)
    inputs = [first] + [F.normalize(first + 0.5 * torch.randn(batch, dim, device=device, generator=generator), dim=1)
                        for _ in range(2)]
    return measure(lambda: loss_fn(*inputs), [x.requires_grad_() for x in inputs], device, repeats)


def measure(loss, leaves, device: str, repeats: int) -> dict:
    """Peak memory above what is allocated now and the median time of `repeats` forward + backward
    runs of loss() (after one untimed), with every leaf's gradient reset between runs."""
    import torch

    cuda = device.startswith("cuda")

    def step():
        for x in leaves:
            x.grad = None
        loss().backward()
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
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - baseline
    return {"peak_bytes": peak, "times_s": times[1:], "median_s": statistics.median(times[1:])}


def run_point(name, impl, batch, dim, device, repeats, script=__file__) -> dict:
    """One point in a fresh process of `script` (its --worker entry), so its peak memory is its own."""
    cmd = [sys.executable, script, "--worker", name, impl, "--batch-sizes", str(batch), "--dims", str(dim),
           "--device", device, "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # killed for memory is a result, not a crash
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(points: list, kind: str = "regularizer", names=REGULARIZERS, baseline: str = "materialized") -> str:
    """flashcl against `baseline` per (name, batch, dim): times, peaks and their ratios."""
    rows = [f"| {kind} | batch | dim | {baseline} time | flashcl time | time ratio | {baseline} peak "
            "| flashcl peak | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(p[kind], p["batch"], p["dim"], p["impl"]): p for p in points}
    keys = sorted({(p[kind], p["batch"], p["dim"]) for p in points},
                  key=lambda k: (names.index(k[0]), k[2], k[1]))
    for name, batch, dim in keys:
        ref, ours = by_key.get((name, batch, dim, baseline), {}), by_key.get((name, batch, dim, "flashcl"), {})
        t = lambda p: f"{p['median_s'] * 1e3:.1f} ms" if "median_s" in p else p.get("error", "-")
        mem = lambda p: f"{p['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in p else "-"
        ratio_t = f"{ours['median_s'] / ref['median_s']:.2f}x" if "median_s" in ref and "median_s" in ours else "-"
        ratio_m = (f"{100 * ours['peak_bytes'] / ref['peak_bytes']:.1f}%"
                   if "peak_bytes" in ref and "peak_bytes" in ours and ref["peak_bytes"] > 0 else "-")
        rows.append(f"| {name} | {batch} | {dim} | {t(ref)} | {t(ours)} | {ratio_t} | {mem(ref)} | {mem(ours)} "
                    f"| {ratio_m} |")
    return "\n".join(rows)


def plot(points: list, meta: dict, path: Path, kind: str = "regularizer", names=REGULARIZERS,
         impls=IMPLEMENTATIONS, title: str = "CVPR 2023 regularizers") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if any(p[kind] == n for p in points)]
    fig, axes = plt.subplots(2, len(names), figsize=(4.4 * len(names), 7), sharex=True, squeeze=False)
    colors = dict(zip(impls, ("tab:red", "tab:blue")))
    for column, name in enumerate(names):
        for impl in impls:
            for dim, line in zip(sorted({p["dim"] for p in points}), ("-", "--", ":")):
                ok = sorted((p for p in points if (p[kind], p["impl"], p["dim"]) == (name, impl, dim)
                             and "median_s" in p), key=lambda p: p["batch"])
                if not ok:
                    continue
                style = dict(color=colors[impl], linestyle=line, marker="s" if impl == "flashcl" else "o",
                             label=f"{impl}, D={dim}")
                axes[0, column].plot([p["batch"] for p in ok], [max(p["peak_bytes"], 2**20) / 2**20 for p in ok],
                                     **style)
                axes[1, column].plot([p["batch"] for p in ok], [p["median_s"] * 1e3 for p in ok], **style)
        axes[0, column].set_title(name)
        axes[1, column].set_xlabel("batch size N")
    axes[0, 0].set_ylabel("peak memory above inputs (MiB)")
    axes[1, 0].set_ylabel("forward + backward (ms)")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(f"{title}, float32, {meta['device']} ({meta['cpu_threads']} threads), "
                 f"torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS), choices=REGULARIZERS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point, after one warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS / "regularizers_cpu")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_sizes[0], args.dims[0], args.device, args.repeats)))
        return

    from tqdm import tqdm

    meta = {**machine(args.device), "dtype": "float32", "repeats": args.repeats}
    grid = [(name, impl, batch, dim) for name in args.regularizers for dim in args.dims
            for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    points = [{"regularizer": name, "impl": impl, "batch": batch, "dim": dim,
               **run_point(name, impl, batch, dim, args.device, args.repeats)}
              for name, impl, batch, dim in tqdm(grid, desc="regularizer points", unit="point")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": meta, "points": points}, indent=2) + "\n")
    header = (f"Regularizers forward + backward, float32, {meta['device']} ({meta['cpu_threads']} threads), "
              f"torch {meta['torch']}, flashcl {meta['commit']}, {meta['date'][:10]}; median of {args.repeats} "
              f"runs; peak memory above the inputs.")
    markdown = header + "\n\n" + table(points)
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(points, meta, args.out.with_suffix(".png"))
    print(markdown)
    print(f"\nwrote {args.out.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
