"""Tests of SPAM's post-reset cosine warm-up (`scale_by_reset_warmup`)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spam_optax
from _piece_helpers import nested_params
from _piece_helpers import to_jnp


def np_warmup_scales(steps, interval, warmup):
  """The official counter: starts at N+1, +1 per step, 0 after step t if (t+1)%T==0."""
  c = warmup + 1
  out = []
  for t in range(1, steps + 1):
    dr = 0.99 * (1 + math.cos(math.pi * c / (warmup + 1))) / 2 if c < warmup else 0
    out.append(1 - dr)
    c += 1
    if interval and (t + 1) % interval == 0:
      c = 0
  return out


class ScaleByResetWarmupTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_official_counter(self):
    interval, warmup, steps = 6, 3, 20
    opt = spam_optax.scale_by_reset_warmup(interval, warmup)
    params = to_jnp(nested_params())
    state = opt.init(params)
    update = self.variant(opt.update)
    ones = jax.tree.map(jnp.ones_like, params)
    for t, want in enumerate(np_warmup_scales(steps, interval, warmup), 1):
      u, state = update(ones, state)
      chex.assert_trees_all_close(u, jax.tree.map(lambda x: x * want, ones),
                                  rtol=1e-6, atol=1e-6)
    # Reset steps run at 0.01; training starts at full scale.
    assert np_warmup_scales(6, interval, warmup)[0] == 1.0
    assert abs(np_warmup_scales(6, interval, warmup)[5] - 0.01) < 1e-12

  def test_zero_interval_is_identity(self):
    steps = jnp.arange(1, 50)
    scales = jax.vmap(lambda t: spam_optax.reset_warmup_scale(t, 0, 10))(steps)
    np.testing.assert_array_equal(scales, np.ones(49))

  def test_rejects_negative_warmup(self):
    with pytest.raises(ValueError, match="warmup_steps"):
      spam_optax.scale_by_reset_warmup(10, -1)
