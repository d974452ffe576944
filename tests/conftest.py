"""Shared test setup: import the single files from the repository root, CPU only."""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiled XLA programs are cached on disk so that the CLI tests, which start several
# processes with the same configuration, compile each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("WANDB_MODE", "offline")

# Under pytest-xdist (`-n N`), each worker process gets one core and one thread, and so do
# the scripts it starts (they inherit the environment and the CPU affinity). The tests'
# networks are small: two processes with one thread each get more done on two cores than
# one process whose thread pools split every small kernel in two, and two processes with a
# pool of two threads each would oversubscribe the cores (OpenMP's spinning threads then make
# every kernel wait for a descheduled partner: beside another busy process an update took
# 2.3-37x as long with two threads, docs/results.md, session 24).
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # Linux only
    if 0 < int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) <= len(cores):  # else: threads only
        os.sched_setaffinity(0, {cores[int(os.environ["PYTEST_XDIST_WORKER"][2:])]})
    for name in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"]:
        os.environ[name] = "1"
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false"]).strip()

# ---- helpers shared by the CLI and learning tests of both files -------------------------


import csv  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


def require(module: str, pip_spec: str, problem: str | None = None) -> None:
    """Skip a test whose package (``module``) is not installed, or that has another ``problem``,
    saying how to enable it; in CI (CI=true, which .ci/run sets) fail instead, since .ci/run
    installs everything the suite needs. For a user who installed only part of the requirements."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        problem = f"{module} does not import ({error}); pip install {pip_spec}"
    if problem is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(problem)
    pytest.skip(problem)


class StubWandbRun:
    """Stands in for a wandb run (start_wandb's result): records what was logged and how the
    run was finished."""

    def __init__(self):
        self.exit_codes, self.logged = [], []

    def log(self, data, step=None):
        self.logged.append((data, step))

    def finish(self, exit_code=0):
        self.exit_codes.append(exit_code)


def fake_wandb(monkeypatch) -> list:
    """Replace the wandb package by one whose init() records its keyword arguments and returns
    a StubWandbRun; returns the list of (kwargs, run), one per init()."""
    import types

    inits = []

    def init(**kwargs):
        inits.append((kwargs, StubWandbRun()))
        return inits[-1][1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return inits


# A run small enough to finish in seconds after compilation (CartpoleBalance, 16-step episodes:
# complete training episodes end by the fourth iteration, so a comparison of two runs' rows
# covers the charts/episodic_* columns too).
TINY = [
    "--env-id", "CartpoleBalance", "--preset", "cpu", "--num-envs", "8", "--num-steps", "8",
    "--num-mini-batches", "2", "--num-epochs", "1", "--actor-hidden", "32", "--critic-hidden", "32",
    "--episode-length", "16", "--num-eval-envs", "2", "--log-interval", "2", "--no-progress",
]  # fmt: skip
BATCH = 8 * 8  # env steps per iteration of TINY


def script_command(script, *argv):
    """The command line `python script argv...` for a file at the repository root."""
    return [sys.executable, os.path.join(ROOT, script), *argv]


def run_script(script, *argv, check=True, timeout=600):
    """Run `python script argv...` from the repository root; raise with its output on failure."""
    result = subprocess.run(
        script_command(script, *argv), capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def assert_same_rows(run_dir, other_run_dir):
    """The two runs' metrics.csv rows agree in every column but the speed, empty cells included."""
    rows, other_rows = read_metrics(run_dir), read_metrics(other_run_dir)
    assert [r["global_step"] for r in rows] == [r["global_step"] for r in other_rows]
    for a, b in zip(rows, other_rows):
        assert a.keys() == b.keys() and [k for k in a if (a[k] == "") != (b[k] == "")] == []
        for column in a:
            if column not in ("charts/SPS",) and a[column] != "":
                np.testing.assert_allclose(float(a[column]), float(b[column]), rtol=1e-5, atol=1e-6, err_msg=column)


def assert_same_state(saved, other, path="state"):
    """Two saved training states (nested dicts/lists of arrays or tensors and plain values, as a
    checkpoint holds them) agree everywhere: float arrays to float32 tolerance, the rest exactly."""
    if isinstance(saved, dict):
        assert saved.keys() == other.keys(), path
        for key in saved:
            assert_same_state(saved[key], other[key], f"{path}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(other), path
        for index, (a, b) in enumerate(zip(saved, other)):
            assert_same_state(a, b, f"{path}[{index}]")
    elif hasattr(saved, "shape"):  # a NumPy array or a torch tensor
        a, b = np.asarray(saved), np.asarray(other)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    else:
        assert saved == other, path


def only_run(runs_dir):
    (run_dir,) = glob.glob(os.path.join(runs_dir, "*"))
    return run_dir


def cartpole_learning_run(script, total_timesteps, runs_dir):
    """Train CartpoleBalance with --preset cpu (seed 1, evaluation every 10 iterations) and
    return (metrics rows, untrained evaluation return, the later evaluation returns)."""
    run_script(
        script, "--env-id", "CartpoleBalance", "--preset", "cpu", "--total-timesteps", str(total_timesteps),
        "--log-interval", "10", "--seed", "1", "--runs-dir", str(runs_dir), "--no-progress", timeout=900,
    )  # fmt: skip
    rows = read_metrics(only_run(runs_dir))
    return rows, float(rows[0]["eval/episodic_return"]), [float(r["eval/episodic_return"]) for r in rows[1:]]


# Runs a script as `python script argv...` would, with one more exit handler that prints
# EXIT_HANDLERS_RAN: a process that leaves through os._exit never prints it.
EXIT_HANDLERS_RAN = "the interpreter's exit handlers ran"
EXIT_PROBE = (
    "import atexit, runpy, sys; "
    f"atexit.register(lambda: print({EXIT_HANDLERS_RAN!r}, file=sys.stderr, flush=True)); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def interrupt_a_run(
    script, runs_dir, timeout=300, rows=2, twice=False, extra_argv=(), wait=2.0, gap=1.0, probe_exit=False
):
    """Start a long TINY run of `script`, send it SIGINT (Ctrl-C) once metrics.csv holds
    `rows` rows (2: step 0 and one log point), and if `twice` `wait` seconds after that and
    again `gap` seconds later; return (exit code, stderr, run folder), and with `twice` also
    the seconds from the last SIGINT to the end of the process. `probe_exit`: run the script
    under EXIT_PROBE, so stderr shows whether the interpreter's exit handlers ran."""
    import signal
    import time

    argv = [*TINY, "--total-timesteps", str(100_000 * BATCH), "--runs-dir", str(runs_dir), *extra_argv]
    command = script_command(script, *argv)
    if probe_exit:
        command = [sys.executable, "-c", EXIT_PROBE, *command[1:]]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            paths = glob.glob(os.path.join(runs_dir, "*", "metrics.csv"))
            if paths and len(read_metrics(os.path.dirname(paths[0]))) >= rows:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it could be interrupted"
        if twice:
            time.sleep(wait)  # (reppo_jax.py) the rows are written just before a chunk starts: be well inside it
        process.send_signal(signal.SIGINT)
        if twice:
            time.sleep(gap)
            process.send_signal(signal.SIGINT)
        last_signal = time.monotonic()
        _, err = process.communicate(timeout=timeout)
        seconds = time.monotonic() - last_signal
    finally:
        process.kill()
    if twice:
        return process.returncode, err, only_run(runs_dir), seconds
    return process.returncode, err, only_run(runs_dir)


# ---- order: the longest files first ------------------------------------------------------
# With `-n 2` (README) and `--dist loadfile` (pyproject.toml), pytest-xdist hands out whole files in this order, so
# the two learning tests (minutes each) start at once on the two workers and the many short
# files fill in behind them, instead of one learning test running alone at the end.
LONGEST_FIRST = [
    "test_learning_torch.py", "test_learning_jax.py", "test_cli_torch.py", "test_cli_jax.py",
    "test_env_jax.py", "test_parity.py", "test_compile_torch.py",
]  # fmt: skip


def ctrl_c_while_writing(path, written: list) -> None:
    """A stand-in for a checkpoint writer (torch.save, np.savez): writes the first bytes of
    `path`, notes it in `written`, then calls the run's own SIGINT handler as a second Ctrl-C
    would (which raises KeyboardInterrupt)."""
    import signal

    with open(path, "wb") as f:
        f.write(b"the first bytes of a checkpoint")
    written.append(path)
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    raise AssertionError("the second Ctrl-C did not stop the save")


def check_track_and_resume(main, checkpoint_name, runs_dir, monkeypatch) -> None:
    """--track with a recording stand-in for wandb (fake_wandb), then --resume of that run: init
    gets the run folder's name as the run id with resume="allow" (so the resumed run continues
    the same wandb run) and the arguments as config; each log point sends the metrics.csv row's
    filled cells at its global_step; both runs finish with exit code 0."""
    inits = fake_wandb(monkeypatch)
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(runs_dir), "--save-model", "--track"]
    argv += ["--wandb-project", "reppo-test", "--wandb-entity", "someone", "--wandb-mode", "offline"]
    assert main(argv) == 0
    run_dir = only_run(runs_dir)
    assert main(["--resume", os.path.join(run_dir, checkpoint_name), "--total-timesteps", str(4 * BATCH)]) == 0
    (first, first_run), (resumed, resumed_run) = inits
    assert first["id"] == resumed["id"] == os.path.basename(run_dir) and first["resume"] == resumed["resume"] == "allow"
    for kwargs in (first, resumed):  # the --wandb-* flags reach init (the resumed run takes them from the checkpoint)
        assert (kwargs["project"], kwargs["entity"], kwargs["mode"]) == ("reppo-test", "someone", "offline")
        assert kwargs["name"] == os.path.basename(run_dir) and kwargs["dir"] == run_dir
    assert first["config"]["env_id"] == "CartpoleBalance" and first["config"]["num_envs"] == 8
    rows = read_metrics(run_dir)
    assert [step for _, step in first_run.logged + resumed_run.logged] == [int(r["global_step"]) for r in rows]
    for (data, _), row in zip(first_run.logged + resumed_run.logged, rows):
        assert set(data) == {name for name, value in row.items() if value != ""} - {"global_step", "seed"}
        for name, value in data.items():
            np.testing.assert_allclose(value, float(row[name]), rtol=1e-6, err_msg=name)
    assert first_run.exit_codes == resumed_run.exit_codes == [0]


def check_saves_at_every_log_point(module, runs_dir, monkeypatch) -> None:
    """--save-model saves at every log point, not only at the end: a run killed between log
    points (out of memory, pre-empted) keeps the last log point's checkpoint."""
    saved, real_save = [], module.save_checkpoint

    def recording_save(path, state, args, global_step, *rest):
        saved.append(global_step)
        return real_save(path, state, args, global_step, *rest)

    monkeypatch.setattr(module, "save_checkpoint", recording_save)
    argv = [*TINY, "--total-timesteps", str(6 * BATCH), "--runs-dir", str(runs_dir), "--save-model"]
    assert module.main(argv) == 0
    assert saved == [2 * BATCH, 4 * BATCH, 6 * BATCH]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order, the rest keep theirs


def check_eval_only_evaluates_the_checkpoint(main, full_run, checkpoint_name, capsys) -> None:
    """Evaluation episodes are drawn from the seed and the iteration, so --eval-only of the
    final checkpoint plays the episodes of the run's last log point: the same return means the
    checkpoint's own weights and normaliser were evaluated (the untrained policy's differs).
    ``full_run``: 4 iterations of seed 3, 2 evaluation episodes."""
    checkpoint = os.path.join(full_run, checkpoint_name)
    rows = read_metrics(full_run)
    untrained, final = (float(rows[i]["eval/episodic_return"]) for i in (0, -1))
    assert f"{untrained:.2f}" != f"{final:.2f}"
    assert main(["--eval-only", "--checkpoint", checkpoint]) == 0
    out = capsys.readouterr().out
    assert f"eval seed=3 step={4 * BATCH} episodic_return={final:.2f} +- " in out and "over 2 episodes" in out
    assert main(["--eval-only", "--checkpoint", checkpoint, "--num-eval-envs", "3"]) == 0
    assert "over 3 episodes" in capsys.readouterr().out


def check_training_episodes_are_logged(main, runs_dir) -> None:
    """charts/episodic_*: the mean over the complete episodes that ended since the last log
    point (10-step episodes here; the first, shortened ones are not complete and not counted).
    Through the CLI this checks the lengths exactly and the returns' range; the sums behind both
    are checked exactly in tests/test_loop_*.py (the training episodes that ended)."""
    argv = [*TINY, "--episode-length", "10", "--total-timesteps", str(4 * BATCH), "--runs-dir", str(runs_dir)]
    assert main(argv) == 0
    rows = read_metrics(only_run(runs_dir))[1:]  # the rows after step 0
    assert [float(r["charts/episodic_length"]) for r in rows] == [10.0, 10.0]
    # CartpoleBalance pays at most 1 per step; above 1 is a sum over an episode, not a per-step mean.
    assert all(1 < float(r["charts/episodic_return"]) <= 10 for r in rows)


def check_track_logs_a_wandb_run_offline(main, runs_dir) -> None:
    """--track: wandb.init with the run's config, a log per log point and finish() go through
    (offline: written beside the run, to sync later; nothing is sent)."""
    require("wandb", "wandb==0.31.0")
    argv = [*TINY, "--total-timesteps", str(2 * BATCH), "--runs-dir", str(runs_dir)]
    argv += ["--track", "--wandb-mode", "offline"]
    assert main(argv) == 0
    run_dir = only_run(runs_dir)
    (record,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert os.path.getsize(record) > 0 and os.path.basename(run_dir) in record  # the run's name is its wandb id
    assert [int(r["global_step"]) for r in read_metrics(run_dir)] == [0, 2 * BATCH]


def check_track_that_cannot_start_says_what_to_do(main, tmp_path, monkeypatch, capsys) -> None:
    """--track online with no wandb login, then without wandb installed: one clear message and
    exit code 2 (no traceback), and the fresh run's folder is removed again."""
    require("wandb", "wandb==0.31.0")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ANONYMOUS", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # no terminal: wandb raises instead of asking for a key
    runs = tmp_path / "runs"
    argv = [*TINY, "--total-timesteps", str(BATCH), "--runs-dir", str(runs), "--track"]
    assert main([*argv, "--wandb-mode", "online"]) == 2
    err = capsys.readouterr().err
    assert "--track: wandb could not start the run (UsageError" in err and "`wandb login`" in err
    assert "--wandb-mode offline" in err and "Traceback" not in err and os.listdir(runs) == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    assert main([*argv, "--wandb-mode", "offline"]) == 2
    assert "--track needs wandb" in capsys.readouterr().err and os.listdir(runs) == []


def check_a_ctrl_c_while_the_run_starts_leaves_nothing_behind(module, tmp_path, monkeypatch, capsys) -> None:
    """A Ctrl-C after the run folder is made but before training begins: exit code 130, a
    wandb run that had started is finished as failed, a fresh run's folder is removed again
    (a resumed run's is kept, checkpoint and all), the Ctrl-C handler of training was never left
    installed, and the PyTorch file's simulators are closed. Cases: the Ctrl-C while args.json
    is written; the same with a wandb run whose finish() fails (reported; the Ctrl-C is still
    the error raised); late in wandb.init, after wandb had made its run (whose finish() then
    works, or fails); and in a resumed run."""
    import signal
    import types

    closed = []
    if hasattr(module, "Trainer"):  # reppo_torch.py: its simulators are closed too
        close = module.Trainer.close
        monkeypatch.setattr(module.Trainer, "close", lambda self: (closed.append(True), close(self))[1])
    sigint = signal.getsignal(signal.SIGINT)
    runs = tmp_path / "runs"
    argv = [*TINY, "--total-timesteps", str(BATCH), "--runs-dir", str(runs), "--track"]
    made = []

    def ctrl_c(args, run_dir, *rest):
        made.append(os.path.isdir(run_dir))
        raise KeyboardInterrupt

    def starts_and_stops(expected_made, expected_runs, run, argv=argv):
        made.clear()
        closed.clear()
        assert module.main(argv) == 130
        assert made == expected_made and sorted(os.listdir(runs)) == expected_runs and run.exit_codes == [1]
        assert signal.getsignal(signal.SIGINT) is sigint
        assert closed == ([True] if hasattr(module, "Trainer") else [])

    class FailingFinish(StubWandbRun):
        def finish(self, exit_code=0):
            super().finish(exit_code)
            raise RuntimeError("no network")

    with monkeypatch.context() as patched:
        # 1. While args.json is written, with a wandb run started.
        run = StubWandbRun()
        patched.setattr(module, "start_wandb", lambda args, run_dir, run_name: run)
        patched.setattr(module, "write_args", ctrl_c)
        starts_and_stops([True], [], run)
        # 2. The same, and the wandb run's finish() fails: said, and the Ctrl-C is still what stops the run.
        run = FailingFinish()
        starts_and_stops([True], [], run)
        assert "wandb could not finish the run: RuntimeError: no network" in capsys.readouterr().err

    # 3. Late in wandb.init (the real start_wandb and write_args again): wandb had made its run
    # (wandb.run) when the Ctrl-C came.
    run = StubWandbRun()
    wandb = types.SimpleNamespace(run=None)

    def init(**kwargs):
        wandb.run = run
        raise KeyboardInterrupt

    wandb.init = init
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    starts_and_stops([], [], run)
    run = FailingFinish()  # and that run's finish() fails: said, and the Ctrl-C still stops the run
    starts_and_stops([], [], run)
    assert "wandb could not finish the run: RuntimeError: no network" in capsys.readouterr().err

    # 4. A resumed run: its folder, checkpoint and metrics stay as they were.
    fake_wandb(monkeypatch)  # the run to resume, with --track (which a resumed run takes from it)
    assert module.main([*argv, "--save-model"]) == 0
    run_dir = only_run(runs)
    before = {name: open(os.path.join(run_dir, name), "rb").read() for name in sorted(os.listdir(run_dir))}
    assert module.CHECKPOINT_NAME in before and "metrics.csv" in before
    monkeypatch.setattr(module, "write_args", ctrl_c)
    run = StubWandbRun()
    monkeypatch.setattr(module, "start_wandb", lambda args, run_dir, run_name: run)
    resume = ["--resume", os.path.join(run_dir, module.CHECKPOINT_NAME), "--total-timesteps", str(2 * BATCH)]
    starts_and_stops([True], [os.path.basename(run_dir)], run, argv=resume)
    assert {name: open(os.path.join(run_dir, name), "rb").read() for name in sorted(os.listdir(run_dir))} == before


def check_a_second_ctrl_c_in_a_gc_callback_is_not_lost(module, capsys) -> None:
    """A second Ctrl-C whose handler runs inside a garbage-collector callback (as one did inside
    JAX's, in session 22's CI) raises KeyboardInterrupt there, which Python would print as
    "Exception ignored" and drop. The run's handler signals it again: it reaches ordinary code,
    and nothing is printed. Both hooks are put back afterwards."""
    import gc
    import signal
    import time

    hook, sigint = sys.unraisablehook, signal.getsignal(signal.SIGINT)
    state = module.install_interrupt_handler()
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)  # the handler runs here and raises

    try:
        state["flag"] = True  # the first Ctrl-C has come
        gc.callbacks.append(callback)
        raised = False
        start = time.perf_counter()
        try:
            gc.collect()
            time.sleep(5)  # ordinary code, where the interrupt is raised again (cut short by it)
        except KeyboardInterrupt:
            raised = True
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
        module.restore_interrupt_handler()
    assert fired and raised, "the second Ctrl-C was lost inside the gc callback"
    assert time.perf_counter() - start < 4, "the interrupt came only after the sleep"
    assert "Exception ignored" not in capsys.readouterr().err
    assert sys.unraisablehook is hook and signal.getsignal(signal.SIGINT) is sigint
