"""Plots and tables from the benchmark grid's results (benchmarks/grid.py).

    python benchmarks/plot.py                                  # docs/images/*.png, tables on stdout
    python benchmarks/plot.py --table-out benchmarks/results/tables.md

Reads `{results_dir}/{impl}/{task}/seed{seed}.csv` (columns env_steps, wall_seconds,
eval_return). For each (impl, task) every seed's curve is linearly interpolated onto a common
grid (0 .. the smallest final x over the seeds, 101 points; no extrapolation), and the plot
shows the mean over seeds with a 95 % percentile-bootstrap confidence interval of that mean
(10,000 resamples of the seeds). With 3 seeds such an interval is narrow and optimistic: it
describes these seeds, not the population of seeds.

Figures (matplotlib, Agg), into --out-dir (docs/images): `results_{Task}.png` per task and
`results_grid.png` with all tasks, each with three panels: return against env steps, return
against training wall-clock seconds, and the paper reference. The paper reference panel draws
the REPPO paper's published curves (`{anchors_dir}/{Task}_small_data.csv`, REPPO, and
`{Task}_ppo.csv`, the paper's PPO) against the FRACTION of their run: the files' `steps` column
runs 0..200M although the runs were configured for about 52M env steps (see
../shared/anchors/README.md), so row k of 20 is read as k/19 of a ~52M-step run. They are not
put on our env-step axis; a vertical line marks where our budget would sit (budget / 52M).

Tables (markdown, stdout or --table-out):
- final return: mean +- sample std (ddof 1) over seeds of the last evaluation's return, per task and method;
- time to threshold: the training wall-clock seconds (and env steps) of the first evaluation at
  which eval_return >= the task's threshold (THRESHOLDS below: half of the paper REPPO
  small-data final mean return, rounded to 5), mean +- sample std over the seeds that reached
  it (a seed that never reached it is left out, not counted as the budget), and how many did;
  resolution is one evaluation interval;
- comparisons, per task where both methods have results: reppo_jax vs reppo_torch (should be
  indistinguishable) and reppo_jax vs brax_ppo. Welch's unequal-variance two-sided t-test over
  seeds, alpha = 0.05, on two statistics: the final return, and the mean return over the run
  (each seed's curve averaged over the env-step grid both methods cover, which also sees how
  fast a method learns). The table gives the difference of the means with its 95 % Welch
  confidence interval. "Indistinguishable" means neither test rejects; with 3 seeds per side
  the tests have little power (the intervals show how large a difference they could miss), so
  it is a necessary check, not a proof of equivalence.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
import sys
from dataclasses import dataclass

import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RUN_STEPS = 52_000_000  # the paper's DM Control runs (anchors README): ~52M env steps
# Half of the paper's REPPO small-data final mean return (last row of ../shared/anchors/dmc/
# {Task}_small_data.csv, mean over its 10 seeds), rounded to 5.
THRESHOLDS = {
    "CartpoleBalance": 500.0,
    "CartpoleSwingup": 440.0,
    "PendulumSwingup": 310.0,
    "AcrobotSwingup": 170.0,
    "ReacherEasy": 485.0,
}
LABELS = {"reppo_jax": "REPPO (JAX)", "reppo_torch": "REPPO (PyTorch)", "brax_ppo": "Brax PPO"}
COLORS = {"reppo_jax": "tab:blue", "reppo_torch": "tab:orange", "brax_ppo": "tab:green"}
IMPL_ORDER = ["reppo_jax", "reppo_torch", "brax_ppo"]

Curve = dict[str, np.ndarray]  # env_steps, wall_seconds, eval_return (one seed)
Results = dict[tuple[str, str], dict[int, Curve]]  # (impl, task) -> seed -> curve


# ---------------------------------------------------------------------------- loading


def read_result_csv(path: str) -> Curve:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for key in ["env_steps", "wall_seconds", "eval_return"]:
        out[key] = np.array([float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows])
    return out


def result_files(results_dir: str) -> list[tuple[str, str, int, str]]:
    """(group, task, seed, path) of every finished `{group}/{task}/seed{N}.csv` under
    results_dir, sorted by path (temporary files such as seed{N}.csv.tmp ignored)."""
    found = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*", "seed*.csv"))):
        match = re.fullmatch(r"seed(-?\d+)\.csv", os.path.basename(path))
        if match:
            task_dir = os.path.dirname(path)
            group, task = os.path.basename(os.path.dirname(task_dir)), os.path.basename(task_dir)
            found.append((group, task, int(match.group(1)), path))
    return found


def load_results(results_dir: str) -> Results:
    """Every finished `{impl}/{task}/seed{N}.csv` under results_dir (temporary files ignored)."""
    results: Results = {}
    for impl, task, seed, path in result_files(results_dir):
        curve = read_result_csv(path)
        if len(curve["env_steps"]):
            results.setdefault((impl, task), {})[seed] = curve
    return results


# ---------------------------------------------------------------------------- statistics


def interpolate(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """y(x) linearly interpolated at grid points; NaN outside [x[0], x[-1]] or where x is NaN."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out = np.full(len(grid), np.nan)
    if len(x) == 0:
        return out
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    inside = (grid >= x[0]) & (grid <= x[-1])
    out[inside] = np.interp(grid[inside], x, y)
    return out


