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

Writes <out>.json (the harness's results schema) and <out>.png; tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness

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


def measure(point: dict) -> dict:
    """One point, in its own process: peak bytes above the inputs and run times."""
    import torch
    import torch.nn.functional as F

    name, dim, device = point["regularizer"], point["dim"], point["device"]
    loss_fn = (materialized if point["impl"] == "materialized" else exact)(name)
    loss_fn(*[torch.randn(8, dim, device=device, requires_grad=True) for _ in range(3)]).backward()  # set-up
    generator = torch.Generator(device=device).manual_seed(0)
    first = F.normalize(torch.randn(point["batch"], dim, device=device, generator=generator), dim=1)
    inputs = [first] + [F.normalize(first + 0.5 * torch.randn(point["batch"], dim, device=device, generator=generator),
                                    dim=1) for _ in range(2)]
    return harness.measure_backward(lambda: loss_fn(*inputs), [x.requires_grad_() for x in inputs], device,
                                    point["repeats"])


def named_comparison(rows: list, kind: str, names, baseline: str) -> str:
    """flashcl against `baseline` per (name, batch, dim), in the order of `names`, then dim, then batch."""
    return harness.comparison_table(rows, [(kind, lambda r: r[kind]), ("batch", lambda r: r["batch"]),
                                           ("dim", lambda r: r["dim"])], baseline=baseline,
                                    order=lambda r: (list(names).index(r[kind]), r["dim"], r["batch"]))


def tables(results: dict) -> dict[str, str]:
    caption = (f"Regularizers forward + backward, float32, median of {results['settings']['repeats']} runs; "
               "peak memory above the inputs.")
    return {"regularizers": caption + "\n\n" + named_comparison(results["rows"], "regularizer", REGULARIZERS,
                                                                  "materialized")}


def faceted_plot(results: dict, path: Path, kind: str, title: str) -> None:
    """Memory (top) and time (bottom) against batch, a column per loss, a line per (impl, dim)."""
    dims = sorted({row["dim"] for row in results["rows"]})
    harness.plot_lines(
        results["rows"], path, x="batch", facet=lambda r: r[kind], series=lambda r: f"{r['impl']}, D={r['dim']}",
        panels=[("peak_bytes", "peak memory above inputs (MiB)", 2**20), ("median_s", "forward + backward (ms)", 1e-3)],
        style=lambda r: {"color": "tab:blue" if r["impl"] == "flashcl" else "tab:red",
                         "linestyle": ("-", "--", ":")[dims.index(r["dim"]) % 3]},
        title=f"{title}, float32, {results['provenance']['machine']['device']}, "
              f"torch {results['provenance']['versions']['torch']}", xlabel="batch size N")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS), choices=REGULARIZERS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 768])
    harness.point_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "regularizers_cpu")
    args = parser.parse_args()

    settings = {"device": args.device, "dtype": "float32", "repeats": args.repeats, "cap_gib": args.cap_gib}
    results = harness.new_results(__file__, settings, args.device)
    points = [{"regularizer": name, "impl": impl, "batch": batch, "dim": dim} for name in args.regularizers
              for dim in args.dims for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    results["rows"] = harness.run_points(__file__, points, settings, cap_gib=args.cap_gib, desc="regularizer points")
    harness.finish(args.out, results, tables,
                   lambda r, png: faceted_plot(r, png, "regularizer", "CVPR 2023 regularizers"))


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
