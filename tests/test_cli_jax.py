"""The command line of reppo_jax.py: tiny real runs, checkpoints, resume and bad input."""

import json
import os
import shlex
import signal

import jax
import numpy as np
import pytest
from conftest import (
    BATCH,
    TINY,
    StubWandbRun,
    assert_same_rows,
    assert_same_state,
    check_a_ctrl_c_while_the_run_starts_leaves_nothing_behind,
    check_a_second_ctrl_c_in_a_gc_callback_is_not_lost,
    check_eval_only_evaluates_the_checkpoint,
    check_saves_at_every_log_point,
    check_track_and_resume,
    check_track_logs_a_wandb_run_offline,
    check_track_that_cannot_start_says_what_to_do,
    check_training_episodes_are_logged,
    ctrl_c_while_writing,
    interrupt_a_run,
    only_run,
    read_metrics,
    run_script,
)

import reppo_jax as rj


def run_cli(*argv, check=True):
    return run_script("reppo_jax.py", *argv, check=check)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """4 iterations in one go, logged every 2, with checkpoints."""
    runs = tmp_path_factory.mktemp("full")
    run_cli(*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(runs), "--save-model", "--seed", "3")
    return only_run(runs)


def test_help_lists_the_flags():
    result = run_cli("--help")
    for flag in ["--env-id", "--num-seeds", "--preset", "--resume", "--eval-only", "--track", "--num-mini-batches"]:
        assert flag in result.stdout


def test_preset_cpu_changes_the_defaults_and_flags_still_win():
    args = rj.parse_args(["--preset", "cpu"])
    assert (args.num_envs, args.num_mini_batches, args.actor_hidden, args.critic_hidden) == (64, 4, 256, 256)
    assert (args.num_steps, args.num_epochs, args.kl_bound) == (32, 8, 0.1)  # the rest is SPEC 11
    assert args.log_interval == 20
    assert rj.parse_args(["--preset=cpu"]) == args  # the "=" form too
    assert rj.parse_args(["--preset", "cpu", "--num-envs", "32"]).num_envs == 32
    paper = rj.parse_args([])
    assert (paper.num_envs, paper.num_mini_batches, paper.critic_hidden, paper.total_timesteps) == (
        1024,
        16,
        512,
        50_000_000,
    )


def test_tiny_run_writes_args_metrics_and_checkpoint(full_run):
    with open(os.path.join(full_run, "args.json")) as f:
        record = json.load(f)
    assert record["args"]["env_id"] == "CartpoleBalance" and record["args"]["vmax"] == 150.0
    assert record["jax_backend"] == "cpu" and record["versions"]["jax"] != "not installed"
    rows = read_metrics(full_run)
    assert [int(r["global_step"]) for r in rows] == [0, 2 * BATCH, 4 * BATCH]
    for column in ["seed", "eval/episodic_return", "charts/SPS", "losses/critic_loss", "losses/actor_loss",
                   "policy/kl", "policy/entropy", "policy/alpha", "policy/beta", "charts/episodic_return"]:  # fmt: skip
        assert column in rows[0]
    for row in rows[1:]:
        assert np.isfinite(float(row["losses/critic_loss"])) and float(row["charts/SPS"]) > 0
        assert 0 < float(row["eval/episodic_return"]) <= 16  # at most 1 per step, 16 steps
    with np.load(os.path.join(full_run, "checkpoint.npz")) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["global_step"] == 4 * BATCH and meta["args"]["seed"] == 3


def test_eval_only_evaluates_the_checkpoint(full_run, capsys):
    check_eval_only_evaluates_the_checkpoint(rj.main, full_run, "checkpoint.npz", capsys)