def common_grid(curves: list[Curve], x_key: str = "env_steps", num: int = 101) -> np.ndarray:
    """The largest first x .. the smallest final x over the curves, so that every seed covers
    the whole grid (0 .. for curves that all start with an evaluation at step 0, as the grid's
    do; a curve without one would otherwise be NaN, and so its mean, before its first x)."""
    ranges = [(np.nanmin(c[x_key]), np.nanmax(c[x_key])) for c in curves if np.isfinite(c[x_key]).any()]
    start = max((first for first, _ in ranges), default=0.0)
    end = min((last for _, last in ranges), default=0.0)
    if start > end:  # no x where every curve has begun and not yet ended: every statistic is NaN
        print(f"warning: the curves share no {x_key} range (latest start {start}, earliest end {end})", file=sys.stderr)
    return np.linspace(start, end, num)


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 10_000, ci: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over axis 0 (seeds); values (n_seeds,) or (n_seeds, n_points)."""
    values = np.asarray(values, float)
    squeeze = values.ndim == 1
    values = values.reshape(len(values), -1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)  # (n_boot, n_points)
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(means, alpha, axis=0), np.quantile(means, 1.0 - alpha, axis=0)
    return (lo[0], hi[0]) if squeeze else (lo, hi)


def aggregate(
    curves: list[Curve],
    grid: np.ndarray,
    x_key: str = "env_steps",
    y_key: str = "eval_return",
    n_boot: int = 10_000,
    ci: float = 0.95,
) -> dict[str, np.ndarray]:
    """Mean over seeds and bootstrap CI at each grid point (NaN where a seed has no data)."""
    ys = np.stack([interpolate(c[x_key], c[y_key], grid) for c in curves])
    mean = ys.mean(axis=0)
    lo, hi = bootstrap_ci(np.nan_to_num(ys), n_boot=n_boot, ci=ci)
    missing = ~np.isfinite(ys).all(axis=0)
    lo, hi = np.where(missing, np.nan, lo), np.where(missing, np.nan, hi)
    return {"x": grid, "mean": mean, "lo": lo, "hi": hi, "n": np.full(len(grid), len(curves))}


def final_returns(seed_curves: dict[int, Curve]) -> np.ndarray:
    """The last evaluation's return of each seed (sorted by seed)."""
    return np.array([seed_curves[s]["eval_return"][-1] for s in sorted(seed_curves)])


def final_table(results: Results) -> list[dict]:
    """One row per (task, impl): seeds, final env steps (min over seeds), mean and std (ddof=1) of final return."""
    rows = []
    for (impl, task), seeds in sorted(results.items(), key=lambda kv: (kv[0][1], _impl_rank(kv[0][0]))):
        finals = final_returns(seeds)
        rows.append(
            {
                "task": task,
                "impl": impl,
                "n": len(finals),
                "env_steps": int(min(seeds[s]["env_steps"][-1] for s in seeds)),
                "mean": float(finals.mean()),
                "std": float(finals.std(ddof=1)) if len(finals) > 1 else float("nan"),
            }
        )
    return rows


