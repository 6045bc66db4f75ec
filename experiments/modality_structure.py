"""Do the CVPR 2023 modality-structure regularizers help? CLIP alone against CLIP + each regularizer
and + all three, on real multi-view digits and on a synthetic control whose information gap we set.

Two towers (an MLP trunk, a shared head whose unit-norm output the losses align, and a private head
that only the separation term uses) trained CLIP-style on two views, with feature-noise and
feature-dropout augmentations, a learnable logit scale, Adam:

    CLIP            flashcl.clip_loss
    + geometric     + w * flashcl.geometric_consistency_loss(image, text)
    + bridge        + w * flashcl.brownian_bridge_loss(image, text, a second augmentation of the image)
    + separation    + w * flashcl.feature_separation_loss(shared, private), both towers
    + all three     each with its selected weight

Each regularizer's weight is chosen from --weights on the validation split (seed 0; score: mean of
the validation R@1 and the image tower's full-label probe accuracy), never on the test split.
Scored on held-out rows, 5 seeds (initialization, batches, augmentations; the split is fixed):
cross-modal retrieval R@1 in both directions among the held-out pairs, and linear probes on each
tower's frozen shared embeddings with all training labels and with 10 per class.

Datasets:
    digits      UCI Multiple Features (multiview_digits.py): "image" = 240 pixel averages, "text" =
                76 Fourier coefficients; label = the digit.
    synthetic   shared latent s, private latents p_image, p_text (4-d each), each view a random
                tanh network of (s, its own private part) plus noise; two 4-class labels, one from
                the signs of s, one from the signs of p_image, which the text view cannot see.
                The paper's theory says exact alignment must lose the second.

    python experiments/modality_structure.py              # both datasets, about 10 minutes on 2 cores

Writes experiments/results/modality_structure.json (the benchmark harness's results schema, a row
per trained model) and a PNG; its tables, one per dataset: `tables()`, which
tools/generate_tables.py puts in the docs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import flashcl
from multiview_digits import Tower, augment, load, probe_accuracy, recall_at_k, split, standardize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REGULARIZERS = ("geometric", "bridge", "separation")
VARIANTS = {"CLIP": (), "+ geometric": ("geometric",), "+ bridge": ("bridge",), "+ separation": ("separation",),
            "+ all three": REGULARIZERS}


def digits_data():
    views, labels = load(["pix", "fou"])
    train, validation, test = split(labels)
    return {"image": standardize(views["pix"], train), "text": standardize(views["fou"], train),
            "labels": {"digit": labels}, "rows": {"train": train, "validation": validation, "test": test}}


def synthetic_data(n=2000, latent=4, dim=64, noise=0.1, seed=0):
    """Views that share s and each carry a private part; a label in each of s and p_image."""
    rng = np.random.default_rng(seed)
    shared, private_image, private_text = (rng.standard_normal((n, latent)) for _ in range(3))

    def view(private):
        hidden = np.tanh(np.concatenate([shared, private], 1) @ rng.standard_normal((2 * latent, 4 * dim)) / 2)
        return hidden @ rng.standard_normal((4 * dim, dim)) / np.sqrt(4 * dim) + noise * rng.standard_normal((n, dim))

    quadrant = lambda z: (z[:, 0] > 0).astype(np.int64) * 2 + (z[:, 1] > 0)
    labels = {"private (image only)": quadrant(private_image), "shared": quadrant(shared)}
    train, validation, test = split(labels["private (image only)"])
    image, text = view(private_image), view(private_text)
    return {"image": standardize(image, train), "text": standardize(text, train), "labels": labels,
            "rows": {"train": train, "validation": validation, "test": test}}


def train(data, weights, seed, args):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image, text = torch.tensor(data["image"]), torch.tensor(data["text"])
    towers = nn.ModuleDict({"image": Tower(image.shape[1], args.hidden, args.embedding),
                            "text": Tower(text.shape[1], args.hidden, args.embedding)})
    log_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    optimizer = torch.optim.Adam([*towers.parameters(), log_scale], lr=args.lr)
    loss_fn = flashcl.ModalityStructureLoss(**{name: weights.get(name, 0.0) for name in REGULARIZERS})
    rows = torch.tensor(data["rows"]["train"])
    view = lambda x: augment(x, generator, args.noise, args.drop)
    for _ in range(args.epochs):
        order = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(order) - args.batch + 1, args.batch):
            batch = order[start:start + args.batch]
            image_shared, image_private = towers["image"](view(image[batch]))
            text_shared, text_private = towers["text"](view(text[batch]))
            image_aug = towers["image"](view(image[batch]))[0] if weights.get("bridge") else None
            loss = loss_fn(image_shared, text_shared, log_scale.exp().clamp(max=100), image_aug=image_aug,
                           image_private=image_private, text_private=text_private)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        towers.eval()
        return {name: towers[name](x)[0].numpy() for name, x in (("image", image), ("text", text))}


def evaluate(data, embeddings, split_name, per_class):
    train_rows, rows = data["rows"]["train"], data["rows"][split_name]
    image, text = embeddings["image"], embeddings["text"]
    scores = {"R@1 image->text": recall_at_k(image[rows], text[rows]),
              "R@1 text->image": recall_at_k(text[rows], image[rows])}
    for tower in ("image", "text"):
        for label_name, labels in data["labels"].items():
            for k in (None, per_class):
                key = f"{tower} probe, {label_name}, {'all labels' if k is None else f'{k} per class'}"
                scores[key] = probe_accuracy(embeddings[tower][train_rows], labels[train_rows],
                                             embeddings[tower][rows], labels[rows], k)
    return scores


def validation_score(scores):
    main_probe = next(k for k in scores if k.startswith("image probe") and k.endswith("all labels"))
    return (scores["R@1 image->text"] + scores["R@1 text->image"]) / 4 + scores[main_probe] / 2


def run(dataset, data, args, progress):
    chosen = {}
    for name in REGULARIZERS:  # each regularizer's weight, on the validation split
        scores = {w: validation_score(evaluate(data, train(data, {name: w}, 0, args), "validation", args.per_class))
                  for w in args.weights}
        progress.update(len(args.weights))
        chosen[name] = max(scores, key=scores.get)
        chosen[f"{name} validation scores"] = scores
    runs = []
    for variant, names in VARIANTS.items():
        for seed in args.seeds:
            embeddings = train(data, {name: chosen[name] for name in names}, seed, args)
            runs.append({"dataset": dataset, "variant": variant, "seed": seed,
                         "weights": {name: chosen[name] for name in names},
                         "scores": evaluate(data, embeddings, "test", args.per_class)})
            progress.update(1)
    return chosen, runs


def cell(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def datasets_of(runs):
    return list(dict.fromkeys(run["dataset"] for run in runs))


def metrics_of(runs, dataset):
    """The scores shown for `dataset`: all but the text tower's probes of the image's private label,
    which the text view cannot see."""
    metrics = list(next(r for r in runs if r["dataset"] == dataset)["scores"])
    return [m for m in metrics if not m.startswith("text probe, private")]


def table(runs, dataset, metrics):
    lines = []
    for variant in VARIANTS:
        chosen = [r for r in runs if r["dataset"] == dataset and r["variant"] == variant]
        weights = ", ".join(f"{k} {v:g}" for k, v in chosen[0]["weights"].items())
        lines.append({"loss": f"{variant} ({weights})" if weights else variant,
                      **{m: cell([r["scores"][m] for r in chosen]) for m in metrics}})
    columns = [(name, lambda row, name=name: row[name]) for name in ("loss", *metrics)]
    return harness.markdown_table(columns, lines, "l" + "r" * len(metrics))


def tables(results: dict) -> dict[str, str]:
    """A table per dataset in the results ("digits", "synthetic"), the study's description above
    the first; from the results alone."""
    settings, runs = results["settings"], results["rows"]
    header = (f"CLIP vs CLIP + CVPR 2023 regularizers, {settings['epochs']} epochs, batch {settings['batch']}, two MLP "
              f"towers ({settings['hidden']} hidden, {settings['embedding']}-d embeddings); weights chosen on the "
              f"validation split from {settings['weights']}; {results['minutes']:.1f} min on "
              f"{results['provenance']['machine']['cpu_threads']} threads.")
    sections = {}
    for dataset in datasets_of(runs):
        sections[dataset] = (("" if sections else header + "\n\n")
                             + f"**{dataset}** ({results['held_out_pairs'][dataset]} held-out pairs; mean +- std "
                             f"over seeds {settings['seeds']}):\n\n" + table(runs, dataset, metrics_of(runs, dataset)))
    return sections


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["rows"]
    panels = [(dataset, metrics_of(runs, dataset)) for dataset in datasets_of(runs)]
    fig, axes = plt.subplots(len(panels), max(len(m) for _, m in panels), figsize=(18, 4 * len(panels)),
                             squeeze=False)
    colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"]
    for row, (dataset, metrics) in enumerate(panels):
        for col, metric in enumerate(metrics):
            ax = axes[row, col]
            for i, variant in enumerate(VARIANTS):
                values = [r["scores"][metric] for r in runs if r["dataset"] == dataset and r["variant"] == variant]
                ax.bar(i, statistics.mean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0,
                       color=colors[i], alpha=0.75, capsize=3)
                ax.scatter([i] * len(values), values, color="k", s=8, zorder=3)
            all_values = [r["scores"][metric] for r in runs if r["dataset"] == dataset]
            ax.set_ylim(max(0, min(all_values) - 0.05), min(1, max(all_values) + 0.03))
            ax.set_xticks(range(len(VARIANTS)), list(VARIANTS), fontsize=7, rotation=20)
            ax.set_title(f"{dataset}\n" + metric.replace(", ", "\n", 1), fontsize=8)
        for col in range(len(metrics), axes.shape[1]):
            axes[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "synthetic"], choices=["digits", "synthetic"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="validation grid per regularizer")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embedding", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.3, help="augmentation: Gaussian noise, in feature stds")
    parser.add_argument("--drop", type=float, default=0.2, help="augmentation: fraction of features zeroed")
    parser.add_argument("--per-class", type=int, default=10, help="labels per class for the few-label probe")
    parser.add_argument("--out", type=Path, default=RESULTS / "modality_structure")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    results = harness.new_results(__file__, {k: v for k, v in vars(args).items() if k != "out"})

    datasets = {name: {"digits": digits_data, "synthetic": synthetic_data}[name]() for name in args.datasets}
    started, chosen = time.perf_counter(), {}
    total = len(datasets) * (len(REGULARIZERS) * len(args.weights) + len(VARIANTS) * len(args.seeds))
    with tqdm(total=total, desc="trainings") as progress:
        for dataset, data in datasets.items():
            chosen[dataset], dataset_runs = run(dataset, data, args, progress)
            results["rows"] += dataset_runs
    results.update(chosen_weights=chosen, minutes=(time.perf_counter() - started) / 60,
                   held_out_pairs={dataset: len(data["rows"]["test"]) for dataset, data in datasets.items()})
    written = harness.write_results(args.out, results, plot)
    print("\n\n".join(tables(results).values()))
    print(f"\nwrote {written} and .png")


if __name__ == "__main__":
    main()
