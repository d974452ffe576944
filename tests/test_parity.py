"""Parity of reppo_torch.py with reppo_jax.py: one set of weights copied into both files'
networks, the same batch and the same random samples -> the same outputs, losses, metric
values and gradients of one update step, and the same targets from a collection step
(float32 tolerance)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from test_losses_jax import states_near_the_bound

import reppo_jax as rj
import reppo_torch as rt

OBS, ACT, HIDDEN, BINS, B, M = 7, 3, 32, 51, 64, 16
VMIN, VMAX = -10.0, 40.0


def perturbed(module, seed):
    """Give every parameter of a JAX module a random, non-trivial value (nonzero biases,
    norm scales away from one), so that a wrongly copied or transposed weight shows."""
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    for _, variable in flat:
        value = np.asarray(variable.get_value())
        variable.set_value(jnp.asarray(value + 0.1 * rng.normal(size=value.shape), jnp.float32))
    nnx.update(module, nnx.from_flat_state(flat))
    return module


def torch_name(path) -> tuple[str, bool]:
    """nnx parameter path -> (torch state_dict key, whether to transpose).
    JAX kernels are (in, out); torch Linear weights are (out, in). RMSNorm 'scale' is 'weight'."""
    *prefix, leaf = [str(p) for p in path]
    if leaf == "kernel":
        return ".".join(prefix + ["weight"]), True
    if leaf == "scale":
        return ".".join(prefix + ["weight"]), False
    return ".".join(prefix + [leaf]), False


def copy_into_torch(jax_module, torch_module):
    state = {}
    for path, variable in nnx.to_flat_state(nnx.state(jax_module, nnx.Param)):
        name, transpose = torch_name(path)
        value = np.asarray(variable.get_value())
        state[name] = torch.from_numpy(np.array(value.T if transpose else value))
    missing, unexpected = torch_module.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return torch_module


def t(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))


def close(torch_value, jax_value, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(np.asarray(torch_value.detach() if torch.is_tensor(torch_value) else torch_value),
                               np.asarray(jax_value), rtol=rtol, atol=atol)  # fmt: skip


@pytest.fixture(scope="module")
def nets():
    rngs = nnx.Rngs(0)
    jax_actor = perturbed(rj.Actor(OBS, ACT, HIDDEN, 0.1, rngs), 1)
    jax_critic = perturbed(rj.Critic(OBS, ACT, HIDDEN, BINS, VMIN, VMAX, rngs), 2)
    torch_actor = copy_into_torch(jax_actor, rt.Actor(OBS, ACT, HIDDEN, 0.1))
    torch_critic = copy_into_torch(jax_critic, rt.Critic(OBS, ACT, HIDDEN, BINS, VMIN, VMAX))
    rng = np.random.default_rng(3)
    batch = {
        "obs": rng.normal(size=(B, OBS)).astype(np.float32),
        "action": np.tanh(rng.normal(size=(B, ACT))).astype(np.float32),
        "target_return": rng.uniform(VMIN - 5, VMAX + 5, size=B).astype(np.float32),
        "next_features": rng.normal(size=(B, HIDDEN)).astype(np.float32),
        "reward": rng.normal(size=B).astype(np.float32),
        "terminated": (rng.random(B) < 0.2).astype(np.float32),
        "action_noise": rng.normal(size=(B, ACT)).astype(np.float32),
        "kl_noise": rng.normal(size=(M, B, ACT)).astype(np.float32),
    }
    # pi_old: the actor's own output, shifted far away on every third state, so that both
    # branches of the trust region (inside: pathwise, outside: KL) are exercised.
    mean, std = jax_actor(jnp.asarray(batch["obs"]))
    shift = np.where((np.arange(B) % 3 == 0)[:, None], 1.5, 0.01).astype(np.float32)
    batch["old_mean"] = np.asarray(mean) + shift
    batch["old_std"] = np.asarray(std) * 0.9
    return jax_actor, jax_critic, torch_actor, torch_critic, batch


def test_initialisation_family_matches_flax():
    """LeCun-normal truncated at 2 std with Flax's rescaling: same spread, same bound."""
    torch.manual_seed(0)
    torch_weight = rt.lecun_normal_(torch.nn.Linear(400, 300)).weight.detach().numpy()
    jax_kernel = np.asarray(nnx.Linear(400, 300, rngs=nnx.Rngs(0)).kernel.get_value())
    bound = 2.0 / np.sqrt(400) / 0.87962566103423978
    for weights in (torch_weight, jax_kernel):
        assert abs(weights.std() * np.sqrt(400) - 1.0) < 0.01
        assert np.abs(weights).max() <= bound + 1e-6
        assert np.abs(weights).max() > 0.98 * bound
    assert (rt.lecun_normal_(torch.nn.Linear(5, 4)).bias == 0).all()