def test_num_seeds_trains_the_seeds_side_by_side(full_run, tmp_path, capsys):
    """--num-seeds 2 trains seeds 3 and 4 under one vmap, in one run folder with a row per seed
    and log point. Seed 3 there is the single-seed run of seed 3 (full_run) up to the rounding
    of batched matrix products; seed 4 is another run; --eval-only evaluates both."""
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(tmp_path), "--save-model", "--seed", "3"]
    assert rj.main([*argv, "--num-seeds", "2"]) == 0
    run_dir = only_run(tmp_path)
    rows = read_metrics(run_dir)
    expected = [(0, "3"), (0, "4"), (2 * BATCH, "3"), (2 * BATCH, "4")]
    assert [(int(r["global_step"]), r["seed"]) for r in rows] == expected
    single = {int(r["global_step"]): r for r in read_metrics(full_run)}
    for row in rows:
        alone = single[int(row["global_step"])]
        same = [c for c in row if c not in ("seed", "charts/SPS") and row[c] != ""]
        close = [np.isclose(float(row[c]), float(alone[c]), rtol=1e-4, atol=1e-6, equal_nan=True) for c in same]
        assert all(close) if row["seed"] == "3" else not all(close), (row, alone)
    capsys.readouterr()
    assert rj.main(["--eval-only", "--checkpoint", os.path.join(run_dir, "checkpoint.npz")]) == 0
    out = capsys.readouterr().out
    for row in rows[2:]:
        expected = f"eval seed={row['seed']} step={2 * BATCH} episodic_return={float(row['eval/episodic_return']):.2f}"
        assert expected in out


def test_ctrl_c_in_the_last_chunk_still_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C promises a checkpoint after the running chunk, also when that chunk
    is the last one (and no --save-model asked for checkpoints anyway)."""
    real_train_chunk = rj.Runner.train_chunk

    def ctrl_c_in_the_last_chunk(runner, state, num_iterations):
        result = real_train_chunk(runner, state, num_iterations)
        handler = signal.getsignal(signal.SIGINT)  # the run's own handler, called as SIGINT would
        assert handler.__qualname__.startswith("install_interrupt_handler"), handler
        handler(signal.SIGINT, None)
        return result

    monkeypatch.setattr(rj.Runner, "train_chunk", ctrl_c_in_the_last_chunk)
    # One chunk: 2 iterations, logged every 2.
    assert rj.main([*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(tmp_path)]) == 130
    assert "interrupted: saved" in capsys.readouterr().err
    with np.load(os.path.join(only_run(tmp_path), "checkpoint.npz")) as data:
        assert json.loads(str(data["meta"]))["global_step"] == 2 * BATCH


def test_a_second_ctrl_c_while_saving_stops_and_says_so(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C stops the run after its chunk and saves; a second one while the file
    is being written stops it, says that no checkpoint was written, and leaves no partial file."""
    real_train_chunk = rj.Runner.train_chunk
    written = []

    def ctrl_c_in_the_first_chunk(runner, state, num_iterations):
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # the first: finish, then save
        return real_train_chunk(runner, state, num_iterations)

    monkeypatch.setattr(rj.Runner, "train_chunk", ctrl_c_in_the_first_chunk)
    monkeypatch.setattr(rj.np, "savez", lambda path, **arrays: ctrl_c_while_writing(path, written))
    assert rj.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted again while saving: no checkpoint written" in err and "interrupted: saved" not in err
    assert len(written) == 1 and os.path.dirname(written[0]) == only_run(tmp_path)
    assert sorted(os.listdir(only_run(tmp_path))) == ["args.json", "metrics.csv"]  # no checkpoint, no .tmp


def test_training_episodes_are_logged_with_their_length_and_return(tmp_path):
    check_training_episodes_are_logged(rj.main, tmp_path)


def test_track_logs_a_wandb_run_offline(tmp_path):
    check_track_logs_a_wandb_run_offline(rj.main, tmp_path)


def test_track_logs_every_row_and_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    check_track_and_resume(rj.main, "checkpoint.npz", tmp_path, monkeypatch)


def test_track_that_cannot_start_says_what_to_do(tmp_path, monkeypatch, capsys):
    check_track_that_cannot_start_says_what_to_do(rj.main, tmp_path, monkeypatch, capsys)


def test_resuming_a_finished_run_asks_for_more_steps(full_run, capsys):
    assert rj.main(["--resume", os.path.join(full_run, "checkpoint.npz")]) == 2
    err = capsys.readouterr().err
    assert "leaves no iteration to run; give a larger --total-timesteps" in err and "Traceback" not in err


