"""skip_step: Adam that drops whole updates on gradient-norm spikes (experiments.skip_step)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import config, optimizers, skip_step

WINDOW, THRESHOLD = 16, 6.0
SPIKES = {20: 50.0, 40: 8.0, 58: 1000.0}  # step (1-based) -> gradient factor, > WINDOW apart


def gradients(n, seed=0):
  """Noisy gradients whose norm drifts slowly (no spikes of their own)."""
  rng = np.random.default_rng(seed)
  scale = np.linspace(1.0, 0.3, n)
  return [{"w": (rng.normal(size=(4, 3)) * s).astype(np.float32),
           "b": (rng.normal(size=(3,)) * s).astype(np.float32)} for s in scale]


def reference_skips(norms, threshold, window, min_history):
  """The documented rule in NumPy: skip when ||g_t|| > threshold * mean of the last `window`."""
  out, history = [], []
  for n in norms:
    prev = history[-window:]
    out.append(len(history) >= min_history and n > threshold * np.mean(prev))
    history.append(n)
  return out


def test_skips_exactly_the_injected_spike_steps():
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
  tx = skip_step.skip_on_grad_norm_spikes(optax.adam(1e-2), threshold=THRESHOLD, window=WINDOW)
  update = jax.jit(tx.update)
  state = tx.init(params)
  skipped, norms = [], []
  for t, g in enumerate(gradients(60), start=1):
    g = jax.tree.map(lambda x: jnp.asarray(x * SPIKES.get(t, 1.0)), g)
    norms.append(float(optax.tree.norm(g)))
    before = state
    updates, state = update(g, state, params)
    skipped.append(bool(state.skipped))
    if state.skipped:  # nothing moves: zero update, inner state exactly as before
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
      chex.assert_trees_all_equal(state.inner_state, before.inner_state)
    else:
      ref_updates, ref_inner = optax.adam(1e-2).update(g, before.inner_state, params)
      chex.assert_trees_all_close(updates, ref_updates, rtol=1e-5, atol=1e-9)
      chex.assert_trees_all_close(state.inner_state, ref_inner, rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, updates)
  assert [t for t, s in enumerate(skipped, start=1) if s] == sorted(SPIKES)
  assert skipped == reference_skips(norms, THRESHOLD, WINDOW, WINDOW // 2)
  assert int(state.num_skipped) == len(SPIKES)


def test_no_skip_before_the_history_fills_and_non_finite_gradients_are_skipped():
  params = {"w": jnp.ones(3)}
  tx = skip_step.skip_on_grad_norm_spikes(optax.adam(1e-2), window=8)
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(3)}, state, params)
  _, state = tx.update({"w": jnp.full(3, 1e6)}, state, params)  # huge, but only 1 norm held
  assert not state.skipped
  updates, state = tx.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
  assert state.skipped
  chex.assert_trees_all_equal(updates, {"w": jnp.zeros(3)})
  assert int(state.count) == 2  # the NaN norm is not part of the running mean


def test_trainer_builds_it_with_the_flag_and_reports_skips():
  cfg = config.parse_args(["--optimizer", "skip_step", "--skip_threshold", "3"])
  tx = optimizers.make_optimizer(cfg)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  assert set(optimizers.spike_stats(state)) == {"skip/skipped", "skip/skipped_total"}
  with pytest.raises(SystemExit, match="--skip_threshold must be > 0"):
    config.parse_args(["--optimizer", "skip_step", "--skip_threshold", "0"])
