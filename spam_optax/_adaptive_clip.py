"""Stable-SPAM's AdaClip: clip each leaf against a running max of |g|."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spam_optax import _count
from spam_optax import _leaf_stats
from spam_optax import _numerics
from spam_optax import _periodic_reset
from spam_optax import _stacked_axes
from spam_optax import _validation


def _abs_max(x: jax.Array, axis) -> jax.Array:
  """The max of non-negative ``x`` over ``axis``: 0 over an empty axis.

  Without ``initial``, which would add a constant of the result's shape; XLA
  merges equal constants, and the sharding of one leaf's partial result could
  then spread to an unrelated leaf's moments through it.
  """
  axes = tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
  if any(x.shape[a] == 0 for a in axes):
    return jnp.zeros([d for i, d in enumerate(x.shape) if i not in axes], x.dtype)
  return jnp.max(x, axis=axes)


def bias_step(state, reset_interval):
  """``(step, k)``: AdaClip's update count after this update and its
  bias-correction step (restarted after each reset)."""
  step = optax.safe_increment(state.count)
  return step, _periodic_reset.restarted_count_before_reset(step, reset_interval)


def running_thresholds(state, row_maxima, gamma3, k):
  r"""``(max_ema, m_hat, ratio)``, one entry per leaf slice each: the new running max
  from each leaf's row maxima of :math:`|g|` (``(slices, rows)`` arrays, as
  :func:`spam_optax._leaf_stats.rows_together` gives them), its bias-corrected value
  :math:`\hat m_t` and the ratio :math:`\hat m_t / \max|g|` that scales the entries
  above it."""
  dtype = state.max_ema.values.dtype
  g_max = _leaf_stats.combine_rows(row_maxima, _abs_max).astype(dtype)
  m = gamma3 * state.max_ema.values + (1 - gamma3) * g_max
  m_hat = m / _numerics.one_minus_power(gamma3, k).astype(dtype)
  ratio = m_hat / jnp.where(g_max > 0, g_max, 1)
  return m.astype(dtype), m_hat, ratio


def running_max(state, leaves, ns, gamma3, reset_interval):
  """One AdaClip step's statistics: ``(step, max_ema, thresholds)``.

  ``leaves`` and ``ns`` are the gradient's leaves and stacked-axis counts;
  ``thresholds`` holds, per leaf, the bias-corrected running max and the
  ratio that scales the entries above it, each shaped like the leaf's
  statistic.
  """
  step, k = bias_step(state, reset_interval)
  dtype = state.max_ema.values.dtype
  partials = _leaf_stats.rows_together([(jnp.abs(g.astype(dtype)),) for g in leaves], ns,
                                       jax.lax.max)
  m, m_hat, ratio = running_thresholds(state, [p[0] for p in partials], gamma3, k)
  lay = state.max_ema.layout
  thresholds = list(zip(_leaf_stats.split(m_hat, lay), _leaf_stats.split(ratio, lay)))
  return step, m, thresholds


def clip_leaf(g: jax.Array, threshold, dtype) -> jax.Array:
  """``g`` in ``dtype`` with its entries above the running max scaled down
  (``threshold``: one leaf's pair from :func:`running_max`)."""
  gd = g.astype(dtype)
  m_hat, ratio = (_stacked_axes.broadcastable(x, g) for x in threshold)
  return jnp.where(jnp.abs(gd) > m_hat, gd * ratio, gd)


class ClipByRunningMaxState(NamedTuple):
  """State of :func:`clip_by_running_max`.

  Both statistics are :class:`spam_optax.LeafStats`: one vector each, its
  entries named by leaf path (``as_dict()``), so that an update adds a few
  small kernels on a GPU rather than a few per leaf.

  Attributes:
    count: number of updates so far (int32).
    max_ema: the EMA of :math:`\\max|g|`, one entry per leaf, or one per slice
      (shape ``leaf.shape[:n]``) of a leaf with ``n`` stacked axes; float32,
      float64 when a leaf is float64.
    clipped: the number of entries clipped at the last step, one int32 per
      leaf (all its slices together).
  """
  count: jax.Array
  max_ema: Any
  clipped: Any


def clip_by_running_max(
    gamma3: float = 0.999,
    reset_interval: int = 0,
    stacked_axes: _stacked_axes.StackedAxes = None,
) -> optax.GradientTransformation:
  r"""Clips each leaf to a running max of its largest entry (AdaClip).

  For each leaf, with :math:`k` the bias-correction step:

  .. math::
    m_t &= \gamma_3 m_{t-1} + (1-\gamma_3)\max_i |g_i|, \qquad
    \hat m_t = m_t / (1 - \gamma_3^k) \\
    g_i &\leftarrow g_i\,\hat m_t / \max_j |g_j|
      \quad\text{where } |g_i| > \hat m_t

  so entries above the running max are scaled down, keeping their sign and
  their ratios to each other. The EMA is never reset, but :math:`k` restarts
  after every multiple of ``reset_interval`` (**quirk** of the official
  Stable-SPAM code, where ``k`` is the per-leaf step reset together with the
  momenta; see :func:`spam_optax.periodic_reset`): :math:`k = t` up to the
  first reset step :math:`T` included, then :math:`2, \dots, T+1` between
  resets. Right after a reset :math:`\hat m` is inflated and the clip barely
  acts. Pass ``reset_interval=0`` for the clean variant (:math:`k = t`).

  The official code takes :math:`\max|g|` per tensor. When a leaf stacks
  several tensors on leading axes (the layers of a scanned model, shape
  ``(layers, ...)``), ``stacked_axes`` keeps one running max per slice, so the
  result equals that of the tensors as separate leaves.

  Args:
    gamma3: :math:`\gamma_3`, decay of the running max.
    reset_interval: period after which :math:`k` restarts (official
      ``update_proj_gap``); 0 = never.
    stacked_axes: the number of leading axes of each leaf that index separate
      tensors: an int, a tree of ints with the structure of the params, a
      callable of the params returning one, or None (each leaf is one tensor).
      With ``optax.inject_hyperparams``, list an int or a callable in
      ``static_args`` (a callable would be read as a schedule).

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = optax.chain(
    ...     spam_optax.clip_by_running_max(0.999), optax.adam(1e-3))
    >>> params = {'w': jnp.zeros(4)}
    >>> state = opt.init(params)
    >>> u, state = opt.update({'w': jnp.arange(4.0)}, state, params)

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _validation.check_unit_interval("gamma3", gamma3)
  _validation.check_non_negative_int("reset_interval", reset_interval)
  _stacked_axes.check_stacked_axes(stacked_axes)

  def init_fn(params):
    leaves, _, ns = _stacked_axes.flatten_with_counts(stacked_axes, params)
    return ClipByRunningMaxState(
        count=jnp.zeros([], jnp.int32),
        max_ema=_leaf_stats.zeros(
            params, _numerics.tree_stat_dtype(params),
            [jnp.shape(p)[:n] for p, n in zip(leaves, ns)],
        ),
        clipped=_leaf_stats.zeros(params, jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef, ns = _stacked_axes.flatten_with_counts(stacked_axes, updates)
    step, m, thresholds = running_max(state, leaves, ns, gamma3, reset_interval)
    dtype = state.max_ema.values.dtype
    clipped = [clip_leaf(g, t, dtype) for g, t in zip(leaves, thresholds)]
    rows = [_count.changed_per_row(c, g.astype(dtype)) for c, g in zip(clipped, leaves)]
    return treedef.unflatten(
        [c.astype(g.dtype) for c, g in zip(clipped, leaves)]
    ), ClipByRunningMaxState(
        count=step,
        max_ema=_leaf_stats.LeafStats(m, state.max_ema.layout),
        clipped=_count.leaf_counts(rows, state.clipped),
    )

  return optax.GradientTransformation(init_fn, update_fn)