def test_a_checkpoint_of_another_version_gives_a_clear_message(full_run, tmp_path, capsys):
    """A checkpoint whose args name a setting this file does not have stops with one message
    and exit code 2."""
    with np.load(os.path.join(full_run, "checkpoint.npz")) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta["args"]["old_setting"] = 1
    arrays["meta"] = np.array(json.dumps(meta))
    checkpoint = str(tmp_path / "checkpoint.npz")
    np.savez(checkpoint, **arrays)
    assert rj.main(["--eval-only", "--checkpoint", checkpoint]) == 2
    err = capsys.readouterr().err
    assert "was saved by another version of this file (unknown settings: old_setting)" in err and "Traceback" not in err


def test_flags_a_checkpoint_overrides_are_named(full_run, capsys):
    checkpoint = os.path.join(full_run, "checkpoint.npz")
    argv = ["--resume", checkpoint, "--total-timesteps", "999999", "--log-interval", "5", "--no-track", "--no-progress"]
    args = rj.args_from_checkpoint(rj.parse_args(argv), argv)
    assert (args.total_timesteps, args.log_interval, args.progress) == (999999, 2, False)  # log-interval: saved
    err = capsys.readouterr().err
    assert "ignored: --log-interval, --no-track" in err and "--total-timesteps" not in err


def test_save_model_saves_at_every_log_point(tmp_path, monkeypatch):
    check_saves_at_every_log_point(rj, tmp_path, monkeypatch)


def test_resume_equals_the_uninterrupted_run(full_run, tmp_path):
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(tmp_path), "--save-model", "--seed", "3"]
    assert rj.main(argv) == 0
    half = only_run(tmp_path)
    resume = ["--resume", os.path.join(half, "checkpoint.npz"), "--total-timesteps", str(4 * BATCH)]
    assert rj.main(resume) == 0
    with open(os.path.join(half, "args.json")) as f:  # main(argv)'s own argv, not pytest's
        record = json.load(f)
    assert record["command"] == "python " + shlex.join(["reppo_jax.py", *argv])
    assert record["resumed_by"] == ["python " + shlex.join(["reppo_jax.py", *resume])]
    assert read_metrics(full_run)[-1]["charts/episodic_return"] != ""  # the episodes' columns count too
    assert_same_rows(half, full_run)
    # The final checkpoints too: every array of the state (networks, optimisers, alpha and beta,
    # normaliser, env state, random key, iteration), and the step.
    with (
        np.load(os.path.join(half, "checkpoint.npz")) as resumed,
        np.load(os.path.join(full_run, "checkpoint.npz")) as unbroken,
    ):
        assert resumed.files == unbroken.files and len(resumed.files) > 50
        assert_same_state(
            {k: resumed[k] for k in resumed.files if k != "meta"},
            {k: unbroken[k] for k in unbroken.files if k != "meta"},
        )
        assert (
            json.loads(str(resumed["meta"]))["global_step"]
            == json.loads(str(unbroken["meta"]))["global_step"]
            == 4 * BATCH
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--env-id", "CheetahRunn"], "unknown --env-id 'CheetahRunn'. Valid DM Control tasks: AcrobotSwingup"),
        (["--env-id", "Go1JoystickFlatTerrain"], "downloaded from the internet"),
        (["--num-envs", "10", "--num-steps", "3", "--num-mini-batches", "4"], "10 * 3 = 30 is not divisible by"),
        (["--num-mini-batches", "0"], "--num-mini-batches must be at least 1, got 0"),
        (["--num-seeds", "0"], "--num-seeds must be at least 1, got 0"),
        (["--eval-only"], "--eval-only needs --checkpoint PATH"),
        (["--resume", "/nonexistent/checkpoint.npz"], "does not exist"),
        (["--total-timesteps", "10"], "smaller than one iteration"),
        (["--gamma", "0"], "--gamma must be in (0, 1], got 0.0"),
        (["--lmbda", "1.5"], "--lmbda must be in [0, 1], got 1.5"),
        (["--env-id", "PickCube-v1"], "(ManiSkill3 tasks, named like PickCube-v1, run in reppo_torch.py)"),
        (["--ent-start", "0"], "--ent-start must be > 0, got 0.0"),
        (["--learning-rate", "-1"], "--learning-rate must be >= 0, got -1.0"),
        (["--vmin", "5", "--vmax", "1"], "need --vmin < --vmax and --num-bins >= 2, got --vmin 5.0, --vmax 1.0"),
        (["--seed", "3000000000"], "--seed must be in [-2**31, 2**31 - num_seeds], got 3000000000"),
        (["--checkpoint", "run/checkpoint.npz"], "--checkpoint is read by --eval-only only; to continue training use"),
        (["--eval-only", "--checkpoint", "a.npz", "--resume", "b.npz"], "it does not go with --resume"),
        (["--resume", os.path.dirname(__file__)], "is a folder; give the checkpoint file, e.g."),
        (["--impl", "warp", "--num-seeds", "2"], "--impl warp runs one seed per process"),
        ([*TINY, "--runs-dir", os.path.join(os.devnull, "runs")], "cannot make the run folder /dev/null/runs/"),
    ],
)
def test_bad_input_gives_a_clear_message_and_exit_code_2(argv, message, capsys):
    assert rj.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_input_from_the_shell_has_no_traceback():
    result = run_cli("--env-id", "CheetahRunn", check=False)
    assert result.returncode == 2 and "unknown --env-id" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_while_the_first_chunk_compiles_leaves_no_run_behind(tmp_path, monkeypatch):
    """The first chunk's compilation (the longest wait of a run) comes before the run folder and
    the wandb run: a Ctrl-C there exits with 130 and leaves neither."""
    run = StubWandbRun()
    monkeypatch.setattr(rj, "start_wandb", lambda args, run_dir, run_name: run)

    def interrupted(self, state, num_iterations):
        raise KeyboardInterrupt

    monkeypatch.setattr(rj.Runner, "metric_names", interrupted)
    assert rj.main([*TINY, "--runs-dir", str(tmp_path), "--track"]) == 130
    assert os.listdir(tmp_path) == [] and run.exit_codes == []


