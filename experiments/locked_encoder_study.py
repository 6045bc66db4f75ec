"""Do the gamma-weighted loss and the modality-structure regularizers help with a real pretrained
encoder on real text? A locked-encoder (LiT-style) study on the docstring pairs.

The encoder, all-MiniLM-L6-v2, is frozen: experiments/docstring_pairs.py embedded each pair's two
sides once (query: a function's or class's qualified name and signature; document: the first
paragraph of its docstring). Only a linear head per side (384 -> 128, unit-norm output) is trained,
CLIP-style, on the cached embeddings; both heads start as the same random orthogonal projection, so
training starts from the encoder's own alignment. The split is fixed by a hash of the qualified name
(80% train, 10% validation, 10% test), so no test pair is ever trained on or selected on.

Part 1, the batch study: InfoNCE against the gamma-weighted loss

    InfoNCE         flashcl.clip_loss(query, document, 1 / temperature)
    gamma a=1       flashcl.GammaContrastiveLoss(shape=1): u ~ Gamma(1, Z^), the paper's estimator
    gamma a=inf     flashcl.GammaContrastiveLoss(shape=inf): u = 1 / Z^ (SogCLR)

at batch sizes 16 to 2048 and the whole batch-study training set, under a fixed number of epochs (5)
and a fixed number of optimizer steps (150). The batch study trains on 4096 pairs of the training
split (its first in hash order, --study-train-pairs): one full-batch step over the whole training
split costs seconds on one thread, and the study trains 576 models; for the same reason the
fixed-steps budget stops at batch 1024. For each (loss, batch, budget) the step size and temperature
are chosen from a grid (Adam lr 1e-3, 1e-2 x temperature 0.03, 0.05, 0.1, 0.2) on the validation
split (seed 0; score: mean validation R@1 of both directions), then 5 seeds (initialization, batch
order, gamma draws) are scored on the test split: R@1 and R@10 in both directions among the
held-out pairs. The question: does any loss at batch b reach InfoNCE at 8b?

Part 2, the CVPR 2023 regularizers: CLIP alone against CLIP + geometric consistency, + Brownian
bridge (the document side plays the image: its second view is its cached embedding with feature
dropout and noise), + feature separation (a private head per side) and + all three, trained on the
whole training split with a learnable logit scale; each weight chosen on the validation split
(score: mean of validation R@1 and the package probe's accuracy). Scored on the test split:
retrieval R@1, and a probe that needs the document side's own information: a logistic regression
predicting the pair's package (30 labels; the standard library counts as one) from the document
head's embedding, fitted on the training split.

    python experiments/docstring_pairs.py                # once: the pairs and their embeddings
    python experiments/locked_encoder_study.py           # both parts: 15 minutes, see below
    python experiments/locked_encoder_study.py --smoke   # a tiny run, seconds
    python experiments/locked_encoder_study.py --report  # tables and plot again from the JSON

The default run took 15 minutes on one thread of a busy 2-core machine (12 for the batch study's 576
trainings, 3 for the regularizers' 34; the results record both). It writes
experiments/results/locked_encoder_study.json (the benchmark harness's results schema, a row per
scored model) and .png; its tables: `tables()`, which tools/generate_tables.py puts in the docs.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import flashcl
import docstring_pairs
from multiview_digits import augment, recall_at_k

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = ("InfoNCE", "gamma a=1", "gamma a=inf")
FULL = 0  # the batch size meaning "the whole batch-study training set"
REGULARIZERS = ("geometric", "bridge", "separation")
VARIANTS = {"CLIP": (), "+ geometric": ("geometric",), "+ bridge": ("bridge",), "+ separation": ("separation",),
            "+ all three": REGULARIZERS}
DIRECTIONS = ("name->doc", "doc->name")
PROBE = "package probe"


def prepare(cache: Path, study_train_pairs: int) -> dict:
    pairs, query, document = docstring_pairs.load(cache)
    rows = {split: np.array([i for i, p in enumerate(pairs) if p["split"] == split])
            for split in ("train", "validation", "test")}
    by_hash = sorted(rows["train"], key=lambda i: hashlib.sha256(pairs[i]["name"].encode()).hexdigest())
    rows["study_train"] = np.sort(np.array(by_hash[:study_train_pairs or len(by_hash)]))
    names = sorted({p["label"] for p in pairs})
    return {"query": torch.tensor(query), "document": torch.tensor(document), "rows": rows, "label_names": names,
            "labels": np.array([names.index(p["label"]) for p in pairs])}


class Head(nn.Module):
    """A linear projection of the frozen embedding to a unit-norm shared embedding, and a second
    (private) one that only the separation term uses."""

    def __init__(self, inputs: int, embedding: int, private: bool = False):
        super().__init__()
        self.shared = nn.Linear(inputs, embedding)
        self.private = nn.Linear(inputs, embedding) if private else None

    def forward(self, x):
        shared = F.normalize(self.shared(x), dim=1)
        return shared, (F.normalize(self.private(x), dim=1) if self.private is not None else None)


def heads_for(inputs: int, embedding: int, private: bool = False) -> nn.ModuleDict:
    """Both sides' heads, starting as the same random orthogonal projection: the encoder embeds both
    sides in one space, so training starts from its alignment (up to the projection), not from
    scratch."""
    heads = nn.ModuleDict({"query": Head(inputs, embedding, private), "document": Head(inputs, embedding, private)})
    projection = nn.init.orthogonal_(torch.empty(embedding, inputs))
    with torch.no_grad():
        for head in heads.values():
            head.shared.weight.copy_(projection)
            head.shared.bias.zero_()
    return heads


def head_embeddings(heads, data):
    with torch.no_grad():
        return {side: heads[side](data[side])[0].numpy() for side in ("query", "document")}


def retrieval(embeddings, rows, ks=(1, 10)):
    query, document = embeddings["query"][rows], embeddings["document"][rows]
    return {f"R@{k} {name}": recall_at_k(a, b, k) for k in ks
            for name, a, b in ((DIRECTIONS[0], query, document), (DIRECTIONS[1], document, query))}


def mean_r1(scores):
    return (scores[f"R@1 {DIRECTIONS[0]}"] + scores[f"R@1 {DIRECTIONS[1]}"]) / 2


def package_probe(data, features, split):
    """Accuracy on `split` of a logistic regression from `features` to the package, fitted on the
    training split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, held_out, labels = data["rows"]["train"], data["rows"][split], data["labels"]
    if len(np.unique(labels[train])) < 2:  # one package (a tiny run): the probe can only say it
        return float(np.mean(labels[held_out] == labels[train][0]))
    scaler = StandardScaler().fit(features[train])
    probe = LogisticRegression(max_iter=300).fit(scaler.transform(features[train]), labels[train])
    return float(probe.score(scaler.transform(features[held_out]), labels[held_out]))


