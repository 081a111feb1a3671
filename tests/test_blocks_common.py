"""Every block under optax's wrappers: inject_hyperparams, MultiSteps, apply_if_finite."""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp


def _reset_adam(reset_interval, after_update=False):
  return spam_optax.periodic_reset(optax.scale_by_adam(), reset_interval,
                                   after_update=after_update)


# name -> (factory, numeric keyword arguments, all injectable)
BLOCKS = {
    "scale_by_spam": (spam_optax.scale_by_spam,
                      dict(b1=0.8, spike_threshold=20.0, clip_delay=2,
                           reset_interval=3)),
    "spam_clip": (spam_optax.spam_clip,
                    dict(spike_threshold=20.0, b2=0.9, clip_delay=2,
                         reset_interval=3)),
    "periodic_reset": (_reset_adam, dict(reset_interval=3)),
    "scale_by_reset_warmup": (spam_optax.scale_by_reset_warmup,
                              dict(reset_interval=3, warmup_steps=2)),
    "add_decayed_weights_after_update": (
        spam_optax.add_decayed_weights_after_update,
        dict(learning_rate=0.1, weight_decay=0.5)),
    "clip_by_running_max": (spam_optax.clip_by_running_max,
                            dict(gamma3=0.9, reset_interval=3)),
    "scale_by_grad_norm_history": (spam_optax.scale_by_grad_norm_history,
                                   dict(gamma1=0.8, gamma2=0.95, total_steps=8,
                                        reset_interval=3)),
    "scale_by_stable_spam_adam": (spam_optax.scale_by_stable_spam_adam,
                                  dict(b1=0.85, total_steps=8, reset_interval=3)),
}


def run(opt, seq, params):
  state = opt.init(params)
  update = jax.jit(opt.update)
  out = []
  for g in seq:
    u, state = update(to_jnp(g), state, params)
    out.append(u)
  return out, state


class BlocksUnderWrappersTest(parameterized.TestCase):

  @parameterized.parameters(*sorted(BLOCKS))
  def test_inject_hyperparams(self, name):
    factory, kwargs = BLOCKS[name]
    params = to_jnp(nested_params())
    seq = gradient_sequence(5)
    plain, _ = run(factory(**kwargs), seq, params)
    injected, _ = run(optax.inject_hyperparams(factory)(**kwargs), seq, params)
    # Injected hyperparameters are float32 arrays: `1 - b1` loses ~1e-7.
    chex.assert_trees_all_close(injected, plain, rtol=1e-4, atol=1e-7)

  @parameterized.parameters(*sorted(BLOCKS))
  def test_multisteps_accumulates_and_counts_optimizer_steps(self, name):
    factory, kwargs = BLOCKS[name]
    params = to_jnp(nested_params())
    seq = gradient_sequence(8)
    multi, _ = run(optax.MultiSteps(factory(**kwargs), every_k_schedule=2),
                   seq, params)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, seq[i], seq[i + 1])
             for i in range(0, len(seq), 2)]
    plain, _ = run(factory(**kwargs), means, params)
    chex.assert_trees_all_close(multi[1::2], plain, rtol=1e-5, atol=1e-7)

  @parameterized.parameters(*sorted(BLOCKS))
  def test_apply_if_finite_leaves_state_untouched(self, name):
    factory, kwargs = BLOCKS[name]
    params = to_jnp(nested_params())
    opt = optax.apply_if_finite(factory(**kwargs), max_consecutive_errors=2)
    seq = gradient_sequence(4)
    _, state = run(opt, seq[:3], params)
    bad = jax.tree.map(lambda x: x * jnp.nan, to_jnp(seq[3]))
    u, new_state = opt.update(bad, state, params)
    for leaf in jax.tree.leaves(u):
      np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
    _, state = run(opt, seq, params)
    assert int(state.notfinite_count) == 0