def test_the_cpu_warning_counts_every_seed_still_to_run(monkeypatch, capsys):
    """Without an accelerator the paper setting prints an estimate of its hours: for all the
    seeds it trains at once (here 2 x 10.8M steps at 1,653 to 876 env-steps/s: 3.6 to 6.8 hours)."""

    class Stop(Exception):
        pass

    def no_runner(args):
        raise Stop

    monkeypatch.setattr(rj, "Runner", no_runner)
    args = rj.resolve_args(rj.Args(env_id="CheetahRun", total_timesteps=10_800_000, num_seeds=2))
    with pytest.raises(Stop):
        rj.train(args, [])
    assert "this run's 21,600,000 env steps would take 3.6-6.8 hours" in capsys.readouterr().err


def poison_critic_loss(monkeypatch):
    """Make every critic loss (and its logged value) NaN from the first update on."""
    real_critic_loss = rj.critic_loss

    def poisoned(*args, **kwargs):
        loss, info = real_critic_loss(*args, **kwargs)
        return loss * float("nan"), {**info, "losses/critic_loss": loss * float("nan")}

    monkeypatch.setattr(rj, "critic_loss", poisoned)


def test_wandb_hears_whether_the_run_completed(tmp_path, monkeypatch):
    """--track: a run that completes finishes its wandb run with exit code 0; one stopped by a
    non-finite loss with 1, so that wandb shows it as failed."""
    run = StubWandbRun()
    monkeypatch.setattr(rj, "start_wandb", lambda args, run_dir, run_name: run)
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--track"]
    assert rj.main([*argv, "--runs-dir", str(tmp_path / "completes")]) == 0
    poison_critic_loss(monkeypatch)
    assert rj.main([*argv, "--runs-dir", str(tmp_path / "stops")]) == 2
    assert run.exit_codes == [0, 1]


