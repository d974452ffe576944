"""Run the benchmark grid (implementation x task x seed at one env-step budget), one job at a
time, resumably.

    python benchmarks/grid.py                          # the whole default grid
    python benchmarks/grid.py --dry-run                # list what would run and what is done
    python benchmarks/grid.py --implementations reppo_jax --tasks CartpoleBalance --seeds 1
    python benchmarks/grid.py --max-jobs 2             # stop after two jobs (time-boxed sessions)

Every finished job leaves `{results_dir}/{impl}/{task}/seed{seed}.csv` and is skipped by later
invocations, so several sessions can accumulate one grid. A job writes its CSV under a temporary
name (`seed{seed}.csv.tmp`) and renames it when complete; an interrupted job leaves no CSV and
is simply rerun. The budget is stored in the sidecar `seed{seed}.json`; a finished CSV of
another budget is reported and left alone (use another --results-dir for another budget).

Result CSV columns (one row per evaluation, the first at env step 0):
- `env_steps`: environment steps of training so far (per seed, summed over parallel envs);
- `wall_seconds`: training wall clock so far, compilation and evaluation excluded.
  reppo_jax.py / reppo_torch.py: metrics.csv has no time column, but its `charts/SPS` is
  cumulative (training steps / training seconds since the start of the process, measured
  around the training calls only: reppo_jax excludes its ahead-of-time compilation,
  reppo_torch excludes its first, warm-up iteration), so `wall_seconds = global_step / SPS`
  (for reppo_torch this counts the warm-up iteration at the average speed). Brax PPO: see
  benchmarks/brax_ppo.py (training/walltime minus an estimate of the first two epochs' compilation);
- `eval_return`, `eval_return_std`: mean and std of the deterministic policy's return over the
  evaluation episodes (16 for every implementation at the defaults).
The sidecar JSON holds the command, the whole job's wall time as measured here (imports,
compilation and evaluation included), the compile time the implementation printed, and
versions.

REPPO jobs run `python reppo_{jax,torch}.py --env-id TASK --preset cpu --total-timesteps BUDGET
--seed SEED --runs-dir TMP --no-progress [--extra-args]` and convert TMP/*/metrics.csv;
Brax PPO jobs run `python benchmarks/brax_ppo.py --env-id TASK --seed SEED --budget BUDGET
--out CSV [--brax-args]`.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Implementation = Literal["reppo_jax", "reppo_torch", "brax_ppo"]
DEFAULT_TASKS = ["CartpoleBalance", "CartpoleSwingup", "PendulumSwingup", "AcrobotSwingup", "ReacherEasy"]
RESULT_COLUMNS = ["env_steps", "wall_seconds", "eval_return", "eval_return_std"]
REPPO_WALL_METHOD = (
    "global_step / charts/SPS (cumulative training-only SPS of the run; compilation and evaluation excluded)"
)


@dataclass
class Options:
    implementations: list[Implementation] = field(default_factory=lambda: ["reppo_jax", "reppo_torch", "brax_ppo"])
    """implementations to run (reppo_torch is skipped with a note when reppo_torch.py is absent)"""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    """MuJoCo Playground DM Control tasks"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds (one job each)"""
    budget: int = 1_000_000
    """environment steps of training per job"""
    results_dir: str = os.path.join(ROOT, "benchmarks", "results")
    """root of the result tree {results_dir}/{impl}/{task}/seed{seed}.csv"""
    dry_run: bool = False
    """print the commands (and what is already done) without running anything"""
    extra_args: str = ""
    """extra flags for the REPPO files, one string given with '=': --extra-args='--num-envs 8 --num-steps 8'"""
    brax_args: str = ""
    """extra flags for benchmarks/brax_ppo.py, one string given with '=': --brax-args='--num-envs 32'"""
    max_jobs: int | None = None
    """run at most this many jobs in this invocation (None: all)"""
    nice: int = 0
    """niceness added to every job (be kind to a shared machine)"""
    keep_failed: bool = True
    """keep the temporary folder (log, run folder) of a failed job and print its path"""


