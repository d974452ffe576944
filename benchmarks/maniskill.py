"""ManiSkill3 learning runs of reppo_torch.py: their results kept in the repository, and the
tables and figure of docs/results.md made from them.

    python benchmarks/maniskill.py import RUN_DIR [RUN_DIR ...] --code COMMIT
    python benchmarks/maniskill.py compare                 # tables on stdout, docs/images/maniskill_{task}.png

A run is one `python reppo_torch.py --env-id PushCube-v1 --preset cpu --total-timesteps 200000
--log-interval 100 --seed S [--ignore-terminations]` (its run folder holds `args.json` and
`metrics.csv`). `import` copies the columns below from the run's `metrics.csv` into
`{results_dir}/{rule}/{task}/seed{S}.csv` (results_dir: benchmarks/maniskill_runs), where the
rule is the run's episode rule for training: `success_ends` (the default, the authors' setting:
a task's termination, success, ends a training episode) or `time_limit`
(`--ignore-terminations`: only the time limit ends one). A run saved before the flag existed has
no `ignore_terminations` in its `args.json`; it ran with the default rule if its code is commit
52dffa6 or later, and with the time limit only before that, so such an older run is imported
with `--rule time_limit`. Beside the CSV, `seed{S}.json` keeps the run's command, library
versions and the commit of the code (`--code`, which the run folder does not record).

`compare` reads that tree and prints, per task (markdown):
- per seed: the first evaluation with any success, the first step at which the mean of three
  consecutive evaluations' success_once reaches 0.5 (the step of the window's first
  evaluation), and the means over the last five evaluations (deterministic and stochastic);
- means over the seeds of each block of env steps (every evaluation in the block);
- where both rules have at least two seeds: Welch's two-sided t-test over seeds (alpha 0.05,
  benchmarks/plot.py's welch_test) of the difference time_limit - success_ends, on the last
  five evaluations' success_once and success_at_end and on success_once averaged over the run.
The figure shows each rule's deterministic evaluation success_once and success_at_end against
env steps: the mean over seeds with a 95 % percentile-bootstrap interval of that mean. With
five seeds per rule the tests have little power; the intervals say how large a difference
they could miss.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot  # noqa: E402  (benchmarks/plot.py: interpolation, bootstrap, Welch's test)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = [
    "global_step",
    "charts/SPS",
    "charts/episodic_length",
    "charts/episodic_return",
    "charts/success_once",
    "eval/episodic_return",
    "eval/success_once",
    "eval/success_at_end",
    "eval_stochastic/episodic_return",
    "eval_stochastic/success_once",
    "eval_stochastic/success_at_end",
]
RULES = {"success_ends": "success ends a training episode", "time_limit": "time limit only"}
COLORS = {"success_ends": "tab:blue", "time_limit": "tab:orange"}
BLOCK = 50_000  # env steps per block of the block table
Run = dict[str, np.ndarray]  # column -> values, one row per evaluation


# ---------------------------------------------------------------------------- import


def import_run(run_dir: str, results_dir: str, code: str, rule: str = "auto") -> str:
    """Copy one run folder's kept columns into the tree; returns the CSV's path. ``rule``
    "auto" reads the episode rule from the run's arguments (see the module docstring)."""
    with open(os.path.join(run_dir, "args.json")) as f:
        saved = json.load(f)
    args = saved["args"]
    if rule == "auto":
        rule = "time_limit" if args.get("ignore_terminations", False) else "success_ends"
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        rows = list(reader)
    if missing or not rows:
        raise SystemExit(f"{run_dir}/metrics.csv is empty or lacks {missing}: not a ManiSkill3 run of reppo_torch.py")
    out_dir = os.path.join(results_dir, rule, args["env_id"])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"seed{args['seed']}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([row[c] for c in COLUMNS] for row in rows)
    sidecar = {"code": code, "command": saved.get("command"), "versions": saved.get("versions"), "rule": rule}
    with open(path[: -len(".csv")] + ".json", "w") as f:
        json.dump(sidecar, f, indent=2)
    return path


# ---------------------------------------------------------------------------- loading and statistics


def load(results_dir: str) -> dict[tuple[str, str], dict[int, Run]]:
    """(rule, task) -> seed -> the rows that hold a deterministic evaluation, as float arrays."""
    results: dict[tuple[str, str], dict[int, Run]] = {}
    for rule, task, seed, path in plot.result_files(results_dir):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["eval/success_once"] not in ("", "nan")]
        run = {c: np.array([float(r[c]) if r[c] != "" else np.nan for r in rows]) for c in COLUMNS}
        results.setdefault((rule, task), {})[seed] = run
    return results


