"""An eagerly built state can be donated to a jitted update on its first call.

`jax.jit(step, donate_argnums=...)` refuses a state in which two leaves share
one buffer ("Attempt to donate the same buffer twice"), so every `init` must
create one array per field and leaf.
"""
from absl.testing import parameterized
import jax
import numpy as np
import optax

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp

# Every public transformation and both aliases (the sparse one too).
TRANSFORMATIONS = {
    "spam": lambda: spam_optax.spam(1e-2, reset_interval=3, clip_delay=1),
    "spam_sparse": lambda: spam_optax.spam(1e-2, density=0.5, reset_interval=3),
    "stable_spam": lambda: spam_optax.stable_spam(1e-2, reset_interval=3),
    "scale_by_spam": spam_optax.scale_by_spam,
    "spam_clip": lambda: spam_optax.spam_clip(reset_interval=3),
    "periodic_reset": lambda: spam_optax.periodic_reset(
        optax.scale_by_adam(), 3),
    "scale_by_reset_warmup": spam_optax.scale_by_reset_warmup,
    "add_decayed_weights_after_update": lambda: (
        spam_optax.add_decayed_weights_after_update(1e-2, 0.1)),
    "clip_by_running_max": spam_optax.clip_by_running_max,
    "scale_by_grad_norm_history": spam_optax.scale_by_grad_norm_history,
    "clip_by_running_max_and_grad_norm_history": (
        spam_optax.clip_by_running_max_and_grad_norm_history),
    "scale_by_grad_norm_history_global": lambda: (
        spam_optax.scale_by_grad_norm_history(global_norm=True)),
    "scale_by_stable_spam_adam": spam_optax.scale_by_stable_spam_adam,
    "sparse_moments": lambda: spam_optax.sparse_moments(
        spam_optax.periodic_reset(spam_optax.scale_by_spam(), 3),
        density=0.5, reset_interval=3),
}


def test_every_public_transformation_is_listed():
  made = {name for name in spam_optax.__all__
          if name[0].islower() and name not in (
              "spam", "stable_spam", "spike_stats", "replace_masks", "redraw_masks",
              "redraw_due",
              "uniform_mask_sampler", "reset_warmup_scale",
              "cosine_momentum_scale")}
  assert made <= set(TRANSFORMATIONS), made - set(TRANSFORMATIONS)


class DonationTest(parameterized.TestCase):

  @parameterized.named_parameters((n, n) for n in sorted(TRANSFORMATIONS))
  def test_eager_init_donates(self, name):
    opt = TRANSFORMATIONS[name]()
    params = to_jnp(nested_params())
    state = opt.init(params)  # eager, as a training script does
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(pointers)) == len(pointers), "fields share a buffer"

    seq = [to_jnp(g) for g in gradient_sequence(2)]
    expected = [opt.update(seq[0], state, params)]
    expected.append(opt.update(seq[1], expected[0][1], params))
    step = jax.jit(opt.update, donate_argnums=1)
    for g, want in zip(seq, expected):
      updates, state = step(g, state, params)  # the first call donates init's
      got = jax.tree.leaves((updates, state))
      for x, y in zip(got, jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                   atol=1e-7)
