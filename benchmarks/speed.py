"""Speed and memory of reppo_jax.py (and reppo_torch.py): compile time, steady-state
env-steps/s after compilation (evaluation excluded) and peak RSS.

Each measurement runs in a fresh subprocess so that its peak RSS is its own:

    python benchmarks/speed.py                        # both settings, reppo_jax.py
    python benchmarks/speed.py --settings cpu --iterations 20

Settings: 'paper' = SPEC defaults on CheetahRun (1024 envs x 32 steps, 16 minibatches,
8 epochs, hidden 512); 'cpu' = --preset cpu on CartpoleBalance (64 x 32, 4 minibatches,
8 epochs, hidden 256).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "paper": ["--env-id", "CheetahRun", "--preset", "paper"],
    "cpu": ["--env-id", "CartpoleBalance", "--preset", "cpu"],
}


@dataclass
class Options:
    settings: list[Literal["paper", "cpu"]] = field(default_factory=lambda: ["paper", "cpu"])
    """which settings to measure"""
    implementations: list[Literal["jax", "torch"]] = field(default_factory=lambda: ["jax"])
    """which files to measure"""
    iterations: int = 0
    """iterations per timed chunk (the same chunk runs once untimed first); 0 picks 1 (paper) or 20 (cpu)"""
    json_out: str | None = None
    """also write the results to this JSON file"""


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
    state, _ = runner.train_chunk(state, iterations)  # warm-up run of the same compiled chunk
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, metrics = runner.train_chunk(state, iterations)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    return {
        "compile_s": runner.compile_seconds,
        "sps": iterations * args.num_envs * args.num_steps / seconds,
        "seconds_per_iteration": seconds / iterations,
        "peak_rss_mib": rj.peak_rss_mb(),
        "backend": jax.default_backend(),
    }


def measure_torch(cli: list[str], iterations: int) -> dict:
    """The same protocol for reppo_torch.py: build the Trainer, one untimed warm-up round of
    `iterations` iterations, then a timed round (evaluation excluded in both files)."""
    import time

    sys.path.insert(0, ROOT)
    import reppo_torch as rt

    args = rt.resolve_args(rt.parse_args(cli))
    start = time.perf_counter()
    trainer = rt.Trainer(args, args.seed, rt.torch_device(args))
    setup_seconds = time.perf_counter() - start
    for _ in range(iterations):
        trainer.train_iteration()
    start = time.perf_counter()
    for _ in range(iterations):
        trainer.train_iteration()
    seconds = time.perf_counter() - start
    return {
        "compile_s": setup_seconds,  # no compilation by default: env set-up (JAX-side env step for Playground)
        "sps": iterations * args.num_envs * args.num_steps / seconds,
        "seconds_per_iteration": seconds / iterations,
        "peak_rss_mib": rt.peak_rss_mb(),
        "backend": str(trainer.device),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # inside the measuring subprocess
        impl, iterations, cli = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
        result = {"jax": measure_jax, "torch": measure_torch}[impl](cli, iterations)
        print("RESULT " + json.dumps(result))
        return
    options = tyro.cli(Options)
    results = []
    for setting in options.settings:
        iterations = options.iterations or (1 if setting == "paper" else 20)
        for impl in options.implementations:
            child = [sys.executable, __file__, "--child", impl, str(iterations), *SETTINGS[setting]]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.split("RESULT ", 1)[1])
            result.update(setting=setting, implementation=impl, iterations=iterations)
            results.append(result)
            print(
                f"{impl:5s} {setting:5s}: {result['sps']:8,.0f} env-steps/s  "
                f"({result['seconds_per_iteration'] * 1000:,.0f} ms/iteration)  compile {result['compile_s']:5.1f} s  "
                f"peak RSS {result['peak_rss_mib']:6,.0f} MiB",
                flush=True,
            )
    if options.json_out:
        with open(options.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