def test_every_linear_layer_of_both_files_networks_starts_so():
    """Each Linear layer of both files' actor and critic (hidden ones, the heads, the encoder's
    output) starts from that family with zero biases; PyTorch's own default (uniform, std
    1/sqrt(3 fan_in), non-zero biases) would fail it. The parity tests copy weights across
    and so cannot see the initialisation."""
    obs_size, action_size, hidden, bins = 24, 6, 512, 151
    torch.manual_seed(0)
    layers = {}
    for name, net in (("actor", rt.Actor(obs_size, action_size, hidden, 0.1)),
                      ("critic", rt.Critic(obs_size, action_size, hidden, bins, 0.0, 150.0))):  # fmt: skip
        for path, module in net.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight, bias = module.weight.detach().numpy().T, module.bias.detach().numpy()  # (in, out)
                layers[f"torch {name}.{path}"] = (weight, bias)
    args = rj.resolve_args(rj.parse_args(["--env-id", "CartpoleBalance"]))  # hidden 512, vmin/vmax set
    for name, net in zip(("actor", "critic"), rj._build_networks(args, obs_size, action_size, nnx.Rngs(0))):
        for path, module in nnx.iter_graph(net):
            if isinstance(module, nnx.Linear):
                weight, bias = np.asarray(module.kernel.get_value()), np.asarray(module.bias.get_value())
                layers[f"jax {name}.{'.'.join(map(str, path))}"] = (weight, bias)
    # Per file: the actor's 2 hidden layers and head; 2 each in the critic's encoder, Q and aux heads.
    assert len(layers) == 2 * (3 + 6), sorted(layers)
    for name, (weight, bias) in layers.items():
        fan_in = weight.shape[0]
        bound = 2.0 / np.sqrt(fan_in) / 0.87962566103423978
        assert abs(weight.std() * np.sqrt(fan_in) - 1.0) < 0.05, name
        assert np.abs(weight).max() <= bound + 1e-6, name
        assert (bias == 0).all(), name


def test_network_outputs_agree(nets):
    jax_actor, jax_critic, torch_actor, torch_critic, batch = nets
    obs, action = batch["obs"], batch["action"]
    mean, std = jax_actor(jnp.asarray(obs))
    torch_mean, torch_std = torch_actor(t(obs))
    close(torch_mean, mean)
    close(torch_std, std)
    logits, features = jax_critic(jnp.asarray(obs), jnp.asarray(action))
    torch_logits, torch_features = torch_critic(t(obs), t(action))
    close(torch_logits, logits, atol=1e-4)
    close(torch_features, features)
    reward_pred, next_pred = jax_critic.aux(features)
    torch_reward_pred, torch_next_pred = torch_critic.aux(torch_features)
    close(torch_reward_pred, reward_pred)
    close(torch_next_pred, next_pred)
    close(rt.q_value(torch_logits, VMIN, VMAX), rj.q_value(logits, VMIN, VMAX), atol=1e-4)


def silu(x):
    return x / (1.0 + np.exp(-x))


