"""Small batches on real data: SimCLR-style learning on scikit-learn's digits, judged by a linear probe.

Two augmented views of each 8x8 digit (a shift of up to one pixel, a random 3x3 erasure, intensity
jitter, pixel noise), a small convolutional encoder with a projection head, and a contrastive loss
between the views:

    InfoNCE             flashcl.clip_loss(z1, z2, 1/T), at batch sizes 16, 64 and 512
    gamma-weighted      flashcl.GammaContrastiveLoss(shape a), a = 1 and a = inf, at 16 and 64

each for 3 seeds, the same epochs, optimizer and step size. The labels are used only by the probes:
logistic regressions on the frozen encoder's features of the training split, scored on a held-out
split, one trained on every training label and one on 10 labels per class (the full probe is
near its ceiling on digits even from raw pixels). Also scored: raw pixels and an untrained encoder.

    python experiments/gamma_digits.py            # the default run: a few minutes on 2 CPU cores
    python experiments/gamma_digits.py --epochs 1 --train-images 300 --configs InfoNCE:16 "gamma a=1:16"  # a check

Writes experiments/results/gamma_digits.json (the benchmark harness's results schema, a row per
trained model) and a PNG; its table: `tables()`, which tools/generate_tables.py puts in the docs.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import flashcl
from multiview_digits import probe_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("InfoNCE", "gamma a=1", "gamma a=inf")
CONFIGS = [("InfoNCE", 16), ("InfoNCE", 64), ("InfoNCE", 512),
           ("gamma a=1", 16), ("gamma a=1", 64), ("gamma a=inf", 16), ("gamma a=inf", 64)]


def augment(images, generator):
    """A random view of each (B, 8, 8) image in [0, 1]."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, :, None]
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, :]
    view = padded[torch.arange(n)[:, None, None], rows, cols]
    top, left = torch.randint(0, 6, (2, n), generator=generator)
    pixel = torch.arange(8)
    in_rows = (pixel[None, :] >= top[:, None]) & (pixel[None, :] < top[:, None] + 3)
    in_cols = (pixel[None, :] >= left[:, None]) & (pixel[None, :] < left[:, None] + 3)
    erase = in_rows[:, :, None] & in_cols[:, None, :]
    view = view.masked_fill(erase, 0.0)
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, generator=generator)
    return (view * gain + 0.1 * torch.randn(view.shape, generator=generator)).flatten(1)


class Encoder(nn.Module):
    """Two 3x3 convolutions and a linear layer (the features the probes see), then a projection head."""

    def __init__(self, width=64, projection=64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 16, 256), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, projection))

    def forward(self, x):
        return F.normalize(self.head(self.features(x)), dim=1)


def probes(features_train, y_train, features_test, y_test, per_class):
    return {"all labels": probe_accuracy(features_train, y_train, features_test, y_test),
            f"{per_class} labels per class": probe_accuracy(features_train, y_train, features_test, y_test, per_class)}


