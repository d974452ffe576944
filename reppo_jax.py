"""REPPO in one file: JAX + Flax NNX + Optax on MuJoCo Playground.

Relative Entropy Pathwise Policy Optimization (Voelcker et al., ICLR 2026,
https://arxiv.org/abs/2507.11019) is an *on-policy* actor-critic for continuous control.
Like PPO it learns only from the latest rollout (no replay buffer); unlike PPO it does
not use the high-variance score-function (likelihood-ratio) gradient. It learns an
action-conditioned critic Q(s, a) from the rollout and improves the policy with
*pathwise* gradients through Q, kept stable by a KL trust region and an entropy target,
each enforced with a learned Lagrange multiplier.

The algorithm at a glance (one call of ``train_iteration``)::

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

    python reppo_jax.py --env-id CheetahRun                 # the paper's DM Control setting
    python reppo_jax.py --env-id CartpoleBalance --preset cpu --total-timesteps 500000
    python reppo_jax.py --help                              # every flag

Sections (the same, in the same order, in ``reppo_torch.py``):
    1. Args   2. Environment   3. Math   4. Networks   5. Losses
    6. Collect / Learn / Evaluate   7. Logging & checkpoints   8. main

The contract for every line is the project's ``SPEC.md``, cited below as "SPEC section N"
(it is not shipped here: ``docs/reppo.md`` maps those numbers to its own headings, and
explains each equation and each ``IMPLEMENTATION DETAIL n`` tag below).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax import nnx

# ======================================================================================
# 1. Args
# ======================================================================================


@dataclass
class Args:
    """REPPO hyperparameters. Defaults are the paper's DM Control "small data" setting
    (SPEC section 11); ``--preset cpu`` swaps in a setting that learns on a laptop CPU."""

    # --- experiment -------------------------------------------------------------------
    exp_name: str = "reppo_jax"
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment; with --num-seeds K the seeds are seed, seed+1, ..., seed+K-1"""
    num_seeds: int = 1
    """number of independent seeds trained at once in this process (vmap)"""
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
    """write {runs_dir}/{run_name}/checkpoint.npz at every log point and at the end"""
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
    """MuJoCo Playground DM Control task, e.g. CheetahRun, CartpoleBalance, WalkerWalk"""
    impl: Literal["auto", "jax", "warp"] = "auto"
    """MuJoCo engine; 'auto' picks 'jax' (MJX) on every backend, see make_env"""
    episode_length: int | None = None
    """time limit of an episode; None takes the suite's (1000 for DM Control)"""
    num_eval_envs: int = 16
    """number of evaluation episodes (one per separate evaluation env)"""

    # --- collection -------------------------------------------------------------------
    total_timesteps: int = 50_000_000
    """total environment steps of training (summed over envs, per seed)"""
    num_envs: int = 1024
    """number of parallel environments"""
    num_steps: int = 32
    """rollout length per env per iteration (T)"""
    gamma: float | None = None
    """discount factor; None takes the suite's (0.99 for DM Control)"""
    lmbda: float = 0.95
    """lambda of the soft TD(lambda) targets"""

    # --- critic -----------------------------------------------------------------------
    critic_hidden: int = 512
    """width of the critic"""
    num_bins: int = 151
    """number of bins of the categorical (HL-Gauss) critic"""
    vmin: float | None = None
    """lowest value of the critic's support; None takes the suite's (0 for DM Control)"""
    vmax: float | None = None
    """highest value of the critic's support; None takes the suite's (150 for DM Control)"""
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

    # --- logging ----------------------------------------------------------------------
    log_interval: int = 10
    """training iterations fused into one jitted call; logging, evaluation and checkpointing happen between calls"""


# `--preset cpu`: a small setting for a CPU (64 envs x 32 steps, 4 minibatches, 8 epochs,
# hidden 256, a log point every 20 iterations); the other hyperparameters as SPEC section 11.
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

# Per-suite defaults (SPEC section 11) for fields left at None.
DM_CONTROL_DEFAULTS = {"vmin": 0.0, "vmax": 150.0, "gamma": 0.99, "episode_length": 1000}


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
    if args.env_id not in dm_control_envs():
        raise UserError(unsupported_env_message(args.env_id))
    filled = {k: v for k, v in DM_CONTROL_DEFAULTS.items() if getattr(args, k) is None}
    args = dataclasses.replace(args, **filled)
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
    if batch_size % args.num_mini_batches != 0:
        raise UserError(
            f"num_envs * num_steps = {args.num_envs} * {args.num_steps} = {batch_size} "
            f"is not divisible by --num-mini-batches {args.num_mini_batches}"
        )
    if args.total_timesteps < batch_size:
        raise UserError(
            f"--total-timesteps {args.total_timesteps} is smaller than one iteration "
            f"(num_envs * num_steps = {batch_size})"
        )
    if not args.vmin < args.vmax or args.num_bins < 2:
        raise UserError(
            f"need --vmin < --vmax and --num-bins >= 2, got --vmin {args.vmin}, --vmax {args.vmax}, "
            f"--num-bins {args.num_bins}"
        )
    if not -(2**31) <= args.seed <= 2**31 - args.num_seeds:  # JAX's int32 seeds
        raise UserError(f"--seed must be in [-2**31, 2**31 - num_seeds], got {args.seed}")
    if args.impl == "warp" and args.num_seeds > 1:
        # MuJoCo Warp's step checks that every leaf of its state is batched over the envs
        # alone; vmapped over seeds as well, it raises a ValueError while compiling.
        raise UserError(
            "--impl warp runs one seed per process (MuJoCo Warp's state does not vmap over seeds): "
            "run the seeds one by one, or use --impl jax with --num-seeds"
        )
    if not 0.0 < args.gamma <= 1.0:
        raise UserError(f"--gamma must be in (0, 1], got {args.gamma}")
    if not 0.0 <= args.lmbda <= 1.0:
        raise UserError(f"--lmbda must be in [0, 1], got {args.lmbda}")
    return args


# ======================================================================================
# 2. Environment
# ======================================================================================


def dm_control_envs() -> tuple[str, ...]:
    """The MuJoCo Playground DM Control task names (all of them work offline)."""
    from mujoco_playground import registry

    return tuple(registry.dm_control_suite.ALL_ENVS)


def unsupported_env_message(env_id: str) -> str:
    from mujoco_playground import registry

    valid = ", ".join(sorted(dm_control_envs()))
    if env_id in registry.ALL_ENVS:
        return (
            f"'{env_id}' is a MuJoCo Playground locomotion/manipulation task. This file supports "
            f"the DM Control suite only; those tasks also need their robot assets (MuJoCo "
            f"Menagerie) downloaded from the internet on first use. DM Control tasks: {valid}"
        )
    maniskill = ""
    if re.search(r"-v\d+$", env_id):
        maniskill = " (ManiSkill3 tasks, named like PickCube-v1, run in reppo_torch.py)"
    return f"unknown --env-id '{env_id}'{maniskill}. Valid DM Control tasks: {valid}"


def make_env(env_id: str, impl: str, episode_length: int):
    """Load a Playground DM Control task with an explicit physics engine.

    Playground's DM Control tasks default to ``impl="warp"`` (MuJoCo Warp). We pick
    ``impl="jax"`` (MJX written in JAX) for 'auto' on every backend: it is faster than warp
    on a CPU (1.7-4.2x through this wrapper on 2 cores; docs/reppo.md), it is the engine behind
    the paper's runs, and it composes with ``jax.vmap`` over seeds and with our own auto-reset
    wrapper. ``--impl warp`` works through the wrapper (tests/test_env_jax.py: the same steps as
    MJX on CartpoleBalance); on a GPU it may be faster for contact-rich tasks, which has not
    been measured here.
    """
    from mujoco_playground import registry

    engine = "jax" if impl == "auto" else impl
    try:
        return registry.load(env_id, config_overrides={"impl": engine, "episode_length": episode_length})
    except Exception as error:  # Playground raises many kinds; the user needs one message
        raise UserError(f"could not load '{env_id}' with impl='{engine}': {error}") from error