def time_to_threshold(x: np.ndarray, returns: np.ndarray, threshold: float) -> float:
    """x (wall seconds or env steps) of the first evaluation with return >= threshold; NaN if never."""
    hit = np.flatnonzero(np.asarray(returns, float) >= threshold)
    return float(np.asarray(x, float)[hit[0]]) if len(hit) else float("nan")


def threshold_table(results: Results, thresholds: dict[str, float] = THRESHOLDS) -> list[dict]:
    rows = []
    for (impl, task), seeds in sorted(results.items(), key=lambda kv: (kv[0][1], _impl_rank(kv[0][0]))):
        if task not in thresholds:
            continue
        thr = thresholds[task]
        wall = np.array([time_to_threshold(c["wall_seconds"], c["eval_return"], thr) for c in seeds.values()])
        steps = np.array([time_to_threshold(c["env_steps"], c["eval_return"], thr) for c in seeds.values()])
        reached = np.isfinite(wall)
        rows.append(
            {
                "task": task,
                "impl": impl,
                "threshold": thr,
                "reached": int(reached.sum()),
                "n": len(wall),
                "wall_mean": float(wall[reached].mean()) if reached.any() else float("nan"),
                "wall_std": float(wall[reached].std(ddof=1)) if reached.sum() > 1 else float("nan"),
                "steps_mean": float(steps[reached].mean()) if reached.any() else float("nan"),
            }
        )
    return rows


