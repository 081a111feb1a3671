"""Periodic momentum reset: zero an inner transformation's moments every T steps.

SPAM (arXiv:2501.06842) and Stable-SPAM (arXiv:2502.17055) both forget their
Adam moments periodically so that the effect of a gradient spike cannot linger.
Here the reset is a wrapper around *any* inner transformation.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spam_optax import _validation


def _int_interval(reset_interval: Any) -> jax.Array:
  return jnp.asarray(reset_interval, dtype=jnp.int32)


def is_reset_step(step: jax.Array, reset_interval: Any) -> jax.Array:
  """True when ``step`` (1-based) is a multiple of ``reset_interval`` (> 0).

  Args:
    step: the 1-based step number (an int32 scalar).
    reset_interval: the reset period; 0 means never.

  Returns:
    A boolean scalar.
  """
  interval = _int_interval(reset_interval)
  safe = jnp.maximum(interval, 1)
  return (interval > 0) & (step % safe == 0)


def steps_into_period(step: jax.Array, reset_interval: Any) -> jax.Array:
  """``step % reset_interval``, or ``step`` itself when the interval is 0."""
  interval = _int_interval(reset_interval)
  safe = jnp.maximum(interval, 1)
  return jnp.where(interval > 0, step % safe, step)


def restarted_count(step: jax.Array, reset_interval: Any) -> jax.Array:
  """Stable-SPAM's per-leaf step ``k``, which restarts at 1 at each reset.

  **Quirk** of the official Stable-SPAM code: ``k`` counts ``1, 2, ..., T-1``,
  then is set to 1 at step ``T`` (the reset step itself), so
  ``k = t`` for ``t < T`` and ``k = t mod T + 1`` afterwards. Bias corrections
  computed from ``k`` therefore restart at every reset.

  Args:
    step: the 1-based global step (int32 scalar).
    reset_interval: the reset period; 0 means never (then ``k = t``).

  Returns:
    ``k`` as an int32 scalar.
  """
  interval = _int_interval(reset_interval)
  safe = jnp.maximum(interval, 1)
  restarted = (interval > 0) & (step >= interval)
  return jnp.where(restarted, step % safe + 1, step)


def restarted_count_before_reset(
    step: jax.Array, reset_interval: Any
) -> jax.Array:
  """Stable-SPAM's ``k`` as seen by AdaClip and AdaGN (they run before the reset).

  In the official code ``k`` is incremented, AdaClip and AdaGN use it, and only
  then is it set to 1 on a reset step. So these statistics see ``k = t`` up to
  the first reset step ``T`` included, then ``2, 3, ..., T+1`` between resets:
  ``k = restarted_count(t - 1) + 1``.

  Args:
    step: the 1-based global step (int32 scalar).
    reset_interval: the reset period; 0 means never (then ``k = t``).

  Returns:
    ``k`` as an int32 scalar.
  """
  return restarted_count(step - 1, reset_interval) + 1


class PeriodicResetState(NamedTuple):
  """State of :func:`periodic_reset`.

  Attributes:
    count: number of updates applied so far (int32).
    steps_since_reset: steps completed since the last reset step (int32):
      0 right after a reset step (a multiple of ``reset_interval``) with either
      timing, ``count`` before the first reset.
    inner_state: the wrapped transformation's state.
  """
  count: jax.Array
  steps_since_reset: jax.Array
  inner_state: Any


def _zero_floating(tree: Any, do_reset: jax.Array) -> Any:
  def zero(x):
    if isinstance(x, (jax.Array, jnp.ndarray)) and jnp.issubdtype(
        x.dtype, jnp.inexact
    ):
      return jnp.where(do_reset, jnp.zeros_like(x), x)
    return x
  return jax.tree.map(zero, tree)


def periodic_reset(
    inner: optax.GradientTransformation,
    reset_interval: int,
    *,
    after_update: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Zeroes the inner transformation's moments every ``reset_interval`` steps.

  At step :math:`t` (1-based) with :math:`t \bmod T = 0`, every floating-point
  array in the inner state (Adam's ``mu``/``nu``, Lion's or SGD's momentum,
  Adafactor's factored moments) is set to zero; integer arrays (step counts)
  keep counting, so Adam's bias correction is *not* restarted.

  Two timings are supported:

  - ``after_update=False`` (SPAM): the moments are zeroed *before* step
    :math:`t`'s update, which therefore starts from fresh moments.
  - ``after_update=True`` (Stable-SPAM, **quirk** of the official code): step
    :math:`t` still uses (and updates) the old moments; the zeroed moments take
    effect from step :math:`t+1`. The zeroing itself is applied at the start
    of step :math:`t+1` (one pass over the moments instead of two), so a state
    saved right after step :math:`t` still holds the moments that step
    :math:`t+1` discards.

  Wrap only the transformation that holds moments: any floating-point state in
  ``inner`` is zeroed, including e.g. hyperparameters held by an
  ``optax.inject_hyperparams`` state.

  Args:
    inner: the transformation whose moments are reset.
    reset_interval: the period :math:`T` in optimizer steps; 0 means never.
    after_update: the reset timing, see above.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = spam_optax.periodic_reset(optax.scale_by_adam(), reset_interval=2)
    >>> params = jnp.ones(3)
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...   _, state = opt.update(jnp.ones(3), state, params)
    >>> print(state.inner_state.mu)  # zeroed before step 2, then one update
    [0.1 0.1 0.1]
    >>> print(state.inner_state.count)  # the count is not reset
    2

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _validation.check_non_negative_int("reset_interval", reset_interval)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PeriodicResetState(
        count=jnp.zeros([], jnp.int32),
        steps_since_reset=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    step = optax.safe_increment(state.count)
    do_reset = is_reset_step(step, reset_interval)
    if after_update:
      # The zeroing that follows reset step t - 1 is applied here, before the
      # inner update of step t: the same trajectory as zeroing right after
      # step t - 1, but the moments are then read and written in one pass
      # (zeroing the freshly updated moments makes XLA copy both of them).
      zero_now = is_reset_step(step - 1, reset_interval) & (step > 1)
    else:
      zero_now = do_reset
    inner_state = _zero_floating(state.inner_state, zero_now)
    updates, inner_state = inner.update(
        updates, inner_state, params, **extra_args
    )
    since = optax.safe_increment(state.steps_since_reset)
    since = jnp.where(do_reset, 0, since)
    return updates, PeriodicResetState(
        count=step, steps_since_reset=since, inner_state=inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
