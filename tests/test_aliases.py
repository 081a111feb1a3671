"""Tests of the `spam` and `stable_spam` aliases under optax's wrappers."""
import inspect
from typing import Optional

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp

# Small intervals so that resets, warm-ups and clip hold-offs happen in a few steps.
SPAM_KW = dict(reset_interval=4, warmup_steps=2, clip_delay=1,
               spike_threshold=50.0, weight_decay=0.1)
STABLE_KW = dict(reset_interval=4, total_steps=10, weight_decay=0.1)


def make(name, lr=1e-2, **kw):
  if name == "spam":
    return spam_optax.spam(lr, **{**SPAM_KW, **kw})
  return spam_optax.stable_spam(lr, **{**STABLE_KW, **kw})


def run(opt, seq, params=None, jit=True):
  params = to_jnp(nested_params()) if params is None else params
  state = opt.init(params)
  update = jax.jit(opt.update) if jit else opt.update
  for g in seq:
    u, state = update(to_jnp(g), state, params)
    params = optax.apply_updates(params, u)
  return params, state


class ValidationTest(parameterized.TestCase):

  @parameterized.parameters(
      ("density", 0.0), ("density", 1.5), ("spike_threshold", -1.0),
      ("reset_interval", -1), ("warmup_steps", -1), ("clip_delay", -2),
      ("b1", 1.0), ("b2", -0.1), ("eps", -1e-8), ("weight_decay", -0.1),
  )
  def test_spam_rejects(self, name, value):
    with pytest.raises(ValueError, match=name) as info:
      spam_optax.spam(1e-3, **{name: value})
    assert "\n" not in str(info.value)

  @parameterized.parameters(
      ("gamma1", 1.0), ("gamma2", 1.2), ("gamma3", -0.5), ("b1", 1.0),
      ("eps", -1.0), ("reset_interval", -3), ("total_steps", 0),
      ("eta_min", 2.0),
  )
  def test_stable_spam_rejects(self, name, value):
    with pytest.raises(ValueError, match=name) as info:
      spam_optax.stable_spam(1e-3, **{name: value})
    assert "\n" not in str(info.value)

  @parameterized.parameters(
      ("spam", "reset_interval", 2.5), ("spam", "warmup_steps", 2.5),
      ("spam", "clip_delay", 2.5), ("spam", "reset_interval", 2.0),
      ("stable_spam", "reset_interval", 2.5), ("stable_spam", "total_steps", 9.5),
  )
  def test_rejects_non_integer_step_counts(self, name, arg, value):
    factory = getattr(spam_optax, name)
    with pytest.raises(ValueError, match=f"`{arg}` must be an integer"):
      factory(1e-3, **{arg: value})
    # The same check when the value is injected (at `init`).
    injected = optax.inject_hyperparams(factory)(1e-3, **{arg: value})
    with pytest.raises(ValueError, match=f"`{arg}` must be an integer"):
      injected.init(to_jnp(nested_params()))

  @parameterized.parameters(
      ("spam", -1e-3, "must be >= 0"), ("stable_spam", -1e-3, "must be >= 0"),
      ("spam", "1e-3", "must be a number"),
      ("stable_spam", "1e-3", "must be a number"),
      ("spam", None, "must be a number"),
  )
  def test_rejects_bad_learning_rate(self, name, value, message):
    factory = getattr(spam_optax, name)
    with pytest.raises(ValueError, match=f"`learning_rate` {message}") as info:
      factory(value)
    assert "\n" not in str(info.value)

  @parameterized.parameters("spam", "stable_spam")
  def test_rejects_injected_negative_learning_rate(self, name):
    injected = optax.inject_hyperparams(getattr(spam_optax, name))(-1e-3)
    with pytest.raises(ValueError, match="`learning_rate` must be >= 0"):
      injected.init(to_jnp(nested_params()))

  @parameterized.parameters("spam", "stable_spam")
  def test_accepts_integer_arrays_and_schedules(self, name):
    factory = getattr(spam_optax, name)
    factory(optax.constant_schedule(1e-3), reset_interval=np.int64(4))
    factory(jnp.asarray(1e-3), reset_interval=jnp.asarray(4))


