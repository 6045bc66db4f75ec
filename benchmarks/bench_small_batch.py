"""Small batches, where overhead shows: flashcl's CLIP loss against the textbook loss, forward + backward,
timed interleaved in one process (textbook, flashcl, textbook, ...), with the operators each dispatches.

    python benchmarks/bench_small_batch.py                       # N = 256, 1024 (21 runs), 16384 (3 runs)
    python benchmarks/bench_small_batch.py --points 256:256 --runs 41

Each point: fp32, unit-norm random pairs, a learnable logit scale, the default (torch) backend on the
CPU. Reports the median of each and their ratio, the ratio's spread over the interleaved pairs, and the
aten operators one forward + backward dispatches. Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import flashcl
from bench_clip_loss import clip_loss_textbook, git_commit

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POINTS = ["256:256", "256:768", "1024:256", "1024:768", "16384:256"]


class CountOperators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(batch: int, dim: int, runs: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=1).requires_grad_()
    text = F.normalize(image.detach() + 0.5 * torch.randn(batch, dim, generator=generator), dim=1).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    losses = {"textbook": clip_loss_textbook, "flashcl": flashcl.clip_loss}

    def step(loss_fn):
        image.grad = text.grad = scale.grad = None
        started = time.perf_counter()
        loss_fn(image, text, scale).backward()
        return time.perf_counter() - started

    for loss_fn in losses.values():  # warm-up: thread pools, first allocations
        step(loss_fn)
    times = {name: [] for name in losses}
    for _ in range(runs):
        for name, loss_fn in losses.items():
            times[name].append(step(loss_fn))
    operators = {}
    for name, loss_fn in losses.items():
        with CountOperators() as counter:
            loss_fn(image, text, scale).backward()
        operators[name] = counter.count
    pairs = sorted(f / t for f, t in zip(times["flashcl"], times["textbook"]))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return dict(batch=batch, dim=dim, runs=runs, textbook_ms=1e3 * median["textbook"],
                flashcl_ms=1e3 * median["flashcl"], ratio=median["flashcl"] / median["textbook"],
                pair_ratio_quartiles=[pairs[len(pairs) // 4], pairs[len(pairs) // 2], pairs[3 * len(pairs) // 4]],
                operators=operators)


def table(points) -> str:
    rows = ["| batch | dim | runs | textbook | flashcl | ratio | pairs' ratio (quartiles) | operators (textbook, flashcl) |",
            "|---:|---:|---:|---:|---:|---:|---|---|"]
    for p in points:
        q = p["pair_ratio_quartiles"]
        rows.append(f"| {p['batch']} | {p['dim']} | {p['runs']} | {p['textbook_ms']:.2f} ms | {p['flashcl_ms']:.2f} ms "
                    f"| {p['ratio']:.2f}x | {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f} | "
                    f"{p['operators']['textbook']}, {p['operators']['flashcl']} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="BATCH:DIM")
    parser.add_argument("--runs", type=int, default=21, help="interleaved runs per point (3 from batch 8192 on)")
    parser.add_argument("--out", type=Path, default=RESULTS / "small_batch_cpu")
    args = parser.parse_args(argv)
    points = []
    for point in args.points:
        batch, dim = map(int, point.split(":"))
        points.append(measure(batch, dim, args.runs if batch < 8192 else min(args.runs, 3)))
        print(table(points[-1:]).splitlines()[-1], flush=True)
    meta = {"device": platform.processor() or "cpu", "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "flashcl": flashcl.__version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(machine=meta, points=points), indent=1))
    caption = (f"CLIP loss forward + backward, float32, CPU ({meta['cpu_threads']} threads), torch {meta['torch']}, "
               f"flashcl {meta['commit']}, {meta['date'][:10]}; medians of interleaved runs.")
    args.out.with_suffix(".md").write_text(table(points) + "\n\n" + caption + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
