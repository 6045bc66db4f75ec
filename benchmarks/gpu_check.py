"""flashcl's first contact with a GPU, sized for one call of the device tool: every phase a child
process under its own timeout, one JSON of everything (device, date, commit, versions, each figure).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json     # on an H100/H200 (~5-8 min)
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.json             # CPU: tiny, Triton interpreted

Phases (benchmarks/gpu_check.sh installs flashcl with flashcl._C first):
  contact   both kernel families against float64 references, one child per precision (bf16, fp16,
            fp32, tf32) in parallel: the primitives (merged LSE, softplus/sigmoid sums, the weighted
            products with both terms, positives and either weight function) on ragged sizes, a
            sliced row-major and a column-major operand, with and without the diagonal; then the
            stress child: the lock-merged column LSE against the two-pass one 30 times at N = 8192
            (a race shows as a difference), a side stream, and N = 2^18.
  headline  benchmarks/bench_gpu.py at the points that matter: CLIP at B = 65536, D = 768, bf16
            (triton, cuda, textbook, open_clip, inf_cl), and SigLIP at B = 65536 (siglip_kernel too).
  autocast  fp32 features under torch.autocast(bf16) against bf16 features: the time of both, and
            the loss against the float64 loss of the rounded features.
Exit status 1 if a check failed or a phase did not finish; the JSON says which.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRECISIONS = {"bf16": ("bfloat16", "ieee", 2e-2), "fp16": ("float16", "ieee", 2e-2),
              "fp32": ("float32", "ieee", 2e-5), "tf32": ("float32", "tf32", 1e-2)}
# Seconds each phase may take on the GPU: 390 in all, which with gpu_check.sh's 150 for the build keeps
# the call within 9 minutes (expected: about 5).
TIMEOUTS = {"contact": 100, "stress": 80, "headline clip": 120, "headline siglip": 50, "autocast": 40}


# -- the children ---------------------------------------------------------------------------------------------

def device():
    import torch

    return torch.device(os.environ.get("FLASHCL_CHECK_DEVICE", "cuda"))


def backends(names):
    """The kernel families by name: (name, FusedKernels), or (name, why it cannot run here)."""
    from flashcl.backends import cuda as cuda_backend
    from flashcl.backends import triton as triton_backend

    out = []
    for name in names:
        maker = {"triton": (triton_backend.make, triton_backend.missing_reason()),
                 "cuda": (cuda_backend.make, cuda_backend.extension_error())}[name]
        out.append((name, maker[1] if maker[1] else maker[0](deterministic=False)))
    return out


class Records:
    """Each check as {name, rel_err, tol, ok}: the error relative to the reference's largest entry."""

    def __init__(self):
        self.rows = []

    def check(self, name, got, want, tol):
        import torch

        got, want = got.double().cpu(), want.double().cpu()
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        ok = bool(torch.isfinite(got).all()) and error <= tol
        self.rows.append(dict(name=name, rel_err=error, tol=tol, ok=ok))
        print(f"{'ok  ' if ok else 'FAIL'} {name:72s} rel.err {error:.2e} (tol {tol:.0e})", flush=True)

    def skip(self, name, why):
        self.rows.append(dict(name=name, skipped=why, ok=True))
        print(f"skip {name}: {why}", flush=True)