class AliasTest(parameterized.TestCase):

  @parameterized.parameters("spam", "stable_spam")
  def test_nested_tree_with_none_leaf_jit_and_eager_agree(self, name):
    seq = gradient_sequence(9)
    p_jit, state = run(make(name), seq)
    p_eager, _ = run(make(name), seq, jit=False)
    assert p_jit["layers"][1] is None
    chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-7)
    for leaf in jax.tree.leaves(p_jit):
      assert np.all(np.isfinite(leaf))

  @parameterized.parameters("spam", "stable_spam")
  def test_no_recompilation_across_resets(self, name):
    opt = make(name)
    traces = []

    def step(g, state, params):
      traces.append(None)
      return opt.update(g, state, params)

    step = jax.jit(step)
    params = to_jnp(nested_params())
    state = opt.init(params)
    for g in gradient_sequence(10):
      _, state = step(to_jnp(g), state, params)
    assert len(traces) == 1

  @parameterized.parameters("spam", "stable_spam")
  def test_inject_hyperparams_learning_rate(self, name):
    seq = gradient_sequence(6)
    factory = spam_optax.spam if name == "spam" else spam_optax.stable_spam
    kw = SPAM_KW if name == "spam" else STABLE_KW
    injected = optax.inject_hyperparams(factory)(learning_rate=1e-2, **kw)
    p_inj, state = run(injected, seq)
    p_ref, _ = run(make(name), seq)
    chex.assert_trees_all_close(p_inj, p_ref, rtol=1e-5, atol=1e-7)
    # The learning rate can be changed between steps without recompiling.
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    params = to_jnp(nested_params())
    u, _ = jax.jit(injected.update)(to_jnp(seq[0]), state, params)
    for leaf in jax.tree.leaves(u):
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))

  @parameterized.parameters("spam", "stable_spam")
  def test_learning_rate_schedule_uses_count_before_step(self, name):
    schedule = optax.linear_schedule(1e-2, 1e-3, 8)
    seq = gradient_sequence(6)
    factory = spam_optax.spam if name == "spam" else spam_optax.stable_spam
    kw = SPAM_KW if name == "spam" else STABLE_KW
    p_sched, _ = run(factory(schedule, **kw), seq)
    p_inj, _ = run(optax.inject_hyperparams(factory)(learning_rate=schedule,
                                                      **kw), seq)
    chex.assert_trees_all_close(p_sched, p_inj, rtol=1e-5, atol=1e-7)
    # First step uses schedule(0).
    params = to_jnp(nested_params())
    u_sched, _ = factory(schedule, **kw).update(
        to_jnp(seq[0]), factory(schedule, **kw).init(params), params)
    u_const, _ = factory(1e-2, **kw).update(
        to_jnp(seq[0]), factory(1e-2, **kw).init(params), params)
    chex.assert_trees_all_close(u_sched, u_const, rtol=1e-6, atol=1e-7)

  def test_density_is_static_under_inject_hyperparams(self):
    opt = optax.inject_hyperparams(spam_optax.spam, static_args=("density",))(
        learning_rate=1e-2, density=0.5, **SPAM_KW)
    params, _ = run(opt, gradient_sequence(3))
    assert np.all(np.isfinite(params["dense"]["w"]))
    with pytest.raises(ValueError, match="density"):
      optax.inject_hyperparams(spam_optax.spam)(
          learning_rate=1e-2, density=0.5).init(to_jnp(nested_params()))

  @parameterized.parameters(
      ("spam", dict(learning_rate=1e-2, b1=0.8, b2=0.95, eps=1e-5,
                    weight_decay=0.1, spike_threshold=20.0, reset_interval=4,
                    warmup_steps=2, clip_delay=1, seed=3)),
      ("stable_spam", dict(learning_rate=1e-2, b1=0.8, b2=0.95, eps=1e-6,
                           weight_decay=0.1, gamma1=0.8, gamma2=0.95,
                           gamma3=0.9, reset_interval=4, total_steps=10,
                           eta_min=0.3)),
  )
  def test_all_numeric_hyperparameters_injectable(self, name, kw):
    # Every numeric argument of the alias, each away from its default.
    factory = getattr(spam_optax, name)
    numbers = (int, float, Optional[int], Optional[float])
    numeric = {k for k, p in inspect.signature(factory).parameters.items()
               if p.annotation in numbers} | {"learning_rate"}
    numeric -= {"density"}  # sets shapes: static (see below)
    assert set(kw) == numeric
    seq = gradient_sequence(9)
    inj = optax.inject_hyperparams(factory)(**kw)
    p_inj, state = run(inj, seq)
    assert set(state.hyperparams) == numeric
    chex.assert_trees_all_close(p_inj, run(factory(**kw), seq)[0], rtol=1e-5, atol=1e-7)

  def test_sparse_leaves_are_not_decayed_quirk(self):
    # Zero gradients: Adam's update is 0, only weight decay moves the params.
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for sparse_mask in (None, {"w": True, "b": False}, lambda p: {"w": True, "b": False}):
      opt = spam_optax.spam(0.1, weight_decay=0.5, density=0.5,
                            sparse_mask=sparse_mask)
      u, _ = opt.update(zeros, opt.init(params), params)
      np.testing.assert_array_equal(u["w"], np.zeros((4, 4)))
      np.testing.assert_allclose(u["b"], -0.05 * np.ones(4), rtol=1e-6)
    dense = spam_optax.spam(0.1, weight_decay=0.5)
    u, _ = dense.update(zeros, dense.init(params), params)
    np.testing.assert_allclose(u["w"], -0.05 * np.ones((4, 4)), rtol=1e-6)

  @parameterized.parameters("spam", "stable_spam")
  def test_moments_follow_param_dtype(self, name):
    params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
    opt = make(name)
    state = opt.init(params)
    u, state = jax.jit(opt.update)({"w": jnp.ones((3, 2), jnp.bfloat16)},
                                   state, params)
    assert u["w"].dtype == jnp.bfloat16
    float_leaves = [x for x in jax.tree.leaves(state)
                    if jnp.issubdtype(x.dtype, jnp.floating)]
    # The moments follow the parameters; the statistics (scalars and the
    # per-leaf vectors) stay float32.
    moments = [x for x in float_leaves if x.shape == (3, 2)]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in float_leaves if x.shape != (3, 2)} <= {
        jnp.dtype(jnp.float32)}


  @parameterized.parameters(("spam", None), ("spam", 0.5), ("stable_spam", None))
  def test_mu_dtype_sets_both_adam_moments(self, name, density):
    params = {"w": jnp.ones((4, 2), jnp.bfloat16), "b": jnp.ones(2, jnp.bfloat16)}
    kw = {} if density is None else {"density": density}
    opt = make(name, mu_dtype=jnp.float32, **kw)
    state = opt.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    u, state = jax.jit(opt.update)(g, state, params)
    assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype(jnp.bfloat16)}
    for field in ("mu", "nu"):
      moments = optax.tree_utils.tree_get_all_with_path(state, field)
      assert len(moments) == 1
      leaves = jax.tree.leaves(moments[0][1])
      assert {x.dtype for x in leaves} == {jnp.dtype(jnp.float32)}
    # The per-leaf scalars of AdaClip and AdaGN are float32 anyway; nothing
    # else in the state is bfloat16.
    assert jnp.dtype(jnp.bfloat16) not in {x.dtype for x in jax.tree.leaves(state)}


