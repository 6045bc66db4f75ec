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

    python experiments/gamma_batch_study.py --pilot   # where does InfoNCE's small-batch gap exist?
    python experiments/gamma_batch_study.py           # the study (16 minutes on 2 cores)
    python experiments/gamma_batch_study.py --report  # tables and plot again from the study's JSON

The pilot trains InfoNCE at batch 16 and at the full batch on several view pairs and temperatures
(fixed epochs), and reports the validation R@1 of each: the evidence for the study's setting.

Writes experiments/results/gamma_batch_study.json and .png (the pilot: gamma_batch_study_pilot.json),
in the benchmark harness's results schema, a row per trained model; its tables: `tables()`, which
tools/generate_tables.py puts in the docs.
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import flashcl
from multiview_digits import Tower, augment, load, probe_accuracy, recall_at_k, split, standardize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

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
    results = harness.new_results(__file__, _settings(args))
    started = time.perf_counter()
    budgets = {"epochs": args.epochs, "steps": args.steps}
    grid = list(itertools.product(args.pilot_views, args.pilot_temperatures, budgets, (16, FULL), args.seeds[:2]))
    datasets = {views: prepare(views.split("-")) for views in args.pilot_views}
    for views, temperature, budget, batch, seed in tqdm(grid, desc="pilot trainings"):
        embeddings = train(datasets[views], "InfoNCE", batch, args.pilot_lr, temperature, budget, budgets[budget],
                           seed, args)
        results["rows"].append({"views": views, "temperature": temperature, "budget": budget, "batch": batch,
                                "seed": seed, **retrieval(datasets[views], embeddings, "validation")})
    results["minutes"] = (time.perf_counter() - started) / 60
    written = harness.write_results(args.out.parent / (args.out.name + "_pilot"), results)
    print(tables(results)["pilot"])
    print(f"\nwrote {written}")


def pilot_table(results):
    settings, rows = results["settings"], results["rows"]
    budgets = {"epochs": settings["epochs"], "steps": settings["steps"]}
    caption = (f"InfoNCE, Adam {settings['pilot_lr']}: validation R@1 (mean of both directions and of seeds "
               f"{settings['seeds'][:2]}) at batch 16 and at the full training batch (1400), after "
               f"{settings['epochs']} epochs or {settings['steps']} steps. {results['minutes']:.1f} min.")
    lines = []
    for views, temperature, budget in itertools.product(settings["pilot_views"], settings["pilot_temperatures"],
                                                        budgets):
        r = {b: statistics.mean(selection_score(x) for x in rows
                                if (x["views"], x["temperature"], x["budget"], x["batch"]) == (views, temperature,
                                                                                                budget, b))
             for b in (16, FULL)}
        lines.append({"views": views, "temperature": temperature, "budget": f"{budgets[budget]} {budget}",
                      "batch 16": f"{r[16]:.3f}", "full batch": f"{r[FULL]:.3f}",
                      "full - 16": f"{r[FULL] - r[16]:+.3f}"})
    columns = [(name, lambda row, name=name: row[name])
               for name in ("views", "temperature", "budget", "batch 16", "full batch", "full - 16")]
    return caption + "\n\n" + harness.markdown_table(columns, lines, "lrlrrr")


def _settings(args):
    return {k: v for k, v in vars(args).items() if k not in ("out", "report")}


def study(args):
    results = harness.new_results(__file__, _settings(args))
    data = prepare(args.views.split("-"))
    budgets = {"epochs": args.epochs, "steps": args.steps}
    configs = [(loss, batch, budget) for budget in budgets for loss in LOSSES for batch in args.batch_sizes]
    grid = list(itertools.product(args.lrs, args.temperatures))
    started, chosen, runs = time.perf_counter(), {}, results["rows"]
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
    results.update(chosen=chosen, minutes=(time.perf_counter() - started) / 60)
    written = harness.write_results(args.out, results, plot)
    print("\n\n".join(tables(results).values()))
    print(f"\nwrote {written} and .png")


