"""Does the gamma-weighted loss let a small batch do a large batch's work on real data?

Two towers (multiview_digits.Tower) trained CLIP-style on two views of the UCI Multiple Features
digits (1400 training, 200 validation, 400 test digits), with three losses

    InfoNCE         flashcl.clip_loss(image, text, 1 / temperature)
    gamma a=1       flashcl.GammaContrastiveLoss(shape=1): u ~ Gamma(1, Z^), the paper's estimator
    gamma a=inf     flashcl.GammaContrastiveLoss(shape=inf): u = 1 / Z^ (SogCLR)

at batch sizes 16 ... 256 and the full training set, under two budgets: a fixed number of epochs,
and a fixed number of optimizer steps (batch size otherwise confounds the number of updates). For
each (loss, batch, budget) the step size and temperature are chosen from the same small grid on the
validation split (seed 0; score: mean validation R@1 of both directions), never on the test split;
then 5 seeds (initialization, batches, augmentations) are scored on the test digits: cross-modal
retrieval R@1 and R@5 in both directions among the 400 held-out pairs, and linear probes of the
image tower's embeddings with all training labels and with 10 per class.

    python benchmarks/gamma_batch_study.py --pilot   # where does InfoNCE's small-batch gap exist?
    python benchmarks/gamma_batch_study.py           # the study (16 minutes on 2 cores)
    python benchmarks/gamma_batch_study.py --report  # tables and plot again from the study's JSON

The pilot trains InfoNCE at batch 16 and at the full batch on several view pairs and temperatures
(fixed epochs), and reports the validation R@1 of each: the evidence for the study's setting.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import flashcl
from multiview_digits import Tower, augment, load, probe_accuracy, recall_at_k, split, standardize

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = ("InfoNCE", "gamma a=1", "gamma a=inf")
FULL = 0  # the batch size meaning "the whole training set"


def prepare(views):
    arrays, labels = load(list(views))
    train, validation, test = split(labels)
    return {"image": torch.tensor(standardize(arrays[views[0]], train)),
            "text": torch.tensor(standardize(arrays[views[1]], train)), "labels": labels,
            "rows": {"train": train, "validation": validation, "test": test}}


def train(data, loss, batch, lr, temperature, budget, amount, seed, args):
    """The two towers' embeddings of every digit after training; `amount` epochs or steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image, text = data["image"], data["text"]
    rows = torch.tensor(data["rows"]["train"])
    n = len(rows)
    batch = n if batch == FULL else batch
    towers = [Tower(image.shape[1], args.hidden, args.embedding), Tower(text.shape[1], args.hidden, args.embedding)]
    optimizer = torch.optim.Adam([p for t in towers for p in t.parameters()], lr=lr)
    gamma = None
    if loss != "InfoNCE":
        gamma = flashcl.GammaContrastiveLoss(n, shape=1.0 if loss == "gamma a=1" else math.inf, momentum=args.momentum,
                                             generator=torch.Generator().manual_seed(seed))
    per_epoch = n // batch
    steps = amount * per_epoch if budget == "epochs" else amount
    view = lambda x: augment(x, generator, args.noise, args.drop)
    order = []
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        local = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]  # dataset positions 0..n-1
        a, b = towers[0](view(image[rows[local]]))[0], towers[1](view(text[rows[local]]))[0]
        value = flashcl.clip_loss(a, b, 1 / temperature) if gamma is None else gamma(a, b, 1 / temperature, local)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        return [tower.eval()(x)[0].numpy() for tower, x in zip(towers, (image, text))]


def retrieval(data, embeddings, split_name):
    rows = data["rows"][split_name]
    image, text = embeddings[0][rows], embeddings[1][rows]
    return {f"R@{k} {name}": recall_at_k(q, keys, k) for k in (1, 5)
            for name, q, keys in (("image->text", image, text), ("text->image", text, image))}


def probes(data, embeddings, per_class):
    train_rows, test_rows, labels = data["rows"]["train"], data["rows"]["test"], data["labels"]
    image = embeddings[0]
    return {"probe, all labels": probe_accuracy(image[train_rows], labels[train_rows], image[test_rows],
                                                labels[test_rows]),
            f"probe, {per_class} per class": probe_accuracy(image[train_rows], labels[train_rows], image[test_rows],
                                                            labels[test_rows], per_class)}


def selection_score(scores):
    return (scores["R@1 image->text"] + scores["R@1 text->image"]) / 2


