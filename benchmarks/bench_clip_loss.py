"""Small batch to large batch: the textbook (materialized) CLIP loss against flashcl.

Forward + backward of the symmetric CLIP loss on unit-norm random features, with a learnable
logit scale. Each (implementation, batch, dim) point runs in a fresh subprocess (the harness's
run_point), so its peak memory is its own: the RSS high-water mark above the inputs (CPU), or
torch.cuda.max_memory_allocated above the inputs (CUDA). Time: the median of several runs after
one warm-up.

    python benchmarks/bench_clip_loss.py                  # CPU unless a GPU is present
    python benchmarks/bench_clip_loss.py --batch-sizes 256 1024 --dims 256

Writes <out>.json (the harness's results schema) and <out>.png; tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness
from peers import clip_loss_textbook

IMPLEMENTATIONS = ("textbook", "flashcl")
RESULTS = Path(__file__).resolve().parent / "results"


def clip_inputs(batch: int, dim: int, device: str, dtype: str = "float32"):
    """Unit-norm image features, text features correlated with them, and a learnable logit scale."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(batch, dim, device=device, generator=generator), dim=1)
    image = image.to(getattr(torch, dtype)).requires_grad_()
    text = text.to(getattr(torch, dtype)).requires_grad_()
    return image, text, torch.tensor(1 / 0.07, device=device, requires_grad=True)


def measure(point: dict) -> dict:
    """One point, in its own process: peak bytes above the inputs and run times."""
    import torch

    import flashcl

    loss_fn = clip_loss_textbook if point["impl"] == "textbook" else flashcl.clip_loss
    device = point["device"]
    # One tiny call first, so one-time set-up (thread pools, lazy library loads) is not counted.
    tiny = torch.randn(8, point["dim"], device=device, requires_grad=True)
    loss_fn(tiny, tiny.detach(), torch.tensor(10.0, device=device)).backward()
    inputs = clip_inputs(point["batch"], point["dim"], device, point["dtype"])
    return harness.measure_backward(lambda: loss_fn(*inputs), list(inputs), device, point["repeats"])


def tables(results: dict) -> dict[str, str]:
    settings = results["settings"]
    caption = (f"CLIP loss forward + backward, {settings['dtype']}, median of {settings['repeats']} runs; "
               "peak memory above the inputs.")
    table = harness.comparison_table(results["rows"], [("batch", lambda r: r["batch"]), ("dim", lambda r: r["dim"])],
                                     baseline="textbook", order=lambda r: (r["dim"], r["batch"]))
    return {"clip_loss": caption + "\n\n" + table}


def plot(results: dict, path: Path) -> None:
    machine = results["provenance"]["machine"]
    harness.plot_lines(
        results["rows"], path, x="batch", series=lambda r: f"{r['impl']}, D={r['dim']}",
        panels=[("peak_bytes", "peak memory above inputs (MiB)", 2**20), ("median_s", "forward + backward (ms)", 1e-3)],
        style=lambda r: {"color": "tab:red" if r["impl"] == "textbook" else "tab:blue",
                         "linestyle": "-" if r["dim"] == min(x["dim"] for x in results["rows"]) else "--"},
        title=f"CLIP loss, {results['settings']['dtype']}, {machine['device']}, "
              f"torch {results['provenance']['versions']['torch']}", xlabel="batch size N = M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    harness.point_arguments(parser, device="auto", repeats=3)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/clip_loss_<device>)")
    args = parser.parse_args()

    settings = {"device": args.device, "dtype": args.dtype, "repeats": args.repeats, "cap_gib": args.cap_gib}
    results = harness.new_results(__file__, settings, args.device)
    points = [{"impl": impl, "batch": batch, "dim": dim}
              for dim in args.dims for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    results["rows"] = harness.run_points(__file__, points, settings, cap_gib=args.cap_gib, desc="clip loss points")
    harness.finish(args.out or RESULTS / f"clip_loss_{args.device.split(':')[0]}", results, tables, plot)


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
