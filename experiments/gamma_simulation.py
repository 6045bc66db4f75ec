"""The paper's simulated experiment: minibatch InfoNCE is biased, the gamma-weighted loss is not.

A one-parameter contrastive problem whose all-negatives optimum is known in closed form:
the positive scores theta, a negative z ~ p = N(0, 1) scores theta * z, so

    L(theta) = -theta + log E_p[exp(theta z)] = -theta + theta^2 / 2,   minimized at theta* = 1.

Noise enters the minibatch negatives without changing that objective: they are drawn from a
proposal q = N(mu, 1) and carry importance weights w = p(z)/q(z) = exp(-mu z + mu^2/2), of mean 1
under q, so Zb(theta) = mean_k w_k exp(theta z_k) is an unbiased estimate of Z(theta) = E_p[exp(theta z)]
for every mu; a larger mismatch mu gives heavier weights (their variance is e^(mu^2) - 1).

    conventional:   -theta + log Zb(theta)       the log of a noisy average: biased (Jensen)
    gamma-weighted: -theta + u * Zb(theta)       u from flashcl's E-step (sample_log_weights of a
                                                 running estimate, ema_log), linear in Zb: unbiased
                                                 up to the noise of the running estimate

Nothing is biased by hand: both see the same negatives, and the conventional loss's bias is
whatever the logarithm of a noisy average makes of it. SGD with a decaying step size from 10
random starts per noise level; prints the final theta per loss and level, writes
experiments/results/gamma_simulation.json (the benchmark harness's results schema, a row per
noise level and loss) and a PNG of the trajectories; its table: `tables()`, which
tools/generate_tables.py puts in the docs.

    python experiments/gamma_simulation.py
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from flashcl.gamma import ema_log, sample_log_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("conventional", "gamma a=1", "gamma a=inf")


def log_batch_denominator(theta, mu, batch, generator):
    """log Zb(theta) per run: B negatives from q = N(mu, 1), importance weighted towards p = N(0, 1)."""
    z = torch.randn(theta.shape[0], batch, generator=generator, dtype=torch.float64) + mu
    log_w = -mu * z + mu * mu / 2
    return torch.logsumexp(theta[:, None] * z + log_w, dim=1) - math.log(batch)


def train(method, mu, args, seed):
    """Trajectories (steps + 1, runs) of theta under one loss; every run gets its own negatives."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.empty(args.runs, dtype=torch.float64).uniform_(*args.init, generator=generator)
    log_z_hat = None  # the running estimate of log Z(theta), one per run (each run is one anchor)
    path = [theta.clone()]
    for step in range(args.steps):
        theta.requires_grad_(True)
        log_zb = log_batch_denominator(theta, mu, args.batch, generator)
        if method == "conventional":
            loss = -theta + log_zb
        else:
            with torch.no_grad():  # E-step: update the estimate, then draw u ~ Gamma(a, rate a Z^)
                log_z_hat = log_zb.clone() if log_z_hat is None else ema_log(log_z_hat, log_zb, args.momentum)
                log_u = sample_log_weights(log_z_hat, {"gamma a=1": 1.0, "gamma a=inf": math.inf}[method], generator)
            loss = -theta + torch.exp(log_u + log_zb)
        (grad,) = torch.autograd.grad(loss.sum(), theta)  # runs are independent: per-run gradients
        with torch.no_grad():
            theta = theta - args.lr / (1 + step / args.decay) * grad
        path.append(theta.detach().clone())
    return torch.stack(path)


def tables(results: dict) -> dict[str, str]:
    """The final theta per noise level and loss, from the results alone."""
    settings, rows = results["settings"], results["rows"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    by_level = {}
    for row in rows:
        by_level.setdefault(row["mu"], {})[row["method"]] = row
    cell = lambda r: f"{r['mean']:.3f} +- {r['std']:.3f} ({r['within_tolerance']}/{r['runs']})"
    columns = [("mu", lambda level: f"{level[0]:g}"),
               ("weight variance", lambda level: f"{math.expm1(level[0] * level[0]):.3g}"),
               *[(method, lambda level, method=method: cell(level[1][method])) for method in methods]]
    caption = (f"theta* = 1; B = {settings['batch']} negatives per step, {settings['steps']} SGD steps, "
               f"{settings['runs']} starts per level; final theta mean +- std, and runs within "
               f"{settings['tolerance']} of 1.")
    return {"simulation": caption + "\n\n" + harness.markdown_table(columns, list(by_level.items()),
                                                                     "rr" + "l" * len(methods))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mismatch", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                        help="proposal means mu: the noise levels")
    parser.add_argument("--batch", type=int, default=8, help="negatives per step")
    parser.add_argument("--runs", type=int, default=10, help="random initializations per level")
    parser.add_argument("--init", type=float, nargs=2, default=[-1.0, 3.0], help="uniform range of theta_0")
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--decay", type=float, default=50.0, help="step size lr / (1 + t / decay)")
    parser.add_argument("--momentum", type=float, default=0.02,
                        help="weight of each batch in the running estimate (updated every step here)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="a run succeeds within this of theta* = 1")
    parser.add_argument("--out", type=Path, default=RESULTS / "gamma_simulation")
    args = parser.parse_args()

    results = harness.new_results(__file__, {k: v for k, v in vars(args).items() if k != "out"})
    paths = {}
    jobs = [(mu, method) for mu in args.mismatch for method in METHODS]
    for level, (mu, method) in enumerate(tqdm(jobs, desc="levels x losses")):
        path = train(method, mu, args, seed=1000 + level // len(METHODS))  # same starts for every loss
        paths[(mu, method)] = path
        final = path[-1]
        results["rows"].append({"mu": mu, "weight_variance": math.expm1(mu * mu), "method": method,
                                "mean": final.mean().item(), "std": final.std().item(),
                                "within_tolerance": int(((final - 1).abs() < args.tolerance).sum()),
                                "runs": args.runs})

    written = harness.write_results(args.out, results, lambda _, png: plot(paths, args, METHODS, png))
    print(tables(results)["simulation"])
    print(f"\nwrote {written} and .png")


def plot(paths, args, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(methods), len(args.mismatch), figsize=(3.2 * len(args.mismatch), 2.6 * len(methods)),
                             sharex=True, sharey=True, squeeze=False)
    for col, mu in enumerate(args.mismatch):
        for row, method in enumerate(methods):
            ax = axes[row][col]
            ax.plot(paths[(mu, method)].numpy(), lw=0.8, alpha=0.8)
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set_ylim(0.0, 2.0)  # the first steps leave this range; the endpoints are the point
            if row == 0:
                ax.set_title(f"mu = {mu:g} (Var w = {math.expm1(mu * mu):.3g})", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{method}\ntheta")
            if row == len(methods) - 1:
                ax.set_xlabel("step")
    fig.suptitle(f"theta over training, {args.runs} starts each; optimum theta* = 1 (dashed); B = {args.batch}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
