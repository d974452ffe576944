"""Brax PPO baseline on a MuJoCo Playground DM Control task, writing one result CSV.

The agent is `brax.training.agents.ppo.train` with MuJoCo Playground's standard DM Control
configuration, `mujoco_playground.config.dm_control_suite_params.brax_ppo_config(env_id)`,
the MJX engine (`impl="jax"`) and `mujoco_playground.wrapper.wrap_for_brax_training`:

    python benchmarks/brax_ppo.py --env-id CartpoleBalance --seed 1 --budget 1000000 \\
        --out benchmarks/results/brax_ppo/CartpoleBalance/seed1.csv

The standard configuration is tuned for 60M steps on a GPU: 2048 envs, and one PPO update
consumes batch_size x num_minibatches x unroll_length = 1024 x 32 x 30 = 983,040 env steps, so a
1M-step budget would be a single update. Changes made for a CPU budget (all printed and stored
in the sidecar JSON next to the CSV):

- num_timesteps = the budget, rounded DOWN to a whole number of eval periods (Brax requires the
  total to be reached exactly by whole training steps); num_evals so that there are about
  `--num-evals` evaluation points including step 0;
- num_envs 2048 -> `--num-envs` (64, as reppo_jax.py --preset cpu) and batch_size scaled by the
  same factor (1024 -> 32), so that an update uses the same number of sequential rollouts
  (16) and the same number of minibatches (32) as the standard configuration, with
  32x less data: 30,720 env steps per update;
- num_resets_per_eval 10 -> 1 (the standard value splits each of its 6M-step eval periods into
  10 training epochs with an env reset after each; here one eval period is 61,440 steps: 2 updates of 30,720);
- num_eval_envs 128 (Brax default) -> 16 and deterministic_eval=True, the evaluation protocol
  of reppo_jax.py (16 episodes of the deterministic policy).
Everything else (learning rate, entropy cost, discount, reward scaling, unroll length,
epochs per batch, networks, observation normalisation, episode length) is the configuration's.

Wall clock. Brax reports `training/walltime`, the time spent in training epochs (evaluation
excluded) but including compilation: on this setup the first AND the second training epoch
each take about as long as a compilation (Brax compiles its epoch again at the second call).
This script writes `wall_seconds` = training/walltime minus an estimate of that compilation
(for each of the first two epochs, its duration minus the median duration of the later epochs,
which train the same number of steps),
and also the raw `wall_seconds_incl_compile` and `elapsed_seconds` (time since `train()` was
called: env setup, compilation and evaluation included).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import tyro
from grid import write_result_csv  # the same atomic CSV writer as the grid (same folder)

RESULT_COLUMNS = [
    "env_steps",
    "wall_seconds",
    "eval_return",
    "eval_return_std",
    "wall_seconds_incl_compile",
    "elapsed_seconds",
]


@dataclass
class Options:
    env_id: str = "CartpoleBalance"
    """MuJoCo Playground DM Control task"""
    seed: int = 1
    """seed passed to brax's ppo.train"""
    budget: int = 1_000_000
    """environment steps of training (rounded down to whole eval periods)"""
    out: str | None = None
    """result CSV; None: benchmarks/results/brax_ppo/{env_id}/seed{seed}.csv"""
    num_evals: int = 20
    """evaluation points wanted, including step 0 (fewer if the budget holds fewer updates)"""
    num_envs: int = 64
    """parallel training envs (standard configuration: 2048); batch_size is scaled with it"""
    num_eval_envs: int = 16
    """evaluation episodes per evaluation point (as reppo_jax.py)"""


def expose_device_put_replicated() -> None:
    """Brax 0.14.2 calls jax.device_put_replicated, which jax 0.10 dropped from the public API."""
    import jax

    if hasattr(jax, "device_put_replicated"):
        return
    import jax._src.api as _api

    if hasattr(_api, "device_put_replicated"):
        jax.device_put_replicated = _api.device_put_replicated
        return

    def device_put_replicated(x, devices):  # the old public function, for one host
        import jax.numpy as jnp

        def stack(leaf):
            return jax.device_put_sharded([jnp.asarray(leaf)] * len(devices), devices)

        return jax.tree.map(stack, x)

    jax.device_put_replicated = device_put_replicated


def ppo_schedule(config: dict, budget: int, num_evals: int, num_envs: int) -> dict:
    """The changed entries of the standard configuration for this budget (see module doc)."""
    scale = num_envs / config["num_envs"]
    batch_size = max(1, round(config["batch_size"] * scale))
    num_minibatches = config["num_minibatches"]
    if (batch_size * num_minibatches) % num_envs:
        raise ValueError(f"batch_size {batch_size} x num_minibatches {num_minibatches} not divisible by {num_envs}")
    steps_per_update = batch_size * num_minibatches * config["unroll_length"] * config["action_repeat"]
    updates = budget // steps_per_update
    if updates < 1:
        raise ValueError(f"budget {budget} is smaller than one PPO update ({steps_per_update} env steps)")
    periods_wanted = max(num_evals - 1, 1)
    updates_per_period = math.ceil(updates / periods_wanted)
    periods = updates // updates_per_period
    return {
        "num_envs": num_envs,
        "batch_size": batch_size,
        "num_timesteps": periods * updates_per_period * steps_per_update,
        "num_evals": periods + 1,
        "num_resets_per_eval": 1,
        "steps_per_update": steps_per_update,
        "updates_per_eval": updates_per_period,
    }


COMPILE_EPOCHS = 2  # observed: Brax's second training epoch is as slow as the first (a second compilation)