class WrapperTest(parameterized.TestCase):

  @parameterized.parameters("spam", "stable_spam")
  def test_apply_if_finite_skips_bad_step(self, name):
    opt = optax.apply_if_finite(make(name), max_consecutive_errors=3)
    params = to_jnp(nested_params())
    state = opt.init(params)
    update = jax.jit(opt.update)
    seq = gradient_sequence(6)
    for g in seq[:3]:
      u, state = update(to_jnp(g), state, params)
      params = optax.apply_updates(params, u)
    bad = jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan) if x.ndim else
                       jnp.inf * jnp.ones_like(x), to_jnp(seq[3]))
    u, new_state = update(bad, state, params)
    new_params = optax.apply_updates(params, u)
    chex.assert_trees_all_equal(new_params, params)
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1
    for g in seq[3:]:
      u, new_state = update(to_jnp(g), new_state, new_params)
      new_params = optax.apply_updates(new_params, u)
    for leaf in jax.tree.leaves(new_params):
      assert np.all(np.isfinite(leaf))
    assert int(new_state.notfinite_count) == 0

  def test_nan_gradient_without_guard_propagates(self):
    # Documented behaviour: the clip does not catch NaN (NaN > x is False).
    opt = make("spam")
    params = {"w": jnp.ones(3)}
    u, _ = opt.update({"w": jnp.array([jnp.nan, 1.0, 1.0])}, opt.init(params),
                      params)
    assert np.isnan(u["w"][0])

  @parameterized.parameters("spam", "stable_spam")
  def test_multisteps_counts_optimizer_steps(self, name):
    k = 2
    seq = gradient_sequence(12)
    multi = optax.MultiSteps(make(name), every_k_schedule=k)
    params = to_jnp(nested_params())
    state = multi.init(params)
    update = jax.jit(multi.update)
    for g in seq:
      u, state = update(to_jnp(g), state, params)
      params = optax.apply_updates(params, u)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, seq[i], seq[i + 1])
             for i in range(0, len(seq), k)]
    want, _ = run(make(name), means)
    chex.assert_trees_all_close(params, want, rtol=1e-5, atol=1e-6)
    resets = optax.tree_utils.tree_get_all_with_path(state, "steps_since_reset")
    # 6 optimizer steps, the last reset step is 4 (SPAM zeroes the moments
    # before its update, Stable-SPAM after it): 2 steps since, either way.
    assert int(resets[0][1]) == 2


@pytest.mark.parametrize("name", ["spam", "stable_spam"])
def test_toy_regression_converges_despite_spikes(name):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  y = x @ w_true
  params = {"w": jnp.zeros((8, 2)), "b": jnp.zeros(2)}
  opt = make(name, lr=5e-2, weight_decay=0.0)

  def loss(p):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  def step(carry, t):
    p, s = carry
    g = jax.grad(loss)(p)
    g = jax.tree.map(lambda a: jnp.where(t % 37 == 20, 1e4 * a, a), g)
    u, s = opt.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (final, _), _ = jax.jit(lambda p: jax.lax.scan(
      step, (p, opt.init(p)), jnp.arange(300)))(params)
  assert float(loss(final)) < 0.05 * float(loss(params))
