"""Speed and memory of reppo_jax.py (and reppo_torch.py): compile time, steady-state
env-steps/s after compilation (evaluation excluded), peak RSS and, on a GPU, peak GPU memory.
It also reports the untimed warm-up round's time, which for reppo_torch.py --compile holds
torch.compile's compilation from an empty cache.

Each measurement runs in a fresh subprocess so that its peak RSS is its own (that process's
alone: the compile workers that torch.compile may start for --torch-compile are not counted):

    python benchmarks/speed.py                        # both settings, reppo_jax.py
    python benchmarks/speed.py --settings cpu --iterations 20
    python benchmarks/speed.py --settings maniskill --implementations torch
    python benchmarks/speed.py --settings cpu --implementations jax torch --paired --iterations 60

--paired times the two files in lockstep instead: both stay alive in their own processes and
run one timed iteration each in turn, so that a VM whose speed changes while it is measured
slows both alike; it reports the ratio of their times round by round.

Settings: 'paper' = SPEC defaults on CheetahRun (1024 envs x 32 steps, 16 minibatches,
8 epochs, hidden 512); 'cpu' = --preset cpu on CartpoleBalance (64 x 32, 4 minibatches,
8 epochs, hidden 256); 'maniskill' = --preset cpu on ManiSkill3 PickCube-v1, reppo_torch.py
only (reppo_jax.py runs Playground tasks only). Without CUDA, ManiSkill simulates on the CPU
(physx_cpu), one training env, so an iteration there is 1 x 32 steps and 32 updates of
minibatches of 8; with CUDA it is the GPU simulator with 64 envs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "paper": ["--env-id", "CheetahRun", "--preset", "paper"],
    "cpu": ["--env-id", "CartpoleBalance", "--preset", "cpu"],
    "maniskill": ["--env-id", "PickCube-v1", "--preset", "cpu"],
}
TORCH_ONLY = {"maniskill"}  # settings reppo_jax.py cannot run


@dataclass
class Options:
    settings: list[Literal["paper", "cpu", "maniskill"]] = field(default_factory=lambda: ["paper", "cpu"])
    """which settings to measure ('maniskill': reppo_torch.py only)"""
    implementations: list[Literal["jax", "torch"]] = field(default_factory=lambda: ["jax"])
    """which files to measure"""
    iterations: int = 0
    """iterations per timed chunk (the same chunk runs once untimed first); 0 picks 1 (paper) or 20 (cpu, maniskill)"""
    json_out: str | None = None
    """also write the results to this JSON file"""
    torch_compile: bool = False
    """measure reppo_torch.py with --compile"""
    torch_fused_adam: bool = False
    """measure reppo_torch.py with --fused-adam (Adam's fused kernel, CPU or CUDA)"""
    torch_cuda_graphs: bool = False
    """measure reppo_torch.py with --cuda-graphs (CUDA only)"""
    paired: bool = False
    """time the two files in lockstep (needs --implementations jax torch): one iteration of each in
    turn, `iterations` rounds, each file in a process kept alive; reports torch/jax per round"""
    extra: str = ""
    """flags added to both files' command lines, as one string (e.g. '--num-envs 16')"""


def jax_session(cli: list[str], chunk: int):
    """reppo_jax.py, built and its chunk of `chunk` iterations compiled ahead of time.
    Returns (run, facts, peak RSS, peak GPU memory): run() trains one chunk and waits for it;
    facts holds the compile time and the env steps of one iteration."""
    import jax

    sys.path.insert(0, ROOT)
    import reppo_jax as rj

    args = rj.resolve_args(rj.parse_args(cli))
    runner = rj.Runner(args)
    state = runner.init()
    runner.compile_chunk(state, chunk)

    def run() -> None:
        nonlocal state
        state, metrics = runner.train_chunk(state, chunk)
        jax.block_until_ready((state, metrics))

    facts = {
        "compile_s": runner.compile_seconds,
        "steps_per_iteration": args.num_envs * args.num_steps,
        "backend": jax.default_backend(),
    }
    return run, facts, rj.peak_rss_mb, jax_peak_gpu_mib


def torch_session(cli: list[str]):
    """reppo_torch.py's Trainer, built. Returns (run, facts, peak RSS, peak GPU memory):
    run() trains one iteration and, on a GPU, waits for it (CUDA kernels run
    asynchronously: only finished work is timed)."""
    import time

    import torch

    sys.path.insert(0, ROOT)
    import reppo_torch as rt

    args = rt.resolve_args(rt.parse_args(cli))
    start = time.perf_counter()
    trainer = rt.Trainer(args, args.seed, rt.torch_device(args))
    setup_seconds = time.perf_counter() - start
    cuda = trainer.device.type == "cuda"

    def run() -> None:
        trainer.train_iteration()
        if cuda:
            torch.cuda.synchronize()

    def peak_gpu_mib() -> float | None:
        # On a GPU: PyTorch's peak plus, for Playground tasks, the peak of the JAX simulator.
        if not cuda:
            return None
        jax_mib = jax_peak_gpu_mib() if trainer.env.suite == "dm_control" else None
        return torch.cuda.max_memory_allocated() / 2**20 + (jax_mib or 0.0)

    facts = {
        "compile_s": setup_seconds,  # no compilation by default: env set-up (JAX-side env step for Playground)
        "steps_per_iteration": args.num_envs * args.num_steps,
        "backend": str(trainer.device),
    }
    return run, facts, rt.peak_rss_mb, peak_gpu_mib


def measure_jax(cli: list[str], iterations: int) -> dict:
    """Runs inside the child process: compile, warm up, then time `iterations` iterations."""
    import time

    run, facts, peak_rss, peak_gpu = jax_session(cli, iterations)
    start = time.perf_counter()
    run()  # warm-up run of the same compiled chunk
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {
        **facts,
        "warmup_s": warmup_seconds,
        "sps": iterations * facts["steps_per_iteration"] / seconds,
        "seconds_per_iteration": seconds / iterations,
        "peak_rss_mib": peak_rss(),
        "peak_gpu_mib": peak_gpu(),
    }


def jax_peak_gpu_mib() -> float | None:
    """Peak bytes JAX's allocator has handed out on the first device (None on a CPU). This
    is what the arrays needed, not the pool JAX reserves up front (75 % of the GPU unless
    XLA_PYTHON_CLIENT_PREALLOCATE=false)."""
    import jax

    device = jax.devices()[0]
    if device.platform != "gpu":
        return None
    return device.memory_stats()["peak_bytes_in_use"] / 2**20


def measure_torch(cli: list[str], iterations: int) -> dict:
    """The same protocol for reppo_torch.py: build the Trainer, one untimed warm-up round of
    `iterations` iterations, then a timed round (evaluation excluded in both files)."""
    import time

    run, facts, peak_rss, peak_gpu = torch_session(cli)
    start = time.perf_counter()
    for _ in range(iterations):  # warm-up round: with --compile, torch.compile compiles here
        run()
    warmup_seconds = time.perf_counter() - start
    # Each iteration ends by copying its metrics to the host (a CUDA sync too), so the time of
    # each one is known; they go into the JSON (iteration_s).
    times = []
    for _ in range(iterations):
        lap = time.perf_counter()
        run()
        times.append(time.perf_counter() - lap)
    seconds = sum(times)
    return {
        **facts,
        "warmup_s": warmup_seconds,  # includes torch.compile's compilation, on a cold cache (see main)
        "sps": iterations * facts["steps_per_iteration"] / seconds,
        "seconds_per_iteration": seconds / iterations,
        "peak_rss_mib": peak_rss(),
        "peak_gpu_mib": peak_gpu(),
        "iteration_s": times,
    }


def serve(impl: str, warmup: int, cli: list[str]) -> None:
    """A --paired worker (a child process): build, compile and warm up one file, then time one
    iteration each time the parent writes 'go' on stdin, until it writes 'stop'."""
    import time

    if impl == "jax":
        run, facts, peak_rss, peak_gpu = jax_session(cli, 1)  # a chunk of one iteration
    else:
        run, facts, peak_rss, peak_gpu = torch_session(cli)
    start = time.perf_counter()
    for _ in range(warmup):
        run()
    print("READY " + json.dumps({**facts, "warmup_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        run()
        print(f"TIME {time.perf_counter() - start!r}", flush=True)
    print("RESULT " + json.dumps({"peak_rss_mib": peak_rss(), "peak_gpu_mib": peak_gpu()}), flush=True)


def child_command(impl: str, mode: str, iterations: int, setting: str, flags: list[str]) -> list[str]:
    return [sys.executable, __file__, mode, impl, str(iterations), *SETTINGS[setting], *flags]


def torch_flags(options: Options) -> list[str]:
    flags = ["--compile"] * options.torch_compile + ["--fused-adam"] * options.torch_fused_adam
    return flags + ["--cuda-graphs"] * options.torch_cuda_graphs


def child_env(cache: str, paired: bool = False) -> dict[str, str]:
    # Each child compiles from nothing: torch.compile keeps its compiled code in a cache
    # folder that a second run would reuse, so an empty one per child makes the warm-up
    # round's time that of a first run on the machine (the JAX file keeps no such cache).
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    if paired:
        # --paired keeps both files alive at once: on a GPU, JAX's default of taking 75 % of
        # its memory up front would leave the PyTorch worker (and its own JAX simulator) the
        # rest. reppo_torch.py sets this for its own JAX already.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


class Worker:
    """One --paired child process, talked to line by line; built, compiled and warmed up
    once the constructor returns (``facts``: what its READY line reported)."""

    def __init__(self, impl: str, setting: str, flags: list[str], warmup: int, cache: str):
        self.impl = impl
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a pipe left unread could fill and block the child
        command = child_command(impl, "--serve", warmup, setting, flags)
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=child_env(cache, paired=True),
        )
        try:  # a failed or interrupted start (the warm-up is long) leaves no process behind
            self.facts = json.loads(self.read("READY"))
        except BaseException:
            self.stop()
            raise

    def read(self, tag: str) -> str:
        for line in self.process.stdout:
            if line.startswith(tag + " "):
                return line[len(tag) + 1 :]
        self.fail()

    def send(self, command: str) -> None:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # the worker has died (killed for memory, say)
            self.fail()

    def fail(self):
        self.process.wait()
        self.stderr.seek(0)
        sys.exit(f"{self.impl} worker failed (exit {self.process.returncode}):\n{self.stderr.read()[-4000:]}")

    def stop(self) -> None:
        """Ends the worker if it is still running (its start, or another worker, failed)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def time_one(self) -> float:
        self.send("go")
        return float(self.read("TIME"))

    def finish(self) -> dict:
        self.send("stop")
        result = json.loads(self.read("RESULT"))
        self.process.wait()
        self.stderr.close()
        return result


def measure_paired(setting: str, rounds: int, flags: list[str], extra: list[str]) -> dict:
    """Both files at one setting, in lockstep: one timed iteration of reppo_jax.py, then one of
    reppo_torch.py, `rounds` times, each file in its own process kept alive throughout (the
    other waits, idle, on its stdin). A VM whose speed changes from minute to minute (docs/
    results.md, session 22) then slows both files alike, and each round's ratio compares the
    two in the same state. The JAX file runs a compiled chunk of one iteration here, which
    measured ~2 % slower than a chunk of 10 (docs/results.md, session 22); the unpaired
    protocol's chunk is 20."""
    import statistics

    warmup = 3  # iterations: enough for torch.compile's compilation and allocator warm-up
    with tempfile.TemporaryDirectory() as cache:
        workers = {}
        try:
            for impl in ("jax", "torch"):  # one after the other: set-up and compilation do not overlap
                workers[impl] = Worker(impl, setting, (flags if impl == "torch" else []) + extra, warmup, cache)
            times = {"jax": [], "torch": []}
            for _ in range(rounds):
                for impl in ("jax", "torch"):
                    times[impl].append(workers[impl].time_one())
            memory = {impl: worker.finish() for impl, worker in workers.items()}
        finally:  # a failed (or interrupted) measurement leaves no worker running
            for worker in workers.values():
                worker.stop()
    ratios = [t / j for j, t in zip(times["jax"], times["torch"])]
    # "inclusive": quartiles within the measured ratios (Python's default, "exclusive",
    # extrapolates beyond them for a few rounds; session 23's JSONs were written with it).
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    result = {"setting": setting, "implementation": "paired", "rounds": rounds, "flags": flags + extra}
    for impl in ("jax", "torch"):
        facts = workers[impl].facts
        result[impl] = {
            **facts,
            "sps": rounds * facts["steps_per_iteration"] / sum(times[impl]),
            "iteration_s": times[impl],
            **memory[impl],
        }
    result.update(
        ratio_median=statistics.median(ratios),
        ratio_quartiles=[quartiles[0], quartiles[2]],
        ratio_quartile_method="inclusive",
        ratio_of_means=sum(times["torch"]) / sum(times["jax"]),
        ratios=ratios,
    )
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # inside the measuring subprocess
        impl, iterations, cli = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
        result = {"jax": measure_jax, "torch": measure_torch}[impl](cli, iterations)
        print("RESULT " + json.dumps(result))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":  # a --paired worker
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        return
    options = tyro.cli(Options)
    extra = shlex.split(options.extra)
    if options.paired:
        if set(options.implementations) != {"jax", "torch"}:
            sys.exit("--paired compares the two files: give --implementations jax torch")
        if TORCH_ONLY & set(options.settings):
            sys.exit("--paired runs the settings both files can run (paper, cpu), not maniskill")
    pairs = [
        (setting, impl)
        for setting in options.settings
        for impl in (["paired"] if options.paired else options.implementations)
        if not (impl == "jax" and setting in TORCH_ONLY)
    ]
    if not pairs:
        sys.exit("nothing to measure: the maniskill setting runs reppo_torch.py only (--implementations torch)")
    if "jax" in options.implementations and TORCH_ONLY & set(options.settings):
        print("reppo_jax.py runs Playground tasks only: the maniskill setting measures reppo_torch.py alone")
    results = []
    for setting, impl in pairs:
        iterations = options.iterations or (1 if setting == "paper" else 20)
        flags = torch_flags(options) if impl != "jax" else []
        if impl == "paired":
            result = measure_paired(setting, iterations, flags, extra)
            results.append(result)
            print_paired(result)
            continue
        with tempfile.TemporaryDirectory() as cache:
            child = child_command(impl, "--child", iterations, setting, flags + extra)
            done = subprocess.run(child, capture_output=True, text=True, env=child_env(cache))
        if done.returncode != 0:
            sys.exit(f"{impl} {setting} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.split("RESULT ", 1)[1])
        result.update(setting=setting, implementation=impl, iterations=iterations, flags=flags + extra)
        results.append(result)
        shown = "".join(" " + flag for flag in flags + extra)
        print(
            f"{impl:5s} {setting:9s}{shown}: {result['sps']:8,.0f} env-steps/s  "
            f"({result['seconds_per_iteration'] * 1000:,.0f} ms/iteration)  "
            f"{'compile' if impl == 'jax' else 'set-up'} {result['compile_s']:5.1f} s  "
            f"warm-up {result['warmup_s']:5.1f} s  "
            f"peak RSS {result['peak_rss_mib']:6,.0f} MiB"
            + (f"  peak GPU {result['peak_gpu_mib']:6,.0f} MiB" if result["peak_gpu_mib"] is not None else ""),
            flush=True,
        )
    if options.json_out:
        with open(options.json_out, "w") as f:
            json.dump(results, f, indent=2)


def print_paired(result: dict) -> None:
    flags = "".join(" " + flag for flag in result["flags"])
    low, high = result["ratio_quartiles"]
    print(
        f"paired {result['setting']:9s}{flags}, {result['rounds']} rounds: "
        f"jax {result['jax']['sps']:8,.0f} env-steps/s, "
        f"torch {result['torch']['sps']:8,.0f} env-steps/s; torch/jax time per iteration: median "
        f"{result['ratio_median']:.2f} (quartiles {low:.2f}-{high:.2f}), of the means {result['ratio_of_means']:.2f}; "
        f"peak RSS jax {result['jax']['peak_rss_mib']:,.0f} MiB, torch {result['torch']['peak_rss_mib']:,.0f} MiB",
        flush=True,
    )


if __name__ == "__main__":
    main()