def test_the_first_non_finite_metric_names_its_iteration_and_seeds():
    """Metrics are (num_seeds, num_iterations): the earliest bad iteration wins, its bad metrics
    are named (losses first), and so are the seeds they are bad for (the stop message lists
    them when several seeds train together)."""
    nan, inf = float("nan"), float("inf")
    metrics = {
        "values/reward_mean": np.array([[1.0, 1.0, inf], [1.0, inf, 1.0], [1.0, 1.0, 1.0]]),
        "losses/critic_loss": np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, nan, nan]]),
        "losses/actor_loss": np.ones((3, 3)),
    }
    assert rj.first_nonfinite(metrics) == (["losses/critic_loss", "values/reward_mean"], 1, [1, 2])
    assert rj.first_nonfinite({"losses/actor_loss": np.ones((2, 4))}) is None


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    poison_critic_loss(monkeypatch)
    code = rj.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path), "--save-model"])
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite losses/" in err and "losses/critic_loss" in err and "at iteration 1;" in err
    run_dir = only_run(tmp_path)
    with np.load(os.path.join(run_dir, "checkpoint.npz")) as data:
        assert json.loads(str(data["meta"]))["global_step"] == 0
        assert all(
            np.isfinite(data[k]).all() for k in data.files if k.startswith("leaf_") and data[k].dtype.kind == "f"
        )
    # The step-0 checkpoint resumes (here without the poison) and evaluates step 0 once more,
    # in place of the row the stopped run wrote, not beside it.
    monkeypatch.undo()
    assert rj.main(["--resume", os.path.join(run_dir, "checkpoint.npz")]) == 0
    assert [int(r["global_step"]) for r in read_metrics(run_dir)] == [0, 2 * BATCH, 4 * BATCH]


def test_non_finite_parameters_after_finite_losses_stop_the_run_too(tmp_path, monkeypatch, capsys):
    """An update can make the parameters NaN while the losses it reports were finite; the
    run stops there instead of saving (and calling finite) the broken state."""
    real_train_chunk = rj.Runner.train_chunk

    def nan_parameters_in_the_second_chunk(runner, state, num_iterations):
        new_state, metrics = real_train_chunk(runner, state, num_iterations)
        if int(np.asarray(new_state.iteration)[0]) > num_iterations:
            new_state = new_state._replace(actor=jax.tree.map(lambda x: x * np.nan, new_state.actor))
        return new_state, metrics

    monkeypatch.setattr(rj.Runner, "train_chunk", nan_parameters_in_the_second_chunk)
    code = rj.main([*TINY, "--total-timesteps", str(4 * BATCH), "--runs-dir", str(tmp_path), "--save-model"])
    assert code == 2
    assert "non-finite parameters at iteration 4; stopped" in capsys.readouterr().err
    with np.load(os.path.join(only_run(tmp_path), "checkpoint.npz")) as data:
        assert json.loads(str(data["meta"]))["global_step"] == 2 * BATCH  # the last finite state


def test_a_second_ctrl_c_stops_at_once_inside_a_long_chunk(tmp_path):
    """The second Ctrl-C leaves without waiting for the running jitted chunk (here one chunk
    of 100,000 iterations, minutes long) and without a checkpoint."""
    argv = ["--log-interval", "100000", "--save-model"]
    code, err, run_dir, seconds = interrupt_a_run("reppo_jax.py", tmp_path, rows=1, twice=True, extra_argv=argv)
    assert code == 130 and "no checkpoint written" in err and "Traceback" not in err
    assert seconds < 20, f"the process took {seconds:.0f} s to leave after the second Ctrl-C"
    assert not os.path.exists(os.path.join(run_dir, "checkpoint.npz"))


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    code, err, run_dir = interrupt_a_run("reppo_jax.py", tmp_path)
    assert code == 130 and "interrupted: saved" in err and "Traceback" not in err, f"exit {code}\n{err}"
    with np.load(os.path.join(run_dir, "checkpoint.npz")) as data:
        step = json.loads(str(data["meta"]))["global_step"]
    assert step >= 2 * BATCH and step % BATCH == 0
    run_cli("--resume", os.path.join(run_dir, "checkpoint.npz"), "--total-timesteps", str(step + 2 * BATCH))
    steps = [int(r["global_step"]) for r in read_metrics(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == step + 2 * BATCH


def test_a_second_ctrl_c_inside_a_gc_callback_still_stops_the_run(capsys):
    check_a_second_ctrl_c_in_a_gc_callback_is_not_lost(rj, capsys)


def test_a_ctrl_c_while_the_run_starts_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    check_a_ctrl_c_while_the_run_starts_leaves_nothing_behind(rj, tmp_path, monkeypatch, capsys)