def first_step(run: Run, threshold: float = 0.5, window: int = 3) -> float:
    """Env step of the first evaluation that starts a window of ``window`` consecutive
    evaluations whose mean success_once reaches ``threshold``; NaN if none does."""
    success = run["eval/success_once"]
    for i in range(len(success) - window + 1):
        if success[i : i + window].mean() >= threshold:
            return float(run["global_step"][i])
    return float("nan")


def first_success(run: Run) -> float:
    """Env step of the first evaluation with any success; NaN if none."""
    hits = np.flatnonzero(run["eval/success_once"] > 0)
    return float(run["global_step"][hits[0]]) if len(hits) else float("nan")


def last_mean(run: Run, column: str, n: int = 5) -> float:
    return float(np.nanmean(run[column][-n:]))


def curves(runs: dict[int, Run], column: str) -> dict[int, plot.Curve]:
    """The runs' column as plot.py's curves (env_steps, eval_return), to use its statistics."""
    return {seed: {"env_steps": r["global_step"], "eval_return": r[column]} for seed, r in runs.items()}


def by_task(results: dict[tuple[str, str], dict[int, Run]]) -> dict[str, dict[str, dict[int, Run]]]:
    """task -> rule -> seed -> run, the rules in RULES' order."""
    tasks = sorted({t for (_, t) in results})
    return {task: {rule: results[(rule, task)] for rule in RULES if (rule, task) in results} for task in tasks}


def block_mean(run: Run, column: str, lo: float, hi: float) -> float:
    """Mean of the column over the evaluations at env steps in (lo, hi]."""
    steps = run["global_step"]
    inside = (steps > lo) & (steps <= hi)
    return float(np.nanmean(run[column][inside])) if inside.any() else float("nan")


# ---------------------------------------------------------------------------- tables


def _f(value: float, digits: int = 2) -> str:
    return "—" if not np.isfinite(value) else f"{value:,.{digits}f}"


def _steps(value: float) -> str:
    return "never" if not np.isfinite(value) else f"{value:,.0f}"


