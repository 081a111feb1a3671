"""Skip-step on gradient-norm spikes: the whole update is dropped when the gradient norm spikes.

The baseline that large-model trainers ship against loss spikes (MaxText's
``skip_step_on_spikes``, OLMo-core's ``SkipStepOptimizer``, levanter's skip-step): instead of
clipping, a step whose gradient looks like a spike is not taken at all. The parameters do not
move and the inner optimizer's state (moments, counters, schedule position) is left exactly as
it was, so the spike never enters Adam's moments.

Rule (``--optimizer skip_step``), with ``g_t`` the gradient the optimizer receives at update
``t`` (1-based) and ``‖·‖`` the global L2 norm over all leaves::

    c_t   = number of finite norms among ‖g_1‖ … ‖g_{t-1}‖
    m_t   = mean of the last min(c_t, window) of them           (the running mean)
    skip  = (c_t >= min_history and ‖g_t‖ > threshold · m_t)  or  ‖g_t‖ is not finite

The running mean is MaxText's: a ring buffer of the last ``window`` = 128 finite norms
(``skip_step_interval``), skipped steps included so that a lasting level shift becomes the new
baseline, and no decision before ``min_history = max(2, window // 2)`` norms are held. MaxText
skips when the norm (or the loss) exceeds ``mean + k·std`` of that window; the flag here is the
ratio to the mean, ``--skip_threshold`` (default 6), which needs no variance estimate and reads
like the SPAM paper's own spike ratios (arXiv:2501.06842). Everything is jit-friendly: the
decision is a traced boolean and both branches are selected with ``optax.tree.where`` (as
``optax.apply_if_finite`` does), no host synchronisation and no recompilation.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spam_optax import _leaf_stats

WINDOW = 128  # MaxText's skip_step_interval
THRESHOLD = 6.0


class SkipStepState(NamedTuple):
  inner_state: optax.OptState
  norms: jax.Array  # (window,) float32 ring buffer of past gradient norms
  count: jax.Array  # int32, finite gradient norms seen (taken or skipped updates)
  skipped: jax.Array  # bool, whether the last update was skipped
  num_skipped: jax.Array  # int32, skipped updates so far


def skip_on_grad_norm_spikes(inner: optax.GradientTransformation, *,
                             threshold: float = THRESHOLD, window: int = WINDOW,
                             min_history: int | None = None) -> optax.GradientTransformation:
  """Wraps ``inner`` so that updates whose gradient norm spikes are skipped entirely.

  Args:
    inner: the optimizer whose updates are taken or skipped (Adam for ``skip_step``).
    threshold: skip when ``‖g_t‖ > threshold × running mean`` of the previous norms.
    window: number of previous gradient norms in the running mean.
    min_history: norms needed before any skip; default ``max(2, window // 2)`` (MaxText's).

  Returns:
    A ``GradientTransformation`` whose state is a :class:`SkipStepState`.
  """
  if threshold <= 0:
    raise ValueError(f"threshold must be > 0, got {threshold}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  min_history = max(2, window // 2) if min_history is None else min_history

  def init_fn(params):
    return SkipStepState(inner_state=inner.init(params),
                         norms=jnp.zeros((window,), jnp.float32),
                         count=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), bool),
                         num_skipped=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    norm = _leaf_stats.global_norm(updates).astype(jnp.float32)
    held = jnp.minimum(state.count, window)
    mean = jnp.sum(jnp.where(jnp.arange(window) < held, state.norms, 0.0)) / jnp.maximum(held, 1)
    finite = jnp.isfinite(norm)
    skip = jnp.logical_or(
        jnp.logical_not(finite),
        jnp.logical_and(state.count >= min_history, norm > threshold * mean))
    new_updates, new_inner = inner.update(updates, state.inner_state, params)
    zeros = jax.tree.map(jnp.zeros_like, new_updates)
    out_updates = optax.tree.where(skip, zeros, new_updates)
    out_inner = optax.tree.where(skip, state.inner_state, new_inner)
    slot = state.count % window
    norms = jnp.where(finite, state.norms.at[slot].set(norm), state.norms)
    return out_updates, SkipStepState(
        inner_state=out_inner, norms=norms, count=state.count + finite.astype(jnp.int32),
        skipped=skip, num_skipped=state.num_skipped + skip.astype(jnp.int32))

  return optax.GradientTransformation(init_fn, update_fn)


def skip_stats(opt_state) -> dict:
  """``skip/skipped`` (1 if the last update was skipped) and ``skip/skipped_total``, if any."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SkipStepState))
           if isinstance(s, SkipStepState)]
  if not found:
    return {}
  return {"skip/skipped": found[0].skipped.astype(jnp.int32),
          "skip/skipped_total": found[0].num_skipped}
