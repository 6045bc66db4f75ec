"""Every benchmark runs end to end through the one harness (tiny settings), writes the one results
schema, and its committed results render the tables the docs show; the docs' generated tables are
what the committed results give. The scripts run in subprocesses; the harness and the table
generator are loaded from their files, so nothing from benchmarks/ or tools/ lands on sys.path."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
pytestmark = [pytest.mark.scripts,
              pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu",
                                 reason="CPU plumbing checks; the GPU phase has its own")]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = load(BENCHMARKS / "harness.py", "_flashcl_bench_harness")


def run_bench(script: str, *args: str, tmp_path: Path) -> dict:
    """Runs a benchmark with --out in tmp_path; returns its results, checked against the schema."""
    pytest.importorskip("matplotlib")
    stem = tmp_path / Path(script).stem
    done = subprocess.run([sys.executable, script, *args, "--out", str(stem)], cwd=BENCHMARKS, capture_output=True,
                          text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = harness.load_results(stem.with_suffix(".json"))
    assert results["benchmark"] == f"benchmarks/{script}"
    assert results["provenance"]["versions"]["torch"] and results["provenance"]["commit"]
    results["stdout"] = done.stdout
    return results


def by_impl(results: dict) -> dict:
    return {row["impl"]: row for row in results["rows"]}


def test_clip_loss_measures_the_quadratic_logits(tmp_path):
    """The textbook loss holds at least the N x N logits and their gradient (2 N^2 floats); flashcl's
    peak (tiles within the torch backend's 32 MiB budget, S being 64 MiB here) is a fraction of
    that. A peak measured wrong (e.g. the parent's resident size carried into the child) fails here."""
    results = run_bench("bench_clip_loss.py", "--batch-sizes", "4096", "--dims", "16", "--repeats", "1",
                        tmp_path=tmp_path)
    rows = by_impl(results)
    assert rows["textbook"]["peak_bytes"] >= 2 * 4096**2 * 4
    assert 0 < rows["flashcl"]["peak_bytes"] < rows["textbook"]["peak_bytes"] / 3
    assert all(row["median_s"] > 0 and row["q1_s"] <= row["median_s"] <= row["q3_s"] for row in rows.values())
    assert "| 4096 | 16 |" in results["stdout"]
    assert (tmp_path / "bench_clip_loss.png").stat().st_size > 0


def test_memory_cap_makes_a_point_a_result(tmp_path):
    """A point over its memory cap is an error row, not a crash of the benchmark."""
    results = run_bench("bench_clip_loss.py", "--batch-sizes", "8192", "--dims", "16", "--repeats", "1",
                        "--cap-gib", "0.4", tmp_path=tmp_path)
    rows = by_impl(results)
    assert rows["textbook"]["error"] == "over the 0.4 GiB memory cap"
    assert "error" not in rows["flashcl"] and rows["flashcl"]["peak_bytes"] < 0.4 * 2**30


@pytest.mark.parametrize("script, kind, names", [("bench_regularizers.py", "regularizer", {"geometric", "bridge",
                                                                                           "separation"}),
                                                 ("bench_siglip_supcon.py", "loss", {"siglip", "supcon"})])
def test_named_comparisons(tmp_path, script, kind, names):
    results = run_bench(script, "--batch-sizes", "64", "--dims", "16", "--repeats", "1", tmp_path=tmp_path)
    assert {(row[kind], row["impl"]) for row in results["rows"]} == {
        (name, impl) for name in names for impl in ("flashcl", "materialized" if kind == "regularizer" else "peer")}
    assert all(row["median_s"] > 0 and row["peak_bytes"] >= 0 for row in results["rows"])


@pytest.mark.parametrize("loss, impls", [("clip", ["open_clip", "flashcl"]), ("siglip", ["open_clip shift", "flashcl"])])
def test_distributed(tmp_path, loss, impls):
    results = run_bench("bench_distributed.py", "--loss", loss, "--impls", *impls, "--world-sizes", "2",
                        "--batch-sizes", "128", "--dim", "16", "--repeats", "1", tmp_path=tmp_path)
    rows = by_impl(results)
    assert set(rows) == set(impls)
    assert all(len(row["per_rank_peak_bytes"]) == 2 and row["median_s"] > 0 for row in rows.values())
    assert "| 2 | 128 |" in results["stdout"]


def test_training_step(tmp_path):
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed")
    results = run_bench("bench_training_step.py", "--batch-sizes", "96", "--variants", "flashcl", "flashcl cached",
                        "--mini-batch-size", "32", tmp_path=tmp_path)
    rows = by_impl(results)
    assert abs(rows["flashcl"]["loss"] - rows["flashcl cached"]["loss"]) < 1e-4 * abs(rows["flashcl"]["loss"])
    assert all(row["peak_bytes"] > 2**20 for row in rows.values())  # the whole process: model, inputs, step


def test_small_batch_and_gamma_step(tmp_path):
    small = run_bench("bench_small_batch.py", "--points", "64:16", "--runs", "3", tmp_path=tmp_path)
    rows = by_impl(small)
    assert rows["textbook"]["operators"] > 10 and rows["flashcl"]["operators"] > 10
    assert len(rows["flashcl"]["pair_ratio_quartiles"]) == 3
    gamma = run_bench("bench_gamma_step.py", "--shapes", "64:16", "--runs", "2", "--num-samples", "1000",
                      tmp_path=tmp_path)
    assert set(by_impl(gamma)) == {"clip_loss", "GammaContrastiveLoss"}


def test_every_benchmark_stands_on_the_harness():
    """Each script in benchmarks/ imports the harness and renders its tables through tables()."""
    scripts = sorted(BENCHMARKS.glob("bench_*.py"))
    assert len(scripts) >= 8
    for script in scripts:
        text = script.read_text()
        assert "import harness" in text, f"{script.name} does not use the harness"
        assert "def tables(" in text, f"{script.name} has no tables(results)"


def test_committed_results_render_and_docs_are_current():
    """Every committed results file has the schema and renders; every generated block in the README
    and docs is what the committed results give (tools/generate_tables.py --check)."""
    for path in sorted(ROOT.glob("*/results/*.json")):
        if path.name.startswith("gpu_check"):
            continue  # the GPU check's report, not a table source
        results = harness.load_results(path)
        assert (ROOT / results["benchmark"]).is_file(), f"{path}: no script {results['benchmark']}"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "generate_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_harness_quartiles_and_comparison():
    assert harness.quartiles([3.0]) == [3.0, 3.0, 3.0]
    assert harness.quartiles([4.0, 1.0, 2.0, 3.0, 5.0]) == [2.0, 3.0, 4.0]
    rows = [{"impl": "textbook", "batch": 8, "median_s": 0.004, "peak_bytes": 2**21},
            {"impl": "flashcl", "batch": 8, "median_s": 0.002, "peak_bytes": 2**20},
            {"impl": "textbook", "batch": 16, "error": "over the 1 GiB memory cap"},
            {"impl": "flashcl", "batch": 16, "median_s": 0.003, "peak_bytes": 2**20}]
    table = harness.comparison_table(rows, [("batch", lambda r: r["batch"])], baseline="textbook").splitlines()
    assert table[2] == "| 8 | 4.0 ms | 2.0 ms | 0.50x | 2.0 MiB | 1.0 MiB | 50.0% |"
    assert table[3] == "| 16 | over the 1 GiB memory cap | 3.0 ms | - | - | 1.0 MiB | - |"
    with pytest.raises(ValueError, match="lack"):
        harness.check_results({"schema": harness.SCHEMA, "rows": []})
    json.dumps(harness.provenance())  # serializable as it is written
