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

Writes <out>.json (the harness's results schema) and <out>.png; tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import harness

VARIANTS = {"textbook": "(a) textbook", "flashcl": "(b) flashcl", "flashcl cached": "(c) flashcl cached",
            "st cached": "(d) st cached"}
RESULTS = Path(__file__).resolve().parent / "results"
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


def measure(point: dict) -> dict:
    """One step at point["batch"] pairs, in its own process under the harness's memory cap."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as path:
        model = build_model(path)
    loss_fn = make_loss(point["impl"], model, point["mini_batch_size"])
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
    features = columns(point["batch"])
    start = time.perf_counter()
    loss = step(features)
    seconds = time.perf_counter() - start
    # The whole process's peak (model, inputs, step): what the cap is about.
    return {**harness.timing([seconds]), "peak_bytes": harness.peak_rss(), "loss": loss}


def largest_batches(results: dict) -> dict:
    variants = list(dict.fromkeys(row["impl"] for row in results["rows"]))
    return {v: max((r["batch"] for r in results["rows"] if r["impl"] == v and "error" not in r), default=None)
            for v in variants}


def tables(results: dict) -> dict[str, str]:
    settings, rows = results["settings"], results["rows"]
    largest = largest_batches(results)
    caption = (f"One training step (forward, loss, backward) of a 2-layer BERT (hidden {settings['hidden']}, "
               f"{settings['tokens']} tokens) on anchor/positive pairs; time of one step, peak resident memory of "
               f"the process, {settings['cap_gib']:g} GiB cap, cached mini-batches of {settings['mini_batch_size']}. "
               "Largest batch that fits: " + ", ".join(f"{VARIANTS[v]} {largest[v] or 'none'}" for v in largest) + ".")
    by_key = harness.index_rows(rows, "impl", "batch")

    def cell(variant):
        def text(batch):
            row = by_key.get((variant, batch))
            if row is None:
                return "skipped (a smaller batch did not fit)"
            if "error" in row:
                return f"does not fit ({row['error']})"
            return f"{row['median_s']:.2f} s, {row['peak_bytes'] / 2**30:.2f} GiB"
        return text

    batches = sorted({row["batch"] for row in rows})
    table = harness.markdown_table([("batch", lambda b: b)] + [(VARIANTS[v], cell(v)) for v in largest], batches,
                                   align="r" + "l" * len(largest))
    tried = max(row["batch"] for row in rows)
    textbook, cached, st_cached = (largest.get(v) for v in ("textbook", "flashcl cached", "st cached"))
    headline = (f"Under a {settings['cap_gib']:g} GiB cap on {results['provenance']['machine']['device']}, one step "
                f"fits {textbook} pairs with the textbook loss and {cached} with flashcl's cached loss"
                + (" (the largest batch tried)" if cached == tried else "")
                + (f", against {st_cached} with sentence-transformers' own cached loss" if st_cached else "")
                + f"; measured at {results['provenance']['commit']}." if textbook and cached else "")
    return {"training_step": caption + "\n\n" + table, "headline": headline}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, rows = results["settings"], results["rows"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"textbook": ("tab:red", "o"), "flashcl": ("tab:blue", "s"), "flashcl cached": ("tab:green", "^"),
              "st cached": ("tab:purple", "v")}
    for variant, label in VARIANTS.items():
        ok = sorted((r for r in rows if r["impl"] == variant and "error" not in r), key=lambda r: r["batch"])
        if not ok:
            continue
        color, marker = styles[variant]
        ax_mem.plot([r["batch"] for r in ok], [r["peak_bytes"] / 2**30 for r in ok], color=color, marker=marker,
                    label=label)
        ax_time.plot([r["batch"] for r in ok], [r["median_s"] for r in ok], color=color, marker=marker, label=label)
    ax_mem.axhline(settings["cap_gib"], color="k", ls="--", lw=1)
    ax_mem.text(min(r["batch"] for r in rows), settings["cap_gib"], f" {settings['cap_gib']:g} GiB cap", va="bottom",
                fontsize=8)
    for ax, label in ((ax_mem, "peak memory of the process (GiB)"), (ax_time, "one training step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    machine = results["provenance"]["machine"]
    fig.suptitle(f"One training step: 2-layer BERT (hidden {settings['hidden']}), {settings['tokens']}-token pairs, "
                 f"{machine['device']} ({machine['cpu_threads']} threads), "
                 f"torch {results['provenance']['versions']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--mini-batch-size", type=int, default=256, help="chunk of the cached variants")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="memory cap per process")
    parser.add_argument("--out", type=Path, default=RESULTS / "training_step_cpu")
    args = parser.parse_args()
    from tqdm import tqdm

    settings = {"cap_gib": args.cap_gib, "mini_batch_size": args.mini_batch_size, "tokens": TOKENS, "hidden": HIDDEN}
    results = harness.new_results(__file__, settings)
    stopped = set()
    grid = [(b, v) for b in sorted(args.batch_sizes) for v in args.variants]
    for batch, variant in tqdm(grid, desc="training-step points", unit="point"):
        if variant in stopped:
            continue
        row = harness.run_point(__file__, {"impl": variant, "batch": batch}, settings=settings, cap_gib=args.cap_gib)
        results["rows"].append(row)
        if "error" in row:
            stopped.add(variant)
    harness.finish(args.out, results, tables, plot)


if __name__ == "__main__":
    harness.serve_worker(measure)
    main()