# ---------------------------------------------------------------------------------------------
# Part 1: the batch study


def train_batch(data, loss, batch, lr, temperature, budget, amount, seed, args):
    """Both heads' embeddings of every pair after training; `amount` epochs or steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor(data["rows"]["study_train"])
    n = len(rows)
    batch = n if batch == FULL else min(batch, n)
    heads = heads_for(data["query"].shape[1], args.embedding)
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    gamma = None
    if loss != "InfoNCE":
        gamma = flashcl.GammaContrastiveLoss(n, shape=1.0 if loss == "gamma a=1" else math.inf, momentum=args.momentum,
                                             generator=torch.Generator().manual_seed(seed))
    per_epoch = n // batch
    steps = amount * per_epoch if budget == "epochs" else amount
    order = []
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(n, generator=generator)
        local = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]  # dataset positions 0..n-1
        q, d = heads["query"](data["query"][rows[local]])[0], heads["document"](data["document"][rows[local]])[0]
        value = flashcl.clip_loss(q, d, 1 / temperature) if gamma is None else gamma(q, d, 1 / temperature, local)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return head_embeddings(heads, data)


def batch_configs(args):
    budgets = {"epochs": args.epochs, "steps": args.steps}
    return budgets, [(loss, batch, budget) for budget in budgets for loss in LOSSES for batch in args.batch_sizes
                     if budget == "epochs" or (batch != FULL and batch <= args.max_steps_batch)]


def batch_study(data, args, results, progress):
    budgets, configs = batch_configs(args)
    grid = list(itertools.product(args.lrs, args.temperatures))
    chosen = {}
    for loss, batch, budget in configs:
        trials = {}
        for lr, temperature in grid:  # seed 0 on the validation split
            embeddings = train_batch(data, loss, batch, lr, temperature, budget, budgets[budget], args.seeds[0], args)
            trials[(lr, temperature)] = (mean_r1(retrieval(embeddings, data["rows"]["validation"])), embeddings)
            progress.update(1)
        (lr, temperature), (_, first) = max(trials.items(), key=lambda item: item[1][0])
        chosen[f"{loss} | {batch or 'full'} | {budget}"] = {"lr": lr, "temperature": temperature,
                                                           "validation": {str(k): v[0] for k, v in trials.items()}}
        for seed in args.seeds:
            embeddings = first if seed == args.seeds[0] else train_batch(data, loss, batch, lr, temperature, budget,
                                                                         budgets[budget], seed, args)
            if seed != args.seeds[0]:
                progress.update(1)
            results["rows"].append({"study": "batch", "loss": loss, "batch": batch or "full", "budget": budget,
                                    "seed": seed, "lr": lr, "temperature": temperature,
                                    "scores": retrieval(embeddings, data["rows"]["test"])})
    results["chosen"] = chosen


# ---------------------------------------------------------------------------------------------
# Part 2: the regularizers


def train_regularized(data, weights, seed, args):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    heads = heads_for(data["query"].shape[1], args.embedding, private=bool(weights.get("separation")))
    log_scale = nn.Parameter(torch.tensor(math.log(1 / args.reg_temperature)))
    optimizer = torch.optim.Adam([*heads.parameters(), log_scale], lr=args.reg_lr)
    loss_fn = flashcl.ModalityStructureLoss(**{name: weights.get(name, 0.0) for name in REGULARIZERS})
    rows = torch.tensor(data["rows"]["train"])
    for _ in range(args.reg_epochs):
        order = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(order) - args.reg_batch + 1, args.reg_batch):
            batch = order[start:start + args.reg_batch]
            document, document_private = heads["document"](data["document"][batch])
            query, query_private = heads["query"](data["query"][batch])
            document_aug = None
            if weights.get("bridge"):
                view = augment(data["document"][batch], generator, args.noise, args.drop)
                document_aug = heads["document"](view)[0]
            loss = loss_fn(document, query, log_scale.exp().clamp(max=100), image_aug=document_aug,
                           image_private=document_private, text_private=query_private)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head_embeddings(heads, data)


def regularizer_scores(data, embeddings, split):
    return {**retrieval(embeddings, data["rows"][split], ks=(1,)),
            PROBE: package_probe(data, embeddings["document"], split)}


def regularizer_study(data, args, results, progress):
    chosen = {}
    for name in REGULARIZERS:  # each regularizer's weight, on the validation split
        scores = {}
        for weight in args.weights:
            validation = regularizer_scores(data, train_regularized(data, {name: weight}, args.seeds[0], args),
                                            "validation")
            scores[weight] = (mean_r1(validation) + validation[PROBE]) / 2
            progress.update(1)
        chosen[name] = max(scores, key=scores.get)
        chosen[f"{name} validation scores"] = {str(k): v for k, v in scores.items()}
    for variant, names in VARIANTS.items():
        for seed in args.seeds:
            weights = {name: chosen[name] for name in names}
            results["rows"].append({"study": "regularizers", "variant": variant, "seed": seed, "weights": weights,
                                    "scores": regularizer_scores(data, train_regularized(data, weights, seed, args),
                                                                 "test")})
            progress.update(1)
    results["chosen_weights"] = chosen


# ---------------------------------------------------------------------------------------------
# Tables and plot


def cell(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def of(rows, loss, batch, budget):
    return [r for r in rows if r.get("study") == "batch" and (r["loss"], r["batch"], r["budget"]) == (loss, batch, budget)]


def batches_of(rows, budget):
    found = {r["batch"] for r in rows if r.get("study") == "batch" and r["budget"] == budget}
    return sorted(found, key=lambda b: math.inf if b == "full" else b)


def describe_data(results):
    data, settings = results["data"], results["settings"]
    return (f"{data['pairs']} docstring pairs ({data['train']} train, {data['validation']} validation, {data['test']} "
            f"test; {data['packages']} packages), frozen all-MiniLM-L6-v2 embeddings, a linear head per side "
            f"(384 -> {settings['embedding']})")


def headline(results):
    """Mean R@1 of both directions per budget and batch: each gamma variant against InfoNCE."""
    settings, rows, lines = results["settings"], results["rows"], []
    for budget in ("epochs", "steps"):
        for batch in batches_of(rows, budget):
            values = {loss: [mean_r1(r["scores"]) for r in of(rows, loss, batch, budget)] for loss in LOSSES}
            base = statistics.mean(values["InfoNCE"])
            lines.append({"budget": f"{settings[budget]} {budget}", "batch": batch,
                          **{loss: cell(values[loss]) for loss in LOSSES},
                          **{f"vs {loss}": f"{statistics.mean(values[loss]) - base:+.3f}" for loss in LOSSES[1:]}})
    columns = [("budget", lambda r: r["budget"]), ("batch", lambda r: r["batch"]), ("InfoNCE", lambda r: r["InfoNCE"]),
               ("gamma a=1", lambda r: r["gamma a=1"]), ("vs InfoNCE", lambda r: r["vs gamma a=1"]),
               ("gamma a=inf", lambda r: r["gamma a=inf"]), ("vs InfoNCE", lambda r: r["vs gamma a=inf"])]
    return harness.markdown_table(columns, lines, "lrrrrrr")


def eight_times(results):
    """For each b whose 8b is in the study: every loss at b against InfoNCE at 8b."""
    settings, rows, lines = results["settings"], results["rows"], []
    for budget in ("epochs", "steps"):
        batches = [b for b in batches_of(rows, budget) if b != "full"]
        for batch in batches:
            if 8 * batch not in batches:
                continue
            target = [mean_r1(r["scores"]) for r in of(rows, "InfoNCE", 8 * batch, budget)]
            line = {"budget": f"{settings[budget]} {budget}", "b": batch, "target": cell(target)}
            for loss in LOSSES:
                mine = [mean_r1(r["scores"]) for r in of(rows, loss, batch, budget)]
                line[loss] = f"{statistics.mean(mine) - statistics.mean(target):+.3f}"
            lines.append(line)
    columns = [("budget", lambda r: r["budget"]), ("b", lambda r: r["b"]), ("InfoNCE at 8b", lambda r: r["target"]),
               *[(f"{loss} at b - InfoNCE at 8b", lambda r, loss=loss: r[loss]) for loss in LOSSES]]
    return harness.markdown_table(columns, lines, "lrrrrr")


def budget_table(results, budget):
    settings, rows = results["settings"], results["rows"]
    metrics = list(next(r for r in rows if r.get("study") == "batch")["scores"])
    lines = []
    for loss in LOSSES:
        for batch in batches_of(rows, budget):
            mine = of(rows, loss, batch, budget)
            lines.append({"loss": loss, "batch": batch, "lr, T": f"{mine[0]['lr']:g}, {mine[0]['temperature']:g}",
                          **{m: cell([r["scores"][m] for r in mine]) for m in metrics}})
    columns = [(name, lambda row, name=name: row[name]) for name in ("loss", "batch", "lr, T", *metrics)]
    return (f"**Budget: {settings[budget]} {budget}** (test split, mean +- std over seeds {settings['seeds']}; step "
            "size and temperature chosen per row on the validation split)\n\n"
            + harness.markdown_table(columns, lines, "lrl" + "r" * len(metrics)))


def regularizer_table(results):
    rows = [r for r in results["rows"] if r.get("study") == "regularizers"]
    metrics = list(rows[0]["scores"])
    baseline = results["untrained"]
    lines = [{"loss": "frozen MiniLM, no head", **{m: f"{baseline[m]:.3f}" for m in metrics}}]
    for variant in VARIANTS:
        chosen = [r for r in rows if r["variant"] == variant]
        weights = ", ".join(f"{k} {v:g}" for k, v in chosen[0]["weights"].items())
        lines.append({"loss": f"{variant} ({weights})" if weights else variant,
                      **{m: cell([r["scores"][m] for r in chosen]) for m in metrics}})
    columns = [(name, lambda row, name=name: row[name]) for name in ("loss", *metrics)]
    return harness.markdown_table(columns, lines, "l" + "r" * len(metrics))


def tables(results: dict) -> dict[str, str]:
    """The batch study's "recall" (headline: mean R@1 of both directions per loss and batch, under
    the study's description), "eight" (each loss at b against InfoNCE at 8b) and "detail" (R@1, R@10
    both ways, per budget); the regularizers' "regularizers"; from the results alone."""
    settings, rows, out = results["settings"], results["rows"], {}
    threads = results["provenance"]["machine"]["cpu_threads"]
    threads = f"{threads} thread{'s' if threads != 1 else ''}"
    if any(r.get("study") == "batch" for r in rows):
        zero = results["untrained"]
        out["recall"] = (
            f"Gamma-weighted loss against InfoNCE by batch size, locked encoder: {describe_data(results)}; the batch "
            f"study trains on {results['data']['study_train']} training pairs (\"full\" = all of them in one batch); "
            f"grid lr {settings['lrs']} x temperature {settings['temperatures']}, Adam; {results['minutes']['batch']:.1f}"
            f" min on {threads}. The frozen embeddings without a head: mean R@1 {mean_r1(zero):.3f}.\n\n"
            "**Mean R@1 of both directions** (test split, mean +- std over seeds)\n\n" + headline(results))
        out["eight"] = ("**Each loss at batch b against InfoNCE at 8b** (mean R@1 of both directions on the test "
                        "split; a difference >= 0 means the loss at b reaches InfoNCE at 8b)\n\n" + eight_times(results))
        out["detail"] = "\n\n".join(budget_table(results, budget) for budget in ("epochs", "steps"))
    if any(r.get("study") == "regularizers" for r in rows):
        out["regularizers"] = (
            f"CLIP vs CLIP + CVPR 2023 regularizers, locked encoder: {describe_data(results)}; trained on the whole "
            f"training split, {settings['reg_epochs']} epochs, batch {settings['reg_batch']}, Adam {settings['reg_lr']:g}, "
            f"learnable temperature (from {settings['reg_temperature']:g}); weights chosen on the validation split "
            f"from {settings['weights']}; package probe: logistic regression from the document head's embedding to "
            f"the package ({results['data']['packages']} classes), fitted on the training split; test split, mean +- "
            f"std over seeds {settings['seeds']}; {results['minutes']['regularizers']:.1f} min on {threads}.\n\n"
            + regularizer_table(results))
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, rows = results["settings"], results["rows"]
    has_batch = any(r.get("study") == "batch" for r in rows)
    regularized = [r for r in rows if r.get("study") == "regularizers"]
    panels = (["epochs", "steps"] if has_batch else []) + (["regularizer R@1", "regularizer probe"] if regularized else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), squeeze=False)
    colors = {"InfoNCE": "tab:red", "gamma a=1": "tab:blue", "gamma a=inf": "tab:green"}
    for ax, panel in zip(axes[0], panels):
        if panel in ("epochs", "steps"):
            batches = batches_of(rows, panel)
            for offset, loss in zip((-0.1, 0, 0.1), LOSSES):
                values = [[mean_r1(r["scores"]) for r in of(rows, loss, b, panel)] for b in batches]
                ax.errorbar(np.arange(len(batches)) + offset, [statistics.mean(v) for v in values],
                            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], color=colors[loss],
                            marker="o", capsize=3, label=loss)
            ax.set_xticks(range(len(batches)), [str(b) for b in batches], fontsize=8)
            ax.set_xlabel("batch size")
            ax.set_ylabel("test R@1, mean of both directions")
            ax.set_title(f"{settings[panel]} {panel}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        else:
            metric = PROBE if panel.endswith("probe") else None
            for i, variant in enumerate(VARIANTS):
                values = [r["scores"][metric] if metric else mean_r1(r["scores"]) for r in regularized
                          if r["variant"] == variant]
                ax.bar(i, statistics.mean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0,
                       color="tab:gray" if i == 0 else "tab:blue", alpha=0.75, capsize=3)
                ax.scatter([i] * len(values), values, color="k", s=8, zorder=3)
            every = [r["scores"][metric] if metric else mean_r1(r["scores"]) for r in regularized]
            if metric:  # the frozen embeddings' probe: what the heads could keep
                every.append(results["untrained"][metric])
                ax.axhline(results["untrained"][metric], color="k", linestyle="--", linewidth=1,
                           label="frozen MiniLM, no head")
                ax.legend(fontsize=8, loc="lower right")
            ax.set_ylim(max(0, min(every) - 0.03), min(1, max(every) + 0.02))
            ax.set_xticks(range(len(VARIANTS)), list(VARIANTS), fontsize=7, rotation=20)
            ax.set_title("regularizers: " + ("package probe accuracy" if metric else "test R@1, both directions"),
                         fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


SMOKE = {"batch_sizes": [4, 32, FULL], "epochs": 1, "steps": 5, "max_steps_batch": 4, "lrs": [1e-2],
         "temperatures": [0.05, 0.1], "seeds": [0, 1], "study_train_pairs": 0, "weights": [1.0], "reg_epochs": 1,
         "reg_batch": 16}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="rewrite the tables and plot from the study's JSON")
    parser.add_argument("--smoke", action="store_true", help="a tiny grid (seconds): " + str(SMOKE))
    parser.add_argument("--parts", nargs="+", default=["batch", "regularizers"], choices=["batch", "regularizers"])
    parser.add_argument("--cache", type=Path, default=docstring_pairs.CACHE, help="the builder's cache folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024, 2048, FULL],
                        help="0 means the whole batch-study training set")
    parser.add_argument("--study-train-pairs", type=int, default=4096,
                        help="training pairs of the batch study (0: the whole training split)")
    parser.add_argument("--epochs", type=int, default=5, help="the fixed-epochs budget")
    parser.add_argument("--steps", type=int, default=150, help="the fixed-steps budget")
    parser.add_argument("--max-steps-batch", type=int, default=1024, help="the largest batch under the fixed-steps budget")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.03, 0.05, 0.1, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--momentum", type=float, default=0.9, help="GammaContrastiveLoss's running-estimate weight")
    parser.add_argument("--embedding", type=int, default=128)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="validation grid per regularizer")
    parser.add_argument("--reg-epochs", type=int, default=5)
    parser.add_argument("--reg-batch", type=int, default=256)
    parser.add_argument("--reg-lr", type=float, default=2e-3)
    parser.add_argument("--reg-temperature", type=float, default=0.05, help="the learnable temperature's start")
    parser.add_argument("--noise", type=float, default=0.02,
                        help="the bridge's second view: Gaussian noise (the unit-norm embeddings' entries are about 0.05)")
    parser.add_argument("--drop", type=float, default=0.2, help="the bridge's second view: fraction of features zeroed")
    parser.add_argument("--out", type=Path, default=RESULTS / "locked_encoder_study")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    torch.set_num_threads(1)
    if args.report:
        results = harness.load_results(args.out.with_suffix(".json"))
        plot(results, args.out.with_suffix(".png"))
        print("\n\n".join(tables(results).values()))
        return

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "report")}
    results = harness.new_results(__file__, settings)
    data = prepare(args.cache, args.study_train_pairs)
    rows = data["rows"]
    frozen = {"query": data["query"].numpy(), "document": data["document"].numpy()}
    results["data"] = {"pairs": len(data["labels"]), "packages": len(data["label_names"]),
                       "study_train": len(rows["study_train"]),
                       **{split: len(rows[split]) for split in ("train", "validation", "test")}}
    results["untrained"] = {**retrieval(frozen, rows["test"]), PROBE: package_probe(data, frozen["document"], "test")}
    _, configs = batch_configs(args)
    grid = len(args.lrs) * len(args.temperatures)
    total = (("batch" in args.parts) * len(configs) * (grid + len(args.seeds) - 1)
             + ("regularizers" in args.parts) * (len(REGULARIZERS) * len(args.weights) + len(VARIANTS) * len(args.seeds)))
    results["minutes"] = {}
    with tqdm(total=total, desc="trainings") as progress:
        for part, run in (("batch", batch_study), ("regularizers", regularizer_study)):
            if part in args.parts:
                started = time.perf_counter()
                run(data, args, results, progress)
                results["minutes"][part] = (time.perf_counter() - started) / 60
    written = harness.write_results(args.out, results, plot)
    print("\n\n".join(tables(results).values()))
    print(f"\nwrote {written} and .png")


if __name__ == "__main__":
    main()
