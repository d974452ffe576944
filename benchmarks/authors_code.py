"""REPPO as specified here against the REPPO authors' own JAX code, on CartpoleBalance at the
CPU setting, up to the authors' code's budget (0.5M env steps).

    python benchmarks/authors_code.py import --runs-dir PATH   # their metrics.npz -> CSVs
    python benchmarks/authors_code.py compare                  # table + docs/images/authors_CartpoleBalance.png

Why: the issue that specified reppo_jax.py quotes the authors' code at a mean evaluation return
of ~650 over 3 seeds after 0.5M steps on CartpoleBalance (64 envs x 32 steps, 4 minibatches,
8 epochs, hidden 256). This script holds what their code did when run on this machine, and
compares our two files with it on the same horizon.

`import` reads `{runs_dir}/cartpole_seed{S}/metrics.npz` as the authors' script writes it
(hydra run folder; `time_step` and `eval/episode_return`, `eval/episode_return_std`,
`eval/num_episodes` per evaluation, one seed per run) and writes
`benchmarks/authors/reppo_authors/CartpoleBalance/seed{S}.csv`, a result tree as
plot.load_results reads it (env_steps, eval_return, eval_return_std, num_episodes; no
wall-clock column: their evaluation is inside their timed loop). How their code was obtained
and run is in docs/results.md ("REPPO against the authors' code"); their code is not part of
this repository.

`compare` reads those CSVs, our grid's `benchmarks/results/{reppo_jax,reppo_torch}/
CartpoleBalance/seed*.csv` (1M steps) and our extra seeds run only to H in the authors' tree
(`benchmarks/authors/{reppo_jax,reppo_torch}/CartpoleBalance/seed*.csv`, written by
`python benchmarks/grid.py --implementations reppo_jax --tasks CartpoleBalance --seeds 4 5 6 7 8
--budget 491520 --results-dir benchmarks/authors`), cuts every curve at the authors' horizon H
(their last evaluation, 491,520 steps) and tests, per seed, with plot.welch_test:
- the return at H (linear interpolation; both evaluate exactly at 491,520);
- the mean return over [S, H], S = the latest first evaluation over all curves (their first
  evaluation comes after 24,576 steps of training; ours at step 0), on a 101-point grid.
Rows: each of our files, and both pooled (the same algorithm, pinned equal by tests/test_parity.py).
"""

from __future__ import annotations

import csv
import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import plot  # noqa: E402

TASK = "CartpoleBalance"
OURS = {"reppo_jax": "REPPO (JAX)", "reppo_torch": "REPPO (PyTorch)"}
THEIRS = "REPPO, the authors' code"
AUTHORS_IMPL = "reppo_authors"  # their method's folder in the authors' result tree


def import_runs(runs_dir: str, out_dir: str) -> list[str]:
    """Convert every `{runs_dir}/cartpole_seed{S}/metrics.npz` into `{out_dir}/seed{S}.csv`."""
    written = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "cartpole_seed*", "metrics.npz"))):
        seed = int(re.fullmatch(r"cartpole_seed(\d+)", os.path.basename(os.path.dirname(path))).group(1))
        with np.load(path) as data:
            columns = {
                "env_steps": data["time_step"].ravel().astype(np.int64),
                "eval_return": data["eval/episode_return"].ravel(),
                "eval_return_std": data["eval/episode_return_std"].ravel(),
                "num_episodes": data["eval/num_episodes"].ravel().astype(np.int64),
            }
        os.makedirs(out_dir, exist_ok=True)
        out = os.path.join(out_dir, f"seed{seed}.csv")
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(list(columns))
            writer.writerows(zip(*columns.values()))
        written.append(out)
    return written


def statistics(groups: dict[str, dict[int, plot.Curve]], horizon: float) -> tuple[dict[str, dict], np.ndarray]:
    """Per group: the return at `horizon` and the mean return over the common grid, per seed."""
    start = max(float(c["env_steps"][0]) for seeds in groups.values() for c in seeds.values())
    grid = np.linspace(start, horizon, 101)
    out = {}
    for name, seeds in groups.items():
        curves = [seeds[s] for s in sorted(seeds)]
        at = np.array([plot.interpolate(c["env_steps"], c["eval_return"], np.array([horizon]))[0] for c in curves])
        mean = plot.mean_returns(seeds, grid)
        out[name] = {"return at horizon": at, "mean over run": mean}
    return out, grid


def their_horizon(theirs: dict[int, plot.Curve]) -> float:
    """H: the last evaluation that every seed of the authors' code reached."""
    return min(float(c["env_steps"][-1]) for c in theirs.values())