def cell(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def mean_recall(run):
    return selection_score(run["scores"])


def of(runs, loss, batch, budget):
    return [r for r in runs if (r["loss"], r["batch"], r["budget"]) == (loss, batch or "full", budget)]


def headline(results):
    """Mean R@1 of both directions per batch: each gamma variant against InfoNCE at the same batch."""
    settings, lines = results["settings"], []
    for budget in ("epochs", "steps"):
        for batch in settings["batch_sizes"]:
            values = {loss: [mean_recall(r) for r in of(results["rows"], loss, batch, budget)] for loss in LOSSES}
            base = statistics.mean(values["InfoNCE"])
            gain = lambda loss: f"{statistics.mean(values[loss]) - base:+.3f}"
            lines.append({"budget": f"{settings[budget]} {budget}", "batch": batch or "full",
                          "InfoNCE": cell(values["InfoNCE"]), "gamma a=1": cell(values["gamma a=1"]),
                          "vs a=1": gain("gamma a=1"), "gamma a=inf": cell(values["gamma a=inf"]),
                          "vs a=inf": gain("gamma a=inf")})
    columns = [(header, lambda row, key=key: row[key]) for header, key in (
        ("budget", "budget"), ("batch", "batch"), ("InfoNCE", "InfoNCE"), ("gamma a=1", "gamma a=1"),
        ("vs InfoNCE", "vs a=1"), ("gamma a=inf", "gamma a=inf"), ("vs InfoNCE", "vs a=inf"))]
    return harness.markdown_table(columns, lines, "lrrrrrr")


def budget_table(results, budget):
    """Every test score per loss and batch under one budget, with the chosen step size and temperature."""
    settings, runs = results["settings"], results["rows"]
    metrics = list(runs[0]["scores"])
    lines = []
    for loss in LOSSES:
        for batch in settings["batch_sizes"]:
            mine = of(runs, loss, batch, budget)
            lines.append({"loss": loss, "batch": batch or "full",
                          "lr, T": f"{mine[0]['lr']:g}, {mine[0]['temperature']:g}",
                          **{m: cell([r["scores"][m] for r in mine]) for m in metrics}})
    columns = [(name, lambda row, name=name: row[name]) for name in ("loss", "batch", "lr, T", *metrics)]
    return (f"**Budget: {settings[budget]} {budget}** (test split, mean +- std over seeds {settings['seeds']}; step "
            "size and temperature chosen per row on the validation split)\n\n"
            + harness.markdown_table(columns, lines, "lrl" + "r" * len(metrics)))


def tables(results: dict) -> dict[str, str]:
    """The pilot's table ("pilot") or the study's: "recall", the headline (mean R@1 of both
    directions per loss and batch, under the study's description), and "probe", every test score
    (retrieval and the linear probes) per budget; from the results alone."""
    settings = results["settings"]
    if settings.get("pilot"):
        return {"pilot": pilot_table(results)}
    header = (f"Gamma-weighted loss against InfoNCE by batch size on the UCI Multiple Features digits (views "
              f"{settings['views']}; 1400 training, 200 validation, 400 test digits); two MLP towers "
              f"({settings['hidden']} hidden, {settings['embedding']}-d); grid lr {settings['lrs']} x temperature "
              f"{settings['temperatures']}; {results['minutes']:.1f} min on "
              f"{results['provenance']['machine']['cpu_threads']} threads.")
    recall = (header + "\n\n**Headline: mean R@1 of both directions** (test split, mean +- std over seeds)\n\n"
              + headline(results))
    return {"recall": recall, "probe": "\n\n".join(budget_table(results, budget) for budget in ("epochs", "steps"))}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, runs = results["settings"], results["rows"]
    metrics = ["R@1 image->text", "R@1 text->image", "R@5 image->text", f"probe, {settings['per_class']} per class"]
    budgets = ("epochs", "steps")
    fig, axes = plt.subplots(len(budgets), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(budgets)), squeeze=False)
    colors = {"InfoNCE": "tab:red", "gamma a=1": "tab:blue", "gamma a=inf": "tab:green"}
    labels = [str(b or "full") for b in settings["batch_sizes"]]
    for row, budget in enumerate(budgets):
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            for offset, loss in zip((-0.1, 0, 0.1), LOSSES):
                means, stds = [], []
                for batch in settings["batch_sizes"]:
                    values = [r["scores"][metric] for r in of(runs, loss, batch, budget)]
                    means.append(statistics.mean(values))
                    stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
                ax.errorbar(np.arange(len(labels)) + offset, means, yerr=stds, color=colors[loss], marker="o",
                            capsize=3, label=loss)
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel("batch size")
            ax.set_title(f"{metric}, {settings[budget]} {budget}", fontsize=9)
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        results = harness.load_results(args.out.with_suffix(".json"))
        plot(results, args.out.with_suffix(".png"))
        print("\n\n".join(tables(results).values()))
        return
    (pilot if args.pilot else study)(args)


if __name__ == "__main__":
    main()