def welch_test(a: np.ndarray, b: np.ndarray, ci: float = 0.95) -> tuple[float, float, float, float]:
    """Welch's two-sided t-test of mean(a) = mean(b): (t, p, lo, hi) with [lo, hi] the Welch
    confidence interval of mean(a) - mean(b). Degenerate zero-variance samples: p = 1 if the
    means are equal, else 0, and the interval is the point difference."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return (float("nan"),) * 4
    diff = float(a.mean() - b.mean())
    if a.var() == 0 and b.var() == 0:
        return (0.0, 1.0, 0.0, 0.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0, diff, diff)
    result = stats.ttest_ind(a, b, equal_var=False)
    lo, hi = result.confidence_interval(confidence_level=ci)
    return float(result.statistic), float(result.pvalue), float(lo), float(hi)


def mean_returns(seed_curves: dict[int, Curve], grid: np.ndarray) -> np.ndarray:
    """Each seed's evaluation return averaged over the points of the env-step grid (evenly
    spaced, so about the area under its learning curve divided by the grid's length; sorted
    by seed). Unlike the final return, this
    statistic sees the whole curve: how fast a method learns, not only where it ends."""
    curves = [seed_curves[s] for s in sorted(seed_curves)]
    return np.array([interpolate(c["env_steps"], c["eval_return"], grid).mean() for c in curves])


# Pairs of methods compared per task where both have results: (a, b, what the test is for).
COMPARISONS = [
    ("reppo_jax", "reppo_torch", "the two implementations of the same algorithm should be indistinguishable"),
    ("reppo_jax", "brax_ppo", "REPPO against the PPO baseline at the same budget"),
]
# The two statistics tested, and the prefix of their keys in a comparison row.
STATISTICS = {"final return": "", "mean over run": "auc_"}


def compare_implementations(
    results: Results, a: str = "reppo_jax", b: str = "reppo_torch", alpha: float = 0.05
) -> list[dict]:
    """Per task where both have at least two seeds (a Welch test needs two per side), two Welch
    t-tests over seeds: on the final return and on the mean return over the run (on the env-step
    grid both methods cover, see mean_returns).
    Keys per statistic (prefix from STATISTICS): mean_a, mean_b, t, p, diff_lo, diff_hi.
    "indistinguishable" only if neither test rejects equality at level alpha."""
    rows = []
    tasks = sorted(
        {t for (i, t), seeds in results.items() if i == a and len(seeds) >= 2}
        & {t for (i, t), seeds in results.items() if i == b and len(seeds) >= 2}
    )
    for task in tasks:
        seeds_a, seeds_b = results[(a, task)], results[(b, task)]
        grid = common_grid(list(seeds_a.values()) + list(seeds_b.values()))
        samples = {
            "": (final_returns(seeds_a), final_returns(seeds_b)),
            "auc_": (mean_returns(seeds_a, grid), mean_returns(seeds_b, grid)),
        }
        row = {"task": task, "a": a, "b": b, "n_a": len(seeds_a), "n_b": len(seeds_b)}
        for prefix, (sa, sb) in samples.items():
            t, p, lo, hi = welch_test(sa, sb)
            values = {"mean_a": sa.mean(), "mean_b": sb.mean(), "t": t, "p": p, "diff_lo": lo, "diff_hi": hi}
            row.update({prefix + k: float(v) for k, v in values.items()})
        ps = [row[prefix + "p"] for prefix in STATISTICS.values()]
        row["indistinguishable"] = bool(all(np.isfinite(p) and p >= alpha for p in ps))
        rows.append(row)
    return rows


def _impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:,.{digits}f}"


def markdown_tables(results: Results, thresholds: dict[str, float] = THRESHOLDS) -> str:
    lines = ["### Final return (last evaluation, mean ± sample std over seeds)", ""]
    lines += ["| Task | Method | Seeds | Env steps | Final return |", "|---|---|---|---|---|"]
    for r in final_table(results):
        label = LABELS.get(r["impl"], r["impl"])
        lines.append(
            f"| {r['task']} | {label} | {r['n']} | {r['env_steps']:,} | {_fmt(r['mean'])} ± {_fmt(r['std'])} |"
        )
    heading = "### Time to threshold (training wall clock, first evaluation at or above the threshold"
    lines += ["", heading + "; mean ± sample std over the seeds that reached it)", ""]
    lines += ["| Task | Threshold | Method | Reached | Wall seconds | Env steps |", "|---|---|---|---|---|---|"]
    for r in threshold_table(results, thresholds):
        label = LABELS.get(r["impl"], r["impl"])
        lines.append(
            f"| {r['task']} | {r['threshold']:g} | {label} | {r['reached']}/{r['n']} | "
            f"{_fmt(r['wall_mean'], 0)} ± {_fmt(r['wall_std'], 0)} | {_fmt(r['steps_mean'], 0)} |"
        )
    for a, b, purpose in COMPARISONS:
        comparison = compare_implementations(results, a, b)
        if not comparison:
            continue
        la, lb = LABELS.get(a, a), LABELS.get(b, b)
        lines += ["", f"### {la} vs {lb}: Welch's t-test over seeds (two-sided, α = 0.05)", ""]
        lines.append(
            f"Purpose: {purpose}. Two statistics per seed: the final return, and the mean return over the run "
            "(the learning curve averaged over the env steps both methods cover). "
            f"Difference = {la} − {lb}, with its 95 % Welch confidence interval."
        )
        lines += ["", f"| Task | Seeds | Statistic | {la} | {lb} | Difference [95 % CI] | p | Different? |"]
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in comparison:
            for stat, prefix in STATISTICS.items():
                p = r[f"{prefix}p"]
                verdict = "n/a" if not np.isfinite(p) else ("yes" if p < 0.05 else "no")
                lines.append(
                    f"| {r['task']} | {r['n_a']} / {r['n_b']} | {stat} | {_fmt(r[f'{prefix}mean_a'])} | "
                    f"{_fmt(r[f'{prefix}mean_b'])} | {_fmt(r[f'{prefix}mean_a'] - r[f'{prefix}mean_b'])} "
                    f"[{_fmt(r[f'{prefix}diff_lo'])}, {_fmt(r[f'{prefix}diff_hi'])}] | {_fmt(p, 3)} | {verdict} |"
                )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- paper anchors


def read_anchor(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of the run, values (rows, seeds)) of a published curve: row k of R is k/(R-1)."""
    data = np.genfromtxt(path, delimiter=",", skip_header=1, ndmin=2)
    values = data[:, 1:]
    return np.linspace(0.0, 1.0, len(values)), values


# ---------------------------------------------------------------------------- plotting


def _draw(ax, results: Results, task: str, x_key: str, n_boot: int) -> None:
    impls = sorted({i for (i, t) in results if t == task}, key=_impl_rank)
    for impl in impls:
        curves = list(results[(impl, task)].values())
        grid = common_grid(curves, x_key)
        if grid[-1] <= 0:
            continue
        agg = aggregate(curves, grid, x_key=x_key, n_boot=n_boot)
        color = COLORS.get(impl)
        ax.plot(agg["x"], agg["mean"], color=color, label=f"{LABELS.get(impl, impl)} (n={len(curves)})")
        ax.fill_between(agg["x"], agg["lo"], agg["hi"], color=color, alpha=0.25, linewidth=0)
    ax.set_xlabel("env steps" if x_key == "env_steps" else "training wall clock [s] (compilation excluded)")
    ax.set_ylabel("eval return")
    ax.grid(alpha=0.3)
    if impls:
        ax.legend(fontsize=7, loc="lower right")


