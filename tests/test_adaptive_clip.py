"""Tests of AdaClip (`clip_by_running_max`) against a NumPy reference."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp


def np_stat_count(t, interval):
  """Stable-SPAM's k as seen before the reset (official order of operations)."""
  k = 0
  for s in range(1, t + 1):
    k += 1
    used = k
    if interval and s % interval == 0:
      k = 1
  return used


def np_ada_clip(seq, gamma3, interval):
  m = 0.0
  out = []
  for t, g in enumerate(seq, 1):
    g = g.astype(np.float64)
    k = np_stat_count(t, interval)
    gmax = np.max(np.abs(g))
    m = gamma3 * m + (1 - gamma3) * gmax
    mhat = m / (1 - gamma3**k)
    over = np.abs(g) > mhat
    out.append(np.where(over, g / gmax * mhat, g))
  return out


class ClipByRunningMaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    gamma3, interval = 0.9, 4
    seq = gradient_sequence(11)
    opt = spam_optax.clip_by_running_max(gamma3, reset_interval=interval)
    state = opt.init(to_jnp(nested_params()))
    update = self.variant(opt.update)
    got = []
    for g in seq:
      u, state = update(to_jnp(g), state)
      got.append(u)
    leaves = [jax.tree.leaves(tree) for tree in seq]
    treedef = jax.tree.structure(seq[0])
    refs = [np_ada_clip([s[i] for s in leaves], gamma3, interval)
            for i in range(len(leaves[0]))]
    for t in range(len(seq)):
      chex.assert_trees_all_close(
          got[t], treedef.unflatten([r[t] for r in refs]), rtol=1e-5, atol=1e-6)
    assert state.max_ema.tree()["dense"]["w"].dtype == jnp.float32
    assert state.max_ema.tree()["layers"][1] is None

  def test_spike_is_scaled_to_running_max(self):
    opt = spam_optax.clip_by_running_max(0.5)
    state = opt.init(jnp.zeros(3))
    _, state = opt.update(jnp.array([1.0, -1.0, 1.0]), state)
    u, state = opt.update(jnp.array([1.0, -1.0, 100.0]), state)
    # m = 0.25 + 50 = 50.25 over (1 - 0.25): mhat = 67; 100 -> 67, others kept.
    np.testing.assert_allclose(u, [1.0, -1.0, 67.0], rtol=1e-6)
    assert int(state.clipped.tree()) == 1

  def test_zero_gradient_is_left_alone(self):
    opt = spam_optax.clip_by_running_max(0.9)
    u, _ = opt.update(jnp.zeros(3), opt.init(jnp.zeros(3)))
    np.testing.assert_array_equal(u, np.zeros(3))

  def test_restart_count(self):
    from spam_optax import _periodic_reset  # pylint: disable=g-import-not-at-top
    steps = jnp.arange(1, 13)
    got = jax.vmap(lambda t: _periodic_reset.restarted_count_before_reset(t, 4))(steps)
    np.testing.assert_array_equal(got, [np_stat_count(int(t), 4) for t in steps])
    adam_k = jax.vmap(lambda t: _periodic_reset.restarted_count(t, 4))(steps)
    np.testing.assert_array_equal(adam_k, [1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 1])

  def test_rejects_bad_gamma3(self):
    with pytest.raises(ValueError, match="gamma3"):
      spam_optax.clip_by_running_max(1.0)