def train(method, batch, seed, data, args):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, n = data["train_images"], data["train_images"].shape[0]
    model = Encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    gamma = None
    if method != "InfoNCE":
        gamma = flashcl.GammaContrastiveLoss(num_samples=n, shape={"gamma a=1": 1.0, "gamma a=inf": math.inf}[method],
                                             momentum=args.momentum, generator=torch.Generator().manual_seed(seed))
    for _ in range(args.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):  # full batches only, the same for every method
            index = order[start:start + batch]
            z1 = model(augment(images[index], generator))
            z2 = model(augment(images[index], generator))
            if gamma is None:
                loss = flashcl.clip_loss(z1, z2, 1 / args.temperature)
            else:
                loss = gamma(z1, z2, 1 / args.temperature, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        model.eval()
        train_features = model.features(data["train_flat"]).numpy()
        test_features = model.features(data["test_flat"]).numpy()
    return probes(train_features, data["train_labels"], test_features, data["test_labels"], args.labels_per_class)


def config(text):
    """A "loss:batch" argument, e.g. "gamma a=1:16"."""
    method, _, batch = text.rpartition(":")
    if method not in METHODS or not batch.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not loss:batch with a loss in {METHODS}")
    return method, int(batch)


def cell(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def configs_of(rows):
    return list(dict.fromkeys((row["method"], row["batch"]) for row in rows))


def tables(results: dict) -> dict[str, str]:
    """The probes' accuracy per loss and batch, and of the baselines, from the results alone."""
    settings, rows, images = results["settings"], results["rows"], results["images"]
    metrics = list(rows[0]["accuracy"])
    lines = [{"loss": f"{name} (no training)", "batch": "-", **{m: f"{accs[m]:.3f}" for m in metrics}}
             for name, accs in results["baselines"].items()]
    for method, batch in configs_of(rows):
        accs = [r["accuracy"] for r in rows if (r["method"], r["batch"]) == (method, batch)]
        lines.append({"loss": method, "batch": batch, **{m: cell([a[m] for a in accs]) for m in metrics}})
    columns = [("loss", lambda r: r["loss"]), ("batch", lambda r: r["batch"]),
               *[(m, lambda r, m=m: r[m]) for m in metrics]]
    caption = (f"Linear-probe accuracy on the held-out 20% of sklearn digits ({images['test']} images) after "
               f"{settings['epochs']} epochs of contrastive learning, mean +- std over seeds {settings['seeds']}, "
               f"probes trained on all {images['train']} training labels or on {settings['labels_per_class']} per "
               f"class (mean of 5 draws). {results['minutes']:.1f} min on "
               f"{results['provenance']['machine']['cpu_threads']} threads.")
    return {"probe": caption + "\n\n" + harness.markdown_table(columns, lines, "lr" + "r" * len(metrics))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size, the same for every batch size")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--momentum", type=float, default=0.9, help="GammaContrastiveLoss's running-estimate weight")
    parser.add_argument("--labels-per-class", type=int, default=10, help="for the few-label probe")
    parser.add_argument("--configs", type=config, nargs="+", default=CONFIGS,
                        help='loss:batch pairs to train, e.g. InfoNCE:16 "gamma a=1:16" (default: all seven)')
    parser.add_argument("--train-images", type=int, default=None,
                        help="train (and fit the probes) on a stratified subset of this many training images")
    parser.add_argument("--out", type=Path, default=RESULTS / "gamma_digits")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = harness.new_results(__file__, {k: v for k, v in vars(args).items() if k != "out"})

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.images / 16.0, digits.target, test_size=0.2,
                                                        stratify=digits.target, random_state=0)
    if args.train_images is not None and args.train_images < len(y_train):
        x_train, _, y_train, _ = train_test_split(x_train, y_train, train_size=args.train_images, stratify=y_train,
                                                  random_state=0)
    data = {"train_images": torch.tensor(x_train, dtype=torch.float32), "train_labels": y_train,
            "train_flat": torch.tensor(x_train, dtype=torch.float32).flatten(1),
            "test_flat": torch.tensor(x_test, dtype=torch.float32).flatten(1), "test_labels": y_test}
    baselines = {"raw pixels": probes(x_train.reshape(len(x_train), -1), y_train, x_test.reshape(len(x_test), -1),
                                      y_test, args.labels_per_class)}
    with torch.no_grad():
        torch.manual_seed(0)
        untrained = Encoder().features
        baselines["untrained encoder"] = probes(untrained(data["train_flat"]).numpy(), y_train,
                                                untrained(data["test_flat"]).numpy(), y_test, args.labels_per_class)

    started = time.perf_counter()
    for method, batch in tqdm(args.configs, desc="configs"):
        for seed in args.seeds:
            results["rows"].append({"method": method, "batch": batch, "seed": seed,
                                    "accuracy": train(method, batch, seed, data, args)})
    results.update(baselines=baselines, images={"train": len(y_train), "test": len(y_test)},
                   minutes=(time.perf_counter() - started) / 60)
    written = harness.write_results(args.out, results, plot)
    print(tables(results)["probe"])
    print(f"\nwrote {written} and .png")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, baselines = results["rows"], results["baselines"]
    configs = configs_of(runs)
    metrics = list(runs[0]["accuracy"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 3.8))
    colors = {"InfoNCE": "tab:red", "gamma a=1": "tab:blue", "gamma a=inf": "tab:green"}
    for ax, metric in zip(axes, metrics):
        for i, (method, batch) in enumerate(configs):
            accs = [r["accuracy"][metric] for r in runs if r["method"] == method and r["batch"] == batch]
            ax.bar(i, statistics.mean(accs), color=colors[method], alpha=0.7)
            ax.scatter([i] * len(accs), accs, color="k", s=10, zorder=3)
        for name, accs in baselines.items():
            ax.axhline(accs[metric], ls="--", lw=1, color="gray")
            ax.text(len(configs) - 0.5, accs[metric], name, fontsize=7, va="bottom", ha="right", color="gray")
        ax.set_xticks(range(len(configs)), [f"{m}\nB={b}" for m, b in configs], fontsize=7)
        ax.set_title(f"linear probe, {metric}", fontsize=9)
        lows = [r["accuracy"][metric] for r in runs] + [accs[metric] for accs in baselines.values()]
        ax.set_ylim(min(lows) - 0.03, min(1.0, max(lows) + 0.02))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
