"""SPAM's spike clip (GSS): clip entries whose square exceeds θ times Adam's v.

The clip compares each gradient entry with the second-moment estimate *before*
this step's update. Inside SPAM that estimate is Adam's own ``v``, so the clip
lives in :func:`spam_optax.scale_by_spam`; :func:`spam_clip` is the
stand-alone form, keeping its own EMA of squared gradients, for use in front of
any optimizer: ``optax.chain(spam_optax.spam_clip(), optax.adam(1e-3))``.
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spam_optax import _count
from spam_optax import _leaf_stats
from spam_optax import _periodic_reset
from spam_optax import _tree_util
from spam_optax import _validation


def spike_clip_active(
    step: jax.Array, spike_threshold: Any, clip_delay: Any, reset_interval: Any
) -> jax.Array:
  r"""Whether the spike clip runs at ``step`` (1-based).

  As in the official SPAM code the clip runs when :math:`\theta \ne 0`,
  :math:`t \ge A` and :math:`t \bmod T \ge A` (the last condition is dropped
  when :math:`T = 0`): it holds off for ``clip_delay`` steps after the start and
  after every momentum reset, while the fresh second moment is unreliable.
  """
  phase = _periodic_reset.steps_into_period(step, reset_interval)
  delay = jnp.asarray(clip_delay, jnp.int32)
  return (jnp.asarray(spike_threshold) != 0) & (step >= delay) & (phase >= delay)


def clip_leaf_against_second_moment(
    g: jax.Array,
    nu: jax.Array,
    spike_threshold: Any,
    active: jax.Array,
    clip_unseen: bool = True,
) -> tuple[jax.Array, jax.Array]:
  r"""Clips one leaf where :math:`g^2 > \theta\nu`, to :math:`\pm\sqrt{\theta\nu}`.

  The comparison is strict and has no epsilon (**quirk** of the official code):
  where ``nu == 0`` while the clip is active, any nonzero entry is clipped to 0.
  ``clip_unseen=False`` leaves such entries alone instead.

  Args:
    g: gradient leaf.
    nu: second-moment leaf (same shape) before this step's update.
    spike_threshold: :math:`\theta`.
    active: boolean scalar, whether the clip runs this step.
    clip_unseen: whether entries with ``nu == 0`` are clipped (to 0).

  Returns:
    ``(clipped_g, rows_clipped)``: ``rows_clipped`` is the number of entries
    clipped per row of the leaf, shape ``(1, rows)``
    (:func:`spam_optax._count.clipped_per_row`); with the clip disabled
    statically, ``(1, 1)`` zeros.
  """
  if isinstance(spike_threshold, (int, float)) and spike_threshold == 0:
    return g, jnp.zeros([1, 1], jnp.int32)  # clip disabled: nothing to compute
  compute_dtype = jnp.promote_types(g.dtype, nu.dtype)
  gc = g.astype(compute_dtype)
  threshold = jnp.asarray(spike_threshold, compute_dtype)
  bound_sq = threshold * nu.astype(compute_dtype)
  spike = active & (gc * gc > bound_sq)
  if not clip_unseen:
    spike = spike & (bound_sq > 0)
  clipped = jnp.where(spike, jnp.sign(gc) * jnp.sqrt(bound_sq), gc)
  return clipped.astype(g.dtype), _count.clipped_per_row(spike, clipped, gc)


class SpamClipState(NamedTuple):
  """State of :func:`spam_clip`.

  Attributes:
    count: number of updates so far (int32).
    nu: EMA of squared (clipped) gradients, one per leaf.
    clipped: the number of entries clipped at the last step, one int32 per
      leaf, in one vector (a :class:`spam_optax.LeafStats`; ``as_dict()``
      names them by leaf path).
  """
  count: jax.Array
  nu: Any
  clipped: Any


def spam_clip(
    spike_threshold: float = 5000.0,
    b2: float = 0.999,
    clip_delay: int = 20,
    reset_interval: int = 0,
    nu_dtype: Optional[Any] = None,
    clip_unseen: bool = True,
) -> optax.GradientTransformation:
  r"""Clips gradient spikes against a running second moment (SPAM's GSS).

  Keeps its own EMA :math:`\nu` of squared gradients. At step :math:`t`, when
  the clip is active (see below), each entry with :math:`g^2 > \theta\,\nu_{t-1}`
  becomes :math:`\mathrm{sign}(g)\sqrt{\theta\,\nu_{t-1}}`; then
  :math:`\nu_t = \beta_2 \nu_{t-1} + (1-\beta_2) g^2` with the clipped
  :math:`g`. The clip is active when :math:`\theta \ne 0`, :math:`t \ge A` and
  :math:`t \bmod T \ge A`, and :math:`\nu` is zeroed at every
  :math:`t \bmod T = 0` (:math:`T` = ``reset_interval``, 0 = never).

  This is the form to put in front of any optimizer, e.g.
  ``optax.chain(spam_clip(), optax.adam(1e-3))``, including those with no
  second moment (Lion, SGD) or whose moments are not accessible. It costs one
  extra full-size buffer; inside SPAM use :func:`scale_by_spam`, which reuses
  Adam's ``v`` (with the same ``b2`` the two are identical).

  **Lining up with a momentum reset.** In front of
  ``periodic_reset(inner, T)``, pass the same ``reset_interval=T``: the clip
  counts the same steps as the reset (both count the updates of the chain, so
  also under ``optax.MultiSteps``), its :math:`\nu` is zeroed on the very step
  whose update starts from the reset moments, and its hold-off of
  ``clip_delay`` steps restarts there, as SPAM's clip does:

  .. code-block:: python

    optax.chain(
        spam_optax.spam_clip(clip_delay=20, reset_interval=500),
        spam_optax.periodic_reset(optax.scale_by_adam(), 500),
        optax.scale_by_learning_rate(1e-3),
    )

  With ``periodic_reset(..., after_update=True)`` the inner moments are zeroed
  one step later than the clip's :math:`\nu` (after reset step :math:`t`
  instead of before it).

  Args:
    spike_threshold: :math:`\theta`; 0 disables the clip.
    b2: decay of the squared-gradient EMA.
    clip_delay: :math:`A`, steps to wait (after the start and after every
      reset) before clipping; while :math:`\nu` is 0 an active clip would zero
      every entry.
    reset_interval: :math:`T`; the EMA is zeroed, and the hold-off restarts,
      at every step :math:`t` with :math:`t \bmod T = 0` (0 = never): the
      ``reset_interval`` of the :func:`periodic_reset` that follows.
    nu_dtype: dtype of :math:`\nu`; defaults to the parameters' dtype.
    clip_unseen: if True (official), an entry whose :math:`\nu` is still 0
      while the clip is active is clipped to 0; False leaves it unclipped.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = optax.chain(spam_optax.spam_clip(), optax.adam(1e-3))
    >>> params = {'w': jnp.ones((2, 3))}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({'w': jnp.ones((2, 3))}, state, params)

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025.
  """
  _validation.check_non_negative("spike_threshold", spike_threshold)
  _validation.check_unit_interval("b2", b2)
  _validation.check_non_negative_int("clip_delay", clip_delay)
  _validation.check_non_negative_int("reset_interval", reset_interval)

  def init_fn(params):
    nu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params)
    clipped = _leaf_stats.zeros(params, jnp.int32)
    return SpamClipState(
        count=jnp.zeros([], jnp.int32), nu=nu, clipped=clipped
    )

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_increment(state.count)
    active = spike_clip_active(
        step, spike_threshold, clip_delay, reset_interval
    )
    reset = _periodic_reset.is_reset_step(step, reset_interval)
    nu = jax.tree.map(
        lambda v: jnp.where(reset, jnp.zeros_like(v), v), state.nu
    )
    new_updates, rows = _tree_util.tree_map_unzip(
        lambda g, v: clip_leaf_against_second_moment(
            g, v, spike_threshold, active, clip_unseen
        ),
        2,
        updates,
        nu,
    )
    counts = _count.leaf_counts(jax.tree.leaves(rows), state.clipped)
    nu = jax.tree.map(
        lambda g, v: (b2 * v + (1 - b2) * jnp.square(g.astype(v.dtype))).astype(
            v.dtype
        ),
        new_updates,
        nu,
    )
    return new_updates, SpamClipState(count=step, nu=nu, clipped=counts)

  return optax.GradientTransformation(init_fn, update_fn)