class EnvState(NamedTuple):
    """State of N auto-resetting envs (a pytree, so it lives inside jit and vmap)."""

    physics: Any  # the Playground State of each env, batched over N
    obs: jax.Array  # (N, obs_size) observation the policy acts on next
    step_count: jax.Array  # (N,) steps since the episode started (or the random start)
    episode_return: jax.Array  # (N,) undiscounted return of the running episode
    episode_length: jax.Array  # (N,) length of the running episode
    from_reset: jax.Array  # (N,) bool: the running episode started at step 0 (a complete one)
    reset_pool: Any  # a fresh Playground State per env, waiting for its next reset (see step)
    pool_fresh: jax.Array  # (N,) bool: the env's pool slot is still unused


class StepResult(NamedTuple):
    """What one vectorised step hands back (all shaped (N, ...))."""

    next_obs: jax.Array  # what the policy sees next: a new episode's first obs where one ended and was reset
    final_obs: jax.Array  # the TRUE observation after this action, even where one ended
    reward: jax.Array
    terminated: jax.Array  # a real terminal state: no bootstrap
    truncated: jax.Array  # time limit: bootstrap from final_obs
    episode_done: jax.Array  # a complete episode (started at step 0) ended here
    episode_return: jax.Array  # its return (valid where episode_done)
    episode_length: jax.Array  # its length (valid where episode_done)


class AutoResetEnv:
    """N copies of a Playground env that reset themselves and keep the true final obs.

    Playground's stock ``BraxAutoResetWrapper`` overwrites the observation of a finished
    episode with the first observation of the next one, so a time-limit step can no
    longer bootstrap from its real next state. This wrapper returns both.
    """

    def __init__(self, env, num_envs: int, episode_length: int):
        self.env = env
        self.num_envs = num_envs
        self.episode_length = episode_length
        self.obs_size = int(env.observation_size)
        self.action_size = int(env.action_size)

    def reset(self, key: jax.Array, randomize_steps: bool) -> EnvState:
        key_reset, key_steps = jax.random.split(key)
        physics = jax.vmap(self.env.reset)(jax.random.split(key_reset, self.num_envs))
        # IMPLEMENTATION DETAIL 4: random initial step counters in [0, episode_length),
        # so that the N envs do not all hit the time limit (and reset) on the same step.
        if randomize_steps:
            steps = jax.random.randint(key_steps, (self.num_envs,), 0, self.episode_length)
        else:
            steps = jnp.zeros(self.num_envs, jnp.int32)
        zeros = jnp.zeros(self.num_envs)
        # IMPLEMENTATION DETAIL 10: an episode whose counter starts late is cut short; it is
        # not a complete episode, so its return is not logged in charts/episodic_return
        # (from_reset stays False until the env's first auto-reset: its first episode starts
        # from a real reset of the physics, but with its step counter part-way through).
        from_reset = jnp.full(self.num_envs, not randomize_steps)
        # The reset pool starts empty (no slot fresh; `physics` only gives it its shape):
        # step fills it when first needed, so evaluation, which never auto-resets, pays
        # nothing for it.
        no_slot = jnp.zeros(self.num_envs, bool)
        return EnvState(physics, physics.obs, steps, zeros, zeros.astype(jnp.int32), from_reset, physics, no_slot)

    def step(
        self, state: EnvState, action: jax.Array, key: jax.Array, auto_reset: bool = True
    ) -> tuple[EnvState, StepResult]:
        """One step of all N envs; envs whose episode ended start a new one (unless
        ``auto_reset`` is False: evaluation runs exactly one episode per env)."""
        stepped = jax.vmap(self.env.step)(state.physics, action)
        # DM Control tasks only "terminate" when the physics diverges: Playground flags a NaN
        # state; a state that overflowed to inf without a NaN (a non-finite observation or
        # reward with done = 0) has diverged too, and is treated the same.
        obs_finite, reward_finite = jnp.isfinite(stepped.obs), jnp.isfinite(stepped.reward)
        terminated = (stepped.done > 0) | ~(obs_finite.all(axis=-1) & reward_finite)
        step_count = state.step_count + 1
        truncated = (step_count >= self.episode_length) & ~terminated
        done = terminated | truncated
        # IMPLEMENTATION DETAIL 5: the true final observation of an episode is kept (the
        # stock Playground wrapper overwrites it with the next episode's first one), so a
        # time-limit step bootstraps from its real next state instead of being masked out.
        # A diverged state (Playground's NaN flag, or a non-finite observation or reward) is
        # never bootstrapped from (terminated); zeroing its non-finite entries keeps NaN out
        # of the networks and the statistics.
        final_obs = jnp.where(obs_finite, stepped.obs, 0.0)
        reward = jnp.where(reward_finite, stepped.reward, 0.0)
        episode_return = state.episode_return + reward
        episode_length = state.episode_length + 1

        pool, pool_fresh = state.reset_pool, state.pool_fresh
        if auto_reset:
            # IMPLEMENTATION DETAIL 11: a finished env continues from its own slot of a pool
            # of fresh episodes, and the pool is remade for all N envs at once, only when a
            # finished env finds its slot used. A Playground reset can be far dearer than a
            # step (CheetahRun's runs 200 physics steps to let the cheetah settle), and on a
            # GPU its cost is the latency of those 200 steps in sequence, whatever the number
            # of envs reset. With random step counters about N / episode_length envs finish
            # on every step, so resetting just those inside the step would run a 200-step
            # reset on nearly every step (docs/reppo.md, implementation detail 11).
            # Resetting all N on every step would cost 200 * N physics steps per step (~7.8 s
            # for 1024 cheetahs on a 2-core CPU). An env hits its time limit once per
            # episode_length steps, so the pool is remade about that often (every ~31
            # iterations at the defaults), and every episode still starts from its own fresh
            # random initial state.
            pool, pool_fresh = self.refill_pool(pool, pool_fresh, done, key)
            physics = jax.tree.map(lambda new, old: _where_env(done, new, old), pool, stepped)
            pool_fresh = pool_fresh & ~done
        else:
            physics = stepped
        result = StepResult(
            next_obs=physics.obs,
            final_obs=final_obs,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            episode_done=done & state.from_reset,
            episode_return=episode_return,
            episode_length=episode_length,
        )
        new_state = EnvState(
            physics=physics,
            obs=physics.obs,
            step_count=jnp.where(done, 0, step_count),
            episode_return=jnp.where(done, 0.0, episode_return),
            episode_length=jnp.where(done, 0, episode_length),
            from_reset=state.from_reset | done,
            reset_pool=pool,
            pool_fresh=pool_fresh,
        )
        return new_state, result

    def refill_pool(self, pool, pool_fresh: jax.Array, done: jax.Array, key: jax.Array):
        """If an env finished whose pool slot is already used, replace the whole pool by N
        fresh episodes, made in one batched reset (slot i for env i); else keep it.

        A while loop that runs its body at most once stands in for ``lax.cond``: under
        ``jax.vmap`` over seeds a cond turns into a select that would run the reset on
        every step, while a vmapped while loop runs its body only if some seed needs it.
        """

        def fill(carry):
            pool = jax.vmap(self.env.reset)(jax.random.split(key, self.num_envs))
            return jnp.zeros((), bool), pool, jnp.ones(self.num_envs, bool)

        needed = (done & ~pool_fresh).any()
        _, pool, pool_fresh = jax.lax.while_loop(lambda carry: carry[0], fill, (needed, pool, pool_fresh))
        return pool, pool_fresh