def spec_q(logits: np.ndarray) -> np.ndarray:
    """Q = sum_i softmax(logits)_i c_i, support c = linspace(vmin, vmax, bins), in float64."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ np.linspace(VMIN, VMAX, BINS)


def spec_networks(actor: dict, critic: dict, obs: np.ndarray, action: np.ndarray) -> dict:
    """SPEC section 2 written out in float64 numpy, from torch-named weights ("<layer>.weight"
    (out, in), "<layer>.bias", "<normed layer>.norm.weight"): a normed layer is Linear ->
    RMSNorm (epsilon 1e-6) -> SiLU; Q as spec_q."""

    def linear(p, name, x):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    def normed(p, name, x):
        h = linear(p, name + ".linear", x)
        return silu(h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * p[name + ".norm.weight"])

    out = linear(actor, "head", normed(actor, "hidden2", normed(actor, "hidden1", obs)))
    z = linear(critic, "encoder_out", normed(critic, "encoder", np.concatenate([obs, action], -1)))
    logits = linear(critic, "q_out", normed(critic, "q_hidden", silu(z))) + 40.0 * critic["zero_dist"]
    aux = linear(critic, "aux_out", normed(critic, "aux_hidden", silu(z)))
    mean, log_std = out[:, :ACT], out[:, ACT:]
    return {"mean": mean, "std": np.exp(log_std) + 0.1, "logits": logits, "features": z,
            "reward_pred": aux[:, 0], "next_pred": aux[:, 1:], "q": spec_q(logits)}  # fmt: skip


def test_both_files_networks_are_spec_2s(nets):
    """Parity alone would pass a change made in both files (a dropped SiLU, another layer
    order, another Q support); this holds both to SPEC section 2, with the fixture's perturbed
    weights."""
    jax_actor, jax_critic, torch_actor, torch_critic, batch = nets
    weights = [
        {name: value.double().numpy() for name, value in m.state_dict().items()} for m in (torch_actor, torch_critic)
    ]
    want = spec_networks(*weights, batch["obs"].astype(np.float64), batch["action"].astype(np.float64))
    obs, action = jnp.asarray(batch["obs"]), jnp.asarray(batch["action"])
    logits, features = jax_critic(obs, action)
    jax_got = dict(zip(("mean", "std"), jax_actor(obs))) | {"logits": logits, "features": features}
    jax_got |= dict(zip(("reward_pred", "next_pred"), jax_critic.aux(features)))
    jax_got["q"] = rj.q_value(logits, VMIN, VMAX)
    with torch.no_grad():
        logits, features = torch_critic(t(batch["obs"]), t(batch["action"]))
        torch_got = dict(zip(("mean", "std"), torch_actor(t(batch["obs"])))) | {"logits": logits, "features": features}
        torch_got |= dict(zip(("reward_pred", "next_pred"), torch_critic.aux(features)))
        torch_got["q"] = rt.q_value(logits, VMIN, VMAX)
    for got in (jax_got, torch_got):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-4, err_msg=name)
    # The offset 40 * zero_dist keeps these Q near 0, where the support hardly matters: the
    # read-out again on spread-out logits, whose Q lie across [vmin, vmax].
    logits = np.random.default_rng(6).normal(scale=3.0, size=(B, BINS))
    q = spec_q(logits)
    assert np.ptp(q) > 10.0
    close(rt.q_value(t(logits), VMIN, VMAX), q, rtol=1e-5, atol=1e-4)
    close(rj.q_value(jnp.asarray(logits, jnp.float32), VMIN, VMAX), q, rtol=1e-5, atol=1e-4)


def test_fresh_critics_have_the_same_zero_offset():
    jax_critic = rj.Critic(OBS, ACT, HIDDEN, BINS, VMIN, VMAX, nnx.Rngs(0))
    torch_critic = rt.Critic(OBS, ACT, HIDDEN, BINS, VMIN, VMAX)
    close(torch_critic.zero_dist, jax_critic.zero_dist.get_value(), atol=1e-6)


def test_math_functions_agree():
    rng = np.random.default_rng(4)
    values = rng.uniform(-20, 60, size=(5, 9)).astype(np.float32)
    close(rt.hl_gauss(t(values), BINS, VMIN, VMAX), rj.hl_gauss(jnp.asarray(values), BINS, VMIN, VMAX), atol=1e-6)
    mean = rng.normal(size=(40, ACT)).astype(np.float32)
    std = rng.uniform(0.1, 2.0, size=(40, ACT)).astype(np.float32)
    noise = rng.normal(size=(40, ACT)).astype(np.float32)
    action = np.tanh(mean + std * noise * 3).astype(np.float32)  # includes |a| near 1 (clipped)
    close(rt.tanh_normal_log_prob(t(action), t(mean), t(std)), rj.tanh_normal_log_prob(action, mean, std), atol=1e-4)
    sample, log_prob = rt.sample_tanh_normal(t(mean), t(std), t(noise))
    jax_sample, jax_log_prob = rj.sample_tanh_normal(mean, std, noise)
    close(sample, jax_sample)
    close(log_prob, jax_log_prob, atol=1e-4)
    kl_noise = rng.normal(size=(M, 40, ACT)).astype(np.float32)
    mean2, std2 = mean + 0.3, std * 1.2
    close(rt.policy_kl(t(mean), t(std), t(mean2), t(std2), t(kl_noise)), rj.policy_kl(mean, std, mean2, std2, kl_noise))
    T, N = 16, 6
    reward, value = rng.normal(size=(T, N)).astype(np.float32), rng.normal(size=(T, N)).astype(np.float32)
    term = (rng.random((T, N)) < 0.1).astype(np.float32)
    trunc = ((rng.random((T, N)) < 0.1) * (1 - term)).astype(np.float32)
    close(
        rt.soft_lambda_returns(t(reward), t(value), t(term), t(trunc), 0.97, 0.9),
        rj.soft_lambda_returns(reward, value, term, trunc, 0.97, 0.9),
    )
    batches = [rng.normal(2.0, 3.0, size=(n, OBS)).astype(np.float32) for n in (7, 50, 1)]
    torch_state, jax_state = rt.normalizer_init(OBS), rj.normalizer_init(OBS)
    for batch in batches:
        torch_state = rt.normalizer_update(torch_state, t(batch))
        jax_state = rj.normalizer_update(jax_state, jnp.asarray(batch))
    for a, b in zip(torch_state, jax_state):
        close(a, b, rtol=1e-5)
    close(rt.normalize(torch_state, t(batches[0])), rj.normalize(jax_state, jnp.asarray(batches[0])), atol=1e-5)


def jax_critic_objective(graph, params, batch, aux_coef=0.7):
    return rj.critic_loss(
        nnx.merge(graph, params),
        *(jnp.asarray(batch[k]) for k in ("obs", "action", "target_return", "next_features", "reward", "terminated")),
        VMIN,
        VMAX,
        aux_coef,
    )


def torch_critic_objective(critic, batch, aux_coef=0.7):
    keys = ("obs", "action", "target_return", "next_features", "reward", "terminated")
    return rt.critic_loss(critic, *(t(batch[k]) for k in keys), VMIN, VMAX, aux_coef)


def jax_actor_objective(graph, variables, critic, batch, kl_bound=0.1, entropy_target=-1.5):
    params, log_alpha, log_beta = variables
    keys = ("obs", "old_mean", "old_std", "action_noise", "kl_noise")
    return rj.actor_loss(
        nnx.merge(graph, params), log_alpha, log_beta, critic, *(jnp.asarray(batch[k]) for k in keys),
        kl_bound, entropy_target, VMIN, VMAX,
    )  # fmt: skip


def torch_actor_objective(actor, log_alpha, log_beta, critic, batch, kl_bound=0.1, entropy_target=-1.5):
    keys = ("obs", "old_mean", "old_std", "action_noise", "kl_noise")
    return rt.actor_loss(
        actor, log_alpha, log_beta, critic, *(t(batch[k]) for k in keys), kl_bound, entropy_target, VMIN, VMAX
    )


def compare_grads(jax_grads, torch_module, torch_grads, rtol=2e-4):
    """Compare nnx-state-shaped JAX gradients with torch gradients, by parameter name."""
    by_name = dict(zip([n for n, _ in torch_module.named_parameters()], torch_grads))
    flat = nnx.to_flat_state(jax_grads)
    assert len(flat) == len(by_name)
    for path, variable in flat:
        name, transpose = torch_name(path)
        want = np.asarray(variable.get_value())
        want = want.T if transpose else want
        scale = np.abs(want).max() + 1e-8
        np.testing.assert_allclose(by_name[name].numpy(), want, rtol=rtol, atol=2e-5 * scale, err_msg=name)


def test_critic_loss_and_gradients_agree(nets):
    _, jax_critic, _, torch_critic, batch = nets
    graph, params = nnx.split(jax_critic, nnx.Param)
    (loss, info), grads = jax.value_and_grad(lambda p: jax_critic_objective(graph, p, batch), has_aux=True)(params)
    torch_loss, torch_info = torch_critic_objective(torch_critic, batch)
    close(torch_loss, loss, rtol=1e-5)
    assert set(torch_info) == set(info)
    for name in info:
        close(torch_info[name], info[name], rtol=1e-5, atol=1e-4)
    assert float(info["losses/aux_loss"]) > 0 and float(info["losses/critic_ce"]) > 0
    torch_grads = torch.autograd.grad(torch_loss, list(torch_critic.parameters()))
    compare_grads(grads, torch_critic, torch_grads)


@pytest.mark.parametrize("near_bound", [False, True])
def test_actor_alpha_beta_losses_and_gradients_agree(nets, near_bound):
    """far: the fixture's pi_old, every third state far outside the trust region; near: every
    state's KL at 0.8 or 1.2 times the bound (exactly, by tests/test_losses_jax.py's construction),
    so that a bound compared differently in one file shows."""
    jax_actor, jax_critic, torch_actor, torch_critic, batch = nets
    if near_bound:
        mean, std = jax_actor(jnp.asarray(batch["obs"]))
        old_mean, kl_noise, _ = states_near_the_bound(mean, std, 0.1, jax.random.PRNGKey(5), M)  # the objectives' bound
        near = {"old_mean": old_mean, "old_std": std, "kl_noise": kl_noise}
        batch = {**batch, **{name: np.asarray(value) for name, value in near.items()}}
    graph, params = nnx.split(jax_actor, nnx.Param)
    log_alpha, log_beta = jnp.log(jnp.float32(0.05)), jnp.log(jnp.float32(2.0))
    variables = (params, log_alpha, log_beta)
    (loss, info), grads = jax.value_and_grad(lambda v: jax_actor_objective(graph, v, jax_critic, batch), has_aux=True)(
        variables
    )
    torch_log_alpha = torch.tensor(float(log_alpha), requires_grad=True)
    torch_log_beta = torch.tensor(float(log_beta), requires_grad=True)
    torch_loss, torch_info = torch_actor_objective(torch_actor, torch_log_alpha, torch_log_beta, torch_critic, batch)
    assert 0.0 < float(info["policy/kl_outside_frac"]) < 1.0  # both branches present
    if near_bound:
        assert float(info["policy/kl_outside_frac"]) == 0.5
    close(torch_loss, loss, rtol=1e-5, atol=1e-5)
    assert set(torch_info) == set(info)
    for name in info:
        close(torch_info[name], info[name], rtol=1e-5, atol=1e-5)
    torch_params = list(torch_actor.parameters())
    torch_grads = torch.autograd.grad(torch_loss, torch_params + [torch_log_alpha, torch_log_beta])
    compare_grads(grads[0], torch_actor, torch_grads[:-2])
    close(torch_grads[-2], grads[1], rtol=1e-5, atol=1e-6)  # d/d log_alpha (the alpha loss)
    close(torch_grads[-1], grads[2], rtol=1e-5, atol=1e-6)  # d/d log_beta (the beta loss)


def test_bootstrap_agrees(nets):
    """What a collection step leaves for the targets: v' over K = 3 fresh actions of the true
    next state, the soft reward (no entropy term after a terminal step) and z', under a
    non-trivial observation normaliser."""
    jax_actor, jax_critic, torch_actor, torch_critic, batch = nets
    rng = np.random.default_rng(5)
    seen = rng.normal(loc=0.5, scale=2.0, size=(40, OBS)).astype(np.float32)
    jax_norm = rj.normalizer_update(rj.normalizer_init(OBS), jnp.asarray(seen))
    torch_norm = rt.NormalizerState(*(t(np.asarray(x)) for x in jax_norm))
    noise = rng.normal(size=(3, B, ACT)).astype(np.float32)
    inputs = [batch["obs"], batch["reward"], batch["terminated"], noise]
    want = rj.bootstrap(jax_actor, jax_critic, jnp.float32(0.05), jax_norm, *map(jnp.asarray, inputs), 0.99, VMIN, VMAX)
    with torch.no_grad():
        got = rt.bootstrap(torch_actor, torch_critic, torch.tensor(0.05), torch_norm, *map(t, inputs), 0.99, VMIN, VMAX)
    for torch_value, jax_value in zip(got, want, strict=True):
        close(torch_value, jax_value, rtol=1e-5, atol=1e-5)
    soft_reward = np.asarray(want[0])
    assert np.array_equal(soft_reward == batch["reward"], batch["terminated"] == 1)  # the entropy term is there


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_clipping_equals_optax_clip_by_global_norm(scale):
    """reppo_torch.clip_grad_norm against optax's rule, below and above the bound: one
    global norm over every tensor, g * max_norm / ||g|| only where ||g|| > max_norm."""
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=shape).astype(np.float32) * scale for shape in [(4, 3), (3,), (), (2, 5)]]
    tx = optax.clip_by_global_norm(0.5)
    want, _ = tx.update([jnp.asarray(g) for g in grads], tx.init(None))
    got = [torch.tensor(g) for g in grads]
    rt.clip_grad_norm(got, 0.5)
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))
    assert (norm > 0.5) == (scale > 0.1)  # both sides of the bound are tested
    for expected, actual in zip(want, got):
        np.testing.assert_allclose(actual.numpy(), np.asarray(expected), rtol=1e-6, atol=1e-9)


def test_one_clipped_adam_step_agrees(nets):
    """The optimiser step both files take: global-norm clipping 0.5, then Adam 3e-4."""
    _, jax_critic, _, torch_critic, batch = nets
    graph, params = nnx.split(jax_critic, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(3e-4))
    grads, _ = jax.grad(lambda p: jax_critic_objective(graph, p, batch), has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)

    critic = rt.Critic(OBS, ACT, HIDDEN, BINS, VMIN, VMAX)
    critic.load_state_dict(torch_critic.state_dict())
    torch_params = list(critic.parameters())
    optimizer = torch.optim.Adam(torch_params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8)
    loss, _ = torch_critic_objective(critic, batch)
    torch_grads = list(torch.autograd.grad(loss, torch_params))
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in torch_grads])))
    assert norm > 0.5  # clipping is active
    rt.clip_grad_norm(torch_grads, 0.5)
    for param, grad in zip(torch_params, torch_grads):
        param.grad = grad
    optimizer.step()
    compare_grads(new_params, critic, [p.detach() for p in torch_params], rtol=1e-5)


@pytest.mark.parametrize("slots", ["all fresh", "some used"])
def test_auto_reset_wrappers_agree_on_a_step_with_partial_resets(slots):
    """The JAX side of reppo_torch.py's Playground bridge and reppo_jax.AutoResetEnv: the
    same state, action and reset key give the same step outputs, with 6 of 8 envs
    finishing and the other 2 carrying on; the finished envs take their reset-pool slots
    as they are ('all fresh') or after the pool is remade ('some used')."""
    num_envs, episode_length = 8, 4
    env = rj.make_env("CartpoleBalance", "jax", episode_length=1000)
    wrapped = rj.AutoResetEnv(env, num_envs, episode_length)
    # Jitted: MJX run one op at a time costs tens of seconds per call on a CPU.
    state = jax.jit(wrapped.reset, static_argnames="randomize_steps")(jax.random.PRNGKey(5), randomize_steps=False)
    refill = jax.jit(wrapped.refill_pool)
    pool, _ = refill(state.reset_pool, state.pool_fresh, jnp.ones(num_envs, bool), jax.random.PRNGKey(6))
    finishing = jnp.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    pool_fresh = jnp.ones(num_envs, bool) if slots == "all fresh" else jnp.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    state = state._replace(
        step_count=jnp.where(finishing, episode_length - 1, 0), reset_pool=pool, pool_fresh=pool_fresh
    )
    action = jnp.full((num_envs, wrapped.action_size), 0.4)
    carry_key = jax.random.PRNGKey(9)
    _, key_reset = jax.random.split(carry_key)  # what the bridge's step draws from its carried key

    jax_state, jax_result = jax.jit(wrapped.step)(state, action, key_reset)
    _, torch_step = rt.make_jax_auto_reset(env, num_envs, episode_length)
    carry = (state.physics, state.obs, state.step_count, state.episode_return, state.episode_length)
    carry = carry + (state.from_reset, state.reset_pool, state.pool_fresh, carry_key)
    torch_carry, outputs = jax.jit(torch_step)(carry, action)
    next_obs, final_obs, reward, terminated, truncated, episode_done, episode_return, length = outputs
    np.testing.assert_array_equal(next_obs, jax_result.next_obs)
    np.testing.assert_array_equal(final_obs, jax_result.final_obs)
    np.testing.assert_array_equal(reward, jax_result.reward)
    np.testing.assert_array_equal(terminated > 0, jax_result.terminated)
    np.testing.assert_array_equal(truncated > 0, finishing)
    np.testing.assert_array_equal(truncated > 0, jax_result.truncated)
    np.testing.assert_array_equal(episode_done > 0, jax_result.episode_done)
    np.testing.assert_array_equal(episode_return, jax_result.episode_return)
    np.testing.assert_array_equal(length, jax_result.episode_length)
    for torch_leaf, jax_leaf in zip(jax.tree.leaves(torch_carry[6:8]), jax.tree.leaves(jax_state[6:8]), strict=True):
        np.testing.assert_array_equal(torch_leaf, jax_leaf)  # the same pool and fresh slots after
    remade = slots == "some used"
    assert np.allclose(np.asarray(next_obs)[0], np.asarray(pool.obs)[0]) != remade
    assert not np.allclose(np.asarray(next_obs)[np.asarray(finishing)], np.asarray(final_obs)[np.asarray(finishing)])


class DivergingEnv:
    """A tiny pure-JAX env: obs = a counter that starts at 3 and falls by one per step; when
    it reaches 1 the "physics" diverges: the observation and the reward become ``bad``, with
    ``done`` = 1 when ``flagged`` (Playground flags a NaN state) and 0 when not (an overflow to
    inf passes Playground's NaN check)."""

    observation_size = 1
    action_size = 1

    def __init__(self, bad: float, flagged: bool):
        self.bad, self.flagged = bad, flagged

    def _state(self, obs, reward, done):
        from mujoco_playground._src.mjx_env import State

        return State(
            data=jnp.zeros(()), obs=jnp.stack([obs]).astype(jnp.float32), reward=jnp.float32(reward),
            done=jnp.float32(done), metrics={}, info={},
        )  # fmt: skip

    def reset(self, key):
        return self._state(3.0, 0.0, 0.0)

    def step(self, state, action):
        counter = state.obs[0] - 1.0
        diverged = counter <= 1.0
        bad = jnp.float32(self.bad)
        return self._state(jnp.where(diverged, bad, counter), jnp.where(diverged, bad, 1.0), diverged & self.flagged)


@pytest.mark.parametrize("bad, flagged", [(float("nan"), True), (float("inf"), False), (-float("inf"), False)])
def test_a_diverged_env_terminates_with_zeroed_outputs_in_both_wrappers(bad, flagged):
    """At the step where the physics diverges (NaN flagged as done by Playground, or inf that
    is not), both wrappers end the episode as terminated (never bootstrapped), hand back a
    zero final observation and reward, keep the return finite, and continue from a fresh
    episode; the two wrappers' outputs are identical."""
    env, num_envs = DivergingEnv(bad, flagged), 2
    wrapped = rj.AutoResetEnv(env, num_envs, episode_length=10)
    state = wrapped.reset(jax.random.PRNGKey(0), randomize_steps=False)
    torch_reset, torch_step = rt.make_jax_auto_reset(env, num_envs, episode_length=10)
    carry = torch_reset(jax.random.PRNGKey(0), randomize_steps=False)
    carry = (state.physics, state.obs, state.step_count, state.episode_return, state.episode_length,
             state.from_reset, state.reset_pool, state.pool_fresh, carry[-1])  # fmt: skip
    action = jnp.zeros((num_envs, 1))
    jax_step, torch_step = jax.jit(wrapped.step), jax.jit(torch_step)
    for _ in range(2):  # the second step diverges
        _, key_reset = jax.random.split(carry[-1])  # what the bridge's step draws from its carried key
        state, result = jax_step(state, action, key_reset)
        carry, outputs = torch_step(carry, action)
        expected = [result.next_obs, result.final_obs, result.reward, result.terminated, result.truncated,
                    result.episode_done, result.episode_return, result.episode_length]  # fmt: skip
        for name, ours, theirs in zip(["next_obs", "final_obs", "reward"] + ["flags"] * 3 + ["return", "length"],
                                      outputs, expected, strict=True):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), err_msg=name)
    np.testing.assert_array_equal(result.terminated, True)
    np.testing.assert_array_equal(result.truncated, False)
    np.testing.assert_array_equal(result.final_obs, 0.0)
    np.testing.assert_array_equal(result.reward, 0.0)
    np.testing.assert_array_equal(result.next_obs, 3.0)  # a fresh episode
    np.testing.assert_array_equal(result.episode_return, 1.0)  # the first step's reward alone
    np.testing.assert_array_equal(result.episode_length, 2)