def compile_excess(walltimes: list[float], compile_epochs: int = COMPILE_EPOCHS) -> list[float]:
    """Per training epoch, the seconds attributed to compilation, from the cumulative
    training/walltime at each eval: for the first `compile_epochs` epochs, their duration minus
    the median duration of the later epochs (which train the same number of steps); 0 after."""
    durations = [b - a for a, b in zip([0.0] + walltimes[:-1], walltimes)]
    if len(durations) <= compile_epochs:
        return [0.0] * len(durations)
    steady = float(statistics.median(durations[compile_epochs:]))
    return [max(0.0, d - steady) if i < compile_epochs else 0.0 for i, d in enumerate(durations)]


def compile_estimate(walltimes: list[float], compile_epochs: int = COMPILE_EPOCHS) -> float:
    return sum(compile_excess(walltimes, compile_epochs))


def rows_with_wall_seconds(raw: list[dict]) -> tuple[list[dict], float]:
    """Fill wall_seconds (compilation estimate removed where it happened) in rows holding the raw columns."""
    excess = iter(compile_excess([r["wall_seconds_incl_compile"] for r in raw if r["env_steps"] > 0]))
    rows, removed = [], 0.0
    for r in raw:
        if r["env_steps"] > 0:
            removed += next(excess)
        wall = max(0.0, r["wall_seconds_incl_compile"] - removed) if r["env_steps"] > 0 else 0.0
        rows.append({**r, "wall_seconds": wall})
    return rows, removed


def main(opts: Options) -> str:
    out = opts.out or os.path.join("benchmarks", "results", "brax_ppo", opts.env_id, f"seed{opts.seed}.csv")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    expose_device_put_replicated()
    import brax
    import mujoco_playground
    from brax.training.agents.ppo import networks as ppo_networks
    from brax.training.agents.ppo import train as ppo
    from mujoco_playground import registry, wrapper
    from mujoco_playground.config import dm_control_suite_params

    config = dm_control_suite_params.brax_ppo_config(opts.env_id).to_dict()
    standard = dict(config)
    changes = ppo_schedule(config, opts.budget, opts.num_evals, opts.num_envs)
    config.update({k: changes[k] for k in ["num_envs", "batch_size", "num_timesteps", "num_evals"]})
    config["num_resets_per_eval"] = changes["num_resets_per_eval"]
    config["num_eval_envs"] = opts.num_eval_envs
    config["deterministic_eval"] = True
    network_kwargs = config.pop("network_factory", None) or {}
    print(f"brax_ppo {opts.env_id} seed {opts.seed}: {json.dumps({k: config[k] for k in sorted(config)})}", flush=True)

    env = registry.load(opts.env_id, config_overrides={"impl": "jax"})
    eval_env = registry.load(opts.env_id, config_overrides={"impl": "jax"})
    raw: list[dict] = []
    partial = out + ".partial"
    start = time.perf_counter()

    def progress_fn(step: int, metrics: dict) -> None:
        row = {
            "env_steps": int(step),
            "eval_return": float(metrics["eval/episode_reward"]),
            "eval_return_std": float(metrics.get("eval/episode_reward_std", float("nan"))),
            "wall_seconds_incl_compile": float(metrics.get("training/walltime", 0.0)),
            "elapsed_seconds": time.perf_counter() - start,
        }
        raw.append(row)
        write_result_csv(partial, raw, RESULT_COLUMNS)  # readable while the job runs
        print(
            f"step {step:>10,}  eval_return {row['eval_return']:8.2f}  train_s {row['wall_seconds_incl_compile']:7.1f}"
            f"  elapsed_s {row['elapsed_seconds']:7.1f}  sps {float(metrics.get('training/sps', float('nan'))):,.0f}",
            flush=True,
        )

    ppo.train(
        environment=env,
        eval_env=eval_env,
        wrap_env_fn=wrapper.wrap_for_brax_training,
        network_factory=functools.partial(ppo_networks.make_ppo_networks, **network_kwargs),
        progress_fn=progress_fn,
        seed=opts.seed,
        **config,
    )
    total_s = time.perf_counter() - start
    rows, compile_s = rows_with_wall_seconds(raw)
    train_steps = rows[-1]["env_steps"]
    steady_sps = train_steps / rows[-1]["wall_seconds"] if rows[-1]["wall_seconds"] > 0 else float("nan")
    meta = {
        "implementation": "brax_ppo",
        "env_id": opts.env_id,
        "seed": opts.seed,
        "budget": opts.budget,
        "options": dataclasses.asdict(opts),
        "standard_config": standard,
        "config_used": {**config, "network_factory": network_kwargs},
        "schedule": changes,
        "compile_seconds_estimate": compile_s,
        "steady_sps": steady_sps,
        "total_seconds": total_s,
        "wall_seconds_method": "training/walltime minus, for epochs 1-2, (epoch - median later epoch); eval excluded",
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "brax": brax.__version__,
            "mujoco_playground": getattr(mujoco_playground, "__version__", "unknown"),
        },
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
        "command": " ".join(sys.argv),
    }
    with open(out[: -len(".csv")] + ".json" if out.endswith(".csv") else out + ".json", "w") as f:
        json.dump(meta, f, indent=2, default=str)
    write_result_csv(out, rows, RESULT_COLUMNS)
    if os.path.exists(partial):
        os.remove(partial)
    print(
        f"done: {train_steps:,} steps in {total_s:.0f} s, final eval return {rows[-1]['eval_return']:.1f}, "
        f"steady SPS {steady_sps:,.0f} (compile estimate {compile_s:.1f} s) -> {out}",
        flush=True,
    )
    return out


if __name__ == "__main__":
    main(tyro.cli(Options))
