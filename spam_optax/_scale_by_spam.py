"""SPAM's Adam block: Adam whose gradient is spike-clipped against its own v."""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spam_optax import _count
from spam_optax import _leaf_stats
from spam_optax import _numerics
from spam_optax import _spike_clip
from spam_optax import _tree_util
from spam_optax import _validation


class ScaleBySpamState(NamedTuple):
  """State of :func:`scale_by_spam`.

  Attributes:
    count: Adam's step count (int32); never reset, it drives bias correction.
    mu: first moment, one per leaf.
    nu: second moment, one per leaf.
    clipped: the number of entries the spike clip changed at the last step,
      one int32 per leaf, in one vector (a :class:`spam_optax.LeafStats`;
      ``as_dict()`` names them by leaf path).
  """
  count: jax.Array
  mu: Any
  nu: Any
  clipped: Any


def scale_by_spam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    spike_threshold: float = 5000.0,
    clip_delay: int = 20,
    reset_interval: int = 500,
    mu_dtype: Optional[Any] = None,
    clip_unseen: bool = True,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam after clipping gradient spikes against Adam's v.

  At step :math:`t`, with :math:`\nu_{t-1}` the second moment *before* this
  step (not bias-corrected):

  .. math::
    g &\leftarrow \mathrm{sign}(g)\sqrt{\theta\,\nu_{t-1}}
        \quad\text{where } g^2 > \theta\,\nu_{t-1}
        \text{ and the clip is active} \\
    \mu_t &= \beta_1 \mu_{t-1} + (1-\beta_1)\, g, \qquad
    \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2)\, g^2 \\
    u_t &= \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
          \frac{\mu_t}{\sqrt{\nu_t} + \epsilon}

  The clip is active when :math:`\theta \ne 0`, :math:`t \ge A` and
  :math:`t \bmod T \ge A` (:math:`A` = ``clip_delay``, :math:`T` =
  ``reset_interval``, 0 = no period). Note :math:`\epsilon` is outside the bias
  correction, as in the official code. This block does not reset its moments;
  wrap it in :func:`spam_optax.periodic_reset` with the same
  ``reset_interval`` (the count, an integer, keeps counting through resets).
  Only ``mu`` and ``nu`` are full-size buffers; the clip reuses ``nu``.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to :math:`\sqrt{\nu}` in the denominator.
    spike_threshold: :math:`\theta`; 0 disables the clip.
    clip_delay: :math:`A` (official ``grad_accu_steps``).
    reset_interval: :math:`T` (official ``DeltaT``), used here only for the
      clip's hold-off after each reset.
    mu_dtype: dtype of both moments; defaults to the parameters' dtype.
    clip_unseen: if True (official **quirk**), an entry whose :math:`\nu` is
      0 while the clip is active (e.g. right after a reset with
      ``clip_delay=0``, or an embedding row never seen since the reset) is
      clipped to 0, freezing it until the next reset; False leaves it alone.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = optax.chain(
    ...     spam_optax.periodic_reset(spam_optax.scale_by_spam(), 500),
    ...     optax.scale_by_learning_rate(1e-3),
    ... )
    >>> params = jnp.zeros(3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.ones(3), state, params)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
  """
  _validation.check_unit_interval("b1", b1)
  _validation.check_unit_interval("b2", b2)
  _validation.check_non_negative("eps", eps)
  _validation.check_non_negative("spike_threshold", spike_threshold)
  _validation.check_non_negative_int("clip_delay", clip_delay)
  _validation.check_non_negative_int("reset_interval", reset_interval)

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, dtype=mu_dtype)
    return ScaleBySpamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
        clipped=_leaf_stats.zeros(params, jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_increment(state.count)
    active = _spike_clip.spike_clip_active(
        step, spike_threshold, clip_delay, reset_interval
    )

    def leaf(g, m, v):
      g, rows_clipped = _spike_clip.clip_leaf_against_second_moment(
          g, v, spike_threshold, active, clip_unseen
      )
      dtype = jnp.promote_types(g.dtype, m.dtype)
      gc = g.astype(dtype)
      m_new = b1 * m.astype(dtype) + (1 - b1) * gc
      v_new = b2 * v.astype(dtype) + (1 - b2) * gc * gc
      correction = jnp.sqrt(
          _numerics.one_minus_power(b2, step)
      ) / _numerics.one_minus_power(b1, step)
      u = m_new / (jnp.sqrt(v_new) + eps) * correction.astype(dtype)
      return (
          u.astype(g.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype),
          rows_clipped,
      )

    u, mu, nu, rows = _tree_util.tree_map_unzip(
        leaf, 4, updates, state.mu, state.nu
    )
    clipped = _count.leaf_counts(jax.tree.leaves(rows), state.clipped)
    return u, ScaleBySpamState(count=step, mu=mu, nu=nu, clipped=clipped)

  return optax.GradientTransformation(init_fn, update_fn)
