"""The one harness every flashcl benchmark and experiment stands on.

A script describes its points and how to measure one; the harness does the rest, the same way
for every script:

- `provenance()`: the commit (and whether the checkout was dirty), the machine, the versions
  and the date, recorded with every result;
- `run_point()`: one fresh subprocess per point (the script itself, re-entered through
  `serve_worker()`), under a memory cap, so each peak is the point's own and a point that
  runs out of memory is a result ("over the cap"), not a crash;
- `PeakMemory`: bytes above the inputs (the RSS high-water mark on CPU, the allocator's peak
  on CUDA);
- `time_interleaved()` and `timing()`: runs of the contenders interleaved (so a noisy
  neighbour slows both), summarized by median and quartiles;
- one results file (`Results`: schema, producing script, provenance, settings, rows) and the
  writers: `write_results()`, `markdown_table()`, `plot_lines()`.

Tables in the README and docs are generated from the results files by
`tools/generate_tables.py`, which asks the producing script's `tables(results)` for them.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

SCHEMA = "flashcl-results/1"
REPOSITORY = Path(__file__).resolve().parents[1]
WORKER_FLAG = "--harness-worker"
CAP_ENV = "FLASHCL_BENCH_CAP_BYTES"
CAPPED = 3  # a worker's exit status when it passed its memory cap


# ---------------------------------------------------------------------------------------------
# Provenance


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPOSITORY,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(device: str = "cpu") -> dict:
    """Where and with what a result was measured."""
    import torch

    import flashcl

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor() or "cpu")
    # Dirty means code that differs from the commit: a results file an earlier script of the same run
    # rewrote (an experiment's builder before its study) is output, not code.
    status = _git("diff", "--name-only", "HEAD")  # tracked files changed, staged or not
    changed = None if status is None else [path for path in status.splitlines() if "/results/" not in f"/{path}"]
    return {
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(changed) if changed is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": name, "device_type": device.split(":")[0], "cpu_threads": torch.get_num_threads(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "cuda": torch.version.cuda, "flashcl": flashcl.__version__},
    }


def describe(prov: dict) -> str:
    """One line of provenance for a table's caption."""
    machine, versions = prov["machine"], prov["versions"]
    threads = f", {machine['cpu_threads']} threads" if machine.get("device_type") == "cpu" else ""
    commit = prov.get("commit") or "unknown commit"
    if prov.get("dirty"):
        commit += " (uncommitted changes)"
    return (f"{machine['device']}{threads}, torch {versions['torch']}, flashcl at {commit}, "
            f"{prov['date'][:10]}")


# ---------------------------------------------------------------------------------------------
# One subprocess per point


