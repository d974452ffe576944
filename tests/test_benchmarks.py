"""The benchmark scripts' aggregation, tables, significance test, plotting and grid resumption,
on a synthetic results tree (no training)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import grid  # noqa: E402
import plot  # noqa: E402
from conftest import run_script  # noqa: E402


def write_curve(path, steps, returns, seconds_per_step=1e-3):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_steps", "wall_seconds", "eval_return", "eval_return_std"])
        for s, r in zip(steps, returns):
            writer.writerow([int(s), s * seconds_per_step, r, 1.0])


STEPS = np.arange(0, 100_001, 10_000)


def true_curve(steps):
    return 1000.0 * steps / steps[-1]  # linear 0 -> 1000


@pytest.fixture
def tree(tmp_path):
    """reppo_jax: 3 seeds = true curve + (-30, 0, +30); brax_ppo: 3 seeds = half of it + the same
    offsets; reppo_torch: the reppo_jax curves exactly. Wall time 1 ms per step (2 ms for brax)."""
    offsets = {1: -30.0, 2: 0.0, 3: 30.0}
    for seed, off in offsets.items():
        write_curve(tmp_path / "reppo_jax" / "CartpoleBalance" / f"seed{seed}.csv", STEPS, true_curve(STEPS) + off)
        write_curve(tmp_path / "reppo_torch" / "CartpoleBalance" / f"seed{seed}.csv", STEPS, true_curve(STEPS) + off)
        write_curve(
            tmp_path / "brax_ppo" / "CartpoleBalance" / f"seed{seed}.csv", STEPS, 0.5 * true_curve(STEPS) + off, 2e-3
        )
    (tmp_path / "reppo_jax" / "CartpoleBalance" / "seed4.csv.tmp").write_text("unfinished")
    return tmp_path


def test_load_results_reads_finished_csvs_only(tree):
    results = plot.load_results(str(tree))
    assert set(results) == {("reppo_jax", "CartpoleBalance"), ("reppo_torch", "CartpoleBalance"),
                            ("brax_ppo", "CartpoleBalance")}  # fmt: skip
    assert sorted(results[("reppo_jax", "CartpoleBalance")]) == [1, 2, 3]
    curve = results[("reppo_jax", "CartpoleBalance")][1]
    np.testing.assert_allclose(curve["env_steps"], STEPS)
    np.testing.assert_allclose(curve["eval_return"], true_curve(STEPS) - 30)


def test_interpolate_and_no_extrapolation():
    x, y = np.array([0.0, 10.0, 20.0]), np.array([0.0, 100.0, 50.0])
    out = plot.interpolate(x, y, np.array([0.0, 5.0, 15.0, 20.0, 25.0]))
    np.testing.assert_allclose(out[:4], [0.0, 50.0, 75.0, 50.0])
    assert np.isnan(out[4])


def test_aggregate_mean_and_ci(tree):
    results = plot.load_results(str(tree))
    curves = list(results[("reppo_jax", "CartpoleBalance")].values())
    grid_x = plot.common_grid(curves)
    assert grid_x[0] == 0 and grid_x[-1] == STEPS[-1]
    agg = plot.aggregate(curves, grid_x)
    np.testing.assert_allclose(agg["mean"], true_curve(grid_x), atol=1e-9)  # offsets cancel
    # The seeds sit at mean - 30, mean and mean + 30. A resample of all three at mean - 30 has
    # probability 1/27 (3.7 %) > 2.5 %, so the 95 % percentile interval is exactly mean -+ 30.
    np.testing.assert_allclose(agg["lo"], agg["mean"] - 30, atol=1e-9)
    np.testing.assert_allclose(agg["hi"], agg["mean"] + 30, atol=1e-9)
    # Past the end of a seed's curve there is no interval (NaN), not one over the other seeds.
    short = {"env_steps": np.array([0.0, 50.0]), "eval_return": np.array([1.0, 2.0])}
    long = {"env_steps": np.array([0.0, 100.0]), "eval_return": np.array([3.0, 4.0])}
    agg = plot.aggregate([short, long], np.array([0.0, 50.0, 100.0]))
    assert np.isfinite(agg["lo"][:2]).all() and np.isnan(agg["lo"][2]) and np.isnan(agg["hi"][2])


def test_common_grid_stops_at_shortest_seed():
    a = {"env_steps": np.array([0.0, 100.0]), "eval_return": np.array([0.0, 1.0])}
    b = {"env_steps": np.array([0.0, 60.0]), "eval_return": np.array([0.0, 1.0])}
    assert plot.common_grid([a, b], num=5)[-1] == 60.0


def test_common_grid_starts_where_every_seed_has_begun():
    """A curve without an evaluation at step 0 (a GPU run's, say) does not make the grid's
    first points NaN for every statistic: the grid starts at the latest first x."""
    a = {"env_steps": np.array([0.0, 100.0]), "eval_return": np.array([0.0, 1.0])}
    b = {"env_steps": np.array([20.0, 100.0]), "eval_return": np.array([0.0, 1.0])}
    grid = plot.common_grid([a, b], num=5)
    np.testing.assert_array_equal(grid, [20.0, 40.0, 60.0, 80.0, 100.0])
    assert np.isfinite(plot.aggregate([a, b], grid, n_boot=10)["mean"]).all()


def test_bootstrap_ci_contains_mean_and_shrinks():
    rng = np.random.default_rng(0)
    few, many = rng.normal(100.0, 10.0, 5), rng.normal(100.0, 10.0, 500)
    lo5, hi5 = plot.bootstrap_ci(few)
    lo500, hi500 = plot.bootstrap_ci(many)
    assert lo500 < 100.0 < hi500
    assert lo5 <= few.mean() <= hi5
    assert (hi500 - lo500) < (hi5 - lo5)
    lo, hi = plot.bootstrap_ci(np.full(4, 7.0))
    assert lo == hi == 7.0


def test_final_table(tree):
    rows = {r["impl"]: r for r in plot.final_table(plot.load_results(str(tree)))}
    assert rows["reppo_jax"]["n"] == 3 and rows["reppo_jax"]["env_steps"] == STEPS[-1]
    assert rows["reppo_jax"]["mean"] == pytest.approx(1000.0)
    assert rows["reppo_jax"]["std"] == pytest.approx(30.0)  # sample std of (-30, 0, 30)
    assert rows["brax_ppo"]["mean"] == pytest.approx(500.0)


def test_time_to_threshold(tree):
    assert plot.time_to_threshold(np.array([0, 1, 2, 3.0]), np.array([0, 10, 20, 30.0]), 15.0) == 2.0
    assert np.isnan(plot.time_to_threshold(np.array([0, 1.0]), np.array([0, 10.0]), 15.0))
    rows = {r["impl"]: r for r in plot.threshold_table(plot.load_results(str(tree)), {"CartpoleBalance": 500.0})}
    # reppo seeds (offsets -30, 0, +30) cross 500 at 53k/50k/47k steps -> first evals at 60k, 50k, 50k; 1 ms per step
    assert rows["reppo_jax"]["reached"] == 3
    assert rows["reppo_jax"]["wall_mean"] == pytest.approx((60 + 50 + 50) / 3)
    assert rows["reppo_jax"]["steps_mean"] == pytest.approx((60_000 + 50_000 + 50_000) / 3)
    # brax (half the curve, offsets -30, 0, +30) reaches 500 with two seeds, at the last eval (100k steps, 2 ms/step)
    assert rows["brax_ppo"]["reached"] == 2 and rows["brax_ppo"]["wall_mean"] == pytest.approx(200.0)


def test_welch_test_identical_and_different():
    a = np.array([900.0, 950.0, 1000.0])
    t, p, lo, hi = plot.welch_test(a, a.copy())
    assert p == pytest.approx(1.0) and lo < 0.0 < hi
    t, p, lo, hi = plot.welch_test(a, a - 500.0)
    assert p < 0.01 and lo < 500.0 < hi and lo > 0.0
    # Welch interval by hand: equal n and variances -> df = 2(n-1) = 4, se = sqrt(2 s^2 / n)
    from scipy import stats

    half = stats.t.ppf(0.975, 4) * np.sqrt(2 * a.var(ddof=1) / 3)
    assert (lo, hi) == pytest.approx((500.0 - half, 500.0 + half))
    # Unequal sizes and variances: Welch-Satterthwaite by hand (a pooled t-test gives another p).
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 10.0]), np.array([5.0, 5.5, 6.0])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t_hand = (a.mean() - b.mean()) / np.sqrt(va + vb)
    p_hand = 2 * stats.t.sf(abs(t_hand), df)
    half = stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    t, p, lo, hi = plot.welch_test(a, b)
    assert (t, p, lo, hi) == pytest.approx((t_hand, p_hand, a.mean() - b.mean() - half, a.mean() - b.mean() + half))
    assert abs(p - stats.ttest_ind(a, b, equal_var=True).pvalue) > 0.01
    assert plot.welch_test(np.full(3, 5.0), np.full(3, 5.0))[1] == 1.0
    assert plot.welch_test(np.full(3, 5.0), np.full(3, 6.0))[1] == 0.0


def test_mean_returns_is_the_curve_average(tree):
    seeds = plot.load_results(str(tree))[("reppo_jax", "CartpoleBalance")]
    # linear 0 -> 1000 over the grid plus the seed's offset: average 500 + offset
    np.testing.assert_allclose(plot.mean_returns(seeds, np.linspace(0, STEPS[-1], 101)), [470.0, 500.0, 530.0])
    # on the first half of the run only: average 250 + offset
    np.testing.assert_allclose(plot.mean_returns(seeds, np.linspace(0, STEPS[-1] / 2, 101)), [220.0, 250.0, 280.0])


def test_compare_implementations(tree, tmp_path):
    rows = plot.compare_implementations(plot.load_results(str(tree)))
    assert len(rows) == 1 and rows[0]["indistinguishable"]
    assert rows[0]["p"] == pytest.approx(1.0) and rows[0]["auc_p"] == pytest.approx(1.0)
    # the same final returns but a slower start -> only the mean over the run tells them apart
    for seed, off in {1: -30.0, 2: 0.0, 3: 30.0}.items():
        slow = np.where(STEPS < 90_000, 0.0, true_curve(STEPS)) + off
        write_curve(tree / "reppo_torch" / "CartpoleBalance" / f"seed{seed}.csv", STEPS, slow)
    rows = plot.compare_implementations(plot.load_results(str(tree)))
    assert rows[0]["p"] == pytest.approx(1.0) and rows[0]["auc_p"] < 0.01 and not rows[0]["indistinguishable"]
    # reppo_torch clearly worse everywhere -> both tests reject
    for seed in (1, 2, 3):
        write_curve(tree / "reppo_torch" / "CartpoleBalance" / f"seed{seed}.csv", STEPS, 0.2 * true_curve(STEPS) + seed)
    rows = plot.compare_implementations(plot.load_results(str(tree)))
    assert not rows[0]["indistinguishable"] and rows[0]["p"] < 0.01 and rows[0]["auc_p"] < 0.01
    # one seed on a side: no test is possible, so no row (not a row of n/a beside a bare difference)
    for seed in (2, 3):
        (tree / "reppo_torch" / "CartpoleBalance" / f"seed{seed}.csv").unlink()
    assert plot.compare_implementations(plot.load_results(str(tree))) == []
    assert "vs REPPO (PyTorch)" not in plot.markdown_tables(plot.load_results(str(tree)))


def test_markdown_tables(tree):
    text = plot.markdown_tables(plot.load_results(str(tree)))
    assert "| CartpoleBalance | REPPO (JAX) | 3 | 100,000 | 1,000.0 ± 30.0 |" in text
    assert "### REPPO (JAX) vs REPPO (PyTorch): Welch" in text and "### REPPO (JAX) vs Brax PPO: Welch" in text
    # identical implementations: difference 0, not different; PPO (half the curve): different
    assert "| CartpoleBalance | 3 / 3 | final return | 1,000.0 | 1,000.0 | 0.0 [" in text
    jax_vs_ppo = text.split("### REPPO (JAX) vs Brax PPO")[1]
    assert "| CartpoleBalance | 3 / 3 | final return | 1,000.0 | 500.0 | 500.0 [" in jax_vs_ppo
    assert jax_vs_ppo.count("| yes |") == 2


def test_plot_writes_pngs(tree, tmp_path):
    out = tmp_path / "images"
    table = tmp_path / "tables.md"
    opts = plot.Options(results_dir=str(tree), out_dir=str(out), table_out=str(table), n_boot=200)
    assert plot.main(opts) == 0
    assert not (out / "results_grid.png").exists()  # one task: its own figure, no grid
    # A second task: one figure per task plus the grid, under the chosen file prefix.
    write_curve(tree / "reppo_jax" / "ReacherEasy" / "seed1.csv", STEPS, true_curve(STEPS))
    opts = plot.Options(results_dir=str(tree), out_dir=str(out), table_out=str(table), n_boot=200, prefix="gpu")
    assert plot.main(opts) == 0
    for name in ["results_CartpoleBalance.png", "gpu_CartpoleBalance.png", "gpu_ReacherEasy.png", "gpu_grid.png"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "Final return" in table.read_text()


def test_convert_reppo_metrics(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "global_step,seed,charts/SPS,eval/episodic_return,eval/episodic_return_std\n"
        "0,1,,10.0,1.0\n2048,1,1024.0,20.0,2.0\n4096,1,2048.0,30.0,3.0\n"
    )
    rows = grid.convert_reppo_metrics(str(path), seed=1)
    assert [r["env_steps"] for r in rows] == [0, 2048, 4096]
    assert [r["wall_seconds"] for r in rows] == [0.0, 2.0, 2.0]
    assert [r["eval_return"] for r in rows] == [10.0, 20.0, 30.0]
    assert grid.convert_reppo_metrics(str(path), seed=2) == []


def test_grid_dry_run_skips_finished_jobs(tree):
    json.dump({"budget": 1_000_000}, open(tree / "reppo_jax" / "CartpoleBalance" / "seed1.json", "w"))
    recorded = {"budget": 1_000_000, "extra_args": "--num-envs 16"}
    json.dump(recorded, open(tree / "reppo_jax" / "CartpoleBalance" / "seed2.json", "w"))
    json.dump({"budget": 500_000}, open(tree / "reppo_jax" / "CartpoleBalance" / "seed3.json", "w"))
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "grid.py"), "--dry-run", "--results-dir", str(tree)]
    cmd += ["--tasks", "CartpoleBalance", "PendulumSwingup", "--seeds", "1", "2", "3", "4"]
    cmd += ["--implementations", "reppo_jax", "brax_ppo", "--extra-args=--num-envs 8"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout
    for seed in (1, 2, 3):  # finished: skipped
        assert f"skip reppo_jax/CartpoleBalance/seed{seed}" in out
        assert f"skip brax_ppo/CartpoleBalance/seed{seed}" in out
        assert f"would run reppo_jax/PendulumSwingup/seed{seed}" in out
    assert "would run reppo_jax/CartpoleBalance/seed4" in out  # only a .tmp file there: rerun
    assert "would run brax_ppo/PendulumSwingup/seed4" in out
    assert "6 of 16 jobs finished, 10 to run" in out
    # a finished job made otherwise is reused, with a warning that says how it differs
    skips = {
        seed: next(x for x in out.splitlines() if f"skip reppo_jax/CartpoleBalance/seed{seed}" in x)
        for seed in (1, 2, 3)
    }
    assert "WARNING" not in skips[1]
    assert "WARNING: its extra_args was '--num-envs 16', not '--num-envs 8'" in skips[2]
    assert "WARNING: its budget was 500000, not 1000000" in skips[3]
    line = next(x for x in out.splitlines() if "would run reppo_jax/PendulumSwingup/seed2" in x)
    assert "reppo_jax.py --env-id PendulumSwingup --preset cpu --total-timesteps 1000000 --seed 2" in line
    assert line.endswith("--no-progress --num-envs 8")
    line = next(x for x in out.splitlines() if "would run brax_ppo/PendulumSwingup/seed2" in x)
    assert "brax_ppo.py --env-id PendulumSwingup --seed 2 --budget 1000000 --out" in line
    assert "--num-envs" not in line
    # nothing was written by a dry run
    assert not (tree / "reppo_jax" / "PendulumSwingup").exists()
    # a relative --results-dir is taken from the caller's folder (Brax jobs run from the root)
    cmd[cmd.index(str(tree))] = tree.name
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tree.parent, timeout=60, check=True).stdout
    line = next(x for x in out.splitlines() if "would run brax_ppo/PendulumSwingup/seed2" in x)
    assert f"--out {tree / 'brax_ppo' / 'PendulumSwingup' / 'seed2.csv'}" in line


def test_brax_schedule_fits_budget():
    import brax_ppo

    config = {"num_envs": 2048, "batch_size": 1024, "num_minibatches": 32, "unroll_length": 30, "action_repeat": 1}
    s = brax_ppo.ppo_schedule(config, 1_000_000, 20, 64)
    assert s["batch_size"] == 32 and s["steps_per_update"] == 30_720
    assert s["num_timesteps"] <= 1_000_000 and s["num_timesteps"] % (s["updates_per_eval"] * 30_720) == 0
    assert s["num_evals"] == 17  # 32 updates, 2 per eval period, plus the eval at step 0
    # epochs of 30, 5, 5, 5 s: 25 s of compilation in the first; 20, 20, 5, 5, 5: 15 + 15 in the first two
    assert brax_ppo.compile_estimate([30.0, 35.0, 40.0, 45.0]) == pytest.approx(25.0)
    raw = [{"env_steps": 0, "wall_seconds_incl_compile": 0.0}]
    raw += [{"env_steps": 10 * (i + 1), "wall_seconds_incl_compile": w} for i, w in enumerate([20, 40, 45, 50, 55.0])]
    rows, removed = brax_ppo.rows_with_wall_seconds(raw)
    assert removed == pytest.approx(30.0)
    assert [r["wall_seconds"] for r in rows] == pytest.approx([0, 5, 10, 15, 20, 25])


def test_authors_code_import_and_comparison(tmp_path):
    import authors_code

    # The authors' script's metrics.npz: evaluations after 1..4 blocks of 10k steps, shape (evals, 1).
    their_steps = np.arange(1, 5)[:, None] * 10_000
    for seed, off in {1: -30.0, 2: 0.0, 3: 30.0}.items():
        run = tmp_path / "runs" / f"cartpole_seed{seed}"
        run.mkdir(parents=True)
        returns = 1000.0 * their_steps / 100_000 + off  # = true_curve on the first 40k steps
        arrays = {"time_step": their_steps, "eval/episode_return": returns}
        arrays.update({"eval/episode_return_std": np.ones_like(returns), "eval/num_episodes": 64 + 0 * their_steps})
        np.savez(run / "metrics.npz", **arrays)
    out = tmp_path / "authors" / authors_code.AUTHORS_IMPL / "CartpoleBalance"
    assert len(authors_code.import_runs(str(tmp_path / "runs"), str(out))) == 3
    theirs = plot.load_results(str(tmp_path / "authors"))[(authors_code.AUTHORS_IMPL, "CartpoleBalance")]
    np.testing.assert_allclose(theirs[2]["env_steps"], [10_000, 20_000, 30_000, 40_000])
    np.testing.assert_allclose(theirs[1]["eval_return"], [70.0, 170.0, 270.0, 370.0])
    # Ours: the same curve to 100k (evaluated from step 0) -> cut at their horizon, 40k: no difference.
    ours = {s: {"env_steps": STEPS.astype(float), "eval_return": true_curve(STEPS) + off}
            for s, off in {1: -30.0, 2: 0.0, 3: 30.0}.items()}  # fmt: skip
    stats, grid_x = authors_code.statistics({"ours": ours, authors_code.THEIRS: theirs}, horizon=40_000.0)
    assert grid_x[0] == 10_000 and grid_x[-1] == 40_000  # from the latest first evaluation
    np.testing.assert_allclose(stats["ours"]["return at horizon"], [370.0, 400.0, 430.0])
    np.testing.assert_allclose(stats["ours"]["mean over run"], [220.0, 250.0, 280.0])  # mean of 100..400, + offset
    np.testing.assert_allclose(stats[authors_code.THEIRS]["mean over run"], stats["ours"]["mean over run"])
    assert authors_code.their_horizon(theirs) == 40_000
    table = authors_code.comparison_table({"ours": ours, authors_code.THEIRS: theirs}, horizon=40_000.0)
    assert "Horizon H = 40,000 env steps; mean over run on [10,000, 40,000]" in table
    assert "| ours | 3 | 370, 400, 430 | 400 ± 30 | 250 ± 30 | 0 [" in table and "p = 1.00" in table


def test_authors_code_compare_merges_our_extra_seeds(tmp_path):
    """`compare` pools our grid's seeds with our extra seeds run only to H in the authors' tree."""
    import authors_code

    def write(root, impl, seed, steps, returns):
        write_curve(root / impl / "CartpoleBalance" / f"seed{seed}.csv", steps, returns)

    grid_dir, authors_dir = tmp_path / "results", tmp_path / "authors"
    for seed, final in {1: 300.0, 2: 500.0}.items():  # our grid: 0..80k, past their horizon
        write(grid_dir, "reppo_jax", seed, [0, 40_000, 80_000], [100.0, final, 900.0])
    write(authors_dir, "reppo_jax", 4, [0, 20_000, 40_000], [100.0, 250.0, 700.0])  # an extra seed, to H only
    for seed in (1, 2, 3):
        write(authors_dir, authors_code.AUTHORS_IMPL, seed, [10_000, 40_000], [150.0, 400.0 + seed])
    opts = authors_code.Options(
        results_dir=str(grid_dir),
        authors_dir=str(authors_dir),
        figure=str(tmp_path / "fig.png"),
        table_out=str(tmp_path / "table.md"),
    )
    assert authors_code.main(opts) == 0
    table = (tmp_path / "table.md").read_text()
    assert "Horizon H = 40,000 env steps" in table
    assert "| REPPO (JAX) | 3 | 300, 500, 700 | 500 ± 200 |" in table
    assert (tmp_path / "fig.png").stat().st_size > 0
    write(authors_dir, "reppo_jax", 1, [0, 40_000], [100.0, 300.0])  # the same seed in both trees: refused
    assert authors_code.main(opts) == 1


def test_speed_refuses_the_maniskill_setting_for_the_jax_file_alone():
    """reppo_jax.py runs Playground tasks only: asked for the maniskill setting with the JAX file
    alone (the default implementation), speed.py says so instead of measuring nothing."""
    done = run_script("benchmarks/speed.py", "--settings", "maniskill", check=False, timeout=120)
    assert done.returncode == 1 and "runs reppo_torch.py only" in done.stderr


def test_speed_paired_times_both_files_in_lockstep(tmp_path):
    """--paired: the two files in two processes kept alive, one timed iteration of each in turn;
    each round's torch/JAX ratio and the summaries are those of the recorded times."""
    tiny = "--num-envs 8 --num-steps 4 --num-mini-batches 2 --num-epochs 1 --actor-hidden 16 --critic-hidden 16"
    out = tmp_path / "paired.json"
    done = run_script(
        "benchmarks/speed.py", "--settings", "cpu", "--implementations", "jax", "torch", "--paired",
        "--iterations", "3", f"--extra={tiny}", "--json-out", str(out), timeout=300,
    )  # fmt: skip
    (result,) = json.loads(out.read_text())
    assert result["setting"] == "cpu" and result["implementation"] == "paired" and result["rounds"] == 3
    assert result["flags"] == tiny.split()
    times = {}
    for impl in ("jax", "torch"):
        side = result[impl]
        times[impl] = np.array(side["iteration_s"])
        assert len(times[impl]) == 3 and (times[impl] > 0).all()
        assert side["steps_per_iteration"] == 8 * 4 and side["backend"] == "cpu" and side["peak_rss_mib"] > 100
        np.testing.assert_allclose(side["sps"], 3 * 32 / times[impl].sum())
    ratios = times["torch"] / times["jax"]
    np.testing.assert_allclose(result["ratios"], ratios)
    np.testing.assert_allclose(result["ratio_median"], np.median(ratios))
    np.testing.assert_allclose(result["ratio_of_means"], times["torch"].sum() / times["jax"].sum())
    # Quartiles within the ratios, interpolated linearly between them ("inclusive"; at 3 rounds
    # the first is halfway between the two smallest, where Python's default gives the smallest).
    assert result["ratio_quartile_method"] == "inclusive"
    np.testing.assert_allclose(result["ratio_quartiles"], np.percentile(ratios, [25, 75]))
    assert "paired cpu" in done.stdout and "torch/jax time per iteration: median" in done.stdout


def test_speed_paired_needs_both_files():
    done = run_script("benchmarks/speed.py", "--settings", "cpu", "--paired", check=False, timeout=120)
    assert done.returncode == 1 and "--implementations jax torch" in done.stderr


def write_maniskill_run(run_dir, seed, success_once, ignore_terminations=None, step=3200):
    """A reppo_torch.py ManiSkill3 run folder: args.json (without ignore_terminations when None,
    as runs saved before the flag) and metrics.csv with one evaluation every ``step`` env steps;
    success_at_end is half of success_once, the return ten times it."""
    import maniskill

    os.makedirs(run_dir)
    args = {"env_id": "PushCube-v1", "seed": seed}
    if ignore_terminations is not None:
        args["ignore_terminations"] = ignore_terminations
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({"args": args, "command": "python reppo_torch.py", "versions": {"torch": "x"}}, f)
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(maniskill.COLUMNS + ["losses/critic_loss"])
        for i, s in enumerate(success_once):
            training = ["", "", ""] if i == 0 else [50.0, 10.0, s]  # no training episodes before step 0
            writer.writerow([i * step, "" if i == 0 else 100.0, *training, 10 * s, s, s / 2, 10 * s, s, s / 2, 1.0])


def test_maniskill_tables_from_imported_runs(tmp_path):
    """import sorts runs by episode rule (a run without the flag in args.json: the default rule)
    and keeps the listed columns; compare finds the first success, the first window of three
    evaluations averaging 0.5 (its first step), last-five means, block means and Welch's test."""
    import maniskill

    runs = tmp_path / "runs"
    curves = {  # 8 evaluations, 0 .. 22,400 steps
        ("old", 1, None): [0, 0, 0.25, 0.5, 0.75, 1, 1, 1],  # window 0.25, 0.5, 0.75 -> 6,400
        ("old", 2, False): [0, 0.5, 0, 0.25, 1, 1, 1, 0.5],  # 0, 0.25, 1 averages 0.42; 0.25, 1, 1 -> 9,600
        ("new", 1, True): [0, 0, 0, 0, 0, 0, 0.25, 0.25],  # never
        ("new", 2, True): [0, 0, 0, 0, 0, 0.5, 0.5, 0.5],  # 16,000
    }
    for (name, seed, flag), success in curves.items():
        write_maniskill_run(str(runs / f"{name}{seed}"), seed, success, flag)
    tree = tmp_path / "tree"
    argv = ["import", *sorted(str(p) for p in runs.iterdir()), "--code", "abc1234", "--results-dir", str(tree)]
    assert maniskill.main(maniskill.tyro.cli(maniskill.Options, args=argv)) == 0
    kept = sorted(os.listdir(tree / "success_ends" / "PushCube-v1"))
    assert kept == ["seed1.csv", "seed1.json", "seed2.csv", "seed2.json"]
    assert json.loads((tree / "time_limit" / "PushCube-v1" / "seed2.json").read_text())["code"] == "abc1234"
    with open(tree / "time_limit" / "PushCube-v1" / "seed2.csv") as f:
        assert next(csv.reader(f)) == maniskill.COLUMNS  # the loss column is not kept
    # A run from before the flag, whose code ended episodes at the time limit only: --rule says so.
    write_maniskill_run(str(tmp_path / "older"), 3, [0, 0, 0])
    argv = [
        "import",
        str(tmp_path / "older"),
        "--code",
        "0ld",
        "--rule",
        "time_limit",
        "--results-dir",
        str(tmp_path / "t2"),
    ]
    assert maniskill.main(maniskill.tyro.cli(maniskill.Options, args=argv)) == 0
    assert os.listdir(tmp_path / "t2") == ["time_limit"]
    # A run folder whose metrics.csv holds no row yet (an interrupted start): a message, no folder.
    write_maniskill_run(str(tmp_path / "empty"), 4, [])
    with pytest.raises(SystemExit, match="is empty or lacks"):
        maniskill.import_run(str(tmp_path / "empty"), str(tmp_path / "t3"), "0ld")
    assert not os.path.exists(tmp_path / "t3")

    results = maniskill.load(str(tree))
    old, new = results[("success_ends", "PushCube-v1")], results[("time_limit", "PushCube-v1")]
    assert [maniskill.first_step(old[s]) for s in (1, 2)] == [6400.0, 9600.0]
    assert np.isnan(maniskill.first_step(new[1])) and maniskill.first_step(new[2]) == 16000.0
    assert [maniskill.first_success(r) for r in (old[1], old[2], new[1])] == [6400.0, 3200.0, 19200.0]
    assert maniskill.last_mean(old[2], "eval/success_once") == pytest.approx((0.25 + 1 + 1 + 1 + 0.5) / 5)
    assert maniskill.last_mean(old[2], "eval/success_at_end") == pytest.approx(0.375)
    # Steps (0, 9,600]: evaluations at 3,200, 6,400, 9,600; training columns have no row 0.
    assert maniskill.block_mean(old[1], "eval/success_once", 0, 9600) == pytest.approx(0.25)
    assert maniskill.block_mean(old[1], "charts/episodic_length", 0, 9600) == 50.0

    table = maniskill.markdown(results)
    half = f"{0.85 / 2:.2f}"  # success_at_end is half of success_once
    assert f"| 1 | 6,400 | 6,400 | 0.85 | {half} | 8.5 | 0.85 | {half} |" in table
    assert "| 1 | 19,200 | never | 0.10 | 0.05 | 1.0 | 0.10 | 0.05 |" in table
    # Block 0-50k holds all 7 evaluations after step 0: success_ends' mean over its two seeds.
    block = np.mean([np.mean(curves[("old", 1, None)][1:]), np.mean(curves[("old", 2, False)][1:])])
    assert f"| 0–50k | success ends a training episode | 2 | {block:.2f} |" in table
    x = [np.mean(curves[k][-5:]) for k in [("new", 1, True), ("new", 2, True)]]
    y = [np.mean(curves[k][-5:]) for k in [("old", 1, None), ("old", 2, False)]]
    _, p, lo, hi = plot.welch_test(np.array(x), np.array(y))
    assert f"| success_once, last 5 evaluations | {np.mean(x):.2f} ± {np.std(x, ddof=1):.2f} |" in table
    assert f"| {np.mean(x) - np.mean(y):+.2f} [{lo:+.2f}, {hi:+.2f}] | {p:.2f} |" in table

    argv = ["compare", "--results-dir", str(tree), "--out-dir", str(tmp_path / "img"), "--n-boot", "200"]
    assert maniskill.main(maniskill.tyro.cli(maniskill.Options, args=argv)) == 0
    assert (tmp_path / "img" / "maniskill_PushCube-v1.png").stat().st_size > 0
