"""reppo_jax.py learns: CartpoleBalance with the CPU setting beats an untrained policy.

Measured on 2 CPU cores (seed 1, --preset cpu): the untrained deterministic policy scores ~310
(seeds 11 and 12: ~152); evaluation returns then climb, noisily, past 400 within 400k env
steps (seed 1: 481 at 368k; seed 11: 477 at 225k; seed 12: 445 at 287k). The authors' JAX code at
the same setting reports ~650 at 500k steps from ~150. A broken learner stays near its start.
"""

import csv
import glob
import os
import subprocess
import sys

from conftest import ROOT

THRESHOLD = 400.0


def test_cartpole_balance_learns_with_the_cpu_setting(tmp_path):
    command = [
        sys.executable, os.path.join(ROOT, "reppo_jax.py"), "--env-id", "CartpoleBalance", "--preset", "cpu",
        "--total-timesteps", "409600", "--log-interval", "10", "--seed", "1", "--runs-dir", str(tmp_path),
        "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*"))
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    untrained = float(rows[0]["eval/episodic_return"])
    trained = [float(r["eval/episodic_return"]) for r in rows[1:]]
    assert int(rows[0]["global_step"]) == 0 and int(rows[-1]["global_step"]) == 409600
    assert untrained < THRESHOLD, f"the untrained policy already scores {untrained}"
    assert max(trained) > THRESHOLD, f"best evaluation return {max(trained)} after 409,600 steps: {trained}"