def seed_table(runs: dict[int, Run]) -> list[str]:
    lines = [
        "| seed | first success | mean of 3 ≥ 0.5 at | last 5: success_once | success_at_end | return "
        "| stochastic: success_once | success_at_end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed in sorted(runs):
        r = runs[seed]
        lines.append(
            f"| {seed} | {_steps(first_success(r))} | {_steps(first_step(r))} "
            f"| {_f(last_mean(r, 'eval/success_once'))} | {_f(last_mean(r, 'eval/success_at_end'))} "
            f"| {_f(last_mean(r, 'eval/episodic_return'), 1)} | {_f(last_mean(r, 'eval_stochastic/success_once'))} "
            f"| {_f(last_mean(r, 'eval_stochastic/success_at_end'))} |"
        )
    return lines


def block_table(by_rule: dict[str, dict[int, Run]]) -> list[str]:
    end = max(r["global_step"][-1] for runs in by_rule.values() for r in runs.values())
    lines = [
        "| env steps | rule | seeds | eval success_once | eval success_at_end | eval return "
        "| training success_once | training episode length |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lo in np.arange(0, end, BLOCK):
        hi = lo + BLOCK
        for rule, runs in by_rule.items():
            cells, seeds = [], 0
            for column, digits in [
                ("eval/success_once", 2), ("eval/success_at_end", 2), ("eval/episodic_return", 1),
                ("charts/success_once", 2), ("charts/episodic_length", 1),
            ]:  # fmt: skip
                values = [v for v in (block_mean(r, column, lo, hi) for r in runs.values()) if np.isfinite(v)]
                seeds = max(seeds, len(values))  # every evaluation row has the eval columns
                cells.append(_f(float(np.mean(values)) if values else float("nan"), digits))
            label = f"{lo / 1000:.0f}–{hi / 1000:.0f}k"
            lines.append(f"| {label} | {RULES[rule]} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def rule_tests(by_rule: dict[str, dict[int, Run]]) -> list[str]:
    a, b = by_rule.get("time_limit", {}), by_rule.get("success_ends", {})
    if len(a) < 2 or len(b) < 2:
        return []
    # success_once averaged over the grid both rules cover (plot.mean_returns: the area under
    # each seed's curve over its length, so that evaluation steps need not coincide).
    success_a, success_b = curves(a, "eval/success_once"), curves(b, "eval/success_once")
    grid = plot.common_grid([*success_a.values(), *success_b.values()])

    def last5(runs: dict[int, Run], column: str) -> list[float]:
        return [last_mean(runs[s], column) for s in sorted(runs)]

    statistics = {
        "success_once, last 5 evaluations": (last5(a, "eval/success_once"), last5(b, "eval/success_once")),
        "success_at_end, last 5 evaluations": (last5(a, "eval/success_at_end"), last5(b, "eval/success_at_end")),
        f"success_once averaged over {grid[0] / 1000:.0f}–{grid[-1] / 1000:.0f}k steps": (
            plot.mean_returns(success_a, grid),
            plot.mean_returns(success_b, grid),
        ),
    }
    lines = [
        f"Welch's t-test, time limit only ({len(a)} seeds) against success ends an episode ({len(b)} seeds):",
        "",
        "| statistic | time limit only | success ends | difference [95 % CI] | p |",
        "|---|---|---|---|---|",
    ]
    for name, (x, y) in statistics.items():
        x, y = np.asarray(x), np.asarray(y)
        _, p, lo, hi = plot.welch_test(x, y)
        lines.append(
            f"| {name} | {x.mean():.2f} ± {x.std(ddof=1):.2f} | {y.mean():.2f} ± {y.std(ddof=1):.2f} "
            f"| {x.mean() - y.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] | {p:.2f} |"
        )
    return lines


def markdown(results: dict[tuple[str, str], dict[int, Run]]) -> str:
    out = []
    for task, by_rule in by_task(results).items():
        out.append(f"## {task}\n")
        for rule, runs in by_rule.items():
            out += [f"{RULES[rule]}:", "", *seed_table(runs), ""]
        out += ["Means over the seeds of each run's evaluations in the block:", "", *block_table(by_rule), ""]
        tests = rule_tests(by_rule)
        if tests:
            out += [*tests, ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- figure


def plot_task(by_rule: dict[str, dict[int, Run]], task: str, path: str, n_boot: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, column in zip(axes, ["eval/success_once", "eval/success_at_end"]):
        for rule, runs in by_rule.items():
            seeds = list(curves(runs, column).values())
            agg = plot.aggregate(seeds, plot.common_grid(seeds), n_boot=n_boot)
            ax.plot(agg["x"], agg["mean"], color=COLORS[rule], label=f"{RULES[rule]} (n={len(runs)})")
            ax.fill_between(agg["x"], agg["lo"], agg["hi"], color=COLORS[rule], alpha=0.25, linewidth=0)
        ax.set_title(column.replace("eval/", "deterministic evaluation: "), fontsize=10)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("success rate (16 episodes)")
    fig.suptitle(f"{task} on the CPU simulator: mean and 95% bootstrap CI over seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI


@dataclass
class Options:
    command: tyro.conf.Positional[Literal["import", "compare"]]
    """import: run folders -> the result tree; compare: tables and figures from the tree"""
    run_dirs: tyro.conf.Positional[list[str]] = field(default_factory=list)
    """(import) run folders of reppo_torch.py ManiSkill3 runs"""
    code: str = ""
    """(import) the commit of reppo_torch.py that made the runs"""
    rule: Literal["auto", "success_ends", "time_limit"] = "auto"
    """(import) the runs' episode rule; auto: from their args.json (runs before 52dffa6: give time_limit)"""
    results_dir: str = os.path.join(ROOT, "benchmarks", "maniskill_runs")
    """root of the result tree: {rule}/{task}/seed{S}.csv"""
    out_dir: str = os.path.join(ROOT, "docs", "images")
    """(compare) where maniskill_{task}.png goes"""
    n_boot: int = 10_000
    """bootstrap resamples"""


def main(opts: Options) -> int:
    if opts.command == "import":
        if not opts.run_dirs or not opts.code:
            print("import needs run folders and --code", file=sys.stderr)
            return 2
        for run_dir in opts.run_dirs:
            print(import_run(run_dir, opts.results_dir, opts.code, opts.rule))
        return 0
    results = load(opts.results_dir)
    if not results:
        print(f"no results under {opts.results_dir}", file=sys.stderr)
        return 1
    print(markdown(results))
    os.makedirs(opts.out_dir, exist_ok=True)
    for task, by_rule in by_task(results).items():
        plot_task(by_rule, task, os.path.join(opts.out_dir, f"maniskill_{task}.png"), opts.n_boot)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Options)))
