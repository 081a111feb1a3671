"""Scalars for loggers: how many entries were clipped, how long since a reset."""
from typing import Any

import jax
import jax.numpy as jnp

from spam_optax import _adaptive_clip
from spam_optax import _periodic_reset
from spam_optax import _scale_by_spam
from spam_optax import _spike_clip

_CLIP_STATES = (
    _scale_by_spam.ScaleBySpamState,
    _spike_clip.SpamClipState,
    _adaptive_clip.ClipByRunningMaxState,
)
_STATES = _CLIP_STATES + (_periodic_reset.PeriodicResetState,)


def _find_states(tree: Any) -> list[Any]:
  found = []
  for node in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, _STATES)
  ):
    if isinstance(node, _STATES):
      found.append(node)
      if isinstance(node, _periodic_reset.PeriodicResetState):
        found.extend(_find_states(node.inner_state))
  return found


def spike_stats(opt_state: Any) -> dict[str, jax.Array]:
  """Returns a flat dict of spike and reset statistics found in ``opt_state``.

  Searches the state of any chain or wrapper (``optax.chain``,
  ``inject_hyperparams``, ``MultiSteps``, ``apply_if_finite``,
  ``sparse_moments``) for the states of :func:`scale_by_spam`,
  :func:`spam_clip`, :func:`clip_by_running_max` and :func:`periodic_reset`.
  Everything is a traced-friendly JAX scalar, so this can run inside a jitted
  train step; no host sync happens until the logger reads the values.

  A state with none of these pieces (e.g. ``optax.adamw``'s) gives an empty
  dict, without a warning, so that one logging call serves every optimizer.
  :func:`spam_optax.spam` and :func:`spam_optax.stable_spam` give the same keys
  for the same parameters.

  Keys:
    - ``spike/clipped_total``: entries clipped at the last step, all leaves and
      all clipping blocks together (int32): SPAM's spike clip, AdaClip.
    - ``spike/clipped/<leaf path>``: the same per parameter leaf, the path
      joined with ``/`` (e.g. ``spike/clipped/layers/0/w``).
    - ``reset/steps_since_reset``: from the first :func:`periodic_reset`
      found, the steps completed since the last reset step: 0 right after a
      step that is a multiple of the interval, whether the reset zeroed the
      moments before that step's update (SPAM) or after it
      (Stable-SPAM); the step count before the first reset.

  Args:
    opt_state: an optimizer state.

  Returns:
    A dict from name to scalar; empty if no relevant state is found.

  Examples:
    >>> import jax.numpy as jnp
    >>> import spam_optax
    >>> opt = spam_optax.spam(1e-3)
    >>> params = {'w': jnp.ones(3)}
    >>> state = opt.init(params)
    >>> sorted(spam_optax.spike_stats(state))
    ['reset/steps_since_reset', 'spike/clipped/w', 'spike/clipped_total']
  """
  found = _find_states(opt_state)
  stats: dict[str, jax.Array] = {}
  total = None
  for node in found:
    if isinstance(node, _CLIP_STATES):
      for leaf, count in node.clipped.as_dict().items():
        name = "spike/clipped/" + leaf
        stats[name] = stats[name] + count if name in stats else count
      if node.clipped.layout.names:
        count = jnp.sum(node.clipped.values, dtype=jnp.int32)
        total = count if total is None else total + count
    elif isinstance(node, _periodic_reset.PeriodicResetState):
      stats.setdefault("reset/steps_since_reset", node.steps_since_reset)
  if total is not None:
    stats["spike/clipped_total"] = total
  elif any(isinstance(n, _CLIP_STATES) for n in found):
    stats["spike/clipped_total"] = jnp.zeros([], jnp.int32)
  return stats
