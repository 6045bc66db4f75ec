"""GISTEmbed's guided negatives: flashcl's GISTEmbedLoss and CachedGISTEmbedLoss against sentence-transformers'.

Forward + backward of the loss on given embeddings: three columns (anchors, positives, one hard negative
each) of unit-norm random (N, D) student embeddings that require grad, and the guide's (N, D') ones, as
constants. Both libraries' classes run unchanged on a stand-in model whose encoder returns those
embeddings (peers.sentence_transformer_stub), so only the loss (and, for the cached classes, their
mini-batching and gradient caching; mini_batch_size 32, sentence-transformers' default) is measured.
sentence-transformers computes every cosine similarity by broadcasting, an N x N x D tensor per block;
flashcl.gist_loss builds no N x N matrix. Each (class, implementation, batch) point runs in a fresh
subprocess under a memory cap and a time limit; once an implementation fails at one batch size its
larger ones are not run. Time is the median of the timed runs after a warm-up.

    python benchmarks/bench_gist.py                     # N 1024 4096 16384, D 256, D' 512 (about 20 minutes)
    python benchmarks/bench_gist.py --batch-sizes 256 --repeats 1

Writes <out>.json (the harness's results schema); tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness

IMPLEMENTATIONS = ("sentence_transformers", "flashcl")
CLASSES = ("GISTEmbedLoss", "CachedGISTEmbedLoss")
RESULTS = Path(__file__).resolve().parent / "results"
TEMPERATURE, MINI_BATCH = 0.05, 32


def make_loss(impl: str, cls: str):
    from peers import sentence_transformer_stub

    if impl == "flashcl":
        from flashcl.integrations import sentence_transformers as library
    else:
        from sentence_transformers.sentence_transformer import losses as library
    options = {"mini_batch_size": MINI_BATCH} if cls.startswith("Cached") else {}
    return getattr(library, cls)(sentence_transformer_stub("student"), sentence_transformer_stub("guide"),
                                 temperature=TEMPERATURE, **options)


def measure(point: dict) -> dict:
    """One point, in its own process: peak bytes above the inputs and run times."""
    import torch
    import torch.nn.functional as F

    loss_fn = make_loss(point["impl"], point["cls"])

    def columns(n, generator):
        return [{"student": F.normalize(torch.randn(n, point["dim"], generator=generator), dim=1).requires_grad_(),
                 "guide": F.normalize(torch.randn(n, point["guide_dim"], generator=generator), dim=1)}
                for _ in range(3)]

    loss_fn(columns(8, torch.Generator().manual_seed(1)), None).backward()  # set-up: imports, first calls
    features = columns(point["batch"], torch.Generator().manual_seed(0))
    leaves = [column["student"] for column in features]
    return harness.measure_backward(lambda: loss_fn(features, None), leaves, "cpu", point["repeats"])


def tables(results: dict) -> dict[str, str]:
    settings = results["settings"]
    caption = (f"GISTEmbed losses forward + backward on given embeddings (anchor, positive, hard negative), "
               f"float32, student D = {settings['dim']}, guide D' = {settings['guide_dim']}, temperature "
               f"{settings['temperature']}, cached mini-batch {settings['mini_batch_size']}; median of "
               f"{settings['repeats']} runs, peak memory above the inputs; a point over the "
               f"{settings['cap_gib']:g} GiB cap or the {settings['timeout_s']:g} s limit is an error.")
    table = harness.comparison_table(results["rows"], [("loss", lambda r: r["cls"]), ("batch", lambda r: r["batch"])],
                                     baseline="sentence_transformers", order=lambda r: (r["cls"], r["batch"]))
    return {"gist": caption + "\n\n" + table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=256, help="the student's embedding dimension D")
    parser.add_argument("--guide-dim", type=int, default=512, help="the guide's embedding dimension D'")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per point")
    harness.point_arguments(parser, repeats=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "gist_cpu")
    args = parser.parse_args()

    settings = {"device": "cpu", "dtype": "float32", "dim": args.dim, "guide_dim": args.guide_dim,
                "temperature": TEMPERATURE, "mini_batch_size": MINI_BATCH, "repeats": args.repeats,
                "cap_gib": args.cap_gib, "timeout_s": args.timeout}
    results = harness.new_results(__file__, settings, "cpu")
    points = [{"cls": cls, "impl": impl, "batch": batch}
              for cls in CLASSES for impl in IMPLEMENTATIONS for batch in sorted(args.batch_sizes)]
    results["rows"] = harness.run_points(__file__, points, settings, cap_gib=args.cap_gib, desc="GIST points",
                                         timeout=args.timeout, skip_after_error=lambda p: (p["cls"], p["impl"]))
    harness.finish(args.out, results, tables)


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
