"""Small batches, where overhead shows: flashcl's CLIP loss against the textbook loss, forward + backward,
timed interleaved in one process (textbook, flashcl, textbook, ...), with the operators each dispatches.

    python benchmarks/bench_small_batch.py                       # N = 256, 1024 (21 runs), 16384 (3 runs)
    python benchmarks/bench_small_batch.py --points 256:256 --runs 41

Each point: fp32, unit-norm random pairs, a learnable logit scale, the default (torch) backend on the
CPU. Reports the median of each and their ratio, the ratio's spread over the interleaved pairs, and the
aten operators one forward + backward dispatches. Writes <out>.json (the harness's results schema).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness
from bench_clip_loss import clip_inputs
from peers import clip_loss_textbook

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POINTS = ["256:256", "256:768", "1024:256", "1024:768", "16384:256"]


def count_operators(step) -> int:
    """The aten operators one call of step() dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOperators(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOperators.count += 1
            return func(*args, **(kwargs or {}))

    with CountOperators():
        step()
    return CountOperators.count


def measure(batch: int, dim: int, runs: int) -> list[dict]:
    import flashcl

    inputs = clip_inputs(batch, dim, "cpu")
    losses = {"textbook": clip_loss_textbook, "flashcl": flashcl.clip_loss}

    def step(loss_fn):
        def run():
            for leaf in inputs:
                leaf.grad = None
            loss_fn(*inputs).backward()
        return run

    times = harness.time_interleaved({name: step(fn) for name, fn in losses.items()}, runs)
    pairs = [ours / theirs for ours, theirs in zip(times["flashcl"], times["textbook"])]
    rows = [{"impl": name, "batch": batch, "dim": dim, "runs": runs, **harness.timing(times[name]),
             "operators": count_operators(step(fn))} for name, fn in losses.items()]
    rows[1]["pair_ratio_quartiles"] = harness.quartiles(pairs)
    return rows


def tables(results: dict) -> dict[str, str]:
    pairs = {}
    for row in results["rows"]:
        pairs.setdefault((row["batch"], row["dim"]), {})[row["impl"]] = row

    def quartiles(pair):
        return " / ".join(f"{q:.2f}" for q in pair["flashcl"]["pair_ratio_quartiles"])

    table = harness.markdown_table([
        ("batch", lambda p: p["textbook"]["batch"]), ("dim", lambda p: p["textbook"]["dim"]),
        ("runs", lambda p: p["textbook"]["runs"]), ("textbook", lambda p: harness.ms(p["textbook"]["median_s"], 2)),
        ("flashcl", lambda p: harness.ms(p["flashcl"]["median_s"], 2)),
        ("ratio", lambda p: harness.ratio(p["flashcl"]["median_s"], p["textbook"]["median_s"])),
        ("pairs' ratio (quartiles)", quartiles),
        ("operators (textbook, flashcl)", lambda p: f"{p['textbook']['operators']}, {p['flashcl']['operators']}")],
        pairs.values(), align="rrrrrrll")
    caption = "CLIP loss forward + backward, float32, CPU; medians of interleaved runs."
    return {"small_batch": caption + "\n\n" + table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="BATCH:DIM")
    parser.add_argument("--runs", type=int, default=21, help="interleaved runs per point (3 from batch 8192 on)")
    parser.add_argument("--out", type=Path, default=RESULTS / "small_batch_cpu")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    results = harness.new_results(__file__, {"device": "cpu", "dtype": "float32", "runs": args.runs})
    for point in tqdm(args.points, desc="small-batch points", unit="point"):
        batch, dim = map(int, point.split(":"))
        results["rows"] += measure(batch, dim, args.runs if batch < 8192 else min(args.runs, 3))
    harness.finish(args.out, results, tables)


if __name__ == "__main__":
    main()