def test_mujoco_warp_steps_through_the_bridge_as_mjx_does():
    """--impl warp in reppo_torch.py: MuJoCo Warp's state holds batch-wide contact buffers
    (leaves without the env axis), which the bridge keeps from the step. Over three episodes
    with resets from the pool, its outputs equal those with MJX (CartpoleBalance)."""
    num_envs, episode_length = 8, 4
    outputs, physics = {}, {}
    for impl in ("jax", "warp"):
        env = rt.make_playground_env("CartpoleBalance", impl, 1000)
        reset, step = rt.make_jax_auto_reset(env, num_envs, episode_length)
        carry, step, outputs[impl] = reset(jax.random.PRNGKey(3), randomize_steps=True), jax.jit(step), []
        for t in range(3 * episode_length):
            carry, out = step(carry, jnp.sin(jnp.arange(num_envs, dtype=jnp.float32)[:, None] + t))
            outputs[impl].append(out)
        physics[impl] = carry[0]
    # MuJoCo Warp did step: its state has leaves without the env axis (MJX's has none).
    axes = {impl: {leaf.shape[:1] for leaf in jax.tree.leaves(state)} for impl, state in physics.items()}
    assert axes["jax"] == {(num_envs,)} and axes["warp"] - {(num_envs,)}, axes
    for mjx_out, warp_out in zip(outputs["jax"], outputs["warp"], strict=True):
        for mjx_value, warp_value in zip(mjx_out, warp_out, strict=True):
            np.testing.assert_allclose(warp_value, mjx_value, rtol=1e-5, atol=1e-5)
    assert sum(float(out[4].sum()) for out in outputs["warp"]) == 3 * num_envs  # truncated: 3 episodes each
