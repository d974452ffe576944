"""Speed and memory of reppo_jax.py (and reppo_torch.py): compile time, steady-state
env-steps/s after compilation (evaluation excluded), peak RSS and, on a GPU, peak GPU memory.
It also reports the untimed warm-up round's time, which for reppo_torch.py --compile holds
torch.compile's compilation from an empty cache.

Each measurement runs in a fresh subprocess so that its peak RSS is its own (that process's
alone: the compile workers that torch.compile may start for --torch-compile are not counted):

    python benchmarks/speed.py                        # both settings, reppo_jax.py
    python benchmarks/speed.py --settings cpu --iterations 20
    python benchmarks/speed.py --settings maniskill --implementations torch

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


def measure_jax(cli: list[str], iterations: int) -> dict:
    """Runs inside the child process: compile, warm up, then time `iterations` iterations."""
    import time

    import jax

    sys.path.insert(0, ROOT)
    import reppo_jax as rj

    args = rj.resolve_args(rj.parse_args(cli))
    runner = rj.Runner(args)
    state = runner.init()
    runner.compile_chunk(state, iterations)
    start = time.perf_counter()
    state, _ = runner.train_chunk(state, iterations)  # warm-up run of the same compiled chunk
    jax.block_until_ready(state)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = runner.train_chunk(state, iterations)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    return {
        "compile_s": runner.compile_seconds,
        "warmup_s": warmup_seconds,
        "sps": iterations * args.num_envs * args.num_steps / seconds,
        "seconds_per_iteration": seconds / iterations,
        "peak_rss_mib": rj.peak_rss_mb(),
        "peak_gpu_mib": jax_peak_gpu_mib(),
        "backend": jax.default_backend(),
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

    import torch

    sys.path.insert(0, ROOT)
    import reppo_torch as rt

    args = rt.resolve_args(rt.parse_args(cli))
    start = time.perf_counter()
    trainer = rt.Trainer(args, args.seed, rt.torch_device(args))
    setup_seconds = time.perf_counter() - start
    cuda = trainer.device.type == "cuda"
    start = time.perf_counter()
    for _ in range(iterations):  # warm-up round: with --compile, torch.compile compiles here
        trainer.train_iteration()
    if cuda:
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time finished work only
    warmup_seconds = time.perf_counter() - start
    # Each iteration ends by copying its metrics to the host (a CUDA sync too), so the time of
    # each one is known without adding a wait; they go into the JSON (iteration_s).
    times = []
    start = time.perf_counter()
    for _ in range(iterations):
        lap = time.perf_counter()
        trainer.train_iteration()
        times.append(time.perf_counter() - lap)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # On a GPU: PyTorch's peak plus, for Playground tasks, the peak of the JAX simulator.
    gpu_mib = None
    if cuda:
        jax_mib = jax_peak_gpu_mib() if trainer.env.suite == "dm_control" else None
        gpu_mib = torch.cuda.max_memory_allocated() / 2**20 + (jax_mib or 0.0)
    return {
        "compile_s": setup_seconds,  # no compilation by default: env set-up (JAX-side env step for Playground)
        "warmup_s": warmup_seconds,  # includes torch.compile's compilation, on a cold cache (see main)
        "sps": iterations * args.num_envs * args.num_steps / seconds,
        "seconds_per_iteration": seconds / iterations,
        "peak_rss_mib": rt.peak_rss_mb(),
        "peak_gpu_mib": gpu_mib,
        "backend": str(trainer.device),
        "iteration_s": times,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # inside the measuring subprocess
        impl, iterations, cli = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
        result = {"jax": measure_jax, "torch": measure_torch}[impl](cli, iterations)
        print("RESULT " + json.dumps(result))
        return
    options = tyro.cli(Options)
    pairs = [
        (setting, impl)
        for setting in options.settings
        for impl in options.implementations
        if not (impl == "jax" and setting in TORCH_ONLY)
    ]
    if not pairs:
        sys.exit("nothing to measure: the maniskill setting runs reppo_torch.py only (--implementations torch)")
    if "jax" in options.implementations and TORCH_ONLY & set(options.settings):
        print("reppo_jax.py runs Playground tasks only: the maniskill setting measures reppo_torch.py alone")
    results = []
    for setting, impl in pairs:
        iterations = options.iterations or (1 if setting == "paper" else 20)
        flags = []
        if impl == "torch":
            flags += ["--compile"] * options.torch_compile + ["--fused-adam"] * options.torch_fused_adam
            flags += ["--cuda-graphs"] * options.torch_cuda_graphs
        child = [sys.executable, __file__, "--child", impl, str(iterations), *SETTINGS[setting], *flags]
        # Each child compiles from nothing: torch.compile keeps its compiled code in a cache
        # folder that a second run would reuse, so an empty one per child makes the warm-up
        # round's time that of a first run on the machine (the JAX file keeps no such cache).
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
            done = subprocess.run(child, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{impl} {setting} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.split("RESULT ", 1)[1])
        result.update(setting=setting, implementation=impl, iterations=iterations, flags=flags)
        results.append(result)
        print(
            f"{impl:5s} {setting:9s}{''.join(' ' + flag for flag in flags)}: {result['sps']:8,.0f} env-steps/s  "
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


if __name__ == "__main__":
    main()