def ragged_inputs(n, m, d, dtype, generator, dev):
    """Unit rows: x sliced out of a wider row-major matrix (odd stride, misaligned base), y column-major."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(n, d + 5, generator=generator, device=dev)[:, 3:d + 3]
    y = torch.randn(d, m, generator=generator, device=dev).T
    return F.normalize(x, dim=1).to(dtype), F.normalize(y, dim=1).to(dtype)


def contact(precision, dry_run, names):
    import torch

    dtype_name, matmul_precision, tol = PRECISIONS[precision]
    dtype = getattr(torch, dtype_name)
    dev = device()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = matmul_precision
    generator = torch.Generator(dev).manual_seed(0)
    n, m, d = (21, 13, 11) if dry_run else (1000, 777, 200)  # no size a multiple of any tile
    scale, bias = torch.tensor(30.0, device=dev), torch.tensor(-10.0, device=dev)
    records = Records()
    for name, family in backends(names):
        tag = f"{name}/{precision}"
        if isinstance(family, str):
            records.skip(tag, family)
            continue
        for rows, cols in ((n, m), (m, n), (n, n)):
            x, y = ragged_inputs(rows, cols, d, dtype, generator, dev)
            logits = 30.0 * x.double() @ y.double().T
            for diagonal in (False, True):
                s = logits.clone()
                if diagonal:
                    k = min(rows, cols)
                    s[torch.arange(k), torch.arange(k)] = float("-inf")
                shape = f"{rows}x{cols} diag={diagonal}"
                row_lse, col_lse = family.lse(x, y, scale, rows=True, cols=True, exclude_diagonal=diagonal)
                records.check(f"{tag} merged LSE rows {shape}", row_lse, s.logsumexp(1), tol)
                records.check(f"{tag} merged LSE cols {shape}", col_lse, s.logsumexp(0), tol)
                softplus, sigmoid = family.softplus_sums(x, y, scale, bias, exclude_diagonal=diagonal)
                z = s - 10.0
                records.check(f"{tag} softplus sums {shape}", softplus, torch.nn.functional.softplus(z).sum(1), tol)
                records.check(f"{tag} sigmoid sums {shape}", sigmoid, torch.sigmoid(z).sum(1), tol)
                rl, cl = s.logsumexp(1), s.logsumexp(0)
                a = torch.rand(rows, generator=generator, device=dev)
                b = torch.rand(cols, generator=generator, device=dev)
                t = torch.arange(rows, device=dev) % cols
                c = -(a + b[t])
                for function, f in (("exp", torch.exp), ("sigmoid", torch.sigmoid)):
                    g = a.double()[:, None] * f(logits - rl[:, None]) + b.double()[None, :] * f(logits - cl[None, :])
                    if diagonal:
                        g[torch.arange(k), torch.arange(k)] = 0
                    g[torch.arange(rows), t] += c.double()
                    dx, dy, ds = family.weighted_grad(x, y, scale, a=a, o=rl.float(), b=b, p=cl.float(),
                                                      positives=(t, c), exclude_diagonal=diagonal, need_dx=True,
                                                      need_dy=True, need_ds=True, function=function)
                    records.check(f"{tag} {function} dx {shape}", dx, 30.0 * g @ y.double(), tol)
                    records.check(f"{tag} {function} dy {shape}", dy, 30.0 * g.T @ x.double(), tol)
                    records.check(f"{tag} {function} ds {shape}", ds, (g * (x.double() @ y.double().T)).sum(), tol)
    return records.rows


def stress(dry_run, names):
    """The lock merge under contention, a side stream, and a grid large enough for 64-bit offsets."""
    import torch

    dev = device()
    generator = torch.Generator(dev).manual_seed(1)
    scale = torch.tensor(20.0, device=dev)
    records = Records()
    for name, family in backends(names):
        if isinstance(family, str):
            records.skip(f"{name} stress", family)
            continue
        n, d = (90, 16) if dry_run else (8192, 64)
        x, y = ragged_inputs(n, n, d, torch.bfloat16, generator, dev)
        two_pass = family._lse_forward(y, x, scale, False, False)[0]  # the columns as the rows of S.T
        worst = 0.0
        for _ in range(3 if dry_run else 30):
            worst = max(worst, (family.lse(x, y, scale, rows=True, cols=True)[1] - two_pass).abs().max().item())
        records.rows.append(dict(name=f"{name} merged column LSE x30 against two passes", max_diff=worst,
                                 ok=worst < 5e-4))
        print(f"{'ok  ' if worst < 5e-4 else 'FAIL'} {name} merged column LSE x30: max diff {worst:.2e}", flush=True)
        ones = torch.ones(n, device=dev)
        if dev.type == "cuda":
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                x2, y2 = x * 1, y * 1  # made on the side stream, used there
                row2, _ = family.lse(x2, y2, scale, rows=True, cols=True)
                dx2, _, _ = family.weighted_grad(x2, y2, scale, a=ones, o=row2, need_dy=False)
            side.synchronize()
            row, _ = family.lse(x, y, scale, rows=True, cols=True)
            dx, _, _ = family.weighted_grad(x, y, scale, a=ones, o=row, need_dy=False)
            records.check(f"{name} side stream: row LSE", row2, row, 1e-5)
            records.check(f"{name} side stream: dx", dx2, dx, 1e-2)
        big = 300 if dry_run else 2**18
        x, y = ragged_inputs(big, big, 64, torch.bfloat16, generator, dev)
        row, col = family.lse(x, y, scale, rows=True, cols=True)
        tail = slice(big - 100, big)
        records.check(f"{name} N={big}: row LSE, last rows", row[tail],
                      (20.0 * x[tail].double() @ y.double().T).logsumexp(1), 2e-2)
        records.check(f"{name} N={big}: column LSE, last columns", col[tail],
                      (20.0 * x.double() @ y[tail].double().T).logsumexp(0), 2e-2)
        dx, _, _ = family.weighted_grad(x, y, scale, a=torch.ones(big, device=dev), o=row, need_dy=False)
        records.check(f"{name} N={big}: dx, last rows", dx[tail],
                      20.0 * torch.softmax(20.0 * x[tail].double() @ y.double().T, 1) @ y.double(), 2e-2)
    return records.rows


def autocast(dry_run):
    """fp32 features under bf16 autocast against bf16 features: time and the loss's accuracy."""
    import torch
    import torch.nn.functional as F

    import flashcl

    dev = device()
    n, d = (48, 32) if dry_run else (65536, 768)
    generator = torch.Generator(dev).manual_seed(2)
    image = F.normalize(torch.randn(n, d, device=dev, generator=generator), dim=1)
    text = F.normalize(image + 0.5 * torch.randn(n, d, device=dev, generator=generator), dim=1)
    results = {}
    for label, features, use_autocast in (("fp32 under autocast", (image, text), True),
                                         ("bf16", (image.bfloat16(), text.bfloat16()), False)):
        x, y = (f.clone().requires_grad_() for f in features)
        scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
                loss = flashcl.clip_loss(x, y, scale)
            loss.backward()
            return loss

        loss = step()  # compiles and autotunes
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(2 if dry_run else 5):
            start = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        results[label] = dict(ms=1e3 * sorted(times)[len(times) // 2], loss=loss.item())
    sample = slice(0, min(n, 4096))  # the reference loss of a sample: the first rows against each other
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        sampled = flashcl.clip_loss(image[sample], text[sample], 1 / 0.07).item()
    x64, y64 = image[sample].bfloat16().double(), text[sample].bfloat16().double()
    logits = x64 @ y64.T / 0.07
    labels = torch.arange(logits.shape[0], device=dev)
    want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)).item()
    error = abs(sampled - want) / abs(want)
    results["sample loss rel. error against the float64 loss of the rounded features"] = error
    results["time ratio fp32-under-autocast / bf16"] = (results["fp32 under autocast"]["ms"] / results["bf16"]["ms"])
    ok = error < 1e-4
    print(f"{'ok  ' if ok else 'FAIL'} autocast: {json.dumps(results)}", flush=True)
    return [dict(name="fp32 features under autocast", ok=ok, **results)]


