"""CLIP distillation: flashcl.DistillClipLoss against open_clip's DistillClipLoss.

Forward + backward of both terms (contrastive + distillation, summed) on unit-norm random features:
the student's (N, D) image and text features and its logit scale require grad; the teacher's (N, D')
features and scale are constants, as under torch.no_grad() in open_clip's training. open_clip builds
the student's and the teacher's N x N logits in both directions; flashcl neither. Each (implementation,
batch) point runs in a fresh subprocess under a memory cap, so its peak memory is its own (RSS
high-water mark above the inputs; CUDA: max_memory_allocated above the inputs); time is the median of
several runs after a warm-up.

    python benchmarks/bench_distill.py                              # N 1024 4096 16384, D 256, D' 512
    python benchmarks/bench_distill.py --batch-sizes 1024 --repeats 1

Writes <out>.json (the harness's results schema) and <out>.png; tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import harness

IMPLEMENTATIONS = ("open_clip", "flashcl")
RESULTS = Path(__file__).resolve().parent / "results"
STUDENT_SCALE, TEACHER_SCALE = 1 / 0.07, 100.0


def make_loss(impl: str):
    if impl == "flashcl":
        import flashcl

        return flashcl.DistillClipLoss()
    from peers import open_clip_loss_module

    return open_clip_loss_module(required=True).DistillClipLoss()


def measure(point: dict) -> dict:
    """One point, in its own process: peak bytes above the inputs and run times."""
    import math

    import torch
    import torch.nn.functional as F

    device, dim, teacher_dim = point["device"], point["dim"], point["teacher_dim"]
    loss_fn = make_loss(point["impl"])

    def features(n, d, generator):
        return F.normalize(torch.randn(n, d, device=device, generator=generator), dim=1)

    def run(image, text, log_scale, teacher_image, teacher_text):
        contrastive, distill = loss_fn(image, text, log_scale.exp(), teacher_image, teacher_text, TEACHER_SCALE)
        return contrastive + distill

    setup = torch.Generator(device=device).manual_seed(1)
    run(features(8, dim, setup).requires_grad_(), features(8, dim, setup).requires_grad_(),
        torch.tensor(0.0, device=device, requires_grad=True), features(8, teacher_dim, setup),
        features(8, teacher_dim, setup)).backward()  # set-up: imports, first calls
    generator = torch.Generator(device=device).manual_seed(0)
    n = point["batch"]
    image, text = features(n, dim, generator), features(n, dim, generator)
    teacher_image, teacher_text = features(n, teacher_dim, generator), features(n, teacher_dim, generator)
    log_scale = torch.tensor(math.log(STUDENT_SCALE), device=device)
    leaves = [image.requires_grad_(), text.requires_grad_(), log_scale.requires_grad_()]
    return harness.measure_backward(lambda: run(image, text, log_scale, teacher_image, teacher_text), leaves,
                                    device, point["repeats"])


def tables(results: dict) -> dict[str, str]:
    settings = results["settings"]
    caption = (f"DistillClipLoss forward + backward (contrastive + distillation), {settings['dtype']}, student "
               f"D = {settings['dim']}, teacher D' = {settings['teacher_dim']} (constant), median of "
               f"{settings['repeats']} runs; peak memory above the inputs.")
    table = harness.comparison_table(results["rows"], [("batch", lambda r: r["batch"])], baseline="open_clip",
                                     order=lambda r: r["batch"])
    return {"distill": caption + "\n\n" + table}


def plot(results: dict, path: Path) -> None:
    harness.plot_lines(
        results["rows"], path, x="batch", series=lambda r: r["impl"],
        panels=[("peak_bytes", "peak memory above inputs (MiB)", 2**20), ("median_s", "forward + backward (ms)", 1e-3)],
        style=lambda r: {"color": "tab:blue" if r["impl"] == "flashcl" else "tab:red"},
        title=f"DistillClipLoss, float32, D={results['settings']['dim']}, D'={results['settings']['teacher_dim']}, "
              f"{results['provenance']['machine']['device']}, torch {results['provenance']['versions']['torch']}",
        xlabel="batch size N")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dim", type=int, default=256, help="the student's feature dimension D")
    parser.add_argument("--teacher-dim", type=int, default=512, help="the teacher's feature dimension D'")
    harness.point_arguments(parser)
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_cpu")
    args = parser.parse_args()

    settings = {"device": args.device, "dtype": "float32", "dim": args.dim, "teacher_dim": args.teacher_dim,
                "repeats": args.repeats, "cap_gib": args.cap_gib}
    results = harness.new_results(__file__, settings, args.device)
    points = [{"impl": impl, "batch": batch} for batch in args.batch_sizes for impl in IMPLEMENTATIONS]
    results["rows"] = harness.run_points(__file__, points, settings, cap_gib=args.cap_gib, desc="distillation points")
    harness.finish(args.out, results, tables, plot)


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