def run_point(script: str | Path, point: dict, *, settings: dict | None = None, cap_gib: float | None = None,
              timeout: float | None = None, env: dict | None = None) -> dict:
    """Measures `point` in a fresh process of `script` (whose measure() sees the point and the
    shared `settings` in one dict) and returns the row: the point with its measurement, or with an
    "error" when the process passed the memory cap or the time limit, or failed."""
    environment = {**os.environ, **(env or {})}
    if cap_gib is not None:
        environment[CAP_ENV] = str(int(cap_gib * 2**30))
    command = [sys.executable, str(script), WORKER_FLAG, json.dumps({**(settings or {}), **point})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**point, "error": f"over the {timeout:g} s time limit"}
    if done.returncode == CAPPED:
        return {**point, "error": f"over the {cap_gib:g} GiB memory cap"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return {**point, "error": f"exit {done.returncode}: {last}"}
    return {**point, **json.loads(done.stdout.strip().splitlines()[-1])}


def resolve_device(name: str) -> str:
    """"auto" as cuda when present, else cpu; any other device name as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def point_arguments(parser, *, device: str = "cpu", repeats: int = 2, cap_gib: float = 16.0) -> None:
    """The options every point-per-process benchmark shares: --device, --repeats, --cap-gib."""
    parser.add_argument("--device", default=device, type=resolve_device,
                        help="auto (cuda if present, else cpu), cpu, cuda")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs per point, after one warm-up")
    parser.add_argument("--cap-gib", type=float, default=cap_gib, help="memory cap per point (GiB)")


def run_points(script: str | Path, points: list[dict], settings: dict, *, cap_gib: float | None = None,
               desc: str = "points", timeout: float | None = None,
               skip_after_error: Callable[[dict], object] | None = None) -> list[dict]:
    """run_point over `points` in order, with a progress bar; the rows. With `skip_after_error`
    (a point -> series key), a series' points after its first error are not run: their rows say so
    (points of a series in increasing size: a peer that could not run one cannot run the next)."""
    from tqdm import tqdm

    rows, failed = [], {}
    for point in tqdm(points, desc=desc, unit="point"):
        series = skip_after_error(point) if skip_after_error else None
        if series is not None and series in failed:
            rows.append({**point, "error": f"not run ({failed[series]})"})
            continue
        row = run_point(script, point, settings=settings, cap_gib=cap_gib, timeout=timeout)
        if "error" in row and series is not None:
            failed[series] = f"failed at a smaller size: {row['error']}"
        rows.append(row)
    return rows


def serve_worker(measure: Callable[[dict], dict]) -> None:
    """In a process started by run_point: measure the point under the cap, print the row, exit.
    Elsewhere: return at once. Call it first thing under `if __name__ == "__main__":`."""
    if len(sys.argv) < 3 or sys.argv[1] != WORKER_FLAG:
        return
    cap = os.environ.get(CAP_ENV)
    if cap:
        _cap_memory(int(cap))
    row = measure(json.loads(sys.argv[2]))
    print(json.dumps(row), flush=True)
    sys.exit(0)


def _cap_memory(cap_bytes: int) -> None:
    """Ends this process with status CAPPED as soon as its resident memory passes the cap, so the
    machine's other work never feels a point that does not fit; on CUDA the allocator refuses
    more than the cap (a torch.OutOfMemoryError, which measure_backward records)."""
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
    page = os.sysconf("SC_PAGE_SIZE")

    def watch():
        while True:
            with open("/proc/self/statm") as f:
                if int(f.read().split()[1]) * page > cap_bytes:
                    os._exit(CAPPED)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------------
# Memory and time


def current_rss() -> int:
    """Resident bytes now, after handing freed heap back to the OS: memory freed earlier would
    otherwise be reused silently and hide part of the next allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Resets this process's resident high-water mark (VmHWM; Linux 4.0 and later). Without it
    the mark would start at the parent's resident size, which exec carries into the child."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's resident high-water mark (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.bytes`: the peak above what was held on
    entry: the allocator's peak on CUDA, the resident high-water mark on CPU (where allocations
    outside torch count too, so one point per process keeps a point's peak its own)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.bytes = None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline = current_rss()
            self.resettable = _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.baseline
        elif self.resettable:
            self.bytes = peak_rss() - self.baseline
        else:
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline
        return False


def measure_backward(loss: Callable[[], object], leaves: list, device: str, repeats: int) -> dict:
    """Peak memory above what is held now and the run times of `repeats` forward + backward runs
    of loss() after one untimed run, every leaf's gradient reset between runs. Running out of
    memory is a result: {"error": "out of memory"}."""
    import torch

    sync = synchronizer(device)

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss().backward()
        sync()

    times = []
    try:
        with PeakMemory(device) as peak:
            for _ in range(repeats + 1):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    return {"peak_bytes": peak.bytes, **timing(times[1:])}


def synchronizer(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(steps: dict[str, Callable[[], object]], runs: int, *, warmup: int = 1,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of each step, run in turn `runs` times after `warmup` untimed rounds."""
    sync = synchronizer(device)
    times = {name: [] for name in steps}
    for round_ in range(warmup + runs):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def quartiles(values: Iterable[float]) -> list[float]:
    """First quartile, median, third quartile (the median alone for fewer than two values)."""
    values = sorted(values)
    if len(values) < 2:
        return values * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


def timing(times: list[float]) -> dict:
    """The row fields of a list of run times: every run, the median and the quartiles."""
    q1, median, q3 = quartiles(times)
    return {"times_s": times, "median_s": median, "q1_s": q1, "q3_s": q3}


# ---------------------------------------------------------------------------------------------
# One results file


def new_results(script: str | Path, settings: dict, device: str = "cpu") -> dict:
    """An empty results record for rows to be appended to."""
    return {"schema": SCHEMA, "benchmark": Path(script).resolve().relative_to(REPOSITORY).as_posix(),
            "provenance": provenance(device), "settings": settings, "rows": []}


def check_results(results: dict) -> dict:
    """Raises ValueError unless `results` has the one schema every results file shares."""
    missing = {"schema", "benchmark", "provenance", "settings", "rows"} - set(results)
    if missing:
        raise ValueError(f"results lack {sorted(missing)}")
    if results["schema"] != SCHEMA:
        raise ValueError(f"results schema {results['schema']!r}, expected {SCHEMA!r}")
    if not isinstance(results["rows"], list) or not all(isinstance(row, dict) for row in results["rows"]):
        raise ValueError("results['rows'] must be a list of dicts")
    for key in ("commit", "date", "machine", "versions"):
        if key not in results["provenance"]:
            raise ValueError(f"results['provenance'] lacks {key!r}")
    return results


def load_results(path: str | Path) -> dict:
    return check_results(json.loads(Path(path).read_text()))


def write_results(stem: str | Path, results: dict, plot: Callable[[dict, Path], None] | None = None) -> Path:
    """Writes <stem>.json (and <stem>.png through `plot`); returns the JSON's path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(check_results(results), indent=1) + "\n")
    if plot is not None:
        plot(results, stem.with_suffix(".png"))
    return path


def finish(stem: str | Path, results: dict, tables: Callable[[dict], dict],
           plot: Callable[[dict, Path], None] | None = None) -> Path:
    """The end of every benchmark: write the results (and the plot), print every table and where
    the files went."""
    path = write_results(stem, results, plot)
    print("\n\n".join(tables(results).values()))
    print(f"\nwrote {path}" + (" and .png" if plot is not None else ""))
    return path


# ---------------------------------------------------------------------------------------------
# Tables and plots


def markdown_table(columns: list[tuple[str, Callable[[dict], object]]], rows: Iterable[dict],
                   align: str | None = None) -> str:
    """A Markdown table with a column per (header, cell function); `align` is one character per
    column, "l" or "r" (default: right)."""
    align = align or "r" * len(columns)
    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell(row)) for _, cell in columns) + " |")
    return "\n".join(lines)


def ms(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.{digits}f} ms"


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def ratio(numerator: float | None, denominator: float | None, percent: bool = False) -> str:
    if numerator is None or not denominator:
        return "-"
    value = numerator / denominator
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"  # two significant digits, never "0.00x"


def time_or_error(row: dict, digits: int = 1) -> str:
    return ms(row["median_s"], digits) if "median_s" in row else row.get("error", "-")


def index_rows(rows: Iterable[dict], *keys: str) -> dict[tuple, dict]:
    """Rows by the tuple of their `keys` values."""
    return {tuple(row.get(key) for key in keys): row for row in rows}


def comparison_table(rows: list[dict], cases: list[tuple[str, Callable[[dict], object]]], baseline: str,
                     contender: str = "flashcl", by: str = "impl", time_digits: int = 1,
                     order: Callable[[dict], object] | None = None, memory: bool = True) -> str:
    """`contender` against `baseline`, a line per case: both median times, the time ratio and
    (with `memory`) both peaks and the memory ratio. `cases` are (header, cell function) pairs
    that name a case; the two rows of a case differ only in row[by]."""
    pairs: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(str(cell(row)) for _, cell in cases)
        pairs.setdefault(key, {"case": row})[row[by]] = row
    lines = sorted(pairs.values(), key=lambda pair: order(pair["case"])) if order else list(pairs.values())
    empty: dict = {}

    def side(name):
        return lambda pair: pair.get(name, empty)

    base, ours = side(baseline), side(contender)
    columns = [(header, lambda pair, cell=cell: cell(pair["case"])) for header, cell in cases] + [
        (f"{baseline} time", lambda pair: time_or_error(base(pair), time_digits)),
        (f"{contender} time", lambda pair: time_or_error(ours(pair), time_digits)),
        ("time ratio", lambda pair: ratio(ours(pair).get("median_s"), base(pair).get("median_s")))]
    columns += [] if not memory else [
        (f"{baseline} peak", lambda pair: mib(base(pair).get("peak_bytes"))),
        (f"{contender} peak", lambda pair: mib(ours(pair).get("peak_bytes"))),
        ("memory ratio", lambda pair: ratio(ours(pair).get("peak_bytes"), base(pair).get("peak_bytes"), True))]
    return markdown_table(columns, lines)


def plot_lines(rows: list[dict], path: Path, *, x: str, series: Callable[[dict], str],
               panels: list[tuple[str, str, float]], title: str, xlabel: str,
               style: Callable[[dict], dict] | None = None, facet: Callable[[dict], str] | None = None) -> None:
    """Log-log lines: a row of panels per (row field, axis label, unit divisor), a column per
    facet (if any), a line per series label styled by style(row); rows without the field
    (errors) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facets = list(dict.fromkeys(facet(row) for row in rows)) if facet else [None]
    fig, axes = plt.subplots(len(panels), len(facets), figsize=(4.6 * len(facets) + 1, 3.6 * len(panels)),
                             squeeze=False)
    labels = list(dict.fromkeys(series(row) for row in rows))
    for column, facet_value in enumerate(facets):
        in_facet = [row for row in rows if facet is None or facet(row) == facet_value]
        for ax, (field, ylabel, unit) in zip(axes[:, column], panels):
            for label in labels:
                mine = [row for row in in_facet if series(row) == label and field in row]
                if mine:
                    points = sorted((row[x], row[field] / unit) for row in mine)
                    ax.plot(*zip(*points), label=label, **{"marker": "o", **(style(mine[0]) if style else {})})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel if column == 0 else "")
            ax.grid(True, which="both", alpha=0.3)
        if facet is not None:
            axes[0, column].set_title(str(facet_value))
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
