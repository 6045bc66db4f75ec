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

Writes <out>.json (the harness's results schema) and <out>.png; tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness
from bench_regularizers import faceted_plot, named_comparison

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


def measure(point: dict) -> dict:
    """One point, in its own process: peak bytes above the inputs and run times."""
    import torch
    import torch.nn.functional as F

    import flashcl

    name, impl, batch, dim, device = (point[key] for key in ("loss", "impl", "batch", "dim", "device"))

    generator = torch.Generator(device=device).manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, device=device, generator=generator), dim=-1)
    if name == "siglip":
        from peers import open_clip_loss_module

        peer = open_clip_loss_module(required=True).SigLipLoss()
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
    return harness.measure_backward(lambda: call(*inputs), [x.requires_grad_() for x in inputs] + extra, device,
                                    point["repeats"])


def tables(results: dict) -> dict[str, str]:
    caption = (f"SigLIP and SupCon forward + backward, float32, median of {results['settings']['repeats']} runs; "
               f"peak memory above the inputs. Peer: open_clip's SigLipLoss for siglip, the materialized definition "
               f"for supcon (batch = rows: batch / {VIEWS} samples of {VIEWS} views, {CLASSES} classes).")
    return {"siglip_supcon": caption + "\n\n" + named_comparison(results["rows"], "loss", LOSSES, "peer")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    harness.point_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "siglip_supcon_cpu")
    args = parser.parse_args()

    settings = {"device": args.device, "dtype": "float32", "repeats": args.repeats, "cap_gib": args.cap_gib,
                "peers": PEERS}
    results = harness.new_results(__file__, settings, args.device)
    points = [{"loss": name, "impl": impl, "batch": batch, "dim": dim} for name in args.losses
              for dim in args.dims for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    results["rows"] = harness.run_points(__file__, points, settings, cap_gib=args.cap_gib,
                                         desc="siglip/supcon points")
    harness.finish(args.out, results, tables, lambda r, png: faceted_plot(r, png, "loss", "SigLIP and SupCon"))


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
