"""The pieces recombined with other optax optimizers and wrappers."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import spam_optax

# ---------------------------------------------------------------------------
# Toy linear regression with 1000x gradient spikes.

_DIM, _OUT, _N, _BATCH, _STEPS = 16, 4, 512, 32, 300
_SPIKE_STEPS = (60, 150, 240, 285)  # 1-based; outside every clip hold-off
_RESET = 100


def _problem():
  kx, kw, kn = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (_N, _DIM))
  y = x @ jax.random.normal(kw, (_DIM, _OUT))
  return x, y + 0.1 * jax.random.normal(kn, (_N, _OUT))


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _final_loss(opt):
  """Trains from zero on minibatches; gradients at the spike steps x1000."""
  x, y = _problem()
  params = {"w": jnp.zeros((_DIM, _OUT)), "b": jnp.zeros(_OUT)}
  spikes = jnp.asarray(_SPIKE_STEPS)

  def step(carry, t):
    params, state = carry
    key = jax.random.fold_in(jax.random.key(1), t)
    idx = jax.random.randint(key, (_BATCH,), 0, _N)
    grads = jax.grad(_loss)(params, x[idx], y[idx])
    factor = jnp.where(jnp.isin(t + 1, spikes), 1000.0, 1.0)
    grads = jax.tree.map(lambda g: g * factor, grads)
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(
      lambda p: jax.lax.scan(step, (p, opt.init(p)), jnp.arange(_STEPS))
  )(params)
  return float(_loss(params, x, y))


_BASES = {
    "lion": lambda: optax.lion(3e-2),
    "adafactor": lambda: optax.adafactor(
        1e-2, multiply_by_parameter_scale=False
    ),
    "sgd_momentum": lambda: optax.sgd(2e-2, momentum=0.9),
}

_PIECES = {
    # Stable-SPAM's AdaClip and AdaGN in front, moments reset periodically.
    "adaclip_adagn": lambda base: optax.chain(
        spam_optax.clip_by_running_max(gamma3=0.999),
        spam_optax.scale_by_grad_norm_history(gamma1=0.7, gamma2=0.9),
        spam_optax.periodic_reset(base, _RESET),
    ),
    # SPAM's spike clip on its own second moment, moments reset periodically.
    "spam_clip": lambda base: optax.chain(
        spam_optax.spam_clip(
            spike_threshold=50.0, clip_delay=10, reset_interval=_RESET
        ),
        spam_optax.periodic_reset(base, _RESET),
    ),
}


@pytest.fixture(scope="module")
def base_losses():
  return {name: _final_loss(make()) for name, make in _BASES.items()}


@pytest.mark.parametrize("pieces", sorted(_PIECES))
@pytest.mark.parametrize("base", sorted(_BASES))
def test_pieces_survive_spikes(base, pieces, base_losses):
  with_pieces = _final_loss(_PIECES[pieces](_BASES[base]()))
  without = base_losses[base]
  assert np.isfinite(with_pieces)
  # The spikes throw the bare optimizer far off (loss 0.8 .. 2e4); with the
  # pieces it ends near the noise floor (0.01).
  assert with_pieces < 0.1 * without, (with_pieces, without)
  assert with_pieces < 0.1, with_pieces


# ---------------------------------------------------------------------------
# optax wrappers.


def _params():
  rng = np.random.default_rng(0)
  return {
      "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
  }


def _grad_stream(params, n, seed=1):
  rng = np.random.default_rng(seed)
  return [
      jax.tree.map(
          lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
      )
      for _ in range(n)
  ]


def _run(opt, params, grads):
  state = opt.init(params)
  update = jax.jit(opt.update)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


_SMALL_SPAM = dict(reset_interval=5, warmup_steps=2, clip_delay=2)


@pytest.mark.parametrize("density", [None, 0.25])
def test_multi_steps_counts_optimizer_steps(density):
  k, steps = 3, 12
  params = _params()
  micro = _grad_stream(params, k * steps)
  make = lambda: spam_optax.spam(1e-2, density=density, **_SMALL_SPAM)

  accumulated, _ = _run(optax.MultiSteps(make(), every_k_schedule=k),
                        params, micro)
  means = [
      jax.tree.map(lambda *g: sum(g) / k, *micro[i * k:(i + 1) * k])
      for i in range(steps)
  ]
  direct, _ = _run(make(), params, means)
  # Resets every 5 optimizer steps: counting micro-batches would differ.
  chex.assert_trees_all_close(accumulated, direct, rtol=1e-4, atol=1e-6)


def test_inject_hyperparams():
  params = _params()
  grads = _grad_stream(params, 7)
  injected = optax.inject_hyperparams(spam_optax.spam)(
      learning_rate=1e-2, **_SMALL_SPAM
  )
  got, state = _run(injected, params, grads)
  want, ref_state = _run(spam_optax.spam(1e-2, **_SMALL_SPAM), params, grads)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  # A new learning rate in the state takes effect at the next step.
  state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
  g = grads[0]
  doubled, _ = jax.jit(injected.update)(g, state, got)
  single, _ = jax.jit(spam_optax.spam(1e-2, **_SMALL_SPAM).update)(
      g, ref_state, want
  )
  chex.assert_trees_all_close(doubled, jax.tree.map(lambda b: 2 * b, single),
                              rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_sparse():
  params = _params()
  grads = _grad_stream(params, 7)
  injected = optax.inject_hyperparams(
      spam_optax.spam, static_args=("density",)
  )(learning_rate=1e-2, density=0.25, **_SMALL_SPAM)
  got, _ = _run(injected, params, grads)
  want, _ = _run(
      spam_optax.spam(1e-2, density=0.25, **_SMALL_SPAM), params, grads
  )
  chex.assert_trees_all_close(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Checkpointing.

_OPTIMIZERS = {
    "spam": lambda: spam_optax.spam(1e-2, **_SMALL_SPAM),
    "spam_sparse": lambda: spam_optax.spam(1e-2, density=0.25, **_SMALL_SPAM),
    "stable_spam": lambda: spam_optax.stable_spam(
        1e-2, reset_interval=5, total_steps=20
    ),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_orbax_round_trip(name, tmp_path):
  opt = _OPTIMIZERS[name]()
  params = _params()
  grads = _grad_stream(params, 5)
  params, state = _run(opt, params, grads[:4])

  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / name
  checkpointer.save(path, state)
  checkpointer.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = checkpointer.restore(path, target)
  checkpointer.close()

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  update = jax.jit(opt.update)
  want = update(grads[4], state, params)
  got = update(grads[4], restored, params)
  jax.tree.map(np.testing.assert_array_equal, got, want)
