"""Stable-SPAM's Adam block: cosine-decayed β1 and a restarting bias correction."""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spam_optax import _momentum_scale
from spam_optax import _numerics
from spam_optax import _periodic_reset
from spam_optax import _tree_util
from spam_optax import _validation


class ScaleByStableSpamAdamState(NamedTuple):
  """State of :func:`scale_by_stable_spam_adam`.

  Attributes:
    count: global step count (int32); never reset.
    mu: first moment, one per leaf.
    nu: second moment, one per leaf.
  """
  count: jax.Array
  mu: Any
  nu: Any


def scale_by_stable_spam_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    total_steps: Optional[int] = None,
    eta_min: float = 0.5,
    reset_interval: int = 0,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Stable-SPAM's Adam.

  With :math:`\beta_1' = \beta_1 s_t` (:math:`s_t` the cosine scale of
  :func:`spam_optax.cosine_momentum_scale`, 1 without ``total_steps``) and
  :math:`k` the bias-correction step:

  .. math::
    \mu_t &= \beta_1' \mu_{t-1} + (1-\beta_1') g, \qquad
    \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) g^2 \\
    u_t &= \frac{1}{1-\beta_1'^k}\,
      \frac{\mu_t}{\sqrt{\nu_t}/\sqrt{1-\beta_2^k} + \epsilon}

  (:math:`\epsilon` outside the bias correction, as in the official code).
  :math:`k = t` until the first multiple of ``reset_interval``, where it
  restarts at 1 (**quirk**: the official code resets its per-leaf step at the
  momentum reset). The moments themselves are not reset here: wrap this block in
  :func:`spam_optax.periodic_reset` with ``after_update=True`` and the same
  interval to reproduce Stable-SPAM.

  Args:
    b1: :math:`\beta_1`.
    b2: :math:`\beta_2`.
    eps: :math:`\epsilon`.
    total_steps: official ``total_T``; enables the cosine decay of
      :math:`\beta_1` to :math:`\eta_{min}\beta_1`.
    eta_min: floor of the cosine scale.
    reset_interval: period after which :math:`k` restarts; 0 = never.
    mu_dtype: dtype of both moments; defaults to the parameters' dtype.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = optax.chain(
    ...     spam_optax.scale_by_stable_spam_adam(b1=0.9, b2=0.999),
    ...     optax.scale_by_learning_rate(1e-3),
    ... )
    >>> params = jnp.zeros(2)
    >>> u, _ = opt.update(jnp.ones(2), opt.init(params), params)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _validation.check_unit_interval("b1", b1)
  _validation.check_unit_interval("b2", b2)
  _validation.check_non_negative("eps", eps)
  _validation.check_positive_int_or_none("total_steps", total_steps)
  _validation.check_closed_unit_interval("eta_min", eta_min)
  _validation.check_non_negative_int("reset_interval", reset_interval)

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=mu_dtype)
    return ScaleByStableSpamAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
    )

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_increment(state.count)
    k = _periodic_reset.restarted_count(step, reset_interval)
    beta1 = b1 * _momentum_scale.cosine_momentum_scale(
        step, total_steps, eta_min
    )
    correction1 = _numerics.one_minus_power(beta1, k)
    sqrt_correction2 = jnp.sqrt(_numerics.one_minus_power(b2, k))

    def leaf(g, m, v):
      dtype = jnp.promote_types(g.dtype, m.dtype)
      gc = g.astype(dtype)
      m_new = (beta1 * m.astype(dtype) + (1 - beta1) * gc).astype(dtype)
      v_new = (b2 * v.astype(dtype) + (1 - b2) * gc * gc).astype(dtype)
      denom = jnp.sqrt(v_new) / sqrt_correction2.astype(dtype) + eps
      u = m_new / correction1.astype(dtype) / denom
      return u.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

    u, mu, nu = _tree_util.tree_map_unzip(leaf, 3, updates, state.mu, state.nu)
    return u, ScaleByStableSpamAdamState(count=step, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
