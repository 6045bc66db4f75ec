"""SigLIP's sigmoid loss and SupCon: flashcl against what users run today.

Forward + backward on unit-norm random features (all inputs require grad), each (loss,
implementation, batch, dim) point in a fresh subprocess so its peak memory is its own (CPU: RSS
high-water mark above the inputs; CUDA: max_memory_allocated above them), time the median of
several runs after a warm-up. The peers:

    siglip   open_clip's SigLipLoss (N x N logits and labels), logit scale 10, bias -10, both learnable
    supcon   the SupCon of Khosla et al. materialized (N x N logits and masks for N rows: N / 2
             samples of 2 views each), 100 classes

    python benchmarks/bench_siglip_supcon.py                      # N 1024..16384 rows, D 256
    python benchmarks/bench_siglip_supcon.py --batch-sizes 1024 --dims 256 --repeats 1

Writes <out>.json, <out>.md (the README's table) and <out>.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_clip_loss import machine
from bench_regularizers import measure, plot, run_point, table

LOSSES = ("siglip", "supcon")
PEERS = {"siglip": "open_clip", "supcon": "materialized"}
IMPLEMENTATIONS = ("peer", "flashcl")
RESULTS = Path(__file__).resolve().parent / "results"
VIEWS, CLASSES, TEMPERATURE = 2, 100, 0.1


def materialized_supcon(features, labels):
    """SupCon as its definition reads: every anchor against every view, masks and all."""
    import torch

    contrast = torch.cat(torch.unbind(features, dim=1))
    contrast_labels = labels.repeat(features.shape[1])
    logits = contrast @ contrast.T / TEMPERATURE
    itself = torch.eye(len(contrast), dtype=torch.bool, device=contrast.device)
    positive = (contrast_labels[:, None] == contrast_labels[None, :]) & ~itself
    log_prob = logits - logits.masked_fill(itself, float("-inf")).logsumexp(1, keepdim=True)
    count = positive.sum(1)
    mean_log_prob = (log_prob * positive).sum(1) / count.clamp(min=1)
    return -(mean_log_prob[count > 0]).mean()


def worker(name: str, impl: str, batch: int, dim: int, device: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    import flashcl

    generator = torch.Generator(device=device).manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, device=device, generator=generator), dim=-1)
    if name == "siglip":
        from bench_gpu import open_clip_loss_module

        peer = open_clip_loss_module().SigLipLoss()
        loss_fn = peer if impl == "peer" else flashcl.siglip_loss
        log_scale = torch.tensor(2.3026, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        call = lambda x, y: loss_fn(x, y, log_scale.exp(), bias)
        small, inputs = [unit(8, dim), unit(8, dim)], [unit(batch, dim), unit(batch, dim)]
        extra = [log_scale, bias]
    else:
        samples = batch // VIEWS  # batch counts rows (anchors), as for siglip
        labels = torch.randint(0, CLASSES, (samples,), device=device, generator=generator)
        loss_fn = materialized_supcon if impl == "peer" else lambda f, l: flashcl.supcon_loss(f, l, TEMPERATURE)
        call = lambda f: loss_fn(f, labels[:f.shape[0]])
        small, inputs, extra = [unit(8, VIEWS, dim)], [unit(samples, VIEWS, dim)], []
    call(*[x.requires_grad_() for x in small]).backward()  # one-time set-up (thread pools, lazy loads) off the clock
    return measure(lambda: call(*inputs), [x.requires_grad_() for x in inputs] + extra, device, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per point, after one warm-up")
    parser.add_argument("--out", type=Path, default=RESULTS / "siglip_supcon_cpu")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_sizes[0], args.dims[0], args.device, args.repeats)))
        return

    from tqdm import tqdm

    meta = {**machine(args.device), "dtype": "float32", "repeats": args.repeats, "peers": PEERS}
    grid = [(name, impl, batch, dim) for name in args.losses for dim in args.dims
            for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    points = [{"loss": name, "impl": impl, "batch": batch, "dim": dim,
               **run_point(name, impl, batch, dim, args.device, args.repeats, script=__file__)}
              for name, impl, batch, dim in tqdm(grid, desc="siglip/supcon points", unit="point")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": meta, "points": points}, indent=2) + "\n")
    header = (f"SigLIP and SupCon forward + backward, float32, {meta['device']} ({meta['cpu_threads']} threads), "
              f"torch {meta['torch']}, flashcl {meta['commit']}, {meta['date'][:10]}; median of {args.repeats} "
              f"runs; peak memory above the inputs. Peer: open_clip's SigLipLoss for siglip, the materialized "
              f"definition for supcon (batch = rows: batch / {VIEWS} samples of {VIEWS} views, {CLASSES} classes).")
    markdown = header + "\n\n" + table(points, "loss", LOSSES, "peer")
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(points, meta, args.out.with_suffix(".png"), "loss", LOSSES, IMPLEMENTATIONS, "SigLIP and SupCon")
    print(markdown)
    print(f"\nwrote {args.out.with_suffix('.json')}, .md and .png")


if __name__ == "__main__":
    main()
