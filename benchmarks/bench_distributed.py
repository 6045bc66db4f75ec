"""Distributed CLIP and SigLIP losses: flashcl's modules against open_clip's, per rank, on CPU processes (gloo).

CLIP (--loss clip): both ClipLoss with open_clip's exact setting (local_loss=True,
gather_with_grad=True): each rank holds global_batch / world_size pairs, gathers every rank's
features and computes its local loss. SigLIP (--loss siglip): open_clip's SigLipLoss in each of its
feature exchanges (dist_impl bidir, shift, reduce, gather) against flashcl.SigLipLoss. Forward
+ backward of the loss alone, fp32, unit-norm random features, learnable logit scale (and bias). Each point
is a fresh set of processes (one thread each); per-rank peak memory is the RSS high-water mark
above the RSS after the inputs were made, the largest over ranks; time is the median over runs of
the slowest rank. On this 2-core machine 4 ranks share 2 cores, so their times measure the
oversubscribed machine, not the method; memory is the point.

    python benchmarks/bench_distributed.py                        # world sizes 1 2 4, batch 4096..16384
    python benchmarks/bench_distributed.py --world-sizes 2 --batch-sizes 4096 --repeats 1
    python benchmarks/bench_distributed.py --loss siglip            # -> results/distributed_siglip_cpu

Writes <out>.json (the harness's results schema) and <out>.png; tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import harness
from peers import open_clip_loss_module

# Per loss: the contenders. open_clip's SigLipLoss in each of its exchanges (dist_impl); flashcl's
# sigmoid loss has one (an all-gather of the features, tiles over the global batch).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
IMPLEMENTATIONS = {"clip": ("open_clip", "flashcl"),
                   "siglip": tuple(f"open_clip {mode}" for mode in DIST_IMPLS) + ("flashcl",)}
RESULTS = Path(__file__).resolve().parent / "results"


def make_loss(loss: str, impl: str, rank: int, world_size: int):
    """The contender's loss module and a call (image, text, log_scale, bias) -> loss."""
    import flashcl

    if loss == "clip":
        make = flashcl.ClipLoss if impl == "flashcl" else open_clip_loss_module(required=True).ClipLoss
        module = make(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
        return lambda image, text, log_scale, bias: module(image, text, log_scale.exp())
    if impl == "flashcl":
        module = flashcl.SigLipLoss(rank=rank, world_size=world_size)
    else:
        module = open_clip_loss_module(required=True).SigLipLoss(rank=rank, world_size=world_size,
                                                                 dist_impl=impl.split()[1])
    return lambda image, text, log_scale, bias: module(image, text, log_scale.exp(), bias)


def rank_worker(rank, world_size, port, loss, impl, batch, dim, repeats, out_dir):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10))
    loss_fn = make_loss(loss, impl, rank, world_size)
    local = batch // world_size
    # open_clip's values: log(1 / 0.07) for CLIP; log(10) and a bias of -10 for SigLIP.
    log_scale = torch.tensor(2.659 if loss == "clip" else 2.3026, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    tiny = torch.randn(4, dim, requires_grad=True)
    loss_fn(tiny, tiny.detach(), log_scale, bias).backward()  # one-time set-up off the clock
    generator = torch.Generator().manual_seed(rank)
    image = F.normalize(torch.randn(local, dim, generator=generator), dim=1).requires_grad_()
    text = F.normalize(image.detach() + 0.5 * torch.randn(local, dim, generator=generator), dim=1).requires_grad_()
    dist.barrier()
    times = []
    with harness.PeakMemory("cpu") as peak:
        for _ in range(repeats + 1):
            image.grad = text.grad = log_scale.grad = bias.grad = None
            dist.barrier()
            start = time.perf_counter()
            loss_fn(image, text, log_scale, bias).backward()
            times.append(time.perf_counter() - start)
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"peak_bytes": peak.bytes, "times_s": times[1:]}))
    dist.destroy_process_group()


def measure(point: dict) -> dict:
    """One point: a fresh set of rank processes; the largest rank's peak, the slowest rank's times."""
    import torch.multiprocessing as mp

    world_size, repeats = point["world_size"], point["repeats"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(rank_worker, args=(world_size, port, point["loss"], point["impl"], point["batch"],
                                                  point["dim"], repeats, out_dir), nprocs=world_size,
                               start_method="spawn")
        except Exception as error:
            # Every rank measured and wrote its result, then one died tearing gloo down: keep the measurement.
            if not all(Path(out_dir, f"{r}.json").exists() for r in range(world_size)):
                return {"error": str(error).splitlines()[0][:200]}  # e.g. killed for memory: a result
        ranks = [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world_size)]
    slowest = [max(r["times_s"][i] for r in ranks) for i in range(repeats)]
    return {"peak_bytes": max(r["peak_bytes"] for r in ranks), "per_rank_peak_bytes": [r["peak_bytes"] for r in ranks],
            **harness.timing(slowest)}


