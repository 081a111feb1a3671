"""Tests of AdaGN (`scale_by_grad_norm_history`) against a NumPy reference."""
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp
from test_adaptive_clip import np_stat_count


def np_scale(t, total, eta_min):
  if total is None:
    return 1.0
  return eta_min + (1 - eta_min) * (1 + math.cos(math.pi * t / (total + 1))) / 2


def np_ada_gn(seq, gamma1, gamma2, eps, total, eta_min, interval, norm_fn):
  a = b = 0.0
  out = []
  for t, g in enumerate(seq, 1):
    k = np_stat_count(t, interval)
    g1 = gamma1 * np_scale(t, total, eta_min)
    n = norm_fn(g)
    a = g1 * a + (1 - g1) * n
    b = gamma2 * b + (1 - gamma2) * n * n
    c = (a / (1 - g1**k)) / (math.sqrt(b / (1 - gamma2**k)) + eps)
    out.append(c / n if n > 0 else 1.0)
  return out


class ScaleByGradNormHistoryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_per_leaf_matches_numpy_reference(self):
    hp = dict(gamma1=0.85, gamma2=0.99, eps=1e-8, total_steps=10,
              eta_min=0.5, reset_interval=4)
    seq = gradient_sequence(10)
    opt = spam_optax.scale_by_grad_norm_history(**hp)
    state = opt.init(to_jnp(nested_params()))
    update = self.variant(opt.update)
    got = []
    for g in seq:
      u, state = update(to_jnp(g), state)
      got.append(u)
    leaves = [jax.tree.leaves(tree) for tree in seq]
    treedef = jax.tree.structure(seq[0])
    factors = [
        np_ada_gn([s[i].astype(np.float64) for s in leaves], hp["gamma1"],
                  hp["gamma2"], hp["eps"], hp["total_steps"], hp["eta_min"],
                  hp["reset_interval"], lambda g: float(np.linalg.norm(g)))
        for i in range(len(leaves[0]))
    ]
    for t in range(len(seq)):
      want = treedef.unflatten(
          [leaves[t][i] * factors[i][t] for i in range(len(factors))]
      )
      chex.assert_trees_all_close(got[t], want, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_global_norm_matches_numpy_reference(self):
    seq = gradient_sequence(8)
    opt = spam_optax.scale_by_grad_norm_history(0.7, 0.9, global_norm=True)
    state = opt.init(to_jnp(nested_params()))
    update = self.variant(opt.update)

    def global_norm(tree):
      return math.sqrt(sum(float(np.sum(np.square(l.astype(np.float64))))
                           for l in jax.tree.leaves(tree)))

    factors = np_ada_gn(seq, 0.7, 0.9, 1e-8, None, 0.5, 0, global_norm)
    for t, g in enumerate(seq):
      u, state = update(to_jnp(g), state)
      chex.assert_trees_all_close(
          u, jax.tree.map(lambda x: x * factors[t], g), rtol=1e-5, atol=1e-6)
    assert state.mu_norm.shape == ()

  def test_spike_is_scaled_down(self):
    opt = spam_optax.scale_by_grad_norm_history(0.7, 0.9)
    state = opt.init(jnp.zeros(2))
    for _ in range(5):
      _, state = opt.update(jnp.array([3.0, 4.0]), state)
    u, _ = opt.update(jnp.array([300.0, 400.0]), state)
    assert float(jnp.linalg.norm(u)) < 200.0

  def test_low_precision_leaves_keep_float32_stats(self):
    state = spam_optax.scale_by_grad_norm_history().init(
        {"w": jnp.ones(3, jnp.bfloat16)})
    assert state.mu_norm.tree()["w"].dtype == jnp.float32

  @parameterized.parameters("gamma1", "gamma2")
  def test_rejects_gammas_outside_unit_interval(self, name):
    with pytest.raises(ValueError, match=name):
      spam_optax.scale_by_grad_norm_history(**{name: -0.1})
