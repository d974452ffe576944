"""REPPO in one file: plain eager PyTorch on ManiSkill3 and MuJoCo Playground.

Relative Entropy Pathwise Policy Optimization (Voelcker et al., ICLR 2026,
https://arxiv.org/abs/2507.11019) is an *on-policy* actor-critic for continuous control.
Like PPO it learns only from the latest rollout (no replay buffer); unlike PPO it does
not use the high-variance score-function (likelihood-ratio) gradient. It learns an
action-conditioned critic Q(s, a) from the rollout and improves the policy with
*pathwise* gradients through Q, kept stable by a KL trust region and an entropy target,
each enforced with a learned Lagrange multiplier.

The algorithm at a glance (one call of ``Trainer.train_iteration``)::

    for t in 0..T-1 (all N envs at once):                         # collect_rollout
        a_t ~ pi(s_t), step the env, keep the TRUE final obs s'_t
        a'_t ~ pi(s'_t);  v'_t = Q(s'_t, a'_t);  z'_t = features(s'_t, a'_t)
        soft_reward_t = r_t - (1 - terminated_t) * gamma * alpha * log pi(a'_t | s'_t)
    update the observation normaliser with the rollout              # normalizer_update
    G = soft_lambda_returns(soft_reward, v', terminated, truncated) # soft TD(lambda)
    pi_old <- pi   (its mean and std on the batch, fixed from here on)
    for epoch in 1..E, for minibatch in a fresh permutation:        # update_minibatch
        critic step on critic_loss(...)   (HL-Gauss cross-entropy to G + auxiliary loss)
        actor step  on actor_loss(...)    (pathwise, KL-clipped; alpha and beta losses)

Run it::

    python reppo_torch.py --env-id CartpoleBalance --preset cpu --total-timesteps 500000
    python reppo_torch.py --env-id PickCube-v1              # ManiSkill3 (GPU sim if CUDA, else 1 CPU env)
    python reppo_torch.py --help                            # every flag

Sections (the same, in the same order, as in ``reppo_jax.py``):
    1. Args   2. Environment   3. Math   4. Networks   5. Losses
    6. Collect / Learn / Evaluate   7. Logging & checkpoints   8. main

The contract for every line is the project's ``SPEC.md``, cited below as "SPEC section N"
(it is not shipped here: ``docs/reppo.md`` maps those numbers to its own headings, and
explains each equation and each ``IMPLEMENTATION DETAIL n`` tag below; the numbers are the
same as in ``reppo_jax.py``). Notes for readers who know ``reppo_jax.py``: where JAX threads an
explicit random key, this file draws training's random numbers (actions, permutations, the
losses' noise) from one ``torch.Generator`` per seed; where JAX fuses a whole iteration into
one compiled ``lax.scan``, this file runs an ordinary Python loop over pre-allocated tensors;
the MuJoCo Playground physics still runs in JAX (it is written in JAX) and its arrays cross to
PyTorch through DLPack, without a copy where both sides use the same device.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from torch.optim.adam import adam as functional_adam  # what torch.optim.Adam.step() calls

# Playground tasks simulate in JAX inside this process, beside PyTorch. On a GPU, JAX would
# by default reserve 75 % of the GPU's memory when it first touches it, leaving PyTorch the
# rest; this makes JAX allocate what it uses instead. Set before JAX is first imported
# (the variable is read when JAX starts its GPU client); an explicit value of yours wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# ======================================================================================
# 1. Args
# ======================================================================================


@dataclass
class Args:
    """REPPO hyperparameters. Defaults are the paper's DM Control "small data" setting
    (SPEC section 11); ``--preset cpu`` swaps in a setting that learns on a laptop CPU."""

    # --- experiment -------------------------------------------------------------------
    exp_name: str = "reppo_torch"
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment; with --num-seeds K the seeds are seed, seed+1, ..., seed+K-1"""
    num_seeds: int = 1
    """number of independent seeds, trained one after another (one run folder each)"""
    preset: Literal["paper", "cpu"] = "paper"
    """'paper': SPEC defaults (1024 envs, hidden 512); 'cpu': 64 envs, 4 minibatches, hidden 256, log every 20"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "reppo"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team or user); None uses your default entity"""
    wandb_mode: Literal["online", "offline"] = "online"
    """'offline' writes the wandb run locally (sync it later with `wandb sync`)"""
    save_model: bool = False
    """write {runs_dir}/{run_name}/checkpoint.pt at every log point and at the end"""
    checkpoint: str | None = None
    """path of a checkpoint to evaluate (with --eval-only)"""
    eval_only: bool = False
    """only evaluate --checkpoint, do not train"""
    resume: str | None = None
    """path of a checkpoint to continue training from (its run folder and arguments are reused;
    --total-timesteps given on the command line may extend the run)"""
    runs_dir: str = "runs"
    """folder under which each run writes runs_dir/{run_name}/"""
    progress: bool = True
    """show a progress bar on stderr"""

    # --- environment ------------------------------------------------------------------
    env_id: str = "CheetahRun"
    """MuJoCo Playground DM Control task (CheetahRun, CartpoleBalance, ...) or ManiSkill3 task
    (PickCube-v1, PushCube-v1, ...)"""
    impl: Literal["auto", "jax", "warp"] = "auto"
    """MuJoCo engine of Playground tasks; 'auto' picks 'jax' (MJX), see make_playground_env"""
    episode_length: int | None = None
    """time limit of an episode; None takes the suite's (1000 for DM Control, the task's for ManiSkill)"""
    num_eval_envs: int = 16
    """number of evaluation episodes (one per evaluation env; ManiSkill's CPU simulator plays them one
    after another on its one env)"""
    control_mode: str = "pd_joint_delta_pos"
    """ManiSkill3 controller (the authors' choice); one with its own action bounds (pd_joint_pos,
    pd_ee_pose) gets the policy's (-1, 1) mapped onto them; ignored for Playground tasks"""
    ignore_terminations: bool = False
    """ManiSkill3 training episodes end only at the time limit; by default (the authors' setting)
    the task's termination (success, or failure where defined) ends one too. Evaluation episodes
    always run the full length; ignored for Playground tasks"""

    # --- collection -------------------------------------------------------------------
    total_timesteps: int = 50_000_000
    """total environment steps of training (summed over envs, per seed)"""
    num_envs: int = 1024
    """number of parallel environments (ManiSkill without CUDA: always 1, the CPU simulator's limit)"""
    num_steps: int = 32
    """rollout length per env per iteration (T)"""
    gamma: float | None = None
    """discount factor; None takes the suite's (0.99 for DM Control, 1 - 10/episode_length for ManiSkill)"""
    lmbda: float = 0.95
    """lambda of the soft TD(lambda) targets"""

    # --- critic -----------------------------------------------------------------------
    critic_hidden: int = 512
    """width of the critic"""
    num_bins: int = 151
    """number of bins of the categorical (HL-Gauss) critic"""
    vmin: float | None = None
    """lowest value of the critic's support; None takes the suite's (0 DM Control, -15 ManiSkill)"""
    vmax: float | None = None
    """highest value of the critic's support; None takes the suite's (150 DM Control, 15 ManiSkill)"""
    aux_coef: float = 1.0
    """weight of the auxiliary (reward and next-feature prediction) loss"""
    num_value_samples: int = 1
    """K next actions a' ~ pi(s'): the next-state value v' and the soft reward's log-pi term
    average over them, the aux target z' uses the first"""

    # --- actor, KL and entropy ----------------------------------------------------------
    actor_hidden: int = 512
    """width of the actor"""
    min_std: float = 0.1
    """floor added to the policy's standard deviation"""
    kl_bound: float = 0.1
    """trust region: largest KL(pi_old || pi) per state before the KL penalty takes over"""
    kl_start: float = 0.01
    """initial value of the KL Lagrange multiplier beta"""
    num_kl_samples: int = 16
    """M, Monte Carlo samples of the KL estimate per state"""
    ent_start: float = 0.01
    """initial value of the entropy temperature alpha"""
    ent_target_mult: float = 0.5
    """entropy target is -ent_target_mult * action_size"""

    # --- optimisation -----------------------------------------------------------------
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critic"""
    max_grad_norm: float = 0.5
    """global-norm gradient clipping"""
    num_mini_batches: int = 16
    """minibatches per epoch"""
    num_epochs: int = 8
    """passes over the rollout per iteration"""

    # --- PyTorch speed switches (never change the math) --------------------------------
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the networks live; 'auto' is CUDA when available"""
    compile: bool = False
    """torch.compile the collection step (act, bootstrap) and the whole minibatch update (both
    losses, their gradients, clipping and both Adam steps) as one graph"""
    fused_adam: bool = False
    """Adam's fused kernel, on CPU or CUDA (the same update rule in one kernel per step instead of
    a loop over parameters); under --compile the compiled update holds Adam itself"""
    cuda_graphs: bool = False
    """CUDA only: record the whole minibatch update (both losses, their gradients, clipping and
    both Adam steps, with Adam's capturable mode) and collection's two network steps (act,
    bootstrap) once each as a CUDA graph and replay them: many small kernels launched as one;
    the same math on the same random numbers (tested equal to eager updates and collection on
    a GPU)"""
    torch_threads: int = 0
    """CPU threads of PyTorch's own kernels; 0 keeps PyTorch's default (one per core). On a CPU
    shared with other busy processes pass 1: on 2 cores beside a reppo_jax.py run, an eager update
    at --preset cpu took 49-783 ms with PyTorch's two threads and 33-42 ms with one (21 and 34 ms
    alone; docs/results.md)"""

    # --- logging ----------------------------------------------------------------------
    log_interval: int = 10
    """training iterations between logging, evaluation and checkpointing"""


# `--preset cpu`: a small setting for a CPU (64 envs x 32 steps, 4 minibatches, 8 epochs,
# hidden 256, a log point every 20 iterations); the other hyperparameters as SPEC section 11.
# The same table as reppo_jax.py.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": {
        "num_envs": 64,
        "num_mini_batches": 4,
        "actor_hidden": 256,
        "critic_hidden": 256,
        "log_interval": 20,
    },
}

# Per-suite defaults (SPEC section 11) for fields left at None. ManiSkill's gamma and
# episode length depend on the task and are filled in resolve_args.
DM_CONTROL_DEFAULTS = {"vmin": 0.0, "vmax": 150.0, "gamma": 0.99, "episode_length": 1000}
MANISKILL_DEFAULTS = {"vmin": -15.0, "vmax": 15.0}


class UserError(Exception):
    """Bad input (flags, a checkpoint, a task that does not load) or a run that cannot go on
    (non-finite losses): printed as one clear message, exit code 2, no traceback."""


def parse_args(argv: list[str] | None = None) -> Args:
    """Parse the command line with tyro; ``--preset`` changes the defaults shown and used,
    explicit flags always win over the preset."""
    argv = sys.argv[1:] if argv is None else list(argv)
    preset = "paper"
    for i, token in enumerate(argv):
        if token == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif token.startswith("--preset="):
            preset = token.split("=", 1)[1]
    overrides = PRESETS.get(preset, {})  # an unknown preset is reported by tyro itself
    default = dataclasses.replace(Args(), **overrides)
    return tyro.cli(Args, default=default, args=argv, description=__doc__.split("\n\n")[0])


