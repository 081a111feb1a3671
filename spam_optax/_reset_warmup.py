"""SPAM's update scale: a cosine warm-up after every momentum reset."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spam_optax import _periodic_reset
from spam_optax import _validation


def reset_warmup_scale(
    step: jax.Array, reset_interval: Any, warmup_steps: Any
) -> jax.Array:
  r"""SPAM's update scale at ``step`` (1-based).

  With :math:`c` the steps since the last reset (:math:`c = t \bmod T` once
  :math:`t \ge T`; :math:`c = N + t` before the first reset, so training
  starts at full scale): :math:`s = 1 - 0.99\,(1+\cos(\pi c/(N+1)))/2` for
  :math:`c < N`, else 1.
  """
  interval = jnp.asarray(reset_interval, jnp.int32)
  n = jnp.asarray(warmup_steps, jnp.int32)
  phase = _periodic_reset.steps_into_period(step, reset_interval)
  since = jnp.where((interval > 0) & (step >= interval), phase, n + step)
  ramp = 0.99 * (1 + jnp.cos(jnp.pi * since / (n + 1))) / 2
  return 1 - jnp.where(since < n, ramp, 0)


class ScaleByResetWarmupState(NamedTuple):
  """State of :func:`scale_by_reset_warmup`: the step count (int32)."""
  count: jax.Array


def scale_by_reset_warmup(
    reset_interval: int = 500, warmup_steps: int = 150
) -> optax.GradientTransformation:
  r"""Scales updates by a cosine ramp from 0.01 to 1 after each reset.

  At step :math:`t` the updates are multiplied by

  .. math::
    s_t = 1 - 0.99\,\frac{1 + \cos(\pi c_t/(N+1))}{2} \text{ if } c_t < N
    \text{, else } 1,

  where :math:`c_t` counts the steps since the last reset (:math:`c_t = 0` at
  every :math:`t \bmod T = 0`). Before the first reset :math:`s_t = 1`. This
  compensates SPAM's momentum reset, which otherwise restarts Adam with
  non-restarted bias corrections.

  Args:
    reset_interval: :math:`T` (official ``DeltaT``); 0 means never (scale 1).
    warmup_steps: :math:`N`, length of the ramp.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import spam_optax
    >>> opt = spam_optax.scale_by_reset_warmup(reset_interval=2, warmup_steps=1)
    >>> state = opt.init(jnp.zeros(1))
    >>> for _ in range(2):
    ...   u, state = opt.update(jnp.ones(1), state)
    >>> print(u.round(6))
    [0.01]

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
  """
  _validation.check_non_negative_int("reset_interval", reset_interval)
  _validation.check_non_negative_int("warmup_steps", warmup_steps)

  def init_fn(params):
    del params
    return ScaleByResetWarmupState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_increment(state.count)
    scale = reset_warmup_scale(step, reset_interval, warmup_steps)
    updates = jax.tree.map(
        lambda u: (u * scale.astype(u.dtype)).astype(u.dtype), updates
    )
    return updates, ScaleByResetWarmupState(count=step)

  return optax.GradientTransformation(init_fn, update_fn)
