"""Per-step time of GammaContrastiveLoss against flashcl.clip_loss at the same shape.

The gamma-weighted loss adds a state update (per-sample running estimates), a gamma draw per
anchor and per direction, and excludes the positive from its denominators; the products are
the same. Forward + backward, the two interleaved run by run so that drifts in the machine's
speed hit both alike; median over the runs.

    python benchmarks/bench_gamma_step.py            # CPU (CUDA if present)

Writes <out>.json (the harness's results schema); tables: tools/generate_tables.py.
"""
import argparse
from pathlib import Path

import harness
from bench_clip_loss import clip_inputs

RESULTS = Path(__file__).resolve().parent / "results"


def measure(batch: int, dim: int, device: str, runs: int, num_samples: int) -> list[dict]:
    import torch

    import flashcl

    image, text, scale = clip_inputs(batch, dim, device)
    gamma = flashcl.GammaContrastiveLoss(num_samples=num_samples, shape=1.0, state_device=device)
    index = torch.randperm(num_samples, device=device)[:batch]
    losses = {"clip_loss": lambda: flashcl.clip_loss(image, text, scale),
              "GammaContrastiveLoss": lambda: gamma(image, text, scale, index)}

    def step(loss):
        def run():
            image.grad = text.grad = scale.grad = None
            loss().backward()
        return run

    times = harness.time_interleaved({name: step(loss) for name, loss in losses.items()}, runs, device=device)
    return [{"impl": name, "batch": batch, "dim": dim, **harness.timing(times[name])} for name in losses]


def tables(results: dict) -> dict[str, str]:
    caption = (f"Forward + backward, float32, medians of {results['settings']['runs']} interleaved runs; the gamma "
               f"loss's state holds {results['settings']['num_samples']} samples.")
    table = harness.comparison_table(results["rows"], [("batch", lambda r: r["batch"]), ("dim", lambda r: r["dim"])],
                                     baseline="clip_loss", contender="GammaContrastiveLoss", memory=False)
    return {"gamma_step": caption + "\n\n" + table}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024:256", "4096:256", "4096:768"], help="N:D")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--num-samples", type=int, default=1_000_000, help="dataset size of the state")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = harness.new_results(__file__, {"device": device, "runs": args.runs, "num_samples": args.num_samples},
                                  device)
    for shape in tqdm(args.shapes, desc="gamma step shapes", unit="shape"):
        batch, dim = (int(v) for v in shape.split(":"))
        results["rows"] += measure(batch, dim, device, args.runs, args.num_samples)
    harness.finish(args.out or RESULTS / f"gamma_step_{device}", results, tables)


if __name__ == "__main__":
    main()
