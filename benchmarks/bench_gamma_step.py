"""Per-step time of GammaContrastiveLoss against flashcl.clip_loss at the same shape.

The gamma-weighted loss adds a state update (per-sample running estimates), a gamma draw per
anchor and per direction, and excludes the positive from its denominators; the products are
the same. Forward + backward, the two interleaved run by run so that drifts in the machine's
speed hit both alike; median over the runs.

    python benchmarks/bench_gamma_step.py            # CPU (CUDA if present)
"""
import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import flashcl

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024:256", "4096:256", "4096:768"], help="N:D")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--num-samples", type=int, default=1_000_000, help="dataset size of the state")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for shape in args.shapes:
        n, d = (int(v) for v in shape.split(":"))
        generator = torch.Generator(device).manual_seed(0)
        a = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1).requires_grad_()
        b = F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1).requires_grad_()
        scale = torch.tensor(14.3, device=device, requires_grad=True)
        gamma = flashcl.GammaContrastiveLoss(num_samples=args.num_samples, shape=1.0, state_device=device)
        index = torch.randperm(args.num_samples, device=device)[:n]
        steps = {"clip_loss": lambda: flashcl.clip_loss(a, b, scale),
                 "GammaContrastiveLoss": lambda: gamma(a, b, scale, index)}
        times = {name: [] for name in steps}
        for run in tqdm(range(args.runs + 1), desc=f"N={n} D={d}"):
            for name, step in steps.items():
                a.grad = b.grad = scale.grad = None
                sync()
                start = time.perf_counter()
                step().backward()
                sync()
                if run:  # the first run of each warms up
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"n": n, "d": d, "median_s": medians, "times_s": times,
                     "ratio": medians["GammaContrastiveLoss"] / medians["clip_loss"]})
        print(f"N={n} D={d}: clip_loss {medians['clip_loss'] * 1e3:.1f} ms, GammaContrastiveLoss "
              f"{medians['GammaContrastiveLoss'] * 1e3:.1f} ms, ratio {rows[-1]['ratio']:.3f}")

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "runs": args.runs, "num_samples": args.num_samples}
    out = args.out or RESULTS / f"gamma_step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
