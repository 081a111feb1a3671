"""Decoupled weight decay of the already-updated parameters (SPAM's order)."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from spam_optax import _tree_util
from spam_optax import _validation


class AddDecayedWeightsAfterUpdateState(NamedTuple):
  """State: the step count (int32), used to evaluate a learning-rate schedule."""
  count: jax.Array


def add_decayed_weights_after_update(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    mask: _tree_util.MaskOrFn = None,
) -> optax.GradientTransformation:
  r"""Adds decoupled weight decay of the *updated* parameters to the updates.

  Put this link last, after the learning rate has been applied. With
  :math:`u` the incoming (final) update and :math:`p` the parameters, the
  official SPAM code does :math:`p' = p + u` and then
  :math:`p'' = p' - \eta\lambda p'`, so this link returns

  .. math::
    u - \eta_t \lambda\,(p + u).

  This differs from :func:`optax.add_decayed_weights` (which decays the old
  :math:`p`) by the second-order term :math:`\eta\lambda u`; to reproduce SPAM's
  trajectories exactly the order matters. :math:`\eta_t` is the learning rate
  (or schedule value at count :math:`t-1`, as in optax).

  Args:
    learning_rate: :math:`\eta`, a float or an optax schedule.
    weight_decay: :math:`\lambda`.
    mask: a tree of booleans (or a callable of the params returning one) that
      selects the leaves to decay, as in :func:`optax.masked`.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = optax.chain(
    ...     optax.scale_by_learning_rate(0.1),
    ...     spam_optax.add_decayed_weights_after_update(0.1, weight_decay=0.5),
    ... )
    >>> params = jnp.ones(1)
    >>> u, _ = opt.update(jnp.ones(1), opt.init(params), params)
    >>> print(params + u)  # (1 - 0.1) * (1 - 0.1 * 0.5)
    [0.855]

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
  """
  _validation.check_learning_rate(learning_rate)
  _validation.check_non_negative("weight_decay", weight_decay)

  def init_fn(params):
    del params
    return AddDecayedWeightsAfterUpdateState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          'add_decayed_weights_after_update needs `params` in update().'
      )
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def leaf(u, p):
      rate = jnp.asarray(lr * weight_decay).astype(u.dtype)
      return (u - rate * (p.astype(u.dtype) + u)).astype(u.dtype)

    updates = jax.tree.map(leaf, updates, params)
    return updates, AddDecayedWeightsAfterUpdateState(
        count=optax.safe_increment(state.count)
    )

  inner = optax.GradientTransformation(init_fn, update_fn)
  if mask is None:
    return inner
  return optax.masked(inner, mask)