# -- the parent -----------------------------------------------------------------------------------------------

def child(args, timeout, env=None):
    """Runs this script as a child under a timeout; (its records, its exit, the seconds it took)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.json"
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, *args, "--records", str(path)], timeout=timeout,
                                  env=env, capture_output=True, text=True)
            status = f"exit {done.returncode}"
            tail = (done.stdout + done.stderr)[-4000:]
        except subprocess.TimeoutExpired as expired:
            status, tail = f"timed out after {timeout} s", str(expired.stdout or "")[-4000:]
        records = json.loads(path.read_text()) if path.exists() else []
        return records, status, time.perf_counter() - started, tail


def provenance():
    """The harness's provenance of every benchmark, and the backends this device has."""
    import flashcl

    sys.path.insert(0, str(HERE))
    import harness

    dev = device()
    return {**harness.provenance(str(dev)), "backends": flashcl.available_backends(dev)}


def parent(args):
    env = dict(os.environ, FLASHCL_TRITON_AUTOTUNE="0")  # one config per flag set in the checks: quick compiles
    dry = ["--dry-run"] if args.dry_run else []
    names = ["--backends", *args.backends]
    started = time.perf_counter()
    report = {"provenance": provenance(), "phases": {}}

    def record(phase, records, status, seconds, tail):
        failed = [r["name"] for r in records if not r.get("ok")]
        report["phases"][phase] = dict(status=status, seconds=round(seconds, 1), failed=failed, records=records,
                                       log_tail=None if status == "exit 0" and not failed else tail)
        print(f"== {phase}: {status}, {seconds:.0f} s, {len(records)} records, {len(failed)} failed", flush=True)

    # The four precisions compile and run in parallel, then the stress child.
    with ThreadPoolExecutor(len(PRECISIONS)) as pool:
        runs = {p: pool.submit(child, ["--phase", "contact", "--precision", p, *dry, *names], TIMEOUTS["contact"], env)
                for p in PRECISIONS}
    for precision, run in runs.items():
        record(f"contact {precision}", *run.result())
    record("stress", *child(["--phase", "stress", *dry, *names], TIMEOUTS["stress"], env))
    with tempfile.TemporaryDirectory() as tmp:
        for loss, contenders, phase in (
                ("clip", ["triton", "cuda", "textbook", "open_clip", "inf_cl"], "headline clip"),
                ("siglip", ["triton", "cuda", "textbook", "open_clip", "siglip_kernel"], "headline siglip")):
            stem = Path(tmp) / loss
            size = ["--dims", "32", "--batch-sizes", "48"] if args.dry_run else ["--dims", "768", "--batch-sizes",
                                                                                 "65536"]
            started_bench = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, str(HERE / "bench_gpu.py"), "--loss", loss, *size, "--extra",
                                       "--contenders", *contenders, "--out", str(stem)], cwd=HERE, capture_output=True,
                                      text=True, timeout=TIMEOUTS[phase])
                status, tail = f"exit {done.returncode}", (done.stdout + done.stderr)[-4000:]
            except subprocess.TimeoutExpired:
                status, tail = f"timed out after {TIMEOUTS[phase]} s", ""
            result = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").exists() else {}
            rows = result.get("rows", [])
            records = [dict(name=f"{loss} {row.get('impl')} N={row.get('batch')} D={row.get('dim')}", ok=True, **row)
                       for row in rows]
            record(phase, records, status, time.perf_counter() - started_bench, tail)
            report["phases"][phase]["settings"] = result.get("settings")
    record("autocast", *child(["--phase", "autocast", *dry], TIMEOUTS["autocast"], env=os.environ.copy()))
    report["seconds"] = round(time.perf_counter() - started, 1)
    problems = [phase for phase, r in report["phases"].items() if r["status"] != "exit 0" or r["failed"]]
    report["ok"] = not problems
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}; {report['seconds']:.0f} s; {'all phases ok' if not problems else f'problems: {problems}'}")
    return 0 if not problems else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, Triton through its interpreter")
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"])
    parser.add_argument("--phase", choices=["contact", "stress", "autocast"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["FLASHCL_CHECK_DEVICE"] = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: children inherit it
    if args.phase is None:
        return parent(args)
    rows = {"contact": lambda: contact(args.precision, args.dry_run, args.backends),
            "stress": lambda: stress(args.dry_run, args.backends), "autocast": lambda: autocast(args.dry_run)}[args.phase]()
    args.records.write_text(json.dumps(rows, default=str))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