def comparison_table(groups: dict[str, dict[int, plot.Curve]], horizon: float, theirs: str = THEIRS) -> str:
    stats, grid = statistics(groups, horizon)
    lines = [
        f"Horizon H = {horizon:,.0f} env steps; mean over run on [{grid[0]:,.0f}, {horizon:,.0f}]. "
        f"Welch's two-sided t-test over seeds against {theirs}, α = 0.05; difference = ours − theirs "
        "with its 95 % Welch confidence interval.",
        "",
        "| Method | Seeds | Return at H, per seed | Return at H (mean ± std) | Mean over run (mean ± std) "
        "| Difference at H [95 % CI], p | Difference over run [95 % CI], p |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        cells = [name, str(len(s["return at horizon"])), ", ".join(f"{v:.0f}" for v in s["return at horizon"])]
        for key in ("return at horizon", "mean over run"):
            v = s[key]
            cells.append(f"{v.mean():.0f} ± {v.std(ddof=1):.0f}")
        for key in ("return at horizon", "mean over run"):
            if name == theirs:
                cells.append("")
                continue
            _, p, lo, hi = plot.welch_test(s[key], stats[theirs][key])
            cells.append(f"{s[key].mean() - stats[theirs][key].mean():.0f} [{lo:.0f}, {hi:.0f}], p = {p:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw(groups: dict[str, dict[int, plot.Curve]], path: str, horizon: float, n_boot: int = 10_000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {OURS["reppo_jax"]: "tab:blue", OURS["reppo_torch"]: "tab:orange", THEIRS: "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, seeds in groups.items():
        if name not in colors:
            continue
        curves = list(seeds.values())
        grid = np.linspace(max(c["env_steps"][0] for c in curves), horizon, 101)
        agg = plot.aggregate(curves, grid, n_boot=n_boot)
        ax.plot(agg["x"], agg["mean"], color=colors[name], label=f"{name} (n={len(curves)})")
        ax.fill_between(agg["x"], agg["lo"], agg["hi"], color=colors[name], alpha=0.2)
    ax.set_xlabel("env steps")
    ax.set_ylabel("evaluation return")
    ax.set_title(f"{TASK}, --preset cpu setting: mean and 95% bootstrap CI over seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Options:
    mode: tyro.conf.Positional[Literal["import", "compare"]] = "compare"
    runs_dir: str | None = None
    """import: the folder holding the authors' hydra run folders cartpole_seed{S}/"""
    authors_dir: str = os.path.join(HERE, "authors")
    """the authors' code's result tree, {authors_dir}/reppo_authors/CartpoleBalance/seed{S}.csv (written by
    import), and our extra seeds to the same horizon, {authors_dir}/reppo_{jax,torch}/CartpoleBalance/"""
    results_dir: str = os.path.join(HERE, "results")
    """our grid's result tree (benchmarks/grid.py)"""
    figure: str = os.path.join(os.path.dirname(HERE), "docs", "images", f"authors_{TASK}.png")
    table_out: str | None = None
    """compare: write the markdown table here (None: stdout)"""


def main(opts: Options) -> int:
    if opts.mode == "import":
        if opts.runs_dir is None:
            print("import needs --runs-dir PATH", file=sys.stderr)
            return 2
        written = import_runs(opts.runs_dir, os.path.join(opts.authors_dir, AUTHORS_IMPL, TASK))
        print("\n".join(written) if written else f"no cartpole_seed*/metrics.npz under {opts.runs_dir}")
        return 0 if written else 1
    ours = plot.load_results(opts.results_dir)
    more = plot.load_results(opts.authors_dir)  # our extra seeds run to H only (benchmarks/grid.py --budget H)
    groups = {}
    for impl, label in OURS.items():
        seeds = dict(ours.get((impl, TASK), {}))
        for seed, curve in more.get((impl, TASK), {}).items():
            if seed in seeds:
                print(f"{impl} seed {seed} is in both {opts.results_dir} and {opts.authors_dir}", file=sys.stderr)
                return 1
            seeds[seed] = curve
        if seeds:
            groups[label] = dict(sorted(seeds.items()))
    theirs = more.get((AUTHORS_IMPL, TASK), {})
    if not groups or not theirs:
        print(f"need CSVs under {opts.authors_dir} and {opts.results_dir}/reppo_*/{TASK}", file=sys.stderr)
        return 1
    if len(groups) > 1:  # both files pooled: the same algorithm
        pooled = [c for seeds in groups.values() for c in seeds.values()]
        groups["both files pooled"] = dict(enumerate(pooled))
    groups[THEIRS] = theirs
    horizon = their_horizon(theirs)
    table = comparison_table(groups, horizon)
    if opts.table_out:
        with open(opts.table_out, "w") as f:
            f.write(table)
    print(table)
    draw(groups, opts.figure, horizon)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Options)))