def tables(results: dict) -> dict[str, str]:
    settings, rows = results["settings"], results["rows"]
    if settings["loss"] == "siglip":
        return {"distributed_siglip": siglip_table(results)}
    caption = (f"ClipLoss(local_loss=True, gather_with_grad=True) forward + backward per rank, D = {settings['dim']}, "
               f"float32, gloo, one thread per rank; median of {settings['repeats']} runs of the slowest rank; peak "
               "memory above the inputs, largest rank.")
    cases = [("world size", lambda r: r["world_size"]), ("global batch", lambda r: r["batch"]),
             ("rows per rank", lambda r: r["batch"] // r["world_size"])]
    table = harness.comparison_table(rows, cases, baseline="open_clip", time_digits=0,
                                     order=lambda r: (r["world_size"], r["batch"]))
    return {"distributed": caption + "\n\n" + table.replace("open_clip peak", "open_clip peak per rank")
            .replace("flashcl peak", "flashcl peak per rank")}


def siglip_table(results: dict) -> str:
    """A line per (world size, global batch): each contender's time and per-rank peak, and
    flashcl's peak as a fraction of the smallest open_clip peak."""
    settings, rows = results["settings"], results["rows"]
    by_key = harness.index_rows(rows, "world_size", "batch", "impl")
    impls = [impl for impl in IMPLEMENTATIONS["siglip"] if any(r["impl"] == impl for r in rows)]

    def cell(impl):
        def text(case):
            row = by_key.get((*case, impl), {})
            if "median_s" not in row:
                return row.get("error", "-")
            return f"{harness.ms(row['median_s'], 0)}, {harness.mib(row['peak_bytes'])}"
        return text

    def against_best(case):
        peers = [by_key[(*case, impl)]["peak_bytes"] for impl in impls
                 if impl != "flashcl" and "peak_bytes" in by_key.get((*case, impl), {})]
        ours = by_key.get((*case, "flashcl"), {}).get("peak_bytes")
        return harness.ratio(ours, min(peers), percent=True) if peers else "-"

    cases = sorted({(r["world_size"], r["batch"]) for r in rows})
    table = harness.markdown_table(
        [("world size", lambda c: c[0]), ("global batch", lambda c: c[1])] + [(impl, cell(impl)) for impl in impls]
        + [("flashcl peak / smallest open_clip peak", against_best)], cases)
    caption = (f"SigLipLoss forward + backward per rank (open_clip's in each dist_impl, flashcl's), D = "
               f"{settings['dim']}, float32, gloo, one thread per rank; each cell: median of {settings['repeats']} "
               "runs of the slowest rank, and the peak memory above the inputs of the largest rank.")
    return caption + "\n\n" + table


def plot(results: dict, path: Path) -> None:
    sizes = sorted({row["world_size"] for row in results["rows"]})
    harness.plot_lines(
        results["rows"], path, x="batch",
        series=lambda r: f"{r['impl']}, {r['world_size']} rank{'s' if r['world_size'] > 1 else ''}",
        panels=[("peak_bytes", "peak memory per rank above inputs (MiB)", 2**20),
                ("median_s", "forward + backward (ms)", 1e-3)],
        style=lambda r: {"color": COLORS.get(r["impl"], "tab:blue"),
                         "linestyle": ("-", "--", ":")[sizes.index(r["world_size"]) % 3]},
        title=f"{TITLES[results['settings']['loss']]}, D={results['settings']['dim']}, float32, gloo on "
              f"{results['provenance']['machine']['device']} (1 thread per rank)", xlabel="global batch")


COLORS = {"open_clip": "tab:red", "open_clip bidir": "tab:red", "open_clip shift": "tab:orange",
          "open_clip reduce": "tab:purple", "open_clip gather": "tab:brown", "flashcl": "tab:blue"}
TITLES = {"clip": "ClipLoss(local_loss=True, gather_with_grad=True)", "siglip": "SigLipLoss"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=list(IMPLEMENTATIONS), default="clip")
    parser.add_argument("--impls", nargs="+", help="default: every contender of the loss (see IMPLEMENTATIONS)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 8192, 16384], help="global batch")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: results/distributed[_siglip]_cpu")
    args = parser.parse_args()
    from tqdm import tqdm

    settings = {"loss": args.loss, "dim": args.dim, "dtype": "float32", "repeats": args.repeats,
                "threads_per_rank": 1}
    results = harness.new_results(__file__, settings)
    # On one rank open_clip's exchanges never run: its dist_impl modes are one computation, measured once.
    impls = args.impls or IMPLEMENTATIONS[args.loss]
    unknown = set(impls) - set(IMPLEMENTATIONS[args.loss])
    if unknown:
        parser.error(f"--impls: {sorted(unknown)} are not contenders of --loss {args.loss}: {IMPLEMENTATIONS[args.loss]}")
    grid = [(w, b, impl) for w in args.world_sizes for b in args.batch_sizes for impl in impls
            if w > 1 or impl in ("open_clip", "open_clip bidir", "flashcl")]
    for w, b, impl in tqdm(grid, desc="distributed points", unit="point"):
        for attempt in (1, 2):  # gloo on loopback occasionally aborts a rank at start-up: one retry, recorded
            row = harness.run_point(__file__, {"impl": impl, "world_size": w, "batch": b, "attempt": attempt},
                                    settings=settings)
            if "error" not in row:
                break
        results["rows"].append(row)
    stem = args.out or RESULTS / ("distributed_cpu" if args.loss == "clip" else "distributed_siglip_cpu")
    harness.finish(stem, results, tables, plot)


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