@dataclass
class Job:
    impl: str
    task: str
    seed: int
    budget: int
    csv_path: str

    @property
    def name(self) -> str:
        return f"{self.impl}/{self.task}/seed{self.seed}"


def result_path(results_dir: str, impl: str, task: str, seed: int) -> str:
    return os.path.join(results_dir, impl, task, f"seed{seed}.csv")


def sidecar_path(csv_path: str) -> str:
    return csv_path[: -len(".csv")] + ".json"


def make_jobs(opts: Options) -> list[Job]:
    """Seeds outermost, so that an unfinished grid has every (impl, task) at its first seeds."""
    return [
        Job(impl, task, seed, opts.budget, result_path(opts.results_dir, impl, task, seed))
        for seed in opts.seeds
        for task in opts.tasks
        for impl in opts.implementations
    ]


def is_finished(job: Job) -> bool:
    return os.path.exists(job.csv_path)


def finished_differences(job: Job, extra_args: str, brax_args: str) -> list[str]:
    """What the sidecar of a finished CSV records that differs from this grid's job: its budget
    or the extra arguments it ran with (sidecars without a field are not compared on it)."""
    try:
        with open(sidecar_path(job.csv_path)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return []
    wanted = {"budget": job.budget, "extra_args": brax_args if job.impl == "brax_ppo" else extra_args}
    return [
        f"its {key} was {meta[key]!r}, not {value!r}"
        for key, value in wanted.items()
        if key in meta and meta[key] != value
    ]


def code_state() -> dict:
    """The commit the job runs (and whether the working tree differs from it), for its sidecar:
    the same seed gives another curve with other code. Empty where git cannot tell."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"code": commit.stdout.strip(), "code_modified": bool(status.stdout.strip())}


def job_command(job: Job, runs_dir: str, extra_args: str = "", brax_args: str = "") -> list[str]:
    if job.impl == "brax_ppo":
        cmd = [sys.executable, os.path.join("benchmarks", "brax_ppo.py"), "--env-id", job.task]
        cmd += ["--seed", str(job.seed), "--budget", str(job.budget), "--out", job.csv_path]
        return cmd + shlex.split(brax_args)
    cmd = [sys.executable, f"{job.impl}.py", "--env-id", job.task, "--preset", "cpu"]
    cmd += ["--total-timesteps", str(job.budget), "--seed", str(job.seed), "--num-seeds", "1"]
    cmd += ["--runs-dir", runs_dir, "--no-progress"]
    return cmd + shlex.split(extra_args)


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def convert_reppo_metrics(metrics_csv: str, seed: int) -> list[dict[str, float]]:
    """Rows of the result CSV from a REPPO run's metrics.csv (see the module doc for wall_seconds)."""
    rows = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("seed") not in (None, "") and int(float(row["seed"])) != seed:
                continue
            step = int(float(row["global_step"]))
            sps = _float(row.get("charts/SPS"))
            wall = 0.0 if step == 0 else (step / sps if sps > 0 else math.nan)
            rows.append(
                {
                    "env_steps": step,
                    "wall_seconds": wall,
                    "eval_return": _float(row.get("eval/episodic_return")),
                    "eval_return_std": _float(row.get("eval/episodic_return_std")),
                }
            )
    return rows


def write_result_csv(path: str, rows: list[dict], columns: list[str] = RESULT_COLUMNS) -> None:
    """Write path + '.tmp' and rename it: a CSV at `path` is always a finished job's."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _compile_seconds(log_text: str) -> float | None:
    match = re.search(r"compiled in ([0-9.]+) s", log_text)
    return float(match.group(1)) if match else None


def run_job(job: Job, opts: Options) -> bool:
    """Run one job to completion; True if its CSV was written."""
    tmp_dir = tempfile.mkdtemp(prefix=f"grid-{job.impl}-{job.task}-seed{job.seed}-")
    runs_dir = os.path.join(tmp_dir, "runs")
    log_path = os.path.join(tmp_dir, "job.log")
    cmd = job_command(job, runs_dir, opts.extra_args, opts.brax_args)
    print(f"[grid] run  {job.name}: {shlex.join(cmd)}\n[grid]      log: {log_path}", flush=True)
    code = code_state()  # as the job starts
    start = time.perf_counter()
    with open(log_path, "w") as log:
        nice = opts.nice
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
    job_seconds = time.perf_counter() - start
    with open(log_path) as f:
        log_text = f.read()
    if proc.returncode != 0:
        tail = "\n".join(log_text.splitlines()[-20:])
        print(f"[grid] FAIL {job.name} (exit {proc.returncode}, {job_seconds:.0f} s); last lines:\n{tail}", flush=True)
        if not opts.keep_failed:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return False

    meta = {"implementation": job.impl, "env_id": job.task, "seed": job.seed, "budget": job.budget}
    meta["extra_args"] = opts.brax_args if job.impl == "brax_ppo" else opts.extra_args
    meta.update({"command": shlex.join(cmd), "job_seconds": job_seconds, **code})
    if job.impl == "brax_ppo":  # brax_ppo.py wrote the CSV and its own sidecar
        with open(sidecar_path(job.csv_path)) as f:
            meta = {**json.load(f), **meta}
    else:
        metrics = glob.glob(os.path.join(runs_dir, "*", "metrics.csv"))
        if len(metrics) != 1:
            print(f"[grid] FAIL {job.name}: expected one metrics.csv under {runs_dir}, found {metrics}", flush=True)
            return False
        rows = convert_reppo_metrics(metrics[0], job.seed)
        if len(rows) < 2:
            print(f"[grid] FAIL {job.name}: metrics.csv has {len(rows)} rows", flush=True)
            return False
        args_json = os.path.join(os.path.dirname(metrics[0]), "args.json")
        if os.path.exists(args_json):
            with open(args_json) as f:
                meta["run_args"] = json.load(f)
        meta["compile_seconds"] = _compile_seconds(log_text)
        meta["wall_seconds_method"] = REPPO_WALL_METHOD
        done = [line for line in log_text.splitlines() if line.startswith("done:")]
        meta["done_line"] = done[-1] if done else None
    # The sidecar first: the CSV marks the job finished, and a finished job needs its record.
    os.makedirs(os.path.dirname(job.csv_path), exist_ok=True)
    with open(sidecar_path(job.csv_path), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    if job.impl != "brax_ppo":
        write_result_csv(job.csv_path, rows)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"[grid] done {job.name} in {job_seconds:.0f} s -> {os.path.relpath(job.csv_path, ROOT)}", flush=True)
    return True


def main(opts: Options) -> int:
    # Absolute: the Brax jobs run from the repository root and write their CSV themselves.
    opts = replace(opts, results_dir=os.path.abspath(opts.results_dir))
    jobs = make_jobs(opts)
    if "reppo_torch" in opts.implementations and not os.path.exists(os.path.join(ROOT, "reppo_torch.py")):
        print("[grid] reppo_torch.py not found: its jobs are skipped", flush=True)
        jobs = [j for j in jobs if j.impl != "reppo_torch"]
    todo, failed, ran = [], 0, 0
    for job in jobs:
        if is_finished(job):
            differences = finished_differences(job, opts.extra_args, opts.brax_args)
            note = f" (WARNING: {'; '.join(differences)})" if differences else ""
            print(f"[grid] skip {job.name}: finished, {os.path.relpath(job.csv_path, ROOT)}{note}", flush=True)
        else:
            todo.append(job)
    print(f"[grid] {len(jobs) - len(todo)} of {len(jobs)} jobs finished, {len(todo)} to run", flush=True)
    for job in todo:
        if opts.max_jobs is not None and ran >= opts.max_jobs:
            print(f"[grid] --max-jobs {opts.max_jobs} reached; {len(todo) - ran} jobs left", flush=True)
            break
        if opts.dry_run:
            cmd = job_command(job, "<tmp>/runs", opts.extra_args, opts.brax_args)
            print(f"[grid] would run {job.name}: {shlex.join(cmd)}", flush=True)
        else:
            failed += not run_job(job, opts)
        ran += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Options)))
