"""Distributed CLIP loss: flashcl.ClipLoss against open_clip's ClipLoss, per rank, on CPU processes (gloo).

Both with open_clip's exact setting (local_loss=True, gather_with_grad=True): each rank holds
global_batch / world_size pairs, gathers every rank's features and computes its local loss; forward
+ backward of the loss alone, fp32, unit-norm random features, learnable logit scale. Each point
is a fresh set of processes (one thread each); per-rank peak memory is the RSS high-water mark
above the RSS after the inputs were made, the largest over ranks; time is the median over runs of
the slowest rank. On this 2-core machine 4 ranks share 2 cores, so their times measure the
oversubscribed machine, not the method; memory is the point.

    python benchmarks/bench_distributed.py                        # world sizes 1 2 4, batch 4096..16384
    python benchmarks/bench_distributed.py --world-sizes 2 --batch-sizes 4096 --repeats 1

Writes <out>.json, <out>.md (the README's table) and <out>.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from bench_clip_loss import current_rss, machine

IMPLEMENTATIONS = ("open_clip", "flashcl")
RESULTS = Path(__file__).resolve().parent / "results"


def open_clip_loss_module():
    """open_clip's loss.py on its own (the package import needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise SystemExit("open_clip is needed: pip install --no-deps open_clip_torch==3.3.0")
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", Path(spec.origin).parent / "loss.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def rank_worker(rank, world_size, port, impl, batch, dim, repeats, out_dir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import flashcl

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    make = flashcl.ClipLoss if impl == "flashcl" else open_clip_loss_module().ClipLoss
    loss_fn = make(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    local = batch // world_size
    tiny = torch.randn(4, dim, requires_grad=True)
    loss_fn(tiny, tiny.detach(), torch.tensor(10.0)).backward()  # one-time set-up off the clock
    generator = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(local, dim, generator=generator), dim=1).requires_grad_()
    text = F.normalize(image.detach() + 0.5 * torch.randn(local, dim, generator=generator), dim=1).requires_grad_()
    log_scale = torch.tensor(2.659, requires_grad=True)
    dist.barrier()
    baseline = current_rss()
    times = []
    for _ in range(repeats + 1):
        image.grad = text.grad = log_scale.grad = None
        dist.barrier()
        start = time.perf_counter()
        loss_fn(image, text, log_scale.exp()).backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"peak_bytes": peak, "times_s": times[1:]}))
    dist.destroy_process_group()


def run_point(impl, world_size, batch, dim, repeats) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(rank_worker, args=(world_size, port, impl, batch, dim, repeats, out_dir),
                               nprocs=world_size, start_method="spawn")
        except Exception as error:
            # Every rank measured and wrote its result, then one died tearing gloo down: keep the measurement.
            if not all(Path(out_dir, f"{r}.json").exists() for r in range(world_size)):
                return {"error": str(error).splitlines()[0][:200]}  # e.g. killed for memory: a result
        ranks = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world_size)]
    slowest = [max(r["times_s"][i] for r in ranks) for i in range(repeats)]
    return {"peak_bytes": max(r["peak_bytes"] for r in ranks), "per_rank_peak_bytes": [r["peak_bytes"] for r in ranks],
            "times_s": slowest, "median_s": statistics.median(slowest)}


def table(points) -> str:
    rows = ["| world size | global batch | rows per rank | open_clip time | flashcl time | time ratio "
            "| open_clip peak per rank | flashcl peak per rank | memory ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(p["world_size"], p["batch"], p["impl"]): p for p in points}
    for world_size, batch in sorted({(p["world_size"], p["batch"]) for p in points}):
        ref, ours = by_key.get((world_size, batch, "open_clip"), {}), by_key.get((world_size, batch, "flashcl"), {})
        t = lambda p: f"{p['median_s'] * 1e3:.0f} ms" if "median_s" in p else p.get("error", "-")
        mem = lambda p: f"{p['peak_bytes'] / 2**20:.1f} MiB" if "peak_bytes" in p else "-"
        ratio_t = f"{ours['median_s'] / ref['median_s']:.2f}x" if "median_s" in ref and "median_s" in ours else "-"
        ratio_m = (f"{100 * ours['peak_bytes'] / ref['peak_bytes']:.1f}%"
                   if "peak_bytes" in ref and "peak_bytes" in ours and ref["peak_bytes"] > 0 else "-")
        rows.append(f"| {world_size} | {batch} | {batch // world_size} | {t(ref)} | {t(ours)} | {ratio_t} "
                    f"| {mem(ref)} | {mem(ours)} | {ratio_m} |")
    return "\n".join(rows)


def plot(points, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"open_clip": "tab:red", "flashcl": "tab:blue"}
    for impl in IMPLEMENTATIONS:
        for world_size, line in zip(sorted({p["world_size"] for p in points}), ("-", "--", ":")):
            ok = sorted((p for p in points if (p["impl"], p["world_size"]) == (impl, world_size) and "median_s" in p),
                        key=lambda p: p["batch"])
            if not ok:
                continue
            style = dict(color=colors[impl], linestyle=line, marker="o" if impl == "open_clip" else "s",
                         label=f"{impl}, {world_size} rank{'s' if world_size > 1 else ''}")
            ax_mem.plot([p["batch"] for p in ok], [max(p["peak_bytes"], 2**20) / 2**20 for p in ok], **style)
            ax_time.plot([p["batch"] for p in ok], [p["median_s"] * 1e3 for p in ok], **style)
    for ax, label in ((ax_mem, "peak memory per rank above inputs (MiB)"), (ax_time, "forward + backward (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"ClipLoss(local_loss=True, gather_with_grad=True), D={meta['dim']}, float32, gloo on "
                 f"{meta['device']} (1 thread per rank), torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 8192, 16384], help="global batch")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed_cpu")
    args = parser.parse_args()
    from tqdm import tqdm

    meta = {**machine("cpu"), "dim": args.dim, "dtype": "float32", "repeats": args.repeats, "threads_per_rank": 1}
    grid = [(w, b, impl) for w in args.world_sizes for b in args.batch_sizes for impl in IMPLEMENTATIONS]
    points = []
    for w, b, impl in tqdm(grid, desc="distributed points", unit="point"):
        for attempt in (1, 2):  # gloo on loopback occasionally aborts a rank at start-up: one retry, recorded
            point = {"impl": impl, "world_size": w, "batch": b, "attempt": attempt,
                     **run_point(impl, w, b, args.dim, args.repeats)}
            if "error" not in point:
                break
        points.append(point)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": meta, "points": points}, indent=2) + "\n")
    header = (f"ClipLoss(local_loss=True, gather_with_grad=True) forward + backward per rank, D = {args.dim}, float32, "
              f"gloo on {meta['device']} (one thread per rank), torch {meta['torch']}, flashcl {meta['commit']}, "
              f"{meta['date'][:10]}; median of {args.repeats} runs of the slowest rank; peak memory above the "
              "inputs, largest rank.")
    markdown = header + "\n\n" + table(points)
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(points, meta, args.out.with_suffix(".png"))
    print(markdown)


if __name__ == "__main__":
    main()