def pilot(args):
    """InfoNCE at batch 16 against the full batch, per view pair and temperature, under both budgets."""
    rows, started = [], time.perf_counter()
    budgets = {"epochs": args.epochs, "steps": args.steps}
    grid = list(itertools.product(args.pilot_views, args.pilot_temperatures, budgets, (16, FULL), args.seeds[:2]))
    datasets = {views: prepare(views.split("-")) for views in args.pilot_views}
    for views, temperature, budget, batch, seed in tqdm(grid, desc="pilot trainings"):
        embeddings = train(datasets[views], "InfoNCE", batch, args.pilot_lr, temperature, budget, budgets[budget],
                           seed, args)
        rows.append({"views": views, "temperature": temperature, "budget": budget, "batch": batch, "seed": seed,
                     **retrieval(datasets[views], embeddings, "validation")})
    lines = [f"InfoNCE, Adam {args.pilot_lr}: validation R@1 (mean of both directions and of seeds {args.seeds[:2]}) "
             f"at batch 16 and at the full training batch (1400), after {args.epochs} epochs or {args.steps} steps. "
             f"{(time.perf_counter() - started) / 60:.1f} min.", "",
             "| views | temperature | budget | batch 16 | full batch | full - 16 |", "|---|---:|---|---:|---:|---:|"]
    for views, temperature, budget in itertools.product(args.pilot_views, args.pilot_temperatures, budgets):
        r = {b: statistics.mean(selection_score(x) for x in rows
                                if (x["views"], x["temperature"], x["budget"], x["batch"]) == (views, temperature,
                                                                                                budget, b))
             for b in (16, FULL)}
        lines.append(f"| {views} | {temperature} | {budgets[budget]} {budget} | {r[16]:.3f} | {r[FULL]:.3f} "
                     f"| {r[FULL] - r[16]:+.3f} |")
    table = "\n".join(lines)
    print(table)
    out = args.out.parent / (args.out.name + "_pilot")
    out.with_suffix(".json").write_text(json.dumps({"settings": _settings(args), "runs": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")


def _settings(args):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def study(args):
    data = prepare(args.views.split("-"))
    budgets = {"epochs": args.epochs, "steps": args.steps}
    configs = [(loss, batch, budget) for budget in budgets for loss in LOSSES for batch in args.batch_sizes]
    grid = list(itertools.product(args.lrs, args.temperatures))
    started, chosen, runs = time.perf_counter(), {}, []
    with tqdm(total=len(configs) * (len(grid) + len(args.seeds) - 1), desc="trainings") as progress:
        for loss, batch, budget in configs:
            trials = {}
            for lr, temperature in grid:  # seed 0 on the validation split
                embeddings = train(data, loss, batch, lr, temperature, budget, budgets[budget], args.seeds[0], args)
                trials[(lr, temperature)] = (selection_score(retrieval(data, embeddings, "validation")), embeddings)
                progress.update(1)
            (lr, temperature), (_, first) = max(trials.items(), key=lambda item: item[1][0])
            chosen[f"{loss} | {batch or 'full'} | {budget}"] = {"lr": lr, "temperature": temperature,
                                                               "validation": {f"{k}": v[0] for k, v in trials.items()}}
            for seed in args.seeds:
                embeddings = first if seed == args.seeds[0] else train(data, loss, batch, lr, temperature, budget,
                                                                       budgets[budget], seed, args)
                if seed != args.seeds[0]:
                    progress.update(1)
                runs.append({"loss": loss, "batch": batch or "full", "budget": budget, "seed": seed, "lr": lr,
                             "temperature": temperature,
                             "scores": {**retrieval(data, embeddings, "test"), **probes(data, embeddings, args.per_class)}})
    minutes = (time.perf_counter() - started) / 60
    report(runs, chosen, args, minutes)


def cell(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def mean_recall(run):
    return selection_score(run["scores"])


def headline(runs, args):
    """Mean R@1 of both directions per batch: each gamma variant against InfoNCE at the same batch."""
    lines = ["| budget | batch | InfoNCE | gamma a=1 | vs InfoNCE | gamma a=inf | vs InfoNCE |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for budget, amount in (("epochs", args.epochs), ("steps", args.steps)):
        for batch in args.batch_sizes:
            values = {loss: [mean_recall(r) for r in runs if (r["loss"], r["batch"], r["budget"])
                             == (loss, batch or "full", budget)] for loss in LOSSES}
            base = statistics.mean(values["InfoNCE"])
            gain = lambda loss: f"{statistics.mean(values[loss]) - base:+.3f}"
            lines.append(f"| {amount} {budget} | {batch or 'full'} | {cell(values['InfoNCE'])} | "
                         f"{cell(values['gamma a=1'])} | {gain('gamma a=1')} | {cell(values['gamma a=inf'])} | "
                         f"{gain('gamma a=inf')} |")
    return "\n".join(lines)


def report(runs, chosen, args, minutes):
    metrics = list(runs[0]["scores"])
    sections = ["**Headline: mean R@1 of both directions** (test split, mean +- std over seeds)\n\n" + headline(runs, args)]
    for budget, amount in (("epochs", args.epochs), ("steps", args.steps)):
        lines = [f"**Budget: {amount} {budget}** (test split, mean +- std over seeds {args.seeds}; step size and "
                 "temperature chosen per row on the validation split)", "",
                 "| loss | batch | lr, T | " + " | ".join(metrics) + " |", "|---|---:|---|" + "---:|" * len(metrics)]
        for loss in LOSSES:
            for batch in args.batch_sizes:
                mine = [r for r in runs if (r["loss"], r["batch"], r["budget"]) == (loss, batch or "full", budget)]
                lines.append(f"| {loss} | {batch or 'full'} | {mine[0]['lr']:g}, {mine[0]['temperature']:g} | "
                             + " | ".join(cell([r["scores"][m] for r in mine]) for m in metrics) + " |")
        sections.append("\n".join(lines))
    header = (f"Gamma-weighted loss against InfoNCE by batch size on the UCI Multiple Features digits (views "
              f"{args.views}; 1400 training, 200 validation, 400 test digits); two MLP towers ({args.hidden} hidden, "
              f"{args.embedding}-d); grid lr {args.lrs} x temperature {args.temperatures}; "
              f"{minutes:.1f} min on {torch.get_num_threads()} threads.")
    markdown = header + "\n\n" + "\n\n".join(sections)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"settings": _settings(args), "chosen": chosen, "runs": runs, "minutes": minutes}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(runs, args, args.out.with_suffix(".png"))


def plot(runs, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["R@1 image->text", "R@1 text->image", "R@5 image->text", f"probe, {args.per_class} per class"]
    budgets = ("epochs", "steps")
    fig, axes = plt.subplots(len(budgets), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(budgets)), squeeze=False)
    colors = {"InfoNCE": "tab:red", "gamma a=1": "tab:blue", "gamma a=inf": "tab:green"}
    labels = [str(b or "full") for b in args.batch_sizes]
    for row, budget in enumerate(budgets):
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            for offset, loss in zip((-0.1, 0, 0.1), LOSSES):
                means, stds = [], []
                for batch in args.batch_sizes:
                    values = [r["scores"][metric] for r in runs
                              if (r["loss"], r["batch"], r["budget"]) == (loss, batch or "full", budget)]
                    means.append(statistics.mean(values))
                    stds.append(statistics.stdev(values))
                ax.errorbar(np.arange(len(labels)) + offset, means, yerr=stds, color=colors[loss], marker="o",
                            capsize=3, label=loss)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel("batch size")
            ax.set_title(f"{metric}, {args.epochs if budget == 'epochs' else args.steps} {budget}", fontsize=9)
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilot", action="store_true", help="only the pilot: where InfoNCE's small-batch gap is")
    parser.add_argument("--report", action="store_true", help="rewrite the tables and plot from the study's JSON")
    parser.add_argument("--views", default="fac-zer", help="image-text view pair (the pilot's largest gap: fac-zer)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, FULL],
                        help="0 means the whole training set")
    parser.add_argument("--epochs", type=int, default=20, help="the fixed-epochs budget")
    parser.add_argument("--steps", type=int, default=300, help="the fixed-steps budget")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--momentum", type=float, default=0.9, help="GammaContrastiveLoss's running-estimate weight")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--drop", type=float, default=0.2)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--pilot-views", nargs="+", default=["pix-fou", "fac-zer", "kar-fou", "pix-mor"])
    parser.add_argument("--pilot-temperatures", type=float, nargs="+", default=[0.05, 0.1, 0.3])
    parser.add_argument("--pilot-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=RESULTS / "gamma_batch_study")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.report:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        report(saved["runs"], saved["chosen"], argparse.Namespace(**{**saved["settings"], "out": args.out}),
               saved["minutes"])
        return
    (pilot if args.pilot else study)(args)


if __name__ == "__main__":
    main()