def resolve_args(args: Args) -> Args:
    """Fill suite defaults and check derived sizes, with a clear message on bad input."""
    suite = env_suite(args.env_id)  # raises UserError listing the valid ids
    if suite == "dm_control":
        filled = {k: v for k, v in DM_CONTROL_DEFAULTS.items() if getattr(args, k) is None}
    else:
        check_maniskill_assets(args.env_id)
        filled = {k: v for k, v in MANISKILL_DEFAULTS.items() if getattr(args, k) is None}
        if args.episode_length is None:
            filled["episode_length"] = maniskill_episode_length(args.env_id)
        if args.gamma is None:
            # The authors' discount for short manipulation episodes: an effective horizon
            # of about episode_length / 10 steps (gamma = 0.8 for 50-step episodes).
            filled["gamma"] = 1.0 - 10.0 / (args.episode_length or filled["episode_length"])
    args = dataclasses.replace(args, **filled)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch finds no CUDA device")
    if args.cuda_graphs and torch_device(args).type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device (CUDA graphs replay GPU kernels); leave it off on the CPU")
    if suite == "maniskill" and torch_device(args).type != "cuda" and args.num_envs != 1:
        # physx_cpu simulates one env per ManiSkill env object (num_envs=1; gym.make refuses
        # more, see .ci/maniskill_notes.md).
        if args.resume is not None:  # a run of many envs cannot go on with one (its step count)
            raise UserError(
                f"the checkpoint ran {args.num_envs} envs on ManiSkill's GPU simulator; without a CUDA device "
                "(or with --device cpu) the CPU simulator runs one: resume it on a CUDA device "
                "(--eval-only works anywhere)"
            )
        args = dataclasses.replace(args, num_envs=1)
    batch_size = args.num_envs * args.num_steps
    positive = ["num_envs", "num_steps", "num_mini_batches", "num_epochs", "num_seeds"]
    positive += ["num_eval_envs", "num_value_samples", "num_kl_samples", "log_interval"]
    for name in positive + ["episode_length", "actor_hidden", "critic_hidden"]:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    # alpha and beta are learned in log space, so they start above 0.
    for name in ["ent_start", "kl_start", "kl_bound", "max_grad_norm"]:
        if not getattr(args, name) > 0:  # (a NaN fails too)
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ["learning_rate", "min_std", "aux_coef"]:  # 0: a frozen learner, no std floor, no aux loss
        if not getattr(args, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.torch_threads < 0:
        raise UserError(f"--torch-threads must be >= 0 (0: PyTorch's default), got {args.torch_threads}")
    # The sizes of training (not checked for --eval-only: a ManiSkill checkpoint of many envs
    # evaluated without CUDA has num_envs forced to one above, and evaluation uses none of them).
    if batch_size % args.num_mini_batches != 0 and not args.eval_only:
        raise UserError(
            f"num_envs * num_steps = {args.num_envs} * {args.num_steps} = {batch_size} "
            f"is not divisible by --num-mini-batches {args.num_mini_batches}"
        )
    if args.total_timesteps < batch_size and not args.eval_only:
        raise UserError(
            f"--total-timesteps {args.total_timesteps} is smaller than one iteration "
            f"(num_envs * num_steps = {batch_size})"
        )
    if not args.vmin < args.vmax or args.num_bins < 2:
        raise UserError(
            f"need --vmin < --vmax and --num-bins >= 2, got --vmin {args.vmin}, --vmax {args.vmax}, "
            f"--num-bins {args.num_bins}"
        )
    if not -(2**31) <= args.seed <= 2**31 - args.num_seeds:  # the same range as reppo_jax.py's int32 seeds
        raise UserError(f"--seed must be in [-2**31, 2**31 - num_seeds], got {args.seed}")
    if not 0.0 < args.gamma <= 1.0:
        default = " (ManiSkill's default 1 - 10 / episode_length needs episodes of more than 10 steps)"
        raise UserError(f"--gamma must be in (0, 1], got {args.gamma}" + (default if suite == "maniskill" else ""))
    if not 0.0 <= args.lmbda <= 1.0:
        raise UserError(f"--lmbda must be in [0, 1], got {args.lmbda}")
    return args


def torch_device(args: Args) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


# ======================================================================================
# 2. Environment
# ======================================================================================
# Both env families are wrapped into the same small interface, all tensors on the
# training device:  reset(randomize_steps) -> obs (N, O);  step(action (N, A)) -> StepResult.


class StepResult(NamedTuple):
    """What one vectorised step hands back (all shaped (N, ...), torch tensors)."""

    next_obs: torch.Tensor  # what the policy sees next: a new episode's first obs where one ended and was reset
    final_obs: torch.Tensor  # the TRUE observation after this action, even where one ended
    reward: torch.Tensor
    terminated: torch.Tensor  # float 0/1: a real terminal state, no bootstrap
    truncated: torch.Tensor  # float 0/1: time limit (ManiSkill: by default any end, see ManiSkillEnv); bootstrap
    episode_done: torch.Tensor  # bool: a complete episode (started at step 0) ended here
    episode_return: torch.Tensor  # its return (valid where episode_done)
    episode_length: torch.Tensor  # its length (valid where episode_done)
    success_once: torch.Tensor  # ManiSkill: success at any step of that episode (else zeros)
    # ManiSkill envs that ignore terminations (evaluation; training with --ignore-terminations):
    # success at its last step; else zeros (ManiSkill records it only then; training reads none)
    success_at_end: torch.Tensor


# --- which suite an --env-id belongs to -----------------------------------------------


def _dm_control_envs() -> tuple[str, ...]:
    from mujoco_playground import registry

    return tuple(registry.dm_control_suite.ALL_ENVS)


def _maniskill_envs() -> tuple[str, ...]:
    """ManiSkill3's registered task ids (empty when mani_skill is not installed)."""
    try:
        import mani_skill.envs  # noqa: F401  (the import registers the tasks)
        from mani_skill.utils.registration import REGISTERED_ENVS
    except ImportError:
        return ()
    return tuple(REGISTERED_ENVS)


def env_suite(env_id: str) -> Literal["dm_control", "maniskill"]:
    """'dm_control' (MuJoCo Playground via the JAX bridge) or 'maniskill'; UserError otherwise."""
    if "-v" not in env_id and env_id in _dm_control_envs():
        return "dm_control"
    if "-v" in env_id and env_id in _maniskill_envs():
        return "maniskill"
    raise UserError(unsupported_env_message(env_id))


def unsupported_env_message(env_id: str) -> str:
    from mujoco_playground import registry

    dm_control = ", ".join(sorted(_dm_control_envs()))
    maniskill = ", ".join(sorted(_maniskill_envs())) or "(not installed: pip install mani_skill==3.0.1)"
    if env_id in registry.ALL_ENVS:
        return (
            f"'{env_id}' is a MuJoCo Playground locomotion/manipulation task. This file supports "
            f"the DM Control suite only; those tasks also need their robot assets (MuJoCo "
            f"Menagerie) downloaded from the internet on first use. DM Control tasks: {dm_control}"
        )
    return f"unknown --env-id '{env_id}'. Valid DM Control tasks: {dm_control}. Valid ManiSkill3 tasks: {maniskill}"


# --- MuJoCo Playground through a DLPack JAX <-> PyTorch bridge -------------------------


def make_playground_env(env_id: str, impl: str, episode_length: int):
    """Load a Playground DM Control task with an explicit physics engine.

    Playground's DM Control tasks default to ``impl="warp"`` (MuJoCo Warp). We pick
    ``impl="jax"`` (MJX written in JAX) for 'auto', as reppo_jax.py does: it is faster than
    warp on a CPU (1.7-4.2x through reppo_jax.py's wrapper on 2 cores; docs/reppo.md) and it is the engine
    behind the paper's runs. ``--impl warp`` works through the bridge (tests/test_parity.py:
    the same steps as MJX on CartpoleBalance).
    """
    from mujoco_playground import registry

    engine = "jax" if impl == "auto" else impl
    try:
        return registry.load(env_id, config_overrides={"impl": engine, "episode_length": episode_length})
    except Exception as error:  # Playground raises many kinds; the user needs one message
        raise UserError(f"could not load '{env_id}' with impl='{engine}': {error}") from error


def make_jax_auto_reset(env, num_envs: int, episode_length: int, auto_reset: bool = True):
    """The JAX side of the bridge: N auto-resetting copies of a Playground env that keep the
    true final observation -- the same semantics as ``AutoResetEnv`` in reppo_jax.py,
    written again here so that this file imports nothing from its twin.

    Returns a jitted ``reset(key, randomize_steps) -> carry`` and a plain (to be jitted by
    the caller) ``step(carry, action) -> (carry, outputs)``; ``carry`` is a tuple (a JAX pytree) of
    (physics state, obs, step_count, episode_return, episode_length, from_reset, reset_pool,
    pool_fresh, key) and never leaves JAX; ``outputs`` are the arrays handed to PyTorch.
    """
    import jax
    import jax.numpy as jnp

    def reset(key, randomize_steps: bool):
        key, key_reset, key_steps = jax.random.split(key, 3)
        physics = jax.vmap(env.reset)(jax.random.split(key_reset, num_envs))
        # IMPLEMENTATION DETAIL 4: random initial step counters in [0, episode_length),
        # so that the N envs do not all hit the time limit (and reset) on the same step.
        if randomize_steps:
            steps = jax.random.randint(key_steps, (num_envs,), 0, episode_length, jnp.int32)
        else:
            steps = jnp.zeros(num_envs, jnp.int32)
        zeros = jnp.zeros(num_envs, jnp.float32)  # dtypes explicit: torch gets float32 even under JAX_ENABLE_X64
        # IMPLEMENTATION DETAIL 10: an episode whose counter starts late is cut short; it is
        # not a complete episode, so its return is not logged in charts/episodic_return
        # (from_reset stays False until the env's first auto-reset: its first episode starts
        # from a real reset of the physics, but with its step counter part-way through).
        from_reset = jnp.full(num_envs, not randomize_steps)
        # The reset pool starts empty (no slot fresh; `physics` only gives it its shape):
        # step fills it when first needed, so evaluation, which never auto-resets, pays
        # nothing for it.
        no_slot = jnp.zeros(num_envs, bool)
        return (physics, physics.obs, steps, zeros, zeros.astype(jnp.int32), from_reset, physics, no_slot, key)

    def refill_pool(pool, pool_fresh, done, key):
        """If an env finished whose pool slot is already used, replace the whole pool by N
        fresh episodes, made in one batched reset (slot i for env i); else keep it. (A while
        loop that runs at most once, as in reppo_jax.py, where it must survive jax.vmap.)"""

        def fill(carry):
            pool = jax.vmap(env.reset)(jax.random.split(key, num_envs))
            return jnp.zeros((), bool), pool, jnp.ones(num_envs, bool)

        needed = (done & ~pool_fresh).any()
        _, pool, pool_fresh = jax.lax.while_loop(lambda carry: carry[0], fill, (needed, pool, pool_fresh))
        return pool, pool_fresh

    def step(carry, action):
        physics, _, step_count, episode_return, episode_length_so_far, from_reset, pool, pool_fresh, key = carry
        key, key_reset = jax.random.split(key)
        stepped = jax.vmap(env.step)(physics, action)
        # DM Control tasks only "terminate" when the physics diverges: Playground flags a NaN
        # state; a state that overflowed to inf without a NaN (a non-finite observation or
        # reward with done = 0) has diverged too, and is treated the same.
        obs_finite, reward_finite = jnp.isfinite(stepped.obs), jnp.isfinite(stepped.reward)
        terminated = (stepped.done > 0) | ~(obs_finite.all(axis=-1) & reward_finite)
        step_count = step_count + 1
        truncated = (step_count >= episode_length) & ~terminated
        done = terminated | truncated
        # IMPLEMENTATION DETAIL 5: the true final observation of an episode is kept (the
        # stock Playground wrapper overwrites it with the next episode's first one), so a
        # time-limit step bootstraps from its real next state instead of being masked out.
        # A diverged state (Playground's NaN flag, or a non-finite observation or reward) is
        # never bootstrapped from (terminated); zeroing its non-finite entries keeps NaN out
        # of the networks and the statistics.
        final_obs = jnp.where(obs_finite, stepped.obs, 0.0)
        reward = jnp.where(reward_finite, stepped.reward, 0.0)
        episode_return = episode_return + reward
        episode_length_so_far = episode_length_so_far + 1

        if auto_reset:
            # IMPLEMENTATION DETAIL 11: a finished env continues from its own slot of a pool
            # of fresh episodes, and the pool is remade for all N envs at once, only when a
            # finished env finds its slot used. A Playground reset can be far dearer than a
            # step (CheetahRun's runs 200 physics steps to let the cheetah settle), and on a
            # GPU its cost is the latency of those 200 steps in sequence, whatever the number
            # of envs reset. With random step counters about N / episode_length envs finish
            # on every step, so resetting just those inside the step meant a 200-step reset
            # on nearly every step (on one H200 GPU, reppo_jax.py ran the paper setting on
            # CheetahRun at 10.5k env-steps/s that way and at 228k with this pool).
            # Resetting all N on every step would cost 200 * N physics steps per step (~7.8 s
            # for 1024 cheetahs on a 2-core CPU). An env hits its time limit once per
            # episode_length steps, so the pool is remade about that often, and every episode
            # still starts from its own fresh random initial state.
            pool, pool_fresh = refill_pool(pool, pool_fresh, done, key_reset)

            def where_done(new, old):
                # A leaf without the env axis is no env's own state: MuJoCo Warp (--impl warp)
                # keeps its contact buffers and their counters for the whole batch and fills
                # them afresh at every step, so ``old`` (the stepped state's) is kept, as MJX's
                # own ``Data.where`` does. (A buffer whose length happens to be N is mixed row
                # by row instead; refilled at the next step all the same.)
                if new.shape[:1] != done.shape:
                    return old
                return jnp.where(done.reshape(done.shape + (1,) * (new.ndim - 1)), new, old)

            physics = jax.tree.map(where_done, pool, stepped)
            pool_fresh = pool_fresh & ~done
        else:
            physics = stepped
        outputs = (
            physics.obs,
            final_obs,
            reward,
            terminated.astype(jnp.float32),
            truncated.astype(jnp.float32),
            (done & from_reset).astype(jnp.float32),
            episode_return,
            episode_length_so_far.astype(jnp.float32),
        )
        carry = (
            physics,
            physics.obs,
            jnp.where(done, 0, step_count),
            jnp.where(done, 0.0, episode_return),
            jnp.where(done, 0, episode_length_so_far),
            from_reset | done,
            pool,
            pool_fresh,
            key,
        )
        return carry, outputs

    return jax.jit(reset, static_argnames="randomize_steps"), step


def jax_to_torch(array, device: torch.device) -> torch.Tensor:
    """Zero-copy view of a JAX array as a torch tensor (DLPack); copied only to change device."""
    return torch.from_dlpack(array).to(device)


def torch_to_jax(tensor: torch.Tensor):
    """A torch tensor for a jitted JAX function: a zero-copy DLPack view when both sides
    use the GPU. Otherwise a NumPy view of its host copy (no copy for a CPU tensor) that jit
    copies in: for an action batch that is cheaper than ``jnp.from_dlpack``, which took
    ~0.13 ms per call on a 2-core CPU (passing the NumPy array: ~0.02 ms)."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    tensor = tensor.detach().contiguous()
    if tensor.device.type == "cuda" and device.platform == "gpu":
        return jnp.from_dlpack(tensor)
    array = tensor.cpu().numpy()
    return array if device.platform == "cpu" else jax.device_put(array, device)


class PlaygroundEnv:
    """N Playground envs stepped in JAX, seen from PyTorch. The physics state, the step
    counters and the JAX random key stay on the JAX side (``self.carry``); each step sends
    the action over (``torch_to_jax``) and gets the StepResult back through DLPack."""

    suite = "dm_control"

    def __init__(
        self, env, num_envs: int, episode_length: int, seed: int, device: torch.device, auto_reset: bool = True
    ):
        import jax

        self.num_envs = num_envs
        self.device = device
        self.obs_size = int(env.observation_size)
        self.action_size = int(env.action_size)
        self._reset, self._step = make_jax_auto_reset(env, num_envs, episode_length, auto_reset)
        self.key = jax.random.PRNGKey(seed)
        self.carry = None
        self._carry_treedef = None  # the carry's structure and
        self._carry_layout = None  # the (dtype, shape) of each of its ~200 arrays, set at the first reset

        def step_packed(buffers, action):
            carry = jax.tree.unflatten(self._carry_treedef, self._unpack(buffers))
            carry, outputs = self._step(carry, action)
            # obs, final_obs and the six per-env numbers side by side: one array to hand over.
            columns = [outputs[0], outputs[1], jax.numpy.stack(outputs[2:], axis=1)]
            return self._pack(jax.tree.leaves(carry)), jax.numpy.concatenate(columns, axis=1)  # (N, 2 O + 6)

        self._step_packed = jax.jit(step_packed)
        # Jitted once here: a fresh jax.jit(...) per call would trace and compile again each time.
        self._pack_jit, self._unpack_jit = jax.jit(self._pack), jax.jit(self._unpack)

    # The carry crosses the jit boundary packed into one flat buffer per dtype (4 arrays
    # instead of ~200: MJX's state has many fields, and the reset pool doubles them). A
    # jitted call costs microseconds per argument array: unpacked, the bare call took
    # ~1.5 ms per step for 64 CartpoleBalance envs, whose physics takes ~0.1 ms. Packing
    # and unpacking run inside jit, as one copy and free slices.
    def _pack(self, leaves: list) -> tuple:
        import jax.numpy as jnp

        dtypes = sorted({dtype for dtype, _ in self._carry_layout})
        return tuple(jnp.concatenate([x.reshape(-1) for x in leaves if str(x.dtype) == d]) for d in dtypes)

    def _unpack(self, buffers: tuple) -> list:
        dtypes = sorted({dtype for dtype, _ in self._carry_layout})
        buffer = dict(zip(dtypes, buffers))
        offset = dict.fromkeys(dtypes, 0)
        leaves = []
        for dtype, shape in self._carry_layout:
            size = math.prod(shape)
            leaves.append(buffer[dtype][offset[dtype] : offset[dtype] + size].reshape(shape))
            offset[dtype] += size
        return leaves

    def reset(self, randomize_steps: bool, key=None) -> torch.Tensor:
        """Reset every env (with ``key``, or the next key of this env's own stream)."""
        import jax

        if key is None:
            self.key, key = jax.random.split(self.key)
        carry = self._reset(key, randomize_steps=randomize_steps)
        leaves, self._carry_treedef = jax.tree.flatten(carry)
        self._carry_layout = [(str(x.dtype), tuple(x.shape)) for x in leaves]
        # Committed to the device like step()'s outputs, which jit would otherwise tell
        # apart from reset()'s (uncommitted) ones and compile step() for each.
        self.carry = jax.device_put(self._pack_jit(leaves), jax.devices()[0])
        return jax_to_torch(carry[1], self.device)

    def step(self, action: torch.Tensor) -> StepResult:
        self.carry, outputs = self._step_packed(self.carry, torch_to_jax(action))
        outputs = jax_to_torch(outputs, self.device)  # (N, 2 O + 6)
        obs, final_obs, numbers = outputs.split([self.obs_size, self.obs_size, 6], dim=1)
        reward, terminated, truncated, episode_done, episode_return, episode_length = numbers.unbind(dim=1)
        no_success = torch.zeros_like(reward)  # success is a ManiSkill notion
        done = episode_done > 0
        return StepResult(
            obs, final_obs, reward, terminated, truncated, done, episode_return, episode_length, no_success, no_success
        )

    def close(self) -> None:
        # Free the envs' JAX state (physics and reset pool; GPU memory when JAX runs on a GPU)
        # now: the jitted step refers back to this object, so the object itself waits for
        # Python's cyclic garbage collector (a --num-seeds run builds one per seed).
        self.carry = None

    # The JAX-side state is part of a checkpoint (unpacked: one array per field), so that a
    # resumed run continues exactly.
    def get_state(self) -> dict:
        leaves = [np.asarray(leaf) for leaf in self._unpack_jit(self.carry) + [self.key]]
        return {"leaves": [_array_to_tensor(leaf) for leaf in leaves], "dtypes": [str(a.dtype) for a in leaves]}

    def set_state(self, saved: dict) -> None:
        import jax
        import jax.numpy as jnp

        leaves = [jnp.asarray(_tensor_to_array(t, d)) for t, d in zip(saved["leaves"], saved["dtypes"])]
        if len(leaves) != len(self._carry_layout) + 1:
            raise UserError(
                f"checkpoint env state has {len(leaves)} arrays, this env needs {len(self._carry_layout) + 1}"
            )
        for i, (leaf, (dtype, shape)) in enumerate(zip(leaves, self._carry_layout)):
            if (str(leaf.dtype), tuple(leaf.shape)) != (dtype, shape):
                raise UserError(
                    f"checkpoint env state array {i} is {leaf.dtype} {tuple(leaf.shape)}, this env needs {dtype} "
                    f"{shape} (saved with another Playground version or env configuration?)"
                )
        self.carry = jax.device_put(self._pack_jit(leaves[:-1]), jax.devices()[0])
        self.key = leaves[-1]


def _array_to_tensor(array: np.ndarray) -> torch.Tensor:
    # torch has no general uint32 support; JAX random keys are uint32, stored bit-for-bit as int32.
    # np.asarray of a JAX array is read-only, so the bits are copied into a tensor of its own.
    return torch.from_numpy((array.view(np.int32) if array.dtype == np.uint32 else array).copy())


def _tensor_to_array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return tensor.numpy().view(np.dtype(dtype))


# --- ManiSkill3 ------------------------------------------------------------------------


def maniskill_episode_length(env_id: str) -> int:
    from mani_skill.utils.registration import REGISTERED_ENVS

    return int(REGISTERED_ENVS[env_id].max_episode_steps)


def missing_maniskill_assets(env_id: str) -> list[str]:
    """Asset ids a ManiSkill task needs that are not on disk: the task's own and those of its
    default robot (e.g. AnymalC-Reach-v1's anymal_c). Checked before ``gym.make``, which
    would otherwise ask an interactive (y|n) question, or exit with status 0 on 'n'.
    An empty asset folder (left by a failed download) counts as missing."""
    import inspect

    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    spec = REGISTERED_ENVS[env_id]
    robots = (spec.default_kwargs or {}).get("robot_uids")
    if robots is None:  # the task's own default, if its constructor names one
        parameter = inspect.signature(spec.cls.__init__).parameters.get("robot_uids")
        robots = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
    robots = [robots] if isinstance(robots, str) else [r for r in robots or [] if isinstance(r, str)]
    missing = []
    for asset_id in [*(spec.asset_download_ids or []), *(r for r in robots if assets.DATA_GROUPS.get(r))]:
        if asset_id in assets.DATA_GROUPS:
            source_ids = assets.expand_data_group_into_individual_data_source_ids(asset_id)
        else:
            source_ids = [asset_id]
        for source_id in source_ids:
            source = assets.DATA_SOURCES[source_id]
            path = source.output_dir / source.target_path
            if not (path.exists() and (path.is_file() or any(path.iterdir()))):
                missing.append(source_id)
    return missing


def check_maniskill_assets(env_id: str) -> None:
    missing = missing_maniskill_assets(env_id)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"ManiSkill task '{env_id}' needs assets that are not downloaded: {shown}. Download them "
            f"first with `python -m mani_skill.utils.download_asset {env_id}` (needs internet; they go "
            f"to $MS_ASSET_DIR, default ~/.maniskill/data), or pick a task without assets "
            f"such as PickCube-v1 or PushCube-v1."
        )


def enable_physx_gpu() -> None:
    """ManiSkill's GPU simulator (physx_cuda) needs PhysX's GPU library, which is not in
    SAPIEN's wheel: SAPIEN downloads it from the internet into ~/.sapien/physx/<version>/ the
    first time a GPU scene is made. We ask for it here, before ``gym.make`` (which asks again,
    a no-op once it is loaded), so that a machine without internet gets one message instead
    of the download's traceback. (Not yet run on a GPU with internet access; the test makes the
    download fail.)"""
    import sapien.physx

    try:
        sapien.physx.enable_gpu()
    except Exception as error:  # requests' ConnectionError, a bad zip, libcuda missing, ...
        folder = os.path.join(os.path.expanduser("~"), ".sapien", "physx", sapien.physx.version())
        if os.path.exists(os.path.join(folder, "libPhysXGpu_64.so")):
            where = f"it is in {folder} but did not load"
        else:
            where = (
                f"SAPIEN fetches it from the internet at first use and that failed; fetch it on a machine with "
                f"internet (the address is in the line SAPIEN printed on stdout, or in sapien/physx/__init__.py) "
                f"and unzip it into {folder}"
            )
        raise UserError(
            f"ManiSkill's GPU simulator needs PhysX's GPU library: {where} ({type(error).__name__}: {error}). "
            "Or run on the CPU simulator with --device cpu (one env)"
        ) from error


class ManiSkillEnv:
    """N ManiSkill3 envs (state observations) with partial resets that hand back the true
    final observation, in ManiSkill's own vector wrapper:
    ``ManiSkillVectorEnv(auto_reset, ignore_terminations, record_metrics=True)``.

    The authors' setting (their ``partial_reset: true`` for training, ``eval_partial_reset:
    false`` for evaluation; SPEC section 11):
    - training envs (``auto_reset=True``): an episode ends at the time limit OR when the
      task terminates it (success; a failure, for tasks that define one), and that env alone
      is reset. Every episode end is bootstrapped as a truncation from the true final
      observation, as the authors do (their ``truncated = terminated | truncated``): a
      reached goal is not a state without a future (for a failure this is their choice too).
    - evaluation envs (``auto_reset=False``, reset by every evaluation round): terminations
      are ignored, so each episode runs the full episode_length and ``success_at_end`` means
      "still successful at the last step".
    With ``--ignore-terminations`` the training envs ignore terminations too: an episode ends
    only at the time limit, and the steps after a success are trained on."""

    suite = "maniskill"

    def __init__(self, args: Args, num_envs: int, seed: int, device: torch.device, auto_reset: bool = True):
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        self.sim_backend = "physx_cuda" if device.type == "cuda" else "physx_cpu"
        if self.sim_backend == "physx_cuda":
            enable_physx_gpu()
        try:
            env = gym.make(
                args.env_id,
                num_envs=num_envs,
                obs_mode="state",
                control_mode=args.control_mode,
                sim_backend=self.sim_backend,
                max_episode_steps=args.episode_length,
                render_mode=None,
                # SAPIEN's renderer (built even for state observations) on the CPU where there is no
                # CUDA: ManiSkill's default asks for a CUDA one, and warns when it falls back.
                render_backend="gpu" if torch.cuda.is_available() else "cpu",
            )
        except AssertionError as error:  # ManiSkill checks --control-mode with an assert
            if "supported modes" not in str(error):
                raise
            raise UserError(f"--control-mode {error}") from error
        except RuntimeError as error:
            # SAPIEN builds its renderer even for state observations (the tasks give their
            # objects render materials; render_backend="none" fails there), and the renderer
            # needs a Vulkan driver. Without one, SAPIEN's error names Vulkan or the device.
            if not any(word in str(error) for word in ("vk::", "Vulkan", "rendering device")):
                raise
            raise UserError(
                f"ManiSkill3 needs a Vulkan driver, also for state observations, and SAPIEN found none that "
                f"works ({error}). On an NVIDIA machine: the driver's Vulkan ICD; on a machine without a GPU: "
                "Mesa's lavapipe, version 24.3 or newer (Debian 12: `sudo bash .ci/install_vulkan.sh` from this "
                "repository installs it from the backports suite). `vulkaninfo --summary` shows what is found"
            ) from error
        ignore_terminations = args.ignore_terminations or not auto_reset  # evaluation: always
        self.env = ManiSkillVectorEnv(
            env, auto_reset=auto_reset, ignore_terminations=ignore_terminations, record_metrics=True
        )
        self.base = self.env.unwrapped
        self.num_envs = num_envs
        self.device = device
        self.episode_length = args.episode_length
        self.obs_size = int(self.env.single_observation_space.shape[0])
        self.action_size = int(self.env.single_action_space.shape[0])
        # The policy acts in (-1, 1). Most controllers (the default pd_joint_delta_pos among them)
        # take normalised actions in [-1, 1]; a few (pd_joint_pos, pd_ee_pose) take joint angles or
        # poses within their own bounds, where ManiSkill neither scales nor clips. For those the
        # action is mapped linearly onto [low, high] before it reaches the simulator.
        space = self.env.single_action_space
        low, high = torch.as_tensor(space.low, dtype=torch.float32), torch.as_tensor(space.high, dtype=torch.float32)
        if not (torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise UserError(f"--control-mode {args.control_mode} has unbounded actions; pick a bounded controller")
        normalised = bool((low == -1).all() and (high == 1).all())
        self.action_bounds = None if normalised else (low.to(self.base.device), high.to(self.base.device))
        self.seed = seed
        self.resets = 0  # number of full resets so far (each gets a fresh seed)
        self.from_reset = torch.zeros(num_envs, dtype=torch.bool, device=device)

    def reset(self, randomize_steps: bool, key: int | None = None) -> torch.Tensor:
        # Fresh seeds for every full reset: seed * 1_000_003 + counter (or an explicit one).
        seed = (key if key is not None else self.seed * 1_000_003 + self.resets) % 2**31  # a non-negative int32
        self.resets += 1
        obs, _ = self.env.reset(seed=seed)
        if randomize_steps:
            # IMPLEMENTATION DETAIL 4: random initial step counters in [0, episode_length).
            # ManiSkill's time limit reads the base env's elapsed-step counter, so we set it.
            generator = torch.Generator().manual_seed(seed)
            steps = torch.randint(0, self.episode_length, (self.num_envs,), generator=generator)
            self.base._elapsed_steps[:] = steps.to(self.base._elapsed_steps.device)
        # IMPLEMENTATION DETAIL 10: shortened first episodes are not logged.
        self.from_reset = torch.full((self.num_envs,), not randomize_steps, device=self.device)
        return obs.to(self.device, torch.float32)

    def step(self, action: torch.Tensor) -> StepResult:
        action = action.to(self.base.device)
        if self.action_bounds is not None:  # a controller with its own bounds (see __init__)
            low, high = self.action_bounds
            action = low + (action + 1) * 0.5 * (high - low)
        obs, reward, terminated, truncated, info = self.env.step(action)
        done = (terminated | truncated).to(self.device).bool()  # terminated is all False in evaluation
        if "final_observation" in info:
            # IMPLEMENTATION DETAIL 5: the wrapper already reset the finished envs; their
            # true last observation is in info["final_observation"] (all N rows, taken
            # before the partial reset, so the unfinished rows equal obs).
            final_obs = info["final_observation"]
            episode = info["final_info"]["episode"]
        else:
            final_obs = obs
            episode = info["episode"]
        n = self.num_envs
        zeros = torch.zeros(n, device=self.device)

        def field(name):
            return episode[name].to(self.device).float().reshape(n) if name in episode else zeros

        result = StepResult(
            next_obs=obs.to(self.device, torch.float32),
            final_obs=final_obs.to(self.device, torch.float32),
            reward=reward.to(self.device, torch.float32).reshape(n),
            terminated=zeros,  # every episode end, success included, is bootstrapped (class docstring)
            truncated=done.float(),
            episode_done=done & self.from_reset,
            episode_return=field("return"),
            episode_length=field("episode_len"),
            success_once=field("success_once"),
            success_at_end=field("success_at_end"),
        )
        self.from_reset = self.from_reset | done
        return result

    def get_state(self) -> dict:
        # The simulator state is not checkpointed: a resumed ManiSkill run restarts its
        # episodes (the networks, optimisers, normaliser and training generator continue
        # exactly; ManiSkill's partial resets draw from torch's global generator, which a
        # resumed run seeds anew, so their start states repeat those of the run's start).
        return {"resets": self.resets}

    def set_state(self, saved: dict) -> None:
        self.resets = int(saved.get("resets", 0)) + 1

    def close(self) -> None:
        self.env.close()  # frees the simulator (a --num-seeds run builds one per seed)


def make_env(args: Args, num_envs: int, seed: int, device: torch.device, auto_reset: bool = True):
    """A PlaygroundEnv or a ManiSkillEnv with ``num_envs`` envs. Evaluation envs pass
    ``auto_reset=False``: every evaluation round resets them anyway, and a reset of all of
    them at the last step would be wasted (for ManiSkill it would also draw the task's random
    initial state from the global torch generator, which the training env's resets use)."""
    if env_suite(args.env_id) == "dm_control":
        env = make_playground_env(args.env_id, args.impl, args.episode_length)
        return PlaygroundEnv(env, num_envs, args.episode_length, seed, device, auto_reset)
    return ManiSkillEnv(args, num_envs, seed, device, auto_reset)


def make_eval_env(args: Args, seed: int, device: torch.device):
    """The evaluation envs, separate from the training ones: ``num_eval_envs`` of them, except
    that ManiSkill on the CPU simulator holds one env per env object; evaluation then plays its
    num_eval_envs episodes one after another on that single env."""
    one_at_a_time = env_suite(args.env_id) == "maniskill" and device.type != "cuda"
    return make_env(args, 1 if one_at_a_time else args.num_eval_envs, seed + 10_000, device, auto_reset=False)


# ======================================================================================
# 3. Math
# ======================================================================================

# IMPLEMENTATION DETAIL 7: an action given to tanh_normal_log_prob is clipped to +-(1 - 1e-6)
# so that atanh stays finite (in float32, tanh(u) rounds to exactly 1 from |u| ~= 8 in XLA,
# ~= 9 in PyTorch). Sampled actions (sample_tanh_normal) keep their pre-tanh value u and need
# no clip.
LOG_PROB_CLIP = 1.0 - 1e-6
# The KL estimate clips its samples harder, to +-(1 - 1e-4) (SPEC section 8).
KL_SAMPLE_CLIP = 1.0 - 1e-4
# IMPLEMENTATION DETAIL 3: actions sent to the environment are clipped to +-0.999.
ACTION_CLIP = 0.999
# Added to the variance before the square root in normalize() (the paper code's constant).
NORMALIZER_EPS = 1e-2


def hl_gauss(values: torch.Tensor, num_bins: int, vmin: float, vmax: float) -> torch.Tensor:
    """HL-Gauss categorical target of a scalar (SPEC section 4; Imani & White 2018).

    The target is a Gaussian N(x, sigma^2) around x = the value clipped to [vmin, vmax],
    sigma = 0.75 * bin width, integrated over each bin of the support:
    p_i = Phi((e_{i+1} - x)/sigma) - Phi((e_i - x)/sigma),
    with bin edges e = linspace(vmin - w/2, vmax + w/2, num_bins + 1), then renormalised.
    ``values`` of any shape -> probabilities of shape ``values.shape + (num_bins,)``.
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    width = (vmax - vmin) / (num_bins - 1)
    sigma = 0.75 * width
    edges = torch.linspace(vmin - width / 2, vmax + width / 2, num_bins + 1, device=values.device)
    x = values.clamp(vmin, vmax).unsqueeze(-1)
    cdf = 0.5 * (1.0 + torch.special.erf((edges - x) / (sigma * math.sqrt(2.0))))  # (..., num_bins + 1)
    probs = cdf[..., 1:] - cdf[..., :-1]
    return probs / probs.sum(dim=-1, keepdim=True)


def tanh_normal_log_prob_from_pre_tanh(pre_tanh: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of a = tanh(u), u ~ N(mean, std), given u (SPEC section 5).

    log pi(a|s) = sum_d [ log N(u_d; mean_d, std_d) - log(1 - tanh(u_d)^2) ],
    with the stable form log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
    Written by hand (no torch.distributions) so that both files compute the same numbers.
    """
    z = (pre_tanh - mean) / std
    log_normal = -0.5 * z**2 - torch.log(std) - 0.5 * math.log(2.0 * math.pi)
    log_det_jacobian = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (log_normal - log_det_jacobian).sum(dim=-1)


def tanh_normal_log_prob(action: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log pi(action|s) of the tanh-Gaussian policy, summed over the last (action) axis."""
    pre_tanh = torch.atanh(action.clamp(-LOG_PROB_CLIP, LOG_PROB_CLIP))
    return tanh_normal_log_prob_from_pre_tanh(pre_tanh, mean, std)


def sample_tanh_normal(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised sample a = tanh(mean + std * noise) and its log-probability.

    ``noise`` is standard normal, drawn by the caller (so gradients flow to mean and std:
    the reparameterisation trick). The log-probability is computed from the pre-tanh value
    u: in exact arithmetic the same number as ``tanh_normal_log_prob(a, ...)`` while
    |u| < atanh(1 - 1e-6) ~= 7.25, but in float32 atanh(tanh(u)) loses u as a nears +-1
    (in PyTorch's float32, log-probs apart by 2e-3 at u = 5 and 9e-3 at u = 6 for mean 0 and std
    0.5; JAX's tanh and atanh round otherwise; beyond the clip the atanh path is capped), while
    u is exact.
    """
    pre_tanh = mean + std * noise
    return torch.tanh(pre_tanh), tanh_normal_log_prob_from_pre_tanh(pre_tanh, mean, std)


def soft_lambda_returns(
    soft_reward: torch.Tensor,
    next_value: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    lmbda: float,
) -> torch.Tensor:
    """Soft TD(lambda) targets, backwards in time (SPEC section 7). Inputs (T, N).

        G_t = r~_t                                        if terminated_t
        G_t = r~_t + gamma * v'_t                         if truncated_t or t = T-1
        G_t = r~_t + gamma * (lmbda G_{t+1} + (1 - lmbda) v'_t)   otherwise

    A lambda-mixture of n-step soft returns that never crosses an episode boundary and
    always ends with a bootstrap v' (seeded with G_T := v'_{T-1}). The loop is over T
    (e.g. 32) time steps only; every step works on all N envs at once.
    """
    terminated, truncated = terminated.bool(), truncated.bool()
    returns = torch.empty_like(soft_reward)
    next_return = next_value[-1]
    for t in reversed(range(soft_reward.shape[0])):
        reward, value = soft_reward[t], next_value[t]
        one_step = reward + gamma * value
        mixed = reward + gamma * (lmbda * next_return + (1.0 - lmbda) * value)
        next_return = torch.where(terminated[t], reward, torch.where(truncated[t], one_step, mixed))
        returns[t] = next_return
    return returns


def policy_kl(
    old_mean: torch.Tensor, old_std: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Monte Carlo forward KL(pi_old || pi) per state (SPEC section 8).

    KL ~= 1/M sum_m [ log pi_old(a_m|s) - log pi(a_m|s) ],  a_m = clip(tanh(u_m), +-(1-1e-4)),
    u_m = old_mean + old_std * noise_m. Both log-probabilities are evaluated at the *same*
    clipped sample. ``noise`` is (M, ..., A) standard normal; returns shape (...).
    """
    samples = torch.tanh(old_mean + old_std * noise).clamp(-KL_SAMPLE_CLIP, KL_SAMPLE_CLIP)  # (M, ..., A)
    log_ratio = tanh_normal_log_prob(samples, old_mean, old_std) - tanh_normal_log_prob(samples, mean, std)
    return log_ratio.mean(dim=0)


class NormalizerState(NamedTuple):
    """Running mean/variance of observations (SPEC section 3)."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor


def normalizer_init(size: int, device: torch.device | str = "cpu") -> NormalizerState:
    return NormalizerState(
        torch.zeros(size, device=device), torch.ones(size, device=device), torch.zeros((), device=device)
    )


def normalizer_update(state: NormalizerState, batch: torch.Tensor) -> NormalizerState:
    """Merge a batch (..., size) into the statistics with Chan's parallel update:

    delta = mean_b - mean,  n = count + count_b,  mean' = mean + delta * count_b / n,
    var' = (var * count + var_b * count_b + delta^2 * count * count_b / n) / n.
    """
    batch = batch.reshape(-1, batch.shape[-1])
    batch_count = batch.shape[0]
    batch_mean, batch_var = batch.mean(dim=0), batch.var(dim=0, unbiased=False)
    delta = batch_mean - state.mean
    total = state.count + batch_count
    mean = state.mean + delta * batch_count / total
    m2 = state.var * state.count + batch_var * batch_count + delta**2 * state.count * batch_count / total
    return NormalizerState(mean, m2 / total, total)


def normalize(state: NormalizerState, obs: torch.Tensor) -> torch.Tensor:
    """(obs - mean) / sqrt(var + 1e-2)."""
    return (obs - state.mean) / torch.sqrt(state.var + NORMALIZER_EPS)


# ======================================================================================
# 4. Networks
# ======================================================================================
# Init family (both files): Linear weights LeCun-normal as in Flax -- a normal truncated
# at +-2 standard deviations, rescaled so that the *truncated* distribution has variance
# 1/fan_in -- biases zero; RMSNorm scale one, epsilon 1e-6. PyTorch's own default
# (Kaiming-uniform) would differ, so we re-initialise every Linear.

RMS_NORM_EPS = 1e-6
# Standard deviation of a standard normal truncated to (-2, 2): Flax divides by it.
TRUNCATED_NORMAL_STD = 0.87962566103423978


def lecun_normal_(linear: nn.Linear) -> nn.Linear:
    fan_in = linear.weight.shape[1]  # torch stores weights as (out, in)
    std = 1.0 / math.sqrt(fan_in) / TRUNCATED_NORMAL_STD
    nn.init.trunc_normal_(linear.weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)
    nn.init.zeros_(linear.bias)
    return linear


class NormedLinear(nn.Module):
    """Linear -> RMSNorm -> SiLU, the building block of both networks."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = lecun_normal_(nn.Linear(in_features, out_features))
        self.norm = nn.RMSNorm(out_features, eps=RMS_NORM_EPS)  # learnable scale, init one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.linear(x)))


class Actor(nn.Module):
    """obs -> normed(h) -> normed(h) -> Linear(2A) = (mean, log_std);
    std = exp(log_std) + min_std; the action is tanh(u), u ~ N(mean, std)."""

    def __init__(self, obs_size: int, action_size: int, hidden: int, min_std: float):
        super().__init__()
        self.hidden1 = NormedLinear(obs_size, hidden)
        self.hidden2 = NormedLinear(hidden, hidden)
        self.head = lecun_normal_(nn.Linear(hidden, 2 * action_size))
        self.min_std = min_std

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.head(self.hidden2(self.hidden1(obs))).chunk(2, dim=-1)
        # IMPLEMENTATION DETAIL 2: the std floor min_std keeps the policy from collapsing
        # to a point mass, which would make log-probabilities and the KL explode.
        return mean, torch.exp(log_std) + self.min_std


class Critic(nn.Module):
    """Categorical Q(s, a) with an auxiliary head (SPEC section 2).

    encoder:  concat(obs, a) -> normed(h) -> Linear(h)            = features z
    Q head:   SiLU(z) -> normed(h) -> Linear(num_bins) + 40 * zero_dist
    aux head: SiLU(z) -> normed(h) -> Linear(h + 1)                = (r_hat, z'_hat)
    """

    def __init__(self, obs_size, action_size, hidden, num_bins, vmin, vmax):
        super().__init__()
        self.encoder = NormedLinear(obs_size + action_size, hidden)
        self.encoder_out = lecun_normal_(nn.Linear(hidden, hidden))
        self.q_hidden = NormedLinear(hidden, hidden)
        self.q_out = lecun_normal_(nn.Linear(hidden, num_bins))
        self.aux_hidden = NormedLinear(hidden, hidden)
        self.aux_out = lecun_normal_(nn.Linear(hidden, hidden + 1))
        # IMPLEMENTATION DETAIL 1: a learnable logit offset 40 * hl_gauss(0) so that the
        # untrained critic predicts Q ~= 0 instead of the middle of [vmin, vmax].
        self.zero_dist = nn.Parameter(hl_gauss(torch.zeros(()), num_bins, vmin, vmax))

    def features(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.encoder_out(self.encoder(torch.cat([obs, action], dim=-1)))

    def q_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.q_out(self.q_hidden(F.silu(features))) + 40.0 * self.zero_dist

    def aux(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.aux_out(self.aux_hidden(F.silu(features)))
        return out[..., 0], out[..., 1:]

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (..., num_bins), features (..., hidden))."""
        features = self.features(obs, action)
        return self.q_logits(features), features


def q_value(logits: torch.Tensor, vmin: float, vmax: float) -> torch.Tensor:
    """Q(s, a) = sum_i softmax(logits)_i c_i, support c = linspace(vmin, vmax, num_bins)."""
    support = torch.linspace(vmin, vmax, logits.shape[-1], device=logits.device)
    return (torch.softmax(logits, dim=-1) * support).sum(dim=-1)


# ======================================================================================
# 5. Losses
# ======================================================================================


def critic_loss(
    critic: Critic,
    obs: torch.Tensor,
    action: torch.Tensor,
    target_return: torch.Tensor,
    next_features: torch.Tensor,
    reward: torch.Tensor,
    terminated: torch.Tensor,
    vmin: float,
    vmax: float,
    aux_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_Q = mean_b [ CE(logits(s, a), hl_gauss(G)) + aux_coef * L_aux ]   (SPEC section 8)

    L_aux = (1 - terminated) * [ mean_j (z'_hat - z')_j^2 + (r_hat - r)^2 ]: the critic's
    features must predict the reward and the next state's features (a self-predictive
    auxiliary task that shapes the representation). Shapes (B: the minibatch's size here, not
    N * T): obs (B, O), action (B, A), target_return / reward / terminated (B,), next_features
    (B, hidden). The targets come from the rollout (no gradient flows into them).
    """
    logits, features = critic(obs, action)
    target_probs = hl_gauss(target_return, logits.shape[-1], vmin, vmax)
    cross_entropy = -(target_probs * torch.log_softmax(logits, dim=-1)).sum(dim=-1)  # (B,)
    reward_pred, next_features_pred = critic.aux(features)
    aux = ((next_features_pred - next_features) ** 2).mean(dim=-1) + (reward_pred - reward) ** 2
    aux = aux * (1.0 - terminated)  # (B,)
    loss = (cross_entropy + aux_coef * aux).mean()
    info = {
        "losses/critic_loss": loss.detach(),
        "losses/critic_ce": cross_entropy.mean().detach(),
        "losses/aux_loss": aux.mean().detach(),
        "values/q_mean": q_value(logits, vmin, vmax).mean().detach(),
    }
    return loss, info


def actor_loss(
    actor: Actor,
    log_alpha: torch.Tensor,
    log_beta: torch.Tensor,
    critic: Critic,
    obs: torch.Tensor,
    old_mean: torch.Tensor,
    old_std: torch.Tensor,
    action_noise: torch.Tensor,
    kl_noise: torch.Tensor,
    kl_bound: float,
    entropy_target: float,
    vmin: float,
    vmax: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pathwise actor loss with KL trust region, plus the alpha and beta losses (SPEC 8).

    a = tanh(mean + std * action_noise) (reparameterised), KL = policy_kl(pi_old, pi):
        l_pi  = sg(alpha) log pi(a|s) - Q(s, a)   if KL < kl_bound, else  sg(beta) KL
        L_alpha = alpha * sg(-log pi(a|s) - entropy_target)
        L_beta  = -beta * sg(mean_b KL - kl_bound)
    returns mean_b(l_pi) + mean_b(L_alpha) + L_beta. sg() is ``.detach()``. Only the actor,
    log_alpha and log_beta are to be differentiated: the caller takes gradients with
    respect to those alone (torch.autograd.grad), so the critic is used, not trained.
    Shapes (B: the minibatch's size): obs (B, O), old_mean/old_std/action_noise (B, A),
    kl_noise (M, B, A).
    """
    mean, std = actor(obs)
    action, log_prob = sample_tanh_normal(mean, std, action_noise)  # (B, A), (B,)
    logits, _ = critic(obs, action)
    q = q_value(logits, vmin, vmax)
    kl = policy_kl(old_mean, old_std, mean, std, kl_noise)  # (B,)
    alpha, beta = torch.exp(log_alpha), torch.exp(log_beta)
    pathwise = alpha.detach() * log_prob - q
    # IMPLEMENTATION DETAIL 8: a state whose policy left the trust region gets only the
    # KL gradient (pull it back); the others get the pathwise gradient through Q.
    inside = kl < kl_bound
    policy_loss = torch.where(inside, pathwise, beta.detach() * kl).mean()
    alpha_loss = (alpha * (-log_prob - entropy_target).detach()).mean()
    beta_loss = -beta * (kl.mean() - kl_bound).detach()
    loss = policy_loss + alpha_loss + beta_loss
    info = {
        "losses/actor_loss": policy_loss.detach(),
        "losses/alpha_loss": alpha_loss.detach(),
        "losses/beta_loss": beta_loss.detach(),
        "policy/kl": kl.mean().detach(),
        "policy/kl_outside_frac": 1.0 - inside.float().mean(),
        "policy/entropy": -log_prob.mean().detach(),
        "policy/alpha": alpha.detach(),
        "policy/beta": beta.detach(),
        "policy/std": std.mean().detach(),
    }
    return loss, info


# ======================================================================================
# 6. Collect / Learn / Evaluate
# ======================================================================================


def act(
    actor: Actor, normalizer: NormalizerState, raw_obs: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The behaviour policy at one collection step: normalise s_t, sample a ~ pi(.|s_t) with
    the standard-normal ``noise`` (N, A), clip it for the environment (IMPLEMENTATION
    DETAIL 3). Returns (normalised obs, action, mean, std), the last three (N, A)."""
    obs = normalize(normalizer, raw_obs)  # (N, O)
    mean, std = actor(obs)  # (N, A) each
    action, _ = sample_tanh_normal(mean, std, noise)
    return obs, action.clamp(-ACTION_CLIP, ACTION_CLIP), mean, std


def bootstrap(
    actor: Actor,
    critic: Critic,
    alpha: torch.Tensor,
    normalizer: NormalizerState,
    final_obs: torch.Tensor,
    reward: torch.Tensor,
    terminated: torch.Tensor,
    noise: torch.Tensor,
    gamma: float,
    vmin: float,
    vmax: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one step leaves for the targets (SPEC 6): the value of the TRUE next state s'
    under the current policy, v' = mean_k Q(s', a'_k) with K fresh actions a'_k ~ pi(.|s')
    (``noise`` (K, N, A)), the soft reward
    r~ = r - (1 - terminated) * gamma * alpha * mean_k log pi(a'_k|s')
    and the critic's features z' of (s', a'_1), the aux head's target.
    Returns (soft_reward (N,), next_value (N,), next_features (N, hidden))."""
    next_obs = normalize(normalizer, final_obs)  # (N, O)
    next_mean, next_std = actor(next_obs)
    next_action, next_log_prob = sample_tanh_normal(next_mean, next_std, noise)  # (K, N, A), (K, N)
    next_logits, next_features = critic(next_obs.expand(noise.shape[0], *next_obs.shape), next_action)
    next_value = q_value(next_logits, vmin, vmax).mean(dim=0)  # (N,)
    # IMPLEMENTATION DETAIL 6: no entropy bonus after a terminal state.
    not_terminal = 1.0 - terminated
    soft_reward = reward - not_terminal * gamma * alpha * next_log_prob.mean(dim=0)
    return soft_reward, next_value, next_features[0]


class Rollout(NamedTuple):
    """One rollout, every field time-first: (T, N, ...). Allocated once, filled in place."""

    obs: torch.Tensor  # normalised s_t (with the statistics in force during collection)
    raw_obs: torch.Tensor  # un-normalised s_t, to update the normaliser afterwards
    action: torch.Tensor  # the clipped action that was executed
    old_mean: torch.Tensor  # pi_old(s_t): the behaviour policy's mean and std (= pi before learning)
    old_std: torch.Tensor
    reward: torch.Tensor
    soft_reward: torch.Tensor
    next_value: torch.Tensor  # v'_t = mean_k Q(s'_t, a'_k)
    next_features: torch.Tensor  # z'_t = features(s'_t, a'_1)
    terminated: torch.Tensor
    truncated: torch.Tensor
    episode_done: torch.Tensor
    episode_return: torch.Tensor
    episode_length: torch.Tensor
    success_once: torch.Tensor  # ManiSkill: the finished episode succeeded at some step (else zeros)


def allocate_rollout(T: int, N: int, obs_size: int, action_size: int, hidden: int, device) -> Rollout:
    def zeros(*shape, dtype=torch.float32):
        return torch.zeros((T, N) + shape, dtype=dtype, device=device)

    return Rollout(
        obs=zeros(obs_size),
        raw_obs=zeros(obs_size),
        action=zeros(action_size),
        old_mean=zeros(action_size),
        old_std=zeros(action_size),
        reward=zeros(),
        soft_reward=zeros(),
        next_value=zeros(),
        next_features=zeros(hidden),
        terminated=zeros(),
        truncated=zeros(),
        episode_done=zeros(dtype=torch.bool),
        episode_return=zeros(),
        episode_length=zeros(),
        success_once=zeros(),
    )


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float) -> None:
    """Global-norm clipping, in place, with optax's exact rule (``clip_by_global_norm``):
    g <- g * max_norm / ||g|| when ||g|| > max_norm. (torch.nn.utils.clip_grad_norm_ adds
    1e-6 to the norm; this keeps the two files' updates identical.)"""
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # ||(||g_1||, ||g_2||, ...)||, no Python loop
    scale = torch.where(norm < max_norm, torch.ones_like(norm), max_norm / norm)
    torch._foreach_mul_(grads, scale)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Adam's saved moments and step counts, under THIS run's speed switches. A state dict
    also carries its param groups' settings, which ``load_state_dict`` would copy over
    ours: a run resumed with --fused-adam or --cuda-graphs from a checkpoint saved without
    them would silently lose them (or fail to record its graph). The switches are set in the
    saved groups first, so that Adam also places the step counts where they need to be."""
    switches = ("foreach", "fused", "capturable")
    groups = [
        {**group, **{key: ours[key] for key in switches if key in ours}}
        for group, ours in zip(saved["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**saved, "param_groups": groups})


class CUDAGraphed:
    """--cuda-graphs: a function of GPU tensors, recorded once as a CUDA graph and replayed.

    Eager PyTorch launches each small kernel from Python, and on a GPU each launch costs more
    than the kernel's own work at REPPO's sizes: a minibatch update is several hundred
    kernels, a collection step (``act``, ``bootstrap``) dozens. A CUDA graph records a
    function's kernels once and relaunches them all with one call. A graph reads and writes
    fixed memory, so each call copies its tensor arguments into fixed tensors
    (``self.inputs``), replays, and copies the results out of one fixed tensor that holds
    them all (``self.output``; results are float32, as every result here is). The function
    must not wait for the CPU (no ``.item()``, no branch on a tensor's value), which is what
    recording needs; its arguments are tensors, tuples (a NamedTuple such as
    ``NormalizerState``) or dicts of tensors, and any other argument (a network, a float) is
    a constant of the recording: the graph reads the network's parameters where they lie,
    which the optimisers update in place. It returns a tuple or a dict of tensors.

    The first call runs the function on a side stream (which compiles it under --compile
    and creates the libraries' workspaces, as a recording must find them) and returns those
    results; then it records, and recording runs nothing. The same kernels on the same
    numbers (the random noise is drawn outside, as an argument), so the same math.
    """

    def __init__(self, fn):
        self.fn = fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []  # the fixed tensors the graph reads its arguments from
        self.output: torch.Tensor | None = None  # the fixed tensor it writes its results to, flat
        self.names: list[str] | None = None  # the results' names, when ``fn`` returns a dict
        self.shapes: list[torch.Size] = []
        self.starts: list[int] = []  # where each result starts in ``self.output``

    @staticmethod
    def _fixed(arg):
        """A fixed copy of one argument (tensors cloned; a constant kept as it is)."""
        if isinstance(arg, torch.Tensor):
            return arg.clone()
        if isinstance(arg, dict):
            return {name: value.clone() for name, value in arg.items()}
        if isinstance(arg, tuple):  # a NamedTuple keeps its type
            values = [value.clone() for value in arg]
            return type(arg)(*values) if hasattr(arg, "_fields") else tuple(values)
        return arg

    @staticmethod
    def _tensors(args) -> list[torch.Tensor]:
        """The tensors among the arguments, in order."""
        tensors = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                tensors.append(arg)
            elif isinstance(arg, dict):
                tensors.extend(arg[name] for name in sorted(arg))
            elif isinstance(arg, tuple):
                tensors.extend(arg)
        return tensors

    def __call__(self, *args):
        if self.graph is None:
            return self._record(args)
        for fixed, value in zip(self.inputs, self._tensors(args), strict=True):  # as many as recorded
            fixed.copy_(value)
        self.graph.replay()
        output = self.output.clone()  # one copy for all results (the next replay overwrites them)
        values = [output[start : start + shape.numel()].view(shape) for start, shape in zip(self.starts, self.shapes)]
        return dict(zip(self.names, values)) if self.names is not None else tuple(values)

    def _record(self, args):
        fixed_args = [self._fixed(arg) for arg in args]
        self.inputs = self._tensors(fixed_args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self.fn(*fixed_args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # "thread_local": only this thread must stay off the GPU's unsafe calls while
        # recording (JAX's own threads, simulating beside PyTorch, may not be idle).
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            recorded = self.fn(*fixed_args)
            if isinstance(recorded, dict):
                self.names, recorded = list(recorded), list(recorded.values())
            self.shapes = [value.shape for value in recorded]
            # Each result starts on a 256-byte boundary, as a tensor of its own would: the
            # action goes on to JAX through DLPack, which wants aligned memory.
            padded = [math.ceil(shape.numel() / 64) * 64 for shape in self.shapes]
            self.starts = [sum(padded[:i]) for i in range(len(padded))]
            self.output = torch.cat(
                [F.pad(value.float().reshape(-1), (0, size - value.numel())) for value, size in zip(recorded, padded)]
            )
        return result

    def forget(self) -> None:
        """Record again at the next call (after a checkpoint's load replaced Adam's moments)."""
        self.graph = None


class Trainer:
    """Everything one seed's training holds: networks, multipliers, optimisers, normaliser,
    envs and the random generator; ``train_iteration`` is one REPPO iteration."""

    def __init__(self, args: Args, seed: int, device: torch.device, env=None, build_eval_env: bool = True):
        self.args = args
        self.seed = seed
        self.device = device
        if args.torch_threads > 0:  # on any device: the threads of PyTorch's CPU kernels, as asked
            torch.set_num_threads(args.torch_threads)
        # One generator drives every random number of training (actions, permutations,
        # noise of the losses), so that one --seed reproduces a run and resuming continues it.
        self.generator = torch.Generator(device=device).manual_seed(seed)
        torch.manual_seed(seed)  # network initialisation
        self.env = env if env is not None else make_env(args, args.num_envs, seed, device)
        self.eval_env = make_eval_env(args, seed, device) if build_eval_env else None
        obs_size, action_size = self.env.obs_size, self.env.action_size
        self.action_size = action_size
        self.entropy_target = -args.ent_target_mult * action_size

        self.actor = Actor(obs_size, action_size, args.actor_hidden, args.min_std).to(device)
        self.critic = Critic(obs_size, action_size, args.critic_hidden, args.num_bins, args.vmin, args.vmax).to(device)
        # alpha and beta are learned in log space; both use the actor's optimiser (SPEC 9),
        # and so share its global-norm gradient clip.
        self.log_alpha = torch.tensor(math.log(args.ent_start), device=device, requires_grad=True)
        self.log_beta = torch.tensor(math.log(args.kl_start), device=device, requires_grad=True)
        self.actor_params = list(self.actor.parameters()) + [self.log_alpha, self.log_beta]
        self.critic_params = list(self.critic.parameters())
        adam = {"lr": args.learning_rate, "betas": (0.9, 0.999), "eps": 1e-8}  # optax.adam's defaults
        if args.fused_adam:
            adam["fused"] = True
        if args.cuda_graphs or (args.compile and device.type == "cuda"):
            # Adam keeps its step count on the GPU and computes the bias correction there, so
            # that a replayed graph reads the current count (the same formula, on the device),
            # and a compiled update finds the count beside the parameters.
            adam["capturable"] = True
        self.actor_opt = torch.optim.Adam(self.actor_params, **adam)
        self.critic_opt = torch.optim.Adam(self.critic_params, **adam)
        self.normalizer = normalizer_init(obs_size, device)
        self.rollout = allocate_rollout(
            args.num_steps, args.num_envs, obs_size, action_size, args.critic_hidden, device
        )
        # Collection's two pure functions (act, bootstrap) and the minibatch update.
        self.act_fn, self.bootstrap_fn, self.update_fn = act, bootstrap, self._update
        if args.compile:
            # The update compiles into ONE graph: both losses, their backward passes
            # (torch.autograd.grad, which dynamo traces only when asked to), clipping and both
            # Adam steps (see _step), so the compiler fuses across all of it and no Python
            # runs between the pieces. Compiling the two losses alone left ~3 ms of Python
            # per update at --preset cpu; one graph made an update ~10 % faster there.
            torch._dynamo.config.trace_autograd_ops = True
            self.act_fn, self.bootstrap_fn = torch.compile(act), torch.compile(bootstrap)
            self.update_fn = torch.compile(self._update)
        if args.cuda_graphs:
            # The two collection steps and the minibatch update, each recorded once as a CUDA
            # graph at its first call and replayed (the update's first call comes after Adam
            # has its state: a fresh run's second update, a resumed run's first).
            self.act_fn, self.bootstrap_fn = CUDAGraphed(self.act_fn), CUDAGraphed(self.bootstrap_fn)
            self.update_fn = CUDAGraphed(self.update_fn)
        self.iteration = 0
        self.obs = self.env.reset(randomize_steps=True)  # (N, O)

    def normal(self, *shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)

    @torch.no_grad()
    def collect_rollout(self) -> Rollout:
        """T steps on N envs with the current policy; soft rewards and v' (SPEC 6).
        No autograd graph is built (``no_grad``): collection only produces targets."""
        args, buf = self.args, self.rollout
        alpha = torch.exp(self.log_alpha)  # the temperature is fixed during collection
        N, A, K = self.env.num_envs, self.action_size, args.num_value_samples
        for t in range(args.num_steps):
            raw_obs = self.obs  # (N, O), kept to update the normaliser afterwards
            obs, action, mean, std = self.act_fn(self.actor, self.normalizer, raw_obs, self.normal(N, A))
            step = self.env.step(action)
            soft_reward, next_value, next_features = self.bootstrap_fn(
                self.actor,
                self.critic,
                alpha,
                self.normalizer,
                step.final_obs,
                step.reward,
                step.terminated,
                self.normal(K, N, A),
                args.gamma,
                args.vmin,
                args.vmax,
            )
            for name, value in (
                ("obs", obs), ("raw_obs", raw_obs), ("action", action), ("old_mean", mean), ("old_std", std),
                ("reward", step.reward), ("soft_reward", soft_reward), ("next_value", next_value),
                ("next_features", next_features), ("terminated", step.terminated),
                ("truncated", step.truncated), ("episode_done", step.episode_done),
                ("episode_return", step.episode_return), ("episode_length", step.episode_length),
                ("success_once", step.success_once),
            ):  # fmt: skip
                getattr(buf, name)[t] = value
            self.obs = step.next_obs
        return buf

    def update_minibatch(self, minibatch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One critic step, then one actor step (SPEC section 8), on a minibatch of rollout
        fields (obs, action, target_return, next_features, reward, terminated, old_mean,
        old_std; each (B, ...)). Returns the losses' metrics as 0-d tensors."""
        # Fresh noise for this minibatch's reparameterised actions and KL samples, drawn
        # here (outside any CUDA graph) so that every path reads the same random numbers.
        shape = minibatch["old_mean"].shape  # (B, A)
        inputs = {
            **minibatch,
            "action_noise": self.normal(*shape),
            "kl_noise": self.normal(self.args.num_kl_samples, *shape),
        }
        if not self.critic_opt.state:
            # An update before Adam has any state (a fresh run's first) is eager: Adam creates
            # its moments and step counts at its first step, and a compiled update (or a
            # recorded graph) must find them there.
            return self._update(inputs)
        return self.update_fn(inputs)

    def _update(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The update itself: critic loss and step, then actor loss and step."""
        args = self.args
        loss, critic_info = critic_loss(
            self.critic,
            inputs["obs"],
            inputs["action"],
            inputs["target_return"],
            inputs["next_features"],
            inputs["reward"],
            inputs["terminated"],
            args.vmin,
            args.vmax,
            args.aux_coef,
        )
        self._step(self.critic_opt, self.critic_params, loss)
        # The actor loss differentiates through the critic, to the action, but never into
        # the critic's parameters: _step asks autograd for the actor's gradients only, and
        # autograd then skips the critic's (eagerly, and in the compiled graph, which
        # computes only what it returns).
        loss, actor_info = actor_loss(
            self.actor,
            self.log_alpha,
            self.log_beta,
            self.critic,  # the freshly updated critic
            inputs["obs"],
            inputs["old_mean"],
            inputs["old_std"],
            inputs["action_noise"],
            inputs["kl_noise"],
            args.kl_bound,
            self.entropy_target,
            args.vmin,
            args.vmax,
        )
        self._step(self.actor_opt, self.actor_params, loss)
        return {**critic_info, **actor_info}

    def _step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss: torch.Tensor) -> None:
        # Gradients with respect to ``params`` only: for the actor loss this leaves the
        # critic's parameters untouched (the JAX file differentiates a function of the actor).
        grads = list(torch.autograd.grad(loss, params))
        clip_grad_norm(grads, self.args.max_grad_norm)
        if torch.compiler.is_compiling():
            # Inside --compile's one graph: torch.optim's own Adam in its functional form
            # (functional_adam, what optimizer.step() calls) on this optimiser's own
            # moments and step counts. optimizer.step() itself would cut the graph in three:
            # it breaks the graph on purpose around its update. "capturable" is the
            # formula with the bias correction computed from the step-count tensors, which
            # is what torch.compile uses for Adam too. Every hyperparameter (lr, betas, eps,
            # weight decay, ...) is read from the optimiser's own param group, so the two paths
            # cannot drift apart; the kernel choice is fixed here (foreach, capturable), so
            # --fused-adam's kernel runs only in eager updates.
            group, state = optimizer.param_groups[0], [optimizer.state[param] for param in params]
            with torch.no_grad():  # as in optimizer.step(): the update is not differentiated
                functional_adam(
                    params, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
                    [s["step"] for s in state], foreach=True, capturable=True, amsgrad=group["amsgrad"],
                    beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                )  # fmt: skip
            return
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()

    def train_iteration(self) -> dict[str, float]:
        """collect -> update normaliser -> soft TD(lambda) targets -> epochs of minibatches."""
        args = self.args
        rollout = self.collect_rollout()
        # IMPLEMENTATION DETAIL 9: the statistics are updated after collection, before
        # learning, and the batch keeps the normalisation it was collected with, so the
        # learner sees exactly the inputs the behaviour policy saw (SPEC 3).
        self.normalizer = normalizer_update(self.normalizer, rollout.raw_obs)
        target_return = soft_lambda_returns(
            rollout.soft_reward, rollout.next_value, rollout.terminated, rollout.truncated, args.gamma, args.lmbda
        )  # (T, N)
        # pi_old: the policy that collected the batch, frozen for the whole learning phase.
        # Its mean/std were stored during collection (the actor did not change meanwhile).
        batch_size = args.num_envs * args.num_steps
        minibatch_size = batch_size // args.num_mini_batches
        batch = {
            "obs": rollout.obs,
            "action": rollout.action,
            "target_return": target_return,
            "next_features": rollout.next_features,
            "reward": rollout.reward,
            "terminated": rollout.terminated,
            "old_mean": rollout.old_mean,
            "old_std": rollout.old_std,
        }
        batch = {k: v.reshape((batch_size,) + v.shape[2:]) for k, v in batch.items()}  # (B, ...)
        infos = []
        for _ in range(args.num_epochs):
            # A fresh permutation each epoch, split into num_mini_batches minibatches.
            order = torch.randperm(batch_size, generator=self.generator, device=self.device)
            shuffled = {k: v[order] for k, v in batch.items()}  # one gather per field per epoch
            for start in range(0, batch_size, minibatch_size):
                minibatch = {k: v[start : start + minibatch_size] for k, v in shuffled.items()}
                infos.append(self.update_minibatch(minibatch))
        self.iteration += 1

        # One device->host transfer for all metrics of the iteration (no per-minibatch sync).
        names = list(infos[0])
        means = torch.stack([torch.stack([info[n] for info in infos]) for n in names]).float().mean(dim=1)
        done = rollout.episode_done
        extra = torch.stack(
            [
                done.sum().float(),
                torch.where(done, rollout.episode_return, 0.0).sum(),
                torch.where(done, rollout.episode_length, 0.0).sum(),
                torch.where(done, rollout.success_once, 0.0).sum(),
                target_return.mean(),
                rollout.next_value.mean(),
                rollout.soft_reward.mean(),
                rollout.reward.mean(),
            ]
        )
        values = torch.cat([means, extra]).tolist()
        extra_names = [
            "charts/episodes",
            "charts/episode_return_sum",
            "charts/episode_length_sum",
            "charts/episode_success_sum",
            "values/target_return_mean",
            "values/next_value_mean",
            "values/soft_reward_mean",
            "values/reward_mean",
        ]
        return dict(zip(names + extra_names, values))

    @torch.no_grad()
    def evaluate(self, stochastic: bool = False) -> dict[str, np.ndarray]:
        """Full episodes on the separate evaluation envs (SPEC 10): the deterministic policy
        tanh(mean), or (``stochastic``) samples of pi. The normaliser is frozen. Fresh reset
        keys derived from the seed and the iteration, so a resumed run evaluates exactly as
        an unbroken one, and evaluation never touches the training generator.
        Returns per-episode arrays: 'return', and for ManiSkill 'success_once'/'success_at_end'."""
        args, env = self.args, self.eval_env
        generator = torch.Generator(device=self.device).manual_seed(
            (self.seed * 1_000_003 + self.iteration * 2 + int(stochastic)) % 2**63
        )
        rounds = math.ceil(args.num_eval_envs / env.num_envs)
        returns, success_once, success_at_end = [], [], []
        for round_index in range(rounds):
            if env.suite == "dm_control":
                import jax

                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), 0xE7A1), self.iteration)
                obs = env.reset(randomize_steps=False, key=jax.random.fold_in(key, round_index))
            else:
                # Keys max(131, rounds) apart per iteration: no two log points share one (the
                # deterministic and the stochastic evaluation of one log point start alike).
                stride = max(131, rounds)
                obs = env.reset(randomize_steps=False, key=self.seed * 7919 + self.iteration * stride + round_index)
            episode_return = torch.zeros(env.num_envs, device=self.device)
            alive = torch.ones(env.num_envs, dtype=torch.bool, device=self.device)
            for _ in range(args.episode_length):
                mean, std = self.actor(normalize(self.normalizer, obs))
                if stochastic:
                    noise = torch.randn(mean.shape, generator=generator, device=self.device)
                    action = sample_tanh_normal(mean, std, noise)[0]
                else:
                    action = torch.tanh(mean)
                step = env.step(action.clamp(-ACTION_CLIP, ACTION_CLIP))
                episode_return += torch.where(alive, step.reward, 0.0)
                ended = (step.terminated + step.truncated) > 0
                newly = alive & ended
                if env.suite == "maniskill":
                    success_once.append(step.success_once[newly])
                    success_at_end.append(step.success_at_end[newly])
                alive = alive & ~ended
                obs = step.next_obs
                if not alive.any():
                    break
            returns.append(episode_return)
        result = {"return": torch.cat(returns)[: args.num_eval_envs].cpu().numpy()}
        if env.suite == "maniskill":
            result["success_once"] = torch.cat(success_once)[: args.num_eval_envs].cpu().numpy()
            result["success_at_end"] = torch.cat(success_at_end)[: args.num_eval_envs].cpu().numpy()
        return result

    def close(self) -> None:
        self.env.close()
        if self.eval_env is not None and self.eval_env is not self.env:
            self.eval_env.close()

    # --- checkpoint contents -----------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "log_beta": self.log_beta.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "normalizer": self.normalizer._asdict(),
            "iteration": self.iteration,
            "generator": self.generator.get_state(),
            "obs": self.obs.detach().clone(),
            "env": self.env.get_state(),
        }

    def load_state_dict(self, state: dict, with_env: bool = True) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
            self.log_beta.copy_(state["log_beta"])
        load_optimizer_state(self.actor_opt, state["actor_opt"])
        load_optimizer_state(self.critic_opt, state["critic_opt"])
        if isinstance(self.update_fn, CUDAGraphed):
            self.update_fn.forget()  # its recording would still read Adam's old moment tensors
        self.normalizer = NormalizerState(**{k: v.to(self.device) for k, v in state["normalizer"].items()})
        self.iteration = int(state["iteration"])
        if state["generator"].numel() == self.generator.get_state().numel():
            self.generator.set_state(state["generator"])
        else:
            # Saved on the other kind of device: a CPU generator's state (5,056 bytes) and a
            # CUDA one's (16 bytes) are not interchangeable, so that stream cannot go on here.
            # A fresh one, derived from the seed and the iteration, takes over.
            self.generator.manual_seed((self.seed + 1) * 2**32 + self.iteration)
            if with_env:  # resuming training (evaluation never reads this generator)
                print(
                    f"note: the checkpoint's random generator was saved on another kind of device than "
                    f"{self.device.type}; training goes on with a fresh random stream (so it will not repeat "
                    "the unbroken run exactly)",
                    file=sys.stderr,
                )
        if with_env:
            self.env.set_state(state["env"])
            if self.env.suite == "dm_control":
                self.obs = state["obs"].to(self.device)
            else:  # the simulator restarts its episodes (see ManiSkillEnv.get_state)
                self.obs = self.env.reset(randomize_steps=True)


# ======================================================================================
# 7. Logging & checkpoints
# ======================================================================================

CHECKPOINT_NAME = "checkpoint.pt"


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    names = ["torch", "numpy", "tyro", "jax", "jaxlib", "mujoco", "mujoco-mjx", "playground"]
    for name in names + ["mani_skill", "sapien", "gymnasium"]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def save_checkpoint(
    path: str, trainer: Trainer, args: Args, global_step: int, metrics: list[dict[str, float]] | None = None
) -> None:
    """One torch.save file: actor, critic, both optimiser states, log_alpha/log_beta,
    normaliser, iteration, the training generator's state, the env state (Playground: the
    JAX physics state and key; ManiSkill: only a counter), plus the args and counters, and
    the metrics of the iterations since the last log point (a Ctrl-C can stop a run between
    log points; the resumed run's next row then averages the same iterations as an unbroken
    run's). Everything in it is a tensor, number or string, so it loads with
    ``weights_only=True``. Written atomically (tmp file + rename)."""
    payload = {"format": "reppo_torch", "args": dataclasses.asdict(args), "global_step": global_step}
    payload["metrics_since_log"] = list(metrics or [])
    payload["trainer"] = trainer.state_dict()
    tmp_path = path + ".tmp"
    try:
        torch.save(payload, tmp_path)
        os.replace(tmp_path, path)
    except BaseException:  # a Ctrl-C or a full disk half way: no partial file is left behind
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def load_trainer_state(trainer: Trainer, payload: dict, path: str, **options) -> None:
    """Trainer.load_state_dict, with one clear message for a checkpoint whose contents do not
    fit this file and these args (a missing entry, a renamed parameter, another size)."""
    try:
        trainer.load_state_dict(payload["trainer"], **options)
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        problem = f"{type(error).__name__}: {error}"
        raise UserError(f"'{path}' does not fit this version of reppo_torch.py ({problem})") from error


def read_checkpoint(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"'{path}' is a folder; give the checkpoint file, e.g. {os.path.join(path, CHECKPOINT_NAME)}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != "reppo_torch":
            raise ValueError("missing the 'reppo_torch' format tag")
    except Exception as error:
        raise UserError(f"'{path}' is not a reppo_torch checkpoint: {error}") from error
    return payload


def start_wandb(args: Args, run_dir: str, run_name: str):
    """--track: a wandb run named after the run folder (so a resumed run continues it), or a
    UserError that says what to do: without wandb installed, or when wandb.init fails (online
    mode with no API key raises its UsageError; no network, a CommError after its timeout).
    Started before args.json is written, so that a run that cannot start changes nothing
    (train() then removes a fresh run's folder again)."""
    try:
        import wandb
    except ImportError as error:
        problem = f"--track needs wandb ({error}): pip install wandb==0.31.0"
    else:
        try:
            return wandb.init(
                project=args.wandb_project,
                entity=args.wandb_entity,
                name=run_name,
                config=dataclasses.asdict(args),
                mode=args.wandb_mode,
                dir=run_dir,
                resume="allow",
                id=run_name.replace("/", "_"),
            )
        except BaseException as error:
            # A run that init had made before it failed or was interrupted (a Ctrl-C late in a
            # slow init) is finished as failed. Earlier in init there is no run object to
            # finish: what wandb had registered by then is left to wandb.
            if getattr(wandb, "run", None) is not None:
                finish_as_failed(wandb.run)
            if not isinstance(error, Exception):  # a Ctrl-C goes on to train()'s clean-up
                raise
            # wandb's own error classes; the user needs one message
            login = "log in once with `wandb login` (or set WANDB_API_KEY), or " if "API key" in str(error) else ""
            problem = (
                f"--track: wandb could not start the run ({type(error).__name__}: {error}); {login}add "
                "--wandb-mode offline to write the run locally and `wandb sync` it later"
            )
    raise UserError(problem)


def finish_as_failed(run) -> None:
    """Finish a wandb run as failed (exit code 1) when a run cannot start. A failure to finish
    (no network, say) is reported, not raised, so that the error that stopped the run stays
    the one raised."""
    try:
        run.finish(exit_code=1)
    except Exception as error:
        print(f"wandb could not finish the run: {type(error).__name__}: {error}", file=sys.stderr)


class MetricsLogger:
    """metrics.csv (always), wandb (with --track) and a tqdm progress bar on stderr."""

    def __init__(self, args: Args, run_dir: str, start_step: int, end_step: int, metric_names: list[str], wandb_run):
        self.wandb = wandb_run  # start_wandb's run, or None without --track
        self.path = os.path.join(run_dir, "metrics.csv")
        self.columns = ["global_step", "seed"] + sorted(set(metric_names) - {"seed"})
        kept = []
        if os.path.exists(self.path) and start_step > 0:
            # A resumed run: keep the rows up to the checkpoint, drop those past it. A run
            # resumed from step 0 starts over (it evaluates step 0 again).
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["global_step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self.bar = None
        if args.progress:
            from tqdm import tqdm

            # end_step: whole iterations only, so up to one batch short of --total-timesteps.
            self.bar = tqdm(total=end_step, initial=start_step, unit="step", unit_scale=True, file=sys.stderr)

    def log(self, global_step: int, rows: list[dict[str, float]]) -> None:
        """One row per seed (this file logs one seed per run, so one row)."""
        with open(self.path, "a", newline="") as f:
            # A key that is no column is a bug (a metric added without its column): fail loudly.
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
            for row in rows:
                writer.writerow({"global_step": global_step, **row})
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in rows[0].items() if k != "seed"}, step=global_step)

    def progress(self, global_step: int, sps: float, eval_return: float, success: float | None = None) -> None:
        if self.bar is not None:
            self.bar.n = global_step
            postfix = {"SPS": f"{sps:,.0f}" if math.isfinite(sps) else "warm-up", "eval_return": f"{eval_return:.1f}"}
            if success is not None:
                postfix["success"] = f"{success:.2f}"
            self.bar.set_postfix(postfix)
            self.bar.refresh()

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self, completed: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if completed else 1)  # a stopped run shows as failed, not finished


def first_nonfinite(metrics: dict[str, float]) -> list[str] | None:
    """Names of the NaN/inf metrics of an iteration (losses first), else None."""
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    return sorted(bad, key=lambda n: (not n.startswith("losses/"), n)) or None


def parameters_finite(trainer: Trainer) -> bool:
    """Whether every network parameter, log alpha and log beta is finite."""
    params = trainer.actor_params + trainer.critic_params
    return bool(torch.stack([p.detach().isfinite().all() for p in params]).all())


# ======================================================================================
# 8. main
# ======================================================================================


def make_run_dir(args: Args) -> tuple[str, str]:
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.runs_dir, run_name)
    try:
        os.makedirs(run_dir)
    except FileExistsError as error:  # never two runs in one folder (their metrics.csv would mix)
        raise UserError(
            f"the run folder {run_dir} exists already (a run of the same task, --exp-name and --seed started "
            "in the same second): start again"
        ) from error
    except OSError as error:  # --runs-dir under a file, or where we may not write
        raise UserError(f"cannot make the run folder {run_dir}: {error.strerror or error}") from error
    return run_name, run_dir


def write_args(args: Args, run_dir: str, device: torch.device, argv: list[str]) -> None:
    """args.json: the resolved arguments, versions, devices and the command line. A resumed
    run keeps the command that started it and lists the ones that resumed it."""
    path = os.path.join(run_dir, "args.json")
    command = "python " + shlex.join([os.path.basename(__file__), *argv])
    record = {
        "args": dataclasses.asdict(args),
        "versions": library_versions(),
        "torch_device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "command": command,
        "resumed_by": [],
    }
    if args.resume is not None and os.path.exists(path):
        with open(path) as f:
            started = json.load(f)
        record["command"] = started.get("command", command)
        record["resumed_by"] = started.get("resumed_by", []) + [command]
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def eval_rows(trainer: Trainer) -> dict[str, float]:
    """Evaluation metrics of one seed: deterministic return (mean, std); for ManiSkill also
    success_once / success_at_end and the same for the stochastic policy."""
    result = trainer.evaluate()
    row = {
        "seed": trainer.seed,
        "eval/episodic_return": float(result["return"].mean()),
        "eval/episodic_return_std": float(result["return"].std()),
    }
    if trainer.env.suite == "maniskill":
        row["eval/success_once"] = float(result["success_once"].mean())
        row["eval/success_at_end"] = float(result["success_at_end"].mean())
        stochastic = trainer.evaluate(stochastic=True)
        row["eval_stochastic/episodic_return"] = float(stochastic["return"].mean())
        row["eval_stochastic/success_once"] = float(stochastic["success_once"].mean())
        row["eval_stochastic/success_at_end"] = float(stochastic["success_at_end"].mean())
    return row


def train_row(metrics: list[dict[str, float]], sps: float, maniskill: bool) -> dict[str, float]:
    """Average the per-iteration metrics since the last log point into one row; the training
    episodes that ended meanwhile give the mean return and length (and, for ManiSkill, the
    fraction that succeeded at some step)."""
    names = [k for k in metrics[0] if not k.startswith("charts/episode")]
    row = {k: float(np.mean([m[k] for m in metrics])) for k in names}
    episodes = sum(m["charts/episodes"] for m in metrics)

    def per_episode(name: str) -> float:
        return sum(m[name] for m in metrics) / episodes if episodes else float("nan")

    row["charts/episodic_return"] = per_episode("charts/episode_return_sum")
    row["charts/episodic_length"] = per_episode("charts/episode_length_sum")
    if maniskill:
        row["charts/success_once"] = per_episode("charts/episode_success_sum")
    row["charts/SPS"] = sps
    return row


def metric_names(trainer: Trainer) -> list[str]:
    """Every column a log row can hold (known without running anything; a row with a key
    that is not here fails in MetricsLogger.log, so a new metric cannot go missing)."""
    names = ["losses/critic_loss", "losses/critic_ce", "losses/aux_loss", "values/q_mean"]
    names += ["losses/actor_loss", "losses/alpha_loss", "losses/beta_loss", "policy/kl", "policy/kl_outside_frac"]
    names += ["policy/entropy", "policy/alpha", "policy/beta", "policy/std", "values/target_return_mean"]
    names += ["values/next_value_mean", "values/soft_reward_mean", "values/reward_mean"]
    names += ["charts/episodic_return", "charts/episodic_length", "charts/SPS"]
    names += ["eval/episodic_return", "eval/episodic_return_std"]
    if trainer.env.suite == "maniskill":
        names += ["charts/success_once", "eval/success_once", "eval/success_at_end"]
        names += ["eval_stochastic/episodic_return", "eval_stochastic/success_once", "eval_stochastic/success_at_end"]
    return names


def describe_device(args: Args, trainer: Trainer, device: torch.device) -> str:
    if trainer.env.suite == "maniskill":
        sim = trainer.env.sim_backend
        reason = "no CUDA" if not torch.cuda.is_available() else "--device cpu"
        note = "" if sim == "physx_cuda" else f" ({reason}: ManiSkill's CPU simulator runs one env at a time)"
        return f"ManiSkill3 {args.env_id} on {sim} with {args.num_envs} env(s){note}; networks on {device}"
    return f"MuJoCo Playground {args.env_id} (JAX, impl={args.impl}) with {args.num_envs} envs; networks on {device}"


def args_from_checkpoint(args: Args, argv: list[str]) -> Args:
    """--resume and --eval-only take the checkpoint's own arguments (so that networks, env
    and sizes match it), but for --total-timesteps (which a resumed run extends) and
    --num-eval-envs, taken from the command line when given, and --progress, always (the same
    rule as reppo_jax.py). The device and the speed switches, which never change the math, may
    be given anew too; without CUDA, a checkpoint's --device cuda and --cuda-graphs fall back to
    the defaults (a run saved on a GPU with --cuda-graphs can go on, or be evaluated, on a CPU)."""
    path = args.resume or args.checkpoint
    saved_args = read_checkpoint(path)["args"]
    unknown = sorted(set(saved_args) - {field.name for field in dataclasses.fields(Args)})
    if unknown:
        raise UserError(f"'{path}' was saved by another version of this file (unknown settings: {', '.join(unknown)})")
    saved = dataclasses.replace(Args(), **saved_args)
    overrides = {"resume": args.resume, "checkpoint": args.checkpoint, "eval_only": args.eval_only}
    overrides["progress"] = args.progress
    may_change = ["total_timesteps", "num_eval_envs", "device", "torch_threads", "compile", "fused_adam", "cuda_graphs"]
    for flag in may_change:
        name = flag.replace("_", "-")
        cli_flags = ("--" + name, "--no-" + name)  # tyro's pair for a boolean flag
        if any(token in cli_flags or token.startswith(cli_flags[0] + "=") for token in argv):
            overrides[flag] = getattr(args, flag)
    warn_ignored_flags(argv, may_change + list(overrides))
    if not torch.cuda.is_available():
        # Saved on a GPU, continued or evaluated here without one: the checkpoint's CUDA-only
        # settings give way to the defaults (the math is the same), unless given anew.
        cuda_only = {"device": "cuda", "cuda_graphs": True}
        dropped = [flag for flag, value in cuda_only.items() if flag not in overrides and getattr(saved, flag) == value]
        if dropped:
            overrides.update({flag: getattr(Args(), flag) for flag in dropped})
            print(
                "note: no CUDA device here; the checkpoint's "
                + ", ".join(f"--{flag.replace('_', '-')}" for flag in dropped)
                + " left at the default",
                file=sys.stderr,
            )
    return dataclasses.replace(saved, **overrides)


def warn_ignored_flags(argv: list[str], used: list[str]) -> None:
    """Say which flags given beside --resume / --eval-only the checkpoint's arguments override."""
    allowed = {name.replace("_", "-") for name in used}
    given = [token[2:].split("=")[0] for token in argv if token.startswith("--")]
    ignored = [name for name in given if name not in allowed and name.removeprefix("no-") not in allowed]
    if ignored:
        print(
            "note: --resume and --eval-only take the checkpoint's own arguments; ignored: "
            + ", ".join("--" + name for name in ignored),
            file=sys.stderr,
        )


def run_eval_only(args: Args) -> None:
    payload = read_checkpoint(args.checkpoint)
    device = torch_device(args)
    # Evaluation needs no training envs: the evaluation envs stand in for them.
    eval_env = make_eval_env(args, args.seed, device)
    try:  # the simulators are closed however evaluation ends (a bad checkpoint, a Ctrl-C)
        trainer = Trainer(
            dataclasses.replace(args, num_envs=eval_env.num_envs), args.seed, device, env=eval_env, build_eval_env=False
        )
        trainer.eval_env = eval_env
        load_trainer_state(trainer, payload, args.checkpoint, with_env=False)
        row = eval_rows(trainer)
    finally:
        eval_env.close()
    line = (
        f"eval seed={args.seed} step={payload['global_step']} "
        f"episodic_return={row['eval/episodic_return']:.2f} +- {row['eval/episodic_return_std']:.2f} "
        f"over {args.num_eval_envs} episodes"
    )
    if "eval/success_once" in row:
        line += (
            f" success_once={row['eval/success_once']:.2f} success_at_end={row['eval/success_at_end']:.2f}"
            f" (stochastic: return={row['eval_stochastic/episodic_return']:.2f}"
            f" success_once={row['eval_stochastic/success_once']:.2f})"
        )
    print(line)


def train(args: Args, argv: list[str]) -> str:
    """Train (or resume) one seed's run; returns the run folder. ``argv``: the command line,
    recorded in args.json."""
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    start_step = 0
    payload = None
    if args.resume is not None:  # continue in the checkpoint's own run folder
        payload = read_checkpoint(args.resume)
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        run_name = os.path.basename(run_dir)
        start_step = payload["global_step"]
        if start_step + batch_size > args.total_timesteps:
            raise UserError(
                f"the checkpoint is at step {start_step:,}: --total-timesteps {args.total_timesteps:,} leaves "
                "no iteration to run; give a larger --total-timesteps"
            )
    device = torch_device(args)
    if device.type == "cpu" and args.num_envs * args.critic_hidden >= 1024 * 512:
        # Measured with benchmarks/speed.py on 2-core VMs: the paper setting on CheetahRun
        # (1024 envs x 32 steps, hidden 512) ran at 774-1,578 env-steps/s (eager), depending on
        # the VM and the sitting (docs/results.md), so the estimate is that range.
        steps = args.total_timesteps - start_step  # still to run (--num-seeds: this seed's)
        print(
            f"No CUDA device: training on the CPU. The paper setting on CheetahRun (1024 envs, hidden 512) "
            f"ran at 774-1,578 env-steps/s on 2-core CPUs; at those speeds this run's {steps:,} env steps would "
            f"take {steps / 1_578 / 3600:,.1f}-{steps / 774 / 3600:,.1f} hours, and this setting "
            f"({args.num_envs} envs, hidden {args.critic_hidden}) is no faster. For a CPU, try --preset cpu.",
            file=sys.stderr,
        )
    trainer = Trainer(args, args.seed, device)
    fresh_run_dir, wandb_run = None, None
    # A run that cannot start (an error, or a Ctrl-C: during a slow wandb.init, say) closes its
    # simulators again, finishes a wandb run it had started as failed and removes a fresh run's
    # folder, so that it leaves nothing behind.
    try:
        if payload is not None:
            load_trainer_state(trainer, payload, args.resume)
        if args.resume is None:  # a fresh run's folder, once its envs and networks could be built
            run_name, run_dir = make_run_dir(args)
            fresh_run_dir = run_dir
        wandb_run = start_wandb(args, run_dir, run_name) if args.track else None
        write_args(args, run_dir, device, argv)  # once the run can start (and --torch-threads is set)
        end_step = num_iterations * batch_size
        logger = MetricsLogger(args, run_dir, start_step, end_step, metric_names(trainer), wandb_run)
        # Ctrl-C from here on: the first one lets the running iteration finish and then saves a
        # clean checkpoint of the last completed iteration (so --resume continues exactly); a
        # second Ctrl-C stops at once.
        interrupted = install_interrupt_handler()
    except BaseException:
        # The error that stopped the start is the one raised (finish_as_failed reports a
        # failure to finish), and a second Ctrl-C during a slow finish still leaves through
        # the clean-up below.
        try:
            if wandb_run is not None:
                finish_as_failed(wandb_run)
        finally:
            if fresh_run_dir is not None:
                shutil.rmtree(fresh_run_dir, ignore_errors=True)
            try:
                trainer.close()
            except Exception as close_error:  # reported, like a failed finish
                print(
                    f"the simulators could not be closed: {type(close_error).__name__}: {close_error}", file=sys.stderr
                )
        raise
    checkpoint_path = os.path.join(run_dir, CHECKPOINT_NAME)
    iteration = trainer.iteration
    train_seconds, train_steps = 0.0, 0
    warmed_up = False  # the first iteration of a process (JAX compilation, allocator warm-up) is not timed
    metrics: list[dict[str, float]] = [] if payload is None else payload.get("metrics_since_log", [])
    payload = None  # loaded: free its copy of the checkpoint
    eval_return = sps = float("nan")
    last_finite = None
    completed = False
    try:
        logger.write(f"run folder: {run_dir}")
        logger.write(describe_device(args, trainer, device))
        if iteration == 0:  # the untrained policy, so curves start at step 0
            row = eval_rows(trainer)
            logger.log(0, [row])
            eval_return = row["eval/episodic_return"]
        while iteration < num_iterations:
            stop_if_interrupted(interrupted)
            if args.save_model or args.resume:  # kept to be saved if this iteration goes non-finite
                last_finite = copy.deepcopy(trainer.state_dict())
            start = time.perf_counter()  # after the copy: SPS times training alone
            iteration_metrics = trainer.train_iteration()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if warmed_up:
                train_seconds += seconds
                train_steps += batch_size
            else:
                logger.write(f"first iteration (warm-up) took {seconds:.1f} s, not counted in SPS")
                warmed_up = True
            bad = first_nonfinite(iteration_metrics)
            if bad is None and not parameters_finite(trainer):
                bad = ["parameters"]  # finite losses, but the iteration's last update was not
            if bad is not None:
                message = f"non-finite {', '.join(bad)} at iteration {iteration + 1}; stopped"
                if last_finite is not None:
                    trainer.load_state_dict(last_finite)
                    save_checkpoint(checkpoint_path, trainer, args, iteration * batch_size, metrics)
                    message += (
                        f". The last finite state (iteration {iteration}) is in {checkpoint_path}, to inspect "
                        "or --eval-only (--resume from it would repeat the same computation)"
                    )
                raise UserError(message)
            metrics.append(iteration_metrics)
            iteration += 1
            global_step = iteration * batch_size
            sps = train_steps / train_seconds if train_seconds > 0 else float("nan")
            logger.progress(global_step, sps, eval_return)
            if iteration % args.log_interval == 0 or iteration == num_iterations:
                row = {**train_row(metrics, sps, trainer.env.suite == "maniskill"), **eval_rows(trainer)}
                metrics = []
                eval_return = row["eval/episodic_return"]
                logger.log(global_step, [row])
                logger.progress(global_step, sps, eval_return, row.get("eval/success_once"))
                if args.save_model:
                    save_checkpoint(checkpoint_path, trainer, args, global_step)
        stop_if_interrupted(interrupted)  # a Ctrl-C in the last iteration still gets its checkpoint
        speed = "SPS not measured (only the warm-up iteration ran)"
        if not math.isnan(sps):
            speed = f"SPS {sps:,.0f} (after the first, warm-up iteration)"
        logger.write(
            f"done: {iteration * batch_size:,} steps, final eval return {eval_return:.1f}, {speed}, "
            f"peak RSS {peak_rss_mb():,.0f} MiB"
        )
        completed = True
    except KeyboardInterrupt:
        if interrupted["clean"]:
            try:  # the save can take seconds (its first call compiles the simulator-state copy)
                save_checkpoint(checkpoint_path, trainer, args, iteration * batch_size, metrics)
            except KeyboardInterrupt:  # a second Ctrl-C while saving: stop now, and say so
                logger.write("interrupted again while saving: no checkpoint written")
            else:
                logger.write(f"interrupted: saved {checkpoint_path} at step {iteration * batch_size:,}")
        else:
            logger.write("interrupted twice, inside an iteration: no checkpoint written")
        raise
    finally:  # also after a non-finite loss (UserError): the progress bar and wandb are closed
        restore_interrupt_handler()
        logger.close(completed)  # first: a Ctrl-C in the simulators' close then skips nothing of it
        trainer.close()
    return run_dir


_previous_sigint_handler: Any = None
_previous_unraisablehook: Any = None


def install_interrupt_handler() -> dict[str, bool]:
    """SIGINT sets a flag the training loop reads between iterations; a second SIGINT
    raises KeyboardInterrupt at once."""
    global _previous_sigint_handler, _previous_unraisablehook
    state = {"flag": False, "clean": False}

    def handler(signum, frame):
        if state["flag"]:
            raise KeyboardInterrupt
        state["flag"] = True
        print(
            "\nCtrl-C: finishing this iteration, then saving a checkpoint (Ctrl-C again to stop now)", file=sys.stderr
        )

    def unraisable(info):
        # Python runs the handler wherever the main thread happens to be. Where an exception
        # cannot be passed on (a garbage-collector callback, such as JAX's, or a __del__),
        # Python prints it and drops it, and a second Ctrl-C landing there would be lost:
        # send SIGINT again, from another thread once this hook has returned (raised in the
        # hook, it would be dropped too), to be raised in ordinary code.
        if issubclass(info.exc_type, KeyboardInterrupt):
            again = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
            again.daemon = True
            again.start()
        else:
            _previous_unraisablehook(info)

    try:
        _previous_sigint_handler = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread (e.g. some test runners): plain KeyboardInterrupt
        _previous_sigint_handler = None
        return state
    _previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, unraisable
    return state


def stop_if_interrupted(state: dict[str, bool]) -> None:
    """Between iterations: after a first Ctrl-C, stop cleanly (the caller then saves a checkpoint)."""
    if state["flag"]:
        state["clean"] = True
        raise KeyboardInterrupt


def restore_interrupt_handler() -> None:
    if _previous_sigint_handler is not None:
        signal.signal(signal.SIGINT, _previous_sigint_handler)
        sys.unraisablehook = _previous_unraisablehook


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        if args.eval_only and args.checkpoint is None:
            raise UserError("--eval-only needs --checkpoint PATH")
        if args.checkpoint is not None and not args.eval_only:
            raise UserError("--checkpoint is read by --eval-only only; to continue training use --resume PATH")
        if args.eval_only and args.resume is not None:
            raise UserError("--eval-only evaluates --checkpoint PATH; it does not go with --resume")
        if args.resume is not None or args.eval_only:
            args = args_from_checkpoint(args, argv)
        args = resolve_args(args)
        if args.eval_only:
            run_eval_only(args)
        elif args.resume is not None:
            train(args, argv)
        else:
            for index in range(args.num_seeds):  # seeds one after another, one run folder each
                if args.compile and index > 0:
                    # The compiled update is tied to its Trainer's optimisers, so each seed compiles
                    # it anew; dropping the last seed's compiled code keeps torch.compile from hitting
                    # its limit of 8 recompilations (past it, it would quietly run eagerly).
                    torch._dynamo.reset()
                # Each run folder's args are those of its one seed (num_seeds=1).
                train(dataclasses.replace(args, seed=args.seed + index, num_seeds=1), argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    if code == 130:
        # Ctrl-C. A second one can land inside a JAX call (the simulator's compilation, say) and
        # leave XLA half way through it; JAX's exit handlers then crashed the interpreter with a
        # segmentation fault. train() has closed the run on its way out (the metrics file, the
        # checkpoint, the progress bar, wandb, the simulators), so the process leaves at once,
        # without the exit handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
