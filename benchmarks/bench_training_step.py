"""How large a batch fits? One whole training step of a small text encoder, four ways, under a memory cap.

A sentence-transformers model (a randomly initialized 2-layer BERT, hidden size 64, 32-token
inputs, mean pooling) embeds anchors and positives, and one step is forward, loss, backward:

    (a) textbook       sentence_transformers' MultipleNegativesRankingLoss: the batch x batch logits
    (b) flashcl        flashcl's MultipleNegativesRankingLoss drop-in, plain backward
    (c) flashcl cached flashcl's CachedMultipleNegativesRankingLoss (gradient caching, mini-batches of 256)
    (d) st cached      sentence_transformers' CachedMultipleNegativesRankingLoss (mini-batches of 256)

Each (variant, batch) runs in a fresh process whose resident memory is watched: above the cap
(default 4 GiB) the process stops and the batch does not fit; a variant's larger batches are then
skipped. Peak memory is the RSS high-water mark of the whole process (model, inputs, optimizer-free
step); time is one step after a warm-up step at a small batch.

    python benchmarks/bench_training_step.py                        # batch 1024 .. 262144, 4 GiB cap
    python benchmarks/bench_training_step.py --batch-sizes 1024 2048 --cap-gib 2

Writes <out>.json, <out>.md (the README's table) and <out>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_clip_loss import machine

VARIANTS = {"textbook": "(a) textbook", "flashcl": "(b) flashcl", "flashcl cached": "(c) flashcl cached",
            "st cached": "(d) st cached"}
RESULTS = Path(__file__).resolve().parent / "results"
CAPPED = 137  # exit status of a process stopped at the memory cap
TOKENS, HIDDEN, VOCAB = 32, 64, 1000


def build_model(path: str):
    from tokenizers import Tokenizer, models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from sentence_transformers import SentenceTransformer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB)])}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), pad_token="[PAD]",
                            unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    import torch

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=2 * HIDDEN, max_position_embeddings=TOKENS + 8)).save_pretrained(path)
    return SentenceTransformer(path, device="cpu")


def make_loss(variant: str, model, mini_batch_size: int):
    import warnings

    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.integrations import sentence_transformers as flash

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"textbook": lambda: st_losses.MultipleNegativesRankingLoss(model),
                "flashcl": lambda: flash.MultipleNegativesRankingLoss(model),
                "flashcl cached": lambda: flash.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
                "st cached": lambda: st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
                }[variant]()


def watch_memory(cap_bytes: int):
    """Stops this process (exit 137) as soon as its resident memory passes the cap."""
    page = os.sysconf("SC_PAGE_SIZE")

    def watch():
        while True:
            with open("/proc/self/statm") as f:
                if int(f.read().split()[1]) * page > cap_bytes:
                    os._exit(CAPPED)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()


def worker(variant: str, batch: int, mini_batch_size: int, cap_gib: float) -> dict:
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    watch_memory(int(cap_gib * 2**30))
    with tempfile.TemporaryDirectory() as path:
        model = build_model(path)
    loss_fn = make_loss(variant, model, mini_batch_size)
    generator = torch.Generator().manual_seed(1)

    def columns(n):
        return [{"input_ids": torch.randint(5, VOCAB + 5, (n, TOKENS), generator=generator),
                 "attention_mask": torch.ones(n, TOKENS, dtype=torch.long),
                 "token_type_ids": torch.zeros(n, TOKENS, dtype=torch.long)} for _ in range(2)]

    def step(features):
        model.zero_grad(set_to_none=True)
        loss = loss_fn([dict(f) for f in features], None)
        loss.backward()
        return float(loss)

    step(columns(64))  # warm-up: thread pools, lazy initialization
    features = columns(batch)
    start = time.perf_counter()
    loss = step(features)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "loss": loss}


def run_point(variant, batch, mini_batch_size, cap_gib) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--batch-sizes", str(batch),
           "--mini-batch-size", str(mini_batch_size), "--cap-gib", str(cap_gib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == CAPPED:
        return {"fits": False, "error": f"passed the {cap_gib:g} GiB cap"}
    if done.returncode != 0:
        return {"fits": False, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return {"fits": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def table(points, batches) -> str:
    rows = ["| batch | " + " | ".join(VARIANTS.values()) + " |", "|---:|" + "---|" * len(VARIANTS)]
    by_key = {(p["variant"], p["batch"]): p for p in points}
    for batch in batches:
        cells = []
        for variant in VARIANTS:
            p = by_key.get((variant, batch))
            if p is None:
                cells.append("skipped (a smaller batch did not fit)")
            elif p["fits"]:
                cells.append(f"{p['seconds']:.2f} s, {p['peak_bytes'] / 2**30:.2f} GiB")
            else:
                cells.append(f"does not fit ({p['error']})")
        rows.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(points, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"textbook": ("tab:red", "o"), "flashcl": ("tab:blue", "s"), "flashcl cached": ("tab:green", "^"),
              "st cached": ("tab:purple", "v")}
    for variant, label in VARIANTS.items():
        ok = sorted((p for p in points if p["variant"] == variant and p["fits"]), key=lambda p: p["batch"])
        if not ok:
            continue
        color, marker = styles[variant]
        ax_mem.plot([p["batch"] for p in ok], [p["peak_bytes"] / 2**30 for p in ok], color=color, marker=marker,
                    label=label)
        ax_time.plot([p["batch"] for p in ok], [p["seconds"] for p in ok], color=color, marker=marker, label=label)
    ax_mem.axhline(meta["cap_gib"], color="k", ls="--", lw=1)
    ax_mem.text(min(p["batch"] for p in points), meta["cap_gib"], f" {meta['cap_gib']:g} GiB cap", va="bottom", fontsize=8)
    for ax, label in ((ax_mem, "peak memory of the process (GiB)"), (ax_time, "one training step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.suptitle(f"One training step: 2-layer BERT (hidden {HIDDEN}), {TOKENS}-token pairs, {meta['device']} "
                 f"({meta['cpu_threads']} threads), torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--mini-batch-size", type=int, default=256, help="chunk of the cached variants")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="memory cap per process")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_step_cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_sizes[0], args.mini_batch_size, args.cap_gib)))
        return
    from tqdm import tqdm

    meta = {**machine("cpu"), "cap_gib": args.cap_gib, "mini_batch_size": args.mini_batch_size, "tokens": TOKENS,
            "hidden": HIDDEN}
    points, stopped = [], set()
    grid = [(b, v) for b in sorted(args.batch_sizes) for v in args.variants]
    for batch, variant in tqdm(grid, desc="training-step points", unit="point"):
        if variant in stopped:
            continue
        point = {"variant": variant, "batch": batch, **run_point(variant, batch, args.mini_batch_size, args.cap_gib)}
        points.append(point)
        if not point["fits"]:
            stopped.add(variant)
    largest = {v: max((p["batch"] for p in points if p["variant"] == v and p["fits"]), default=None)
               for v in args.variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": meta, "largest_batch": largest, "points": points},
                                                        indent=2) + "\n")
    header = (f"One training step (forward, loss, backward) of a 2-layer BERT (hidden {HIDDEN}, {TOKENS} tokens) on "
              f"anchor/positive pairs, {meta['device']} ({meta['cpu_threads']} threads), torch {meta['torch']}, "
              f"flashcl {meta['commit']}, {meta['date'][:10]}; time of one step, peak resident memory of the process, "
              f"{args.cap_gib:g} GiB cap, cached mini-batches of {args.mini_batch_size}. Largest batch that fits: "
              + ", ".join(f"{VARIANTS[v]} {largest[v] or 'none'}" for v in args.variants) + ".")
    markdown = header + "\n\n" + table(points, sorted(args.batch_sizes))
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(points, meta, args.out.with_suffix(".png"))
    print(markdown)


if __name__ == "__main__":
    main()