def _where_env(mask: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` for the envs flagged in ``mask`` (N,), ``old`` for the others; any leaf shape (N, ...).
    A leaf without the env axis is no env's own state: MuJoCo Warp (--impl warp) keeps its
    contact buffers and their counters for the whole batch and fills them afresh at every
    step, so ``old`` (the stepped state's) is kept, as MJX's own ``Data.where`` does. (A
    buffer whose length happens to be N is mixed row by row instead; refilled at the next
    step all the same.)"""
    if new.shape[:1] != mask.shape:
        return old
    return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)


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


def hl_gauss(values: jax.Array, num_bins: int, vmin: float, vmax: float) -> jax.Array:
    """HL-Gauss categorical target of a scalar (SPEC section 4; Imani & White 2018).

    The target is a Gaussian N(x, sigma^2) around x = the value clipped to [vmin, vmax],
    sigma = 0.75 * bin width, integrated over each bin of the support:
    p_i = Phi((e_{i+1} - x)/sigma) - Phi((e_i - x)/sigma),
    with bin edges e = linspace(vmin - w/2, vmax + w/2, num_bins + 1), then renormalised.
    ``values`` of any shape -> probabilities of shape ``values.shape + (num_bins,)``.
    """
    width = (vmax - vmin) / (num_bins - 1)
    sigma = 0.75 * width
    edges = jnp.linspace(vmin - width / 2, vmax + width / 2, num_bins + 1)
    x = jnp.clip(values, vmin, vmax)[..., None]
    cdf = 0.5 * (1.0 + jax.scipy.special.erf((edges - x) / (sigma * math.sqrt(2.0))))
    probs = cdf[..., 1:] - cdf[..., :-1]
    return probs / probs.sum(axis=-1, keepdims=True)


def tanh_normal_log_prob_from_pre_tanh(pre_tanh: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log pi(a|s) of a = tanh(u), u ~ N(mean, std), given u (SPEC section 5).

    log pi(a|s) = sum_d [ log N(u_d; mean_d, std_d) - log(1 - tanh(u_d)^2) ],
    with the stable form log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
    """
    z = (pre_tanh - mean) / std
    log_normal = -0.5 * z**2 - jnp.log(std) - 0.5 * math.log(2.0 * math.pi)
    log_det_jacobian = 2.0 * (math.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))
    return (log_normal - log_det_jacobian).sum(axis=-1)


def tanh_normal_log_prob(action: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """log pi(action|s) of the tanh-Gaussian policy, summed over the last (action) axis."""
    pre_tanh = jnp.arctanh(jnp.clip(action, -LOG_PROB_CLIP, LOG_PROB_CLIP))
    return tanh_normal_log_prob_from_pre_tanh(pre_tanh, mean, std)


def sample_tanh_normal(mean: jax.Array, std: jax.Array, noise: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reparameterised sample a = tanh(mean + std * noise) and its log-probability.

    The log-probability is computed from the pre-tanh value u: in exact arithmetic the
    same number as ``tanh_normal_log_prob(a, ...)`` while |u| < atanh(1 - 1e-6) ~= 7.25, but
    in float32 atanh(tanh(u)) loses u as a nears +-1 (in JAX's float32, log-probs apart by 4e-3
    at u = 5 and 0.1 at u = 6 for mean 0 and std 0.5; beyond the clip the atanh path is
    capped), while u is exact.
    """
    pre_tanh = mean + std * noise
    return jnp.tanh(pre_tanh), tanh_normal_log_prob_from_pre_tanh(pre_tanh, mean, std)


def soft_lambda_returns(
    soft_reward: jax.Array,
    next_value: jax.Array,
    terminated: jax.Array,
    truncated: jax.Array,
    gamma: float,
    lmbda: float,
) -> jax.Array:
    """Soft TD(lambda) targets, backwards in time (SPEC section 7). Inputs (T, N).

        G_t = r~_t                                        if terminated_t
        G_t = r~_t + gamma * v'_t                         if truncated_t or t = T-1
        G_t = r~_t + gamma * (lmbda G_{t+1} + (1 - lmbda) v'_t)   otherwise

    A lambda-mixture of n-step soft returns that never crosses an episode boundary and
    always ends with a bootstrap v' (seeded with G_T := v'_{T-1}).
    """

    def backward_step(next_return, step):
        reward, value, term, trunc = step
        one_step = reward + gamma * value
        mixed = reward + gamma * (lmbda * next_return + (1.0 - lmbda) * value)
        target = jnp.where(term, reward, jnp.where(trunc, one_step, mixed))
        return target, target

    steps = (soft_reward, next_value, terminated.astype(bool), truncated.astype(bool))
    _, returns = jax.lax.scan(backward_step, next_value[-1], steps, reverse=True)
    return returns


def policy_kl(old_mean: jax.Array, old_std: jax.Array, mean: jax.Array, std: jax.Array, noise: jax.Array) -> jax.Array:
    """Monte Carlo forward KL(pi_old || pi) per state (SPEC section 8).

    KL ~= 1/M sum_m [ log pi_old(a_m|s) - log pi(a_m|s) ],  a_m = clip(tanh(u_m), +-(1-1e-4)),
    u_m = old_mean + old_std * noise_m. Both log-probabilities are evaluated at the *same*
    clipped sample. ``noise`` is (M, ..., A) standard normal; returns shape (...).
    """
    samples = jnp.clip(jnp.tanh(old_mean + old_std * noise), -KL_SAMPLE_CLIP, KL_SAMPLE_CLIP)
    log_ratio = tanh_normal_log_prob(samples, old_mean, old_std) - tanh_normal_log_prob(samples, mean, std)
    return log_ratio.mean(axis=0)


class NormalizerState(NamedTuple):
    """Running mean/variance of observations (SPEC section 3)."""

    mean: jax.Array
    var: jax.Array
    count: jax.Array


def normalizer_init(size: int) -> NormalizerState:
    return NormalizerState(jnp.zeros(size), jnp.ones(size), jnp.zeros(()))


def normalizer_update(state: NormalizerState, batch: jax.Array) -> NormalizerState:
    """Merge a batch (..., size) into the statistics with Chan's parallel update:

    delta = mean_b - mean,  n = count + count_b,  mean' = mean + delta * count_b / n,
    var' = (var * count + var_b * count_b + delta^2 * count * count_b / n) / n.
    """
    batch = batch.reshape(-1, batch.shape[-1])
    batch_count = batch.shape[0]
    batch_mean, batch_var = batch.mean(axis=0), batch.var(axis=0)
    delta = batch_mean - state.mean
    total = state.count + batch_count
    mean = state.mean + delta * batch_count / total
    m2 = state.var * state.count + batch_var * batch_count + delta**2 * state.count * batch_count / total
    return NormalizerState(mean, m2 / total, total)


def normalize(state: NormalizerState, obs: jax.Array) -> jax.Array:
    """(obs - mean) / sqrt(var + 1e-2)."""
    return (obs - state.mean) / jnp.sqrt(state.var + NORMALIZER_EPS)


# ======================================================================================
# 4. Networks
# ======================================================================================
# Init family (both files): Linear weights LeCun-normal, i.e. truncated normal with
# variance 1/fan_in (Flax's default), biases zero; RMSNorm scale one, epsilon 1e-6.

RMS_NORM_EPS = 1e-6


class NormedLinear(nnx.Module):
    """Linear -> RMSNorm -> SiLU, the building block of both networks."""

    def __init__(self, in_features: int, out_features: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_features, out_features, rngs=rngs)
        self.norm = nnx.RMSNorm(out_features, epsilon=RMS_NORM_EPS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.norm(self.linear(x)))


class Actor(nnx.Module):
    """obs -> normed(h) -> normed(h) -> Linear(2A) = (mean, log_std);
    std = exp(log_std) + min_std; the action is tanh(u), u ~ N(mean, std)."""

    def __init__(self, obs_size: int, action_size: int, hidden: int, min_std: float, rngs: nnx.Rngs):
        self.hidden1 = NormedLinear(obs_size, hidden, rngs)
        self.hidden2 = NormedLinear(hidden, hidden, rngs)
        self.head = nnx.Linear(hidden, 2 * action_size, rngs=rngs)
        self.min_std = min_std

    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = jnp.split(self.head(self.hidden2(self.hidden1(obs))), 2, axis=-1)
        # IMPLEMENTATION DETAIL 2: the std floor min_std keeps the policy from collapsing
        # to a point mass, which would make log-probabilities and the KL explode.
        return mean, jnp.exp(log_std) + self.min_std


class Critic(nnx.Module):
    """Categorical Q(s, a) with an auxiliary head (SPEC section 2).

    encoder:  concat(obs, a) -> normed(h) -> Linear(h)            = features z
    Q head:   SiLU(z) -> normed(h) -> Linear(num_bins) + 40 * zero_dist
    aux head: SiLU(z) -> normed(h) -> Linear(h + 1)                = (r_hat, z'_hat)
    """

    def __init__(self, obs_size, action_size, hidden, num_bins, vmin, vmax, rngs: nnx.Rngs):
        self.encoder = NormedLinear(obs_size + action_size, hidden, rngs)
        self.encoder_out = nnx.Linear(hidden, hidden, rngs=rngs)
        self.q_hidden = NormedLinear(hidden, hidden, rngs)
        self.q_out = nnx.Linear(hidden, num_bins, rngs=rngs)
        self.aux_hidden = NormedLinear(hidden, hidden, rngs)
        self.aux_out = nnx.Linear(hidden, hidden + 1, rngs=rngs)
        # IMPLEMENTATION DETAIL 1: a learnable logit offset 40 * hl_gauss(0) so that the
        # untrained critic predicts Q ~= 0 instead of the middle of [vmin, vmax].
        self.zero_dist = nnx.Param(hl_gauss(jnp.zeros(()), num_bins, vmin, vmax))

    def features(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        return self.encoder_out(self.encoder(jnp.concatenate([obs, action], axis=-1)))

    def q_logits(self, features: jax.Array) -> jax.Array:
        return self.q_out(self.q_hidden(jax.nn.silu(features))) + 40.0 * self.zero_dist[...]

    def aux(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = self.aux_out(self.aux_hidden(jax.nn.silu(features)))
        return out[..., 0], out[..., 1:]

    def __call__(self, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (logits (..., num_bins), features (..., hidden))."""
        features = self.features(obs, action)
        return self.q_logits(features), features


def q_value(logits: jax.Array, vmin: float, vmax: float) -> jax.Array:
    """Q(s, a) = sum_i softmax(logits)_i c_i, support c = linspace(vmin, vmax, num_bins)."""
    support = jnp.linspace(vmin, vmax, logits.shape[-1])
    return (jax.nn.softmax(logits, axis=-1) * support).sum(axis=-1)


# ======================================================================================
# 5. Losses
# ======================================================================================


def critic_loss(
    critic: Critic,
    obs: jax.Array,
    action: jax.Array,
    target_return: jax.Array,
    next_features: jax.Array,
    reward: jax.Array,
    terminated: jax.Array,
    vmin: float,
    vmax: float,
    aux_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_Q = mean_b [ CE(logits(s, a), hl_gauss(G)) + aux_coef * L_aux ]   (SPEC section 8)

    L_aux = (1 - terminated) * [ mean_j (z'_hat - z')_j^2 + (r_hat - r)^2 ]: the critic's
    features must predict the reward and the next state's features (a self-predictive
    auxiliary task that shapes the representation). Shapes (B: the minibatch's size here, not
    N * T): obs (B, O), action (B, A), target_return / reward / terminated (B,), next_features
    (B, hidden).
    """
    logits, features = critic(obs, action)
    target_probs = hl_gauss(target_return, logits.shape[-1], vmin, vmax)
    cross_entropy = -(target_probs * jax.nn.log_softmax(logits, axis=-1)).sum(axis=-1)  # (B,)
    reward_pred, next_features_pred = critic.aux(features)
    aux = ((next_features_pred - next_features) ** 2).mean(axis=-1) + (reward_pred - reward) ** 2
    aux = aux * (1.0 - terminated)  # (B,)
    loss = (cross_entropy + aux_coef * aux).mean()
    info = {
        "losses/critic_loss": loss,
        "losses/critic_ce": cross_entropy.mean(),
        "losses/aux_loss": aux.mean(),
        "values/q_mean": q_value(logits, vmin, vmax).mean(),
    }
    return loss, info


def actor_loss(
    actor: Actor,
    log_alpha: jax.Array,
    log_beta: jax.Array,
    critic: Critic,
    obs: jax.Array,
    old_mean: jax.Array,
    old_std: jax.Array,
    action_noise: jax.Array,
    kl_noise: jax.Array,
    kl_bound: float,
    entropy_target: float,
    vmin: float,
    vmax: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pathwise actor loss with KL trust region, plus the alpha and beta losses (SPEC 8).

    a = tanh(mean + std * action_noise) (reparameterised), KL = policy_kl(pi_old, pi):
        l_pi  = sg(alpha) log pi(a|s) - Q(s, a)   if KL < kl_bound, else  sg(beta) KL
        L_alpha = alpha * sg(-log pi(a|s) - entropy_target)
        L_beta  = -beta * sg(mean_b KL - kl_bound)
    returns mean_b(l_pi) + mean_b(L_alpha) + L_beta. Only the actor, log_alpha and
    log_beta are differentiated (the caller takes gradients with respect to those).
    Shapes (B: the minibatch's size): obs (B, O), old_mean/old_std/action_noise (B, A),
    kl_noise (M, B, A).
    """
    mean, std = actor(obs)
    action, log_prob = sample_tanh_normal(mean, std, action_noise)  # (B, A), (B,)
    logits, _ = critic(obs, action)
    q = q_value(logits, vmin, vmax)
    kl = policy_kl(old_mean, old_std, mean, std, kl_noise)  # (B,)
    alpha, beta = jnp.exp(log_alpha), jnp.exp(log_beta)
    pathwise = jax.lax.stop_gradient(alpha) * log_prob - q
    # IMPLEMENTATION DETAIL 8: a state whose policy left the trust region gets only the
    # KL gradient (pull it back); the others get the pathwise gradient through Q.
    inside = kl < kl_bound
    policy_loss = jnp.where(inside, pathwise, jax.lax.stop_gradient(beta) * kl).mean()
    alpha_loss = (alpha * jax.lax.stop_gradient(-log_prob - entropy_target)).mean()
    beta_loss = -beta * jax.lax.stop_gradient(kl.mean() - kl_bound)
    loss = policy_loss + alpha_loss + beta_loss
    info = {
        "losses/actor_loss": policy_loss,
        "losses/alpha_loss": alpha_loss,
        "losses/beta_loss": beta_loss,
        "policy/kl": kl.mean(),
        "policy/kl_outside_frac": 1.0 - inside.mean(),
        "policy/entropy": -log_prob.mean(),
        "policy/alpha": alpha,
        "policy/beta": beta,
        "policy/std": std.mean(),
    }
    return loss, info


# ======================================================================================
# 6. Collect / Learn / Evaluate
# ======================================================================================


def bootstrap(
    actor: Actor,
    critic: Critic,
    alpha: jax.Array,
    normalizer: NormalizerState,
    final_obs: jax.Array,
    reward: jax.Array,
    terminated: jax.Array,
    noise: jax.Array,
    gamma: float,
    vmin: float,
    vmax: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What one step leaves for the targets (SPEC 6): the value of the TRUE next state s'
    under the current policy, v' = mean_k Q(s', a'_k) with K fresh actions a'_k ~ pi(.|s')
    (``noise`` (K, N, A)), the soft reward
    r~ = r - (1 - terminated) * gamma * alpha * mean_k log pi(a'_k|s')
    and the critic's features z' of (s', a'_1), the aux head's target.
    Returns (soft_reward (N,), next_value (N,), next_features (N, hidden))."""
    next_obs = normalize(normalizer, final_obs)  # (N, O)
    next_mean, next_std = actor(next_obs)
    next_action, next_log_prob = sample_tanh_normal(next_mean, next_std, noise)  # (K, N, A), (K, N)
    next_logits, next_features = critic(jnp.broadcast_to(next_obs, (noise.shape[0],) + next_obs.shape), next_action)
    next_value = q_value(next_logits, vmin, vmax).mean(axis=0)  # (N,)
    # IMPLEMENTATION DETAIL 6: no entropy bonus after a terminal state.
    not_terminal = 1.0 - terminated
    soft_reward = reward - not_terminal * gamma * alpha * next_log_prob.mean(axis=0)
    return soft_reward, next_value, next_features[0]


class TrainState(NamedTuple):
    """Everything one seed's training carries from iteration to iteration."""

    actor: nnx.State  # actor parameters
    log_alpha: jax.Array  # entropy temperature, log-space
    log_beta: jax.Array  # KL multiplier, log-space
    critic: nnx.State  # critic parameters
    actor_opt: optax.OptState  # clip + Adam state of (actor, log_alpha, log_beta): one global norm for all three
    critic_opt: optax.OptState  # clip + Adam state of the critic (its own global norm)
    normalizer: NormalizerState
    env: EnvState
    key: jax.Array
    iteration: jax.Array  # completed training iterations


class Rollout(NamedTuple):
    """One rollout, every field time-first: (T, N, ...)."""

    obs: jax.Array  # normalised s_t (with the statistics in force during collection)
    raw_obs: jax.Array  # un-normalised s_t, to update the normaliser afterwards
    action: jax.Array  # the clipped action that was executed
    reward: jax.Array
    soft_reward: jax.Array
    next_value: jax.Array  # v'_t = mean_k Q(s'_t, a'_k)
    next_features: jax.Array  # z'_t = features(s'_t, a'_1)
    terminated: jax.Array
    truncated: jax.Array
    episode_done: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array


class Agent(NamedTuple):
    """The pure functions of one run, closed over its static configuration."""

    init: Any  # key -> TrainState
    train_chunk: Any  # (TrainState, num_iterations) -> (TrainState, metrics (num_iterations,))
    evaluate: Any  # (TrainState, key) -> returns (num_eval_envs,)


def make_agent(args: Args, env) -> Agent:
    """Build init / train_chunk / evaluate for one seed (``jax.vmap`` them for several)."""
    train_env = AutoResetEnv(env, args.num_envs, args.episode_length)
    eval_env = AutoResetEnv(env, args.num_eval_envs, args.episode_length)
    obs_size, action_size = train_env.obs_size, train_env.action_size
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_mini_batches
    entropy_target = -args.ent_target_mult * action_size
    vmin, vmax = args.vmin, args.vmax

    def make_optimizer():
        return optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.learning_rate))

    actor_tx, critic_tx = make_optimizer(), make_optimizer()
    # The graph definitions (structure, no arrays) are fixed; parameters travel separately.
    abstract = nnx.eval_shape(lambda: _build_networks(args, obs_size, action_size, nnx.Rngs(0)))
    actor_graph, critic_graph = nnx.graphdef(abstract[0]), nnx.graphdef(abstract[1])

    def init(key: jax.Array) -> TrainState:
        key, key_net, key_env = jax.random.split(key, 3)
        actor, critic = _build_networks(args, obs_size, action_size, nnx.Rngs(key_net))
        actor_params, critic_params = nnx.state(actor), nnx.state(critic)
        log_alpha = jnp.log(jnp.float32(args.ent_start))
        log_beta = jnp.log(jnp.float32(args.kl_start))
        return TrainState(
            actor=actor_params,
            log_alpha=log_alpha,
            log_beta=log_beta,
            critic=critic_params,
            actor_opt=actor_tx.init((actor_params, log_alpha, log_beta)),
            critic_opt=critic_tx.init(critic_params),
            normalizer=normalizer_init(obs_size),
            env=train_env.reset(key_env, randomize_steps=True),
            key=key,
            iteration=jnp.zeros((), jnp.int32),
        )

    def collect_rollout(state: TrainState, key: jax.Array) -> tuple[EnvState, Rollout]:
        """T steps on N envs with the current policy; soft rewards and v' (SPEC 6)."""
        actor = nnx.merge(actor_graph, state.actor)
        critic = nnx.merge(critic_graph, state.critic)
        alpha = jnp.exp(state.log_alpha)

        def env_step(env_state: EnvState, step_key):
            key_action, key_next, key_reset = jax.random.split(step_key, 3)
            raw_obs = env_state.obs  # (N, O), kept to update the normaliser afterwards
            obs = normalize(state.normalizer, raw_obs)
            mean, std = actor(obs)
            action, _ = sample_tanh_normal(mean, std, jax.random.normal(key_action, mean.shape))
            action = jnp.clip(action, -ACTION_CLIP, ACTION_CLIP)  # (N, A)
            env_state, step = train_env.step(env_state, action, key_reset)
            # Value of the TRUE next state under the current policy: K fresh actions a'.
            soft_reward, next_value, next_features = bootstrap(
                actor,
                critic,
                alpha,
                state.normalizer,
                step.final_obs,
                step.reward,
                step.terminated,
                jax.random.normal(key_next, (args.num_value_samples,) + mean.shape),
                args.gamma,
                vmin,
                vmax,
            )
            transition = Rollout(
                obs=obs,
                raw_obs=raw_obs,
                action=action,
                reward=step.reward,
                soft_reward=soft_reward,
                next_value=next_value,
                next_features=next_features,
                terminated=step.terminated.astype(jnp.float32),
                truncated=step.truncated.astype(jnp.float32),
                episode_done=step.episode_done,
                episode_return=step.episode_return,
                episode_length=step.episode_length,
            )
            return env_state, transition

        return jax.lax.scan(env_step, state.env, jax.random.split(key, args.num_steps))

    def update_minibatch(carry, minibatch):
        """One critic step, then one actor step (SPEC section 8)."""
        actor_params, log_alpha, log_beta, critic_params, actor_opt, critic_opt, key = carry
        key, key_action, key_kl = jax.random.split(key, 3)

        def critic_objective(params):
            critic = nnx.merge(critic_graph, params)
            return critic_loss(
                critic,
                minibatch["obs"],
                minibatch["action"],
                minibatch["target_return"],
                minibatch["next_features"],
                minibatch["reward"],
                minibatch["terminated"],
                vmin,
                vmax,
                args.aux_coef,
            )

        critic_grads, critic_info = jax.grad(critic_objective, has_aux=True)(critic_params)
        updates, critic_opt = critic_tx.update(critic_grads, critic_opt, critic_params)
        critic_params = optax.apply_updates(critic_params, updates)

        critic = nnx.merge(critic_graph, critic_params)  # the freshly updated critic
        action_noise = jax.random.normal(key_action, minibatch["old_mean"].shape)
        kl_noise = jax.random.normal(key_kl, (args.num_kl_samples,) + minibatch["old_mean"].shape)

        def actor_objective(actor_vars):
            params, alpha_param, beta_param = actor_vars
            return actor_loss(
                nnx.merge(actor_graph, params),
                alpha_param,
                beta_param,
                critic,
                minibatch["obs"],
                minibatch["old_mean"],
                minibatch["old_std"],
                action_noise,
                kl_noise,
                args.kl_bound,
                entropy_target,
                vmin,
                vmax,
            )

        actor_vars = (actor_params, log_alpha, log_beta)
        actor_grads, actor_info = jax.grad(actor_objective, has_aux=True)(actor_vars)
        updates, actor_opt = actor_tx.update(actor_grads, actor_opt, actor_vars)
        actor_params, log_alpha, log_beta = optax.apply_updates(actor_vars, updates)
        carry = (actor_params, log_alpha, log_beta, critic_params, actor_opt, critic_opt, key)
        return carry, {**critic_info, **actor_info}

    def train_iteration(state: TrainState, _=None) -> tuple[TrainState, dict[str, jax.Array]]:
        """collect -> update normaliser -> soft TD(lambda) targets -> epochs of minibatches."""
        key, key_collect, key_learn = jax.random.split(state.key, 3)
        env_state, rollout = collect_rollout(state, key_collect)
        # IMPLEMENTATION DETAIL 9: the statistics are updated after collection, before
        # learning, and the batch keeps the normalisation it was collected with, so the
        # learner sees exactly the inputs the behaviour policy saw (SPEC 3).
        normalizer = normalizer_update(state.normalizer, rollout.raw_obs)
        target_return = soft_lambda_returns(
            rollout.soft_reward, rollout.next_value, rollout.terminated, rollout.truncated, args.gamma, args.lmbda
        )  # (T, N)

        # pi_old: the policy that collected the batch, frozen for the whole learning phase.
        old_mean, old_std = nnx.merge(actor_graph, state.actor)(rollout.obs)

        def flat(x):
            return x.reshape((batch_size,) + x.shape[2:])

        batch = {
            "obs": flat(rollout.obs),
            "action": flat(rollout.action),
            "target_return": flat(target_return),
            "next_features": flat(rollout.next_features),
            "reward": flat(rollout.reward),
            "terminated": flat(rollout.terminated),
            "old_mean": flat(old_mean),
            "old_std": flat(old_std),
        }

        # A fresh permutation of the B samples for every epoch, split into num_mini_batches
        # minibatches of indices; one flat scan over all epochs x minibatches gathers each
        # minibatch when it is used.
        key_epochs, key_updates = jax.random.split(key_learn)
        orders = jax.vmap(lambda k: jax.random.permutation(k, batch_size))(
            jax.random.split(key_epochs, args.num_epochs)
        )  # (E, B)
        minibatch_indices = orders.reshape(args.num_epochs * args.num_mini_batches, minibatch_size)

        def update(carry, indices):
            return update_minibatch(carry, jax.tree.map(lambda x: x[indices], batch))

        carry = (
            state.actor,
            state.log_alpha,
            state.log_beta,
            state.critic,
            state.actor_opt,
            state.critic_opt,
            key_updates,
        )
        carry, infos = jax.lax.scan(update, carry, minibatch_indices)
        actor_params, log_alpha, log_beta, critic_params, actor_opt, critic_opt, _ = carry

        metrics = jax.tree.map(jnp.mean, infos)
        done = rollout.episode_done
        metrics.update(
            {
                "charts/episodes": done.sum(),
                "charts/episode_return_sum": jnp.where(done, rollout.episode_return, 0.0).sum(),
                "charts/episode_length_sum": jnp.where(done, rollout.episode_length, 0).sum(),
                "values/target_return_mean": target_return.mean(),
                "values/next_value_mean": rollout.next_value.mean(),
                "values/soft_reward_mean": rollout.soft_reward.mean(),
                "values/reward_mean": rollout.reward.mean(),
            }
        )
        new_state = TrainState(
            actor=actor_params,
            log_alpha=log_alpha,
            log_beta=log_beta,
            critic=critic_params,
            actor_opt=actor_opt,
            critic_opt=critic_opt,
            normalizer=normalizer,
            env=env_state,
            key=key,
            iteration=state.iteration + 1,
        )
        return new_state, metrics

    def train_chunk(state: TrainState, num_iterations: int):
        """``num_iterations`` training iterations fused into one compiled call."""
        return jax.lax.scan(train_iteration, state, None, length=num_iterations)

    def evaluate(state: TrainState, key: jax.Array) -> jax.Array:
        """Deterministic policy tanh(mean) on separate envs, one full episode each (SPEC 10).

        The normaliser is frozen (the statistics of the state being evaluated)."""
        actor = nnx.merge(actor_graph, state.actor)
        env_state = eval_env.reset(key, randomize_steps=False)

        def eval_step(carry, _):
            env_state, returns, alive = carry
            mean, _ = actor(normalize(state.normalizer, env_state.obs))
            action = jnp.clip(jnp.tanh(mean), -ACTION_CLIP, ACTION_CLIP)
            # The step's key only seeds auto-resets, and evaluation plays one episode per env.
            env_state, step = eval_env.step(env_state, action, key, auto_reset=False)
            returns = returns + jnp.where(alive, step.reward, 0.0)
            alive = alive & ~(step.terminated | step.truncated)
            return (env_state, returns, alive), None

        returns = jnp.zeros(args.num_eval_envs)
        alive = jnp.ones(args.num_eval_envs, bool)
        carry = (env_state, returns, alive)
        (_, returns, _), _ = jax.lax.scan(eval_step, carry, None, length=args.episode_length)
        return returns

    return Agent(init=init, train_chunk=train_chunk, evaluate=evaluate)


def _build_networks(args: Args, obs_size: int, action_size: int, rngs: nnx.Rngs) -> tuple[Actor, Critic]:
    actor = Actor(obs_size, action_size, args.actor_hidden, args.min_std, rngs)
    critic = Critic(obs_size, action_size, args.critic_hidden, args.num_bins, args.vmin, args.vmax, rngs)
    return actor, critic


# ======================================================================================
# 7. Logging & checkpoints
# ======================================================================================

CHECKPOINT_NAME = "checkpoint.npz"


def library_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for name in ["jax", "jaxlib", "flax", "optax", "mujoco", "mujoco-mjx", "playground", "numpy", "tyro"]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def save_checkpoint(path: str, state: TrainState, args: Args, global_step: int) -> None:
    """One .npz file: every array of the (seed-batched) TrainState -- actor, critic, both
    optimiser states, log_alpha/log_beta, normaliser, env state, RNG key, iteration --
    plus the args and counters as JSON. Written atomically (tmp file + rename)."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(state))]
    meta = {"args": dataclasses.asdict(args), "global_step": global_step, "num_leaves": len(leaves)}
    arrays = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}
    tmp_path = path + ".tmp.npz"
    try:
        np.savez(tmp_path, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp_path, path)
    except BaseException:  # a Ctrl-C or a full disk half way: no partial file is left behind
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def read_checkpoint_meta(path: str) -> dict:
    if os.path.isdir(path):
        raise UserError(f"'{path}' is a folder; give the checkpoint file, e.g. {os.path.join(path, CHECKPOINT_NAME)}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        with np.load(path) as data:
            return json.loads(str(data["meta"]))
    except Exception as error:
        raise UserError(f"'{path}' is not a reppo_jax checkpoint: {error}") from error


def load_checkpoint(path: str, template: TrainState) -> TrainState:
    """Restore a TrainState saved by save_checkpoint into the structure of ``template``
    (an abstract state built from the same args), checking every shape."""
    leaves, treedef = jax.tree.flatten(template)
    with np.load(path) as data:
        saved = [data[f"leaf_{i:05d}"] for i in range(len([k for k in data.files if k.startswith("leaf_")]))]
    if len(saved) != len(leaves):
        raise UserError(f"checkpoint '{path}' holds {len(saved)} arrays, this configuration needs {len(leaves)}")
    for i, (array, like) in enumerate(zip(saved, leaves)):
        if array.shape != like.shape:
            raise UserError(f"checkpoint '{path}' array {i} has shape {array.shape}, expected {like.shape}")
    return jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=like.dtype) for a, like in zip(saved, leaves)])


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
        """One row per seed; wandb gets the mean over seeds (and each seed's eval return)."""
        with open(self.path, "a", newline="") as f:
            # A key that is no column is a bug (a metric added without its column): fail loudly.
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
            for row in rows:
                writer.writerow({"global_step": global_step, **row})
        if self.wandb is not None:
            keys = [k for k in rows[0] if k != "seed"]
            with warnings.catch_warnings():  # a column all NaN (no seed ended an episode yet) stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                summary = {k: float(np.nanmean([row.get(k, np.nan) for row in rows])) for k in keys}
            if len(rows) > 1:
                summary.update({f"eval/episodic_return_seed{r['seed']}": r["eval/episodic_return"] for r in rows})
            self.wandb.log(summary, step=global_step)

    def progress(self, global_step: int, sps: float, eval_return: float) -> None:
        if self.bar is not None:
            self.bar.n = global_step
            self.bar.set_postfix(SPS=f"{sps:,.0f}", eval_return=f"{eval_return:.1f}")
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


def first_nonfinite(metrics: dict[str, np.ndarray]) -> tuple[list[str], int, list[int]] | None:
    """The earliest iteration (index along the chunk axis) at which any metric is NaN/inf,
    with the names of the metrics that are non-finite there (losses first) and the indices of
    the seeds they are non-finite for, else None. Metrics are shaped (num_seeds, num_iterations)."""
    finite = {name: np.isfinite(np.asarray(v, np.float64)) for name, v in metrics.items()}
    bad_iterations = [int(np.argmax(~ok.all(axis=0))) for ok in finite.values() if not ok.all()]
    if not bad_iterations:
        return None
    index = min(bad_iterations)
    names = [n for n, ok in finite.items() if not ok[:, index].all()]
    names.sort(key=lambda n: (not n.startswith("losses/"), n))
    seeds = [int(s) for s in np.flatnonzero(~np.all([finite[n][:, index] for n in names], axis=0))]
    return names, index, seeds


def parameters_finite(state: TrainState) -> bool:
    """Whether every network parameter, log alpha and log beta is finite (all seeds)."""
    leaves = jax.tree.leaves((state.actor, state.critic, state.log_alpha, state.log_beta))
    return all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)


# ======================================================================================
# 8. main
# ======================================================================================


def over_seeds(fn, num_seeds: int):
    """``fn`` of one seed -> the same function over a leading seed axis (``jax.vmap``).

    With one seed the axis is dropped before the call and restored after it, instead of a
    vmap of size 1: XLA's CPU backend runs the batch-of-one matmuls that such a vmap
    produces far slower (measured at --preset cpu: 22.9 against 12.6 ms per update)."""
    if num_seeds > 1:
        return jax.vmap(fn)

    def one_seed(*inputs):
        outputs = fn(*jax.tree.map(lambda x: x[0], inputs))
        return jax.tree.map(lambda x: x[None], outputs)

    return one_seed


class Runner:
    """Compiles the functions of one configuration, over the seed axis, and drives them."""

    def __init__(self, args: Args):
        self.args = args
        env = make_env(args.env_id, args.impl, args.episode_length)
        self.agent = make_agent(args, env)
        self.seed_keys = jax.vmap(jax.random.PRNGKey)(args.seed + jnp.arange(args.num_seeds))
        self._chunks: dict[int | str, Any] = {}  # chunk length -> compiled chunk; "evaluate"
        self.compile_seconds = 0.0

    def init(self) -> TrainState:
        return jax.jit(over_seeds(self.agent.init, self.args.num_seeds))(self.seed_keys)

    def abstract_state(self) -> TrainState:
        return jax.eval_shape(over_seeds(self.agent.init, self.args.num_seeds), self.seed_keys)

    def _compiled(self, fn, *example):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*example).compile()
        self.compile_seconds += time.perf_counter() - start
        return compiled

    def compile_chunk(self, state: TrainState, num_iterations: int) -> None:
        """Compile (once per chunk length) ahead of time, so SPS never includes it."""
        if num_iterations not in self._chunks:
            chunk = over_seeds(partial(self.agent.train_chunk, num_iterations=num_iterations), self.args.num_seeds)
            self._chunks[num_iterations] = self._compiled(chunk, state)

    def train_chunk(self, state: TrainState, num_iterations: int):
        self.compile_chunk(state, num_iterations)
        return self._chunks[num_iterations](state)

    def metric_names(self, state: TrainState, num_iterations: int) -> list[str]:
        """Names of every column a log row holds, read off the compiled chunk's outputs."""
        self.compile_chunk(state, num_iterations)
        dummy = {name: np.ones((1, 1)) for name in self._chunks[num_iterations].out_info[1]}
        return list(_train_row(dummy, 0, 0.0)) + list(_eval_row(self.args, 0, np.zeros(1)))

    def _eval_keys(self, state: TrainState) -> jax.Array:
        """Fresh evaluation keys derived from the seed and the iteration, so that a resumed
        run evaluates exactly like an unbroken one."""
        return jax.vmap(lambda k, i: jax.random.fold_in(jax.random.fold_in(k, 0xE7A1), i))(
            self.seed_keys, state.iteration
        )

    def compile_evaluate(self, state: TrainState) -> None:
        if "evaluate" not in self._chunks:
            self._chunks["evaluate"] = self._compiled(
                over_seeds(self.agent.evaluate, self.args.num_seeds), state, self._eval_keys(state)
            )

    def evaluate(self, state: TrainState) -> np.ndarray:
        """Evaluation returns, shaped (num_seeds, num_eval_envs)."""
        self.compile_evaluate(state)
        return np.asarray(self._chunks["evaluate"](state, self._eval_keys(state)))


def chunk_length(iteration: int, num_iterations: int, log_interval: int) -> int:
    """Iterations until the next log point. Log points sit at multiples of log_interval
    (and at the end), so a resumed run logs, evaluates and saves where an unbroken one does."""
    return min(log_interval - iteration % log_interval, num_iterations - iteration)


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


def write_args(args: Args, run_dir: str, argv: list[str]) -> None:
    """args.json: the resolved arguments, versions, devices and the command line. A resumed
    run keeps the command that started it and lists the ones that resumed it."""
    path = os.path.join(run_dir, "args.json")
    command = "python " + shlex.join([os.path.basename(__file__), *argv])
    record = {
        "args": dataclasses.asdict(args),
        "versions": library_versions(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
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


def args_from_checkpoint(args: Args, argv: list[str]) -> Args:
    """--resume and --eval-only take the checkpoint's own arguments (so that networks, env
    and sizes match it), but for --total-timesteps (which a resumed run extends) and
    --num-eval-envs, taken from the command line when given, and --progress, always."""
    path = args.resume or args.checkpoint
    saved_args = read_checkpoint_meta(path)["args"]
    unknown = sorted(set(saved_args) - {field.name for field in dataclasses.fields(Args)})
    if unknown:
        raise UserError(f"'{path}' was saved by another version of this file (unknown settings: {', '.join(unknown)})")
    saved = dataclasses.replace(Args(), **saved_args)
    overrides = {"resume": args.resume, "checkpoint": args.checkpoint, "eval_only": args.eval_only}
    overrides["progress"] = args.progress
    may_change = ["total_timesteps", "num_eval_envs"]
    for flag in may_change:
        cli_flag = "--" + flag.replace("_", "-")
        if any(token == cli_flag or token.startswith(cli_flag + "=") for token in argv):
            overrides[flag] = getattr(args, flag)
    warn_ignored_flags(argv, may_change + list(overrides))
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
    global_step = read_checkpoint_meta(args.checkpoint)["global_step"]
    runner = Runner(args)
    state = load_checkpoint(args.checkpoint, runner.abstract_state())
    returns = runner.evaluate(state)
    for index, seed_returns in enumerate(returns):
        print(
            f"eval seed={args.seed + index} step={global_step} "
            f"episodic_return={seed_returns.mean():.2f} +- {seed_returns.std():.2f} "
            f"over {len(seed_returns)} episodes"
        )


def train(args: Args, argv: list[str]) -> str:
    """Train (or resume) a run; returns the run folder. ``argv``: the command line, recorded
    in args.json."""
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    start_step = 0
    if args.resume is not None:  # continue in the checkpoint's own run folder
        start_step = read_checkpoint_meta(args.resume)["global_step"]
        if start_step + batch_size > args.total_timesteps:
            raise UserError(
                f"the checkpoint is at step {start_step:,}: --total-timesteps {args.total_timesteps:,} leaves "
                "no iteration to run; give a larger --total-timesteps"
            )
        run_dir = os.path.dirname(os.path.abspath(args.resume))
        run_name = os.path.basename(run_dir)

    if jax.default_backend() == "cpu" and args.num_envs * args.critic_hidden >= 1024 * 512:
        # Measured with benchmarks/speed.py on 2-core VMs: the paper setting on CheetahRun
        # (1024 envs x 32 steps, hidden 512) ran at 876-1,653 env-steps/s, depending on the VM
        # and the sitting (docs/results.md), so the estimate is that range.
        steps = (args.total_timesteps - start_step) * args.num_seeds  # still to run, all seeds together
        print(
            f"No accelerator found (JAX backend: cpu). The paper setting on CheetahRun (1024 envs, "
            f"hidden 512) ran at 876-1,653 env-steps/s on 2-core CPUs; at those speeds this run's {steps:,} env "
            f"steps would take {steps / 1_653 / 3600:,.1f}-{steps / 876 / 3600:,.1f} hours, and this setting "
            f"({args.num_envs} envs, hidden {args.critic_hidden}) is no faster. For a CPU, try --preset cpu.",
            file=sys.stderr,
        )

    runner = Runner(args)
    state = load_checkpoint(args.resume, runner.abstract_state()) if args.resume else runner.init()
    iteration = int(np.asarray(state.iteration)[0])
    first_chunk = chunk_length(iteration, num_iterations, args.log_interval)  # >= 1: checked above
    # Compiles the first chunk, the longest wait of a run: before any run folder or wandb run
    # exists, so that a Ctrl-C or a failure here leaves nothing behind.
    metric_names = runner.metric_names(state, first_chunk)
    fresh_run_dir, wandb_run = None, None
    # A run that cannot start (an error, or a Ctrl-C: during a slow wandb.init, say) finishes a
    # wandb run it had started as failed and removes a fresh run's folder, so that it leaves
    # nothing behind.
    try:
        if args.resume is None:  # a fresh run's folder, once its envs and networks could be built
            run_name, run_dir = make_run_dir(args)
            fresh_run_dir = run_dir
        wandb_run = start_wandb(args, run_dir, run_name) if args.track else None
        write_args(args, run_dir, argv)  # once the run can start (a failed resume leaves it as it was)
        end_step = num_iterations * batch_size
        logger = MetricsLogger(args, run_dir, start_step, end_step, metric_names, wandb_run)
        # Ctrl-C from here on: the first one lets the running chunk finish (one jitted call) and
        # then saves a checkpoint of the last completed iteration, so that --resume continues
        # exactly; a second Ctrl-C stops at once without saving (the process leaves without
        # waiting for the chunk: see the end of this file).
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
        raise
    checkpoint_path = os.path.join(run_dir, CHECKPOINT_NAME)
    train_seconds = 0.0
    train_steps = 0
    completed = False
    try:
        logger.write(f"run folder: {run_dir}")
        if iteration == 0:  # the untrained policy, so curves start at step 0
            returns = runner.evaluate(state)
            logger.log(0, [_eval_row(args, s, returns[s]) for s in range(args.num_seeds)])
        runner.compile_evaluate(state)  # already done where step 0 was evaluated
        logger.write(f"compiled in {runner.compile_seconds:.1f} s (not counted in SPS)")
        while iteration < num_iterations:
            stop_if_interrupted(interrupted)
            chunk = chunk_length(iteration, num_iterations, args.log_interval)
            runner.compile_chunk(state, chunk)  # a no-op once this chunk length is compiled
            start = time.perf_counter()
            new_state, metrics = runner.train_chunk(state, chunk)
            metrics = jax.device_get(metrics)
            train_seconds += time.perf_counter() - start
            train_steps += chunk * batch_size
            bad = first_nonfinite(metrics)
            if bad is None and not parameters_finite(new_state):
                # Finite losses, non-finite parameters: the chunk's last update made them so
                # (after an earlier one the next iteration's losses would not be finite).
                bad = (["parameters"], chunk - 1, [])
            if bad is not None:
                names, index, seeds = bad
                where = ""
                if args.num_seeds > 1 and seeds:  # which of the seeds trained together
                    listed = ", ".join(str(args.seed + s) for s in seeds)
                    where = f" (seed {listed} of {args.num_seeds} trained together)"
                message = f"non-finite {', '.join(names)} at iteration {iteration + index + 1}{where}; stopped"
                if args.save_model or args.resume:
                    save_checkpoint(checkpoint_path, state, args, iteration * batch_size)
                    message += (
                        f". The last finite state (iteration {iteration}) is in {checkpoint_path}, to inspect "
                        "or --eval-only (--resume from it would repeat the same computation)"
                    )
                raise UserError(message)
            state, iteration = new_state, iteration + chunk
            global_step = iteration * batch_size
            returns = runner.evaluate(state)
            sps = train_steps / train_seconds
            rows = [{**_train_row(metrics, s, sps), **_eval_row(args, s, returns[s])} for s in range(args.num_seeds)]
            logger.log(global_step, rows)
            logger.progress(global_step, sps, float(returns.mean()))
            if args.save_model:
                save_checkpoint(checkpoint_path, state, args, global_step)
        stop_if_interrupted(interrupted)  # a Ctrl-C in the last chunk still gets its checkpoint
        logger.write(
            f"done: {iteration * batch_size:,} steps, final eval return "
            f"{float(returns.mean()):.1f}, SPS {train_steps / max(train_seconds, 1e-9):,.0f} "
            f"(after compilation; compile {runner.compile_seconds:.1f} s), peak RSS {peak_rss_mb():,.0f} MiB"
        )
        completed = True
    except KeyboardInterrupt:
        if interrupted["clean"]:
            try:
                save_checkpoint(checkpoint_path, state, args, iteration * batch_size)
            except KeyboardInterrupt:  # a second Ctrl-C while saving: stop now, and say so
                logger.write("interrupted again while saving: no checkpoint written")
            else:
                logger.write(f"interrupted: saved {checkpoint_path} at step {iteration * batch_size:,}")
        else:
            logger.write("interrupted inside a chunk (Ctrl-C twice): no checkpoint written")
        raise
    finally:  # also after a non-finite loss (UserError): the progress bar and wandb are closed
        restore_interrupt_handler()
        logger.close(completed)
    return run_dir


_previous_sigint_handler: Any = None
_previous_unraisablehook: Any = None


def install_interrupt_handler() -> dict[str, bool]:
    """SIGINT sets a flag the training loop reads between chunks; a second SIGINT raises
    KeyboardInterrupt at once."""
    global _previous_sigint_handler, _previous_unraisablehook
    state = {"flag": False, "clean": False}

    def handler(signum, frame):
        if state["flag"]:
            raise KeyboardInterrupt
        state["flag"] = True
        print(
            "\nCtrl-C: finishing this chunk of iterations (up to the next log point), then saving a "
            "checkpoint (Ctrl-C again to stop now)",
            file=sys.stderr,
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
    """Between chunks: after a first Ctrl-C, stop cleanly (the caller then saves a checkpoint)."""
    if state["flag"]:
        state["clean"] = True
        raise KeyboardInterrupt


def restore_interrupt_handler() -> None:
    if _previous_sigint_handler is not None:
        signal.signal(signal.SIGINT, _previous_sigint_handler)
        sys.unraisablehook = _previous_unraisablehook


def _eval_row(args: Args, seed_index: int, returns: np.ndarray) -> dict[str, float]:
    return {
        "seed": args.seed + seed_index,
        "eval/episodic_return": float(returns.mean()),
        "eval/episodic_return_std": float(returns.std()),
    }


def _train_row(metrics: dict[str, np.ndarray], seed_index: int, sps: float) -> dict[str, float]:
    """Average a chunk's per-iteration metrics of one seed into one row."""
    row = {k: float(np.mean(v[seed_index])) for k, v in metrics.items() if not k.startswith("charts/episode")}
    episodes = float(np.sum(metrics["charts/episodes"][seed_index]))
    for name in ["return", "length"]:  # NaN where no complete episode ended in the chunk
        total = float(np.sum(metrics[f"charts/episode_{name}_sum"][seed_index]))
        row[f"charts/episodic_{name}"] = total / episodes if episodes else float("nan")
    row["charts/SPS"] = sps
    return row


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
        else:
            train(args, argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    if code == 130:
        # Ctrl-C. After a second one the jitted chunk is still running on XLA's threads, and a
        # normal interpreter exit would wait for it (minutes at the paper setting on a CPU).
        # Every file is written and closed by now, so the process leaves at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
