"""Tests of `periodic_reset` around several inner transformations."""
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

INNERS = {
    "adam": lambda: optax.scale_by_adam(),
    "lion": lambda: optax.lion(1e-2),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=2),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
}


def zero_floats(tree):
  return jax.tree.map(
      lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else x,
      tree,
  )


def manual_reset_run(inner, seq, params, interval, after_update):
  """Reference: the unwrapped inner with float state zeroed by hand."""
  state = inner.init(params)
  out = []
  for t, g in enumerate(seq, 1):
    reset = interval and t % interval == 0
    if reset and not after_update:
      state = zero_floats(state)
    u, state = inner.update(to_jnp(g), state, params)
    if reset and after_update:
      state = zero_floats(state)
    out.append(u)
  return out, state


class PeriodicResetTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(inner=sorted(INNERS), after_update=[False, True])
  def test_matches_manual_reset(self, inner, after_update):
    interval = 3
    params = to_jnp(nested_params())
    seq = gradient_sequence(7)
    opt = spam_optax.periodic_reset(INNERS[inner](), interval,
                                    after_update=after_update)
    state = opt.init(params)
    update = self.variant(opt.update)
    got = []
    for g in seq:
      u, state = update(to_jnp(g), state, params)
      got.append(u)
    want, want_state = manual_reset_run(INNERS[inner](), seq, params,
                                        interval, after_update)
    for t in range(len(seq)):
      chex.assert_trees_all_close(got[t], want[t], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.inner_state, want_state, rtol=1e-5,
                                atol=1e-6)

  def test_adam_count_keeps_counting(self):
    opt = spam_optax.periodic_reset(optax.scale_by_adam(b1=0.5), 2)
    params = jnp.zeros(2)
    state = opt.init(params)
    for _ in range(4):
      _, state = opt.update(jnp.ones(2), state, params)
    assert int(state.inner_state.count) == 4
    # Reset before step 4: mu holds only step 4's gradient.
    np.testing.assert_allclose(state.inner_state.mu, [0.5, 0.5])

  def test_after_update_timing_zeroes_moments_after_the_step(self):
    params = jnp.zeros(2)
    before = spam_optax.periodic_reset(optax.scale_by_adam(), 2)
    after = spam_optax.periodic_reset(optax.scale_by_adam(), 2,
                                      after_update=True)
    plain = optax.scale_by_adam()
    sb, sa, sp = before.init(params), after.init(params), plain.init(params)
    for t in range(2):
      g = jnp.array([1.0, -2.0]) * (t + 1)
      ub, sb = before.update(g, sb)
      ua, sa = after.update(g, sa)
      up, sp = plain.update(g, sp)
    np.testing.assert_allclose(ua, up)  # step 2 still used the old moments
    assert not np.allclose(ub, up)
    # Either timing: 0 steps since the reset step 2.
    assert int(sa.steps_since_reset) == 0 and int(sb.steps_since_reset) == 0
    # Step 3 starts from zeroed moments (the zeroing is applied on entry).
    g = jnp.array([0.5, 4.0])
    ua, sa = after.update(g, sa)
    fresh = spam_optax.periodic_reset(optax.scale_by_adam(), 2)
    _, sf = fresh.update(g, fresh.init(params))
    np.testing.assert_allclose(sa.inner_state.mu, sf.inner_state.mu)
    np.testing.assert_allclose(sa.inner_state.nu, sf.inner_state.nu)

  def test_zero_interval_never_resets(self):
    params = jnp.zeros(3)
    opt = spam_optax.periodic_reset(optax.scale_by_adam(), 0)
    plain = optax.scale_by_adam()
    s, sp = opt.init(params), plain.init(params)
    for g in gradient_sequence(5):
      g = jnp.asarray(g["dense"]["b"])
      u, s = opt.update(g, s)
      up, sp = plain.update(g, sp)
      np.testing.assert_array_equal(u, up)
    assert int(s.steps_since_reset) == 5

  def test_rejects_negative_interval(self):
    with pytest.raises(ValueError, match="reset_interval"):
      spam_optax.periodic_reset(optax.scale_by_adam(), -1)