def _draw_anchor(ax, task: str, anchors_dir: str, budget: float | None, n_boot: int) -> None:
    drew = False
    for suffix, label, color in [("small_data", "paper REPPO (small data)", "k"), ("ppo", "paper PPO", "tab:red")]:
        path = os.path.join(anchors_dir, f"{task}_{suffix}.csv")
        if not os.path.exists(path):
            continue
        frac, values = read_anchor(path)
        values = values[:, np.isfinite(values).all(axis=0)]
        if values.shape[1] == 0:
            continue
        lo, hi = bootstrap_ci(values.T, n_boot=n_boot)
        ax.plot(frac, values.mean(axis=1), "--", color=color, label=f"{label} (n={values.shape[1]})")
        ax.fill_between(frac, lo, hi, color=color, alpha=0.12, linewidth=0)
        drew = True
    if budget:
        ax.axvline(budget / PAPER_RUN_STEPS, color="gray", lw=0.8, ls=":", label="our budget / 52M")
    ax.set_xlabel("fraction of the paper's ~52M-step run (not env steps)")
    ax.set_ylabel("eval return")
    ax.set_title("paper reference", fontsize=9)
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no anchor data", ha="center", va="center", transform=ax.transAxes)


def _task_budget(results: Results, task: str) -> float | None:
    ends = [c["env_steps"][-1] for (i, t), seeds in results.items() if t == task for c in seeds.values()]
    return max(ends) if ends else None


def plot_task(results: Results, task: str, path: str, anchors_dir: str, n_boot: int = 10_000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _draw(axes[0], results, task, "env_steps", n_boot)
    _draw(axes[1], results, task, "wall_seconds", n_boot)
    _draw_anchor(axes[2], task, anchors_dir, _task_budget(results, task), n_boot)
    fig.suptitle(f"{task}: mean and 95% bootstrap CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(results: Results, tasks: list[str], path: str, anchors_dir: str, n_boot: int = 10_000) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.3 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        _draw(row[0], results, task, "env_steps", n_boot)
        _draw(row[1], results, task, "wall_seconds", n_boot)
        _draw_anchor(row[2], task, anchors_dir, _task_budget(results, task), n_boot)
        row[0].set_title(task, fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI


@dataclass
class Options:
    results_dir: str = os.path.join(ROOT, "benchmarks", "results")
    """root of the result tree written by benchmarks/grid.py"""
    out_dir: str = os.path.join(ROOT, "docs", "images")
    """where the PNGs go"""
    anchors_dir: str = os.path.join(os.path.dirname(ROOT), "shared", "anchors", "dmc")
    """the paper's published DM Control curves"""
    table_out: str | None = None
    """write the markdown tables here (None: stdout)"""
    n_boot: int = 10_000
    """bootstrap resamples"""
    prefix: str = "results"
    """file names: {prefix}_{task}.png per task, and {prefix}_grid.png when there are several tasks"""


def main(opts: Options) -> int:
    results = load_results(opts.results_dir)
    if not results:
        print(f"no results under {opts.results_dir}", file=sys.stderr)
        return 1
    os.makedirs(opts.out_dir, exist_ok=True)
    present = {t for (_, t) in results}
    tasks = [t for t in THRESHOLDS if t in present] + sorted(present - set(THRESHOLDS))
    for task in tasks:
        path = os.path.join(opts.out_dir, f"{opts.prefix}_{task}.png")
        plot_task(results, task, path, opts.anchors_dir, opts.n_boot)
    if len(tasks) > 1:
        plot_grid(results, tasks, os.path.join(opts.out_dir, f"{opts.prefix}_grid.png"), opts.anchors_dir, opts.n_boot)
    tables = markdown_tables(results)
    if opts.table_out:
        with open(opts.table_out, "w") as f:
            f.write(tables)
    else:
        print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Options)))
