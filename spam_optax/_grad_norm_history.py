"""Stable-SPAM's AdaGN: rescale each leaf by the history of its gradient norm."""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spam_optax import _leaf_stats
from spam_optax import _momentum_scale
from spam_optax import _numerics
from spam_optax import _periodic_reset
from spam_optax import _stacked_axes
from spam_optax import _validation


class ScaleByGradNormHistoryState(NamedTuple):
  """State of :func:`scale_by_grad_norm_history`.

  Attributes:
    count: number of updates so far (int32).
    mu_norm: EMA of the gradient norm: a :class:`spam_optax.LeafStats`, one
      vector with an entry per leaf, or per slice (shape ``leaf.shape[:n]``)
      of a leaf with ``n`` stacked axes, named by leaf path (``as_dict()``);
      one scalar with ``global_norm=True``. Float32, float64 when a leaf is
      float64.
    nu_norm: EMA of the squared gradient norm, same layout.
  """
  count: jax.Array
  mu_norm: Any
  nu_norm: Any


def norm_history(state, norm, a, b, *, gamma1, gamma2, eps, total_steps,
                 eta_min, reset_interval):
  """One AdaGN step from this step's ``norm`` (a scalar or one per leaf) and
  the EMAs ``a``, ``b``: ``(step, factor, a, b)``, ``factor`` the scale that
  takes each norm to its target."""
  step = optax.safe_increment(state.count)
  k = _periodic_reset.restarted_count_before_reset(step, reset_interval)
  g1 = gamma1 * _momentum_scale.cosine_momentum_scale(step, total_steps, eta_min)
  correction1 = _numerics.one_minus_power(g1, k)
  correction2 = _numerics.one_minus_power(gamma2, k)
  dtype = a.dtype
  norm = norm.astype(dtype)
  a = (g1 * a + (1 - g1) * norm).astype(dtype)
  b = (gamma2 * b + (1 - gamma2) * norm * norm).astype(dtype)
  target = (a / correction1.astype(dtype)) / (
      jnp.sqrt(b / correction2.astype(dtype)) + eps
  )
  factor = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1), 1)
  return step, factor.astype(dtype), a, b


def rescale(g: jax.Array, factor: jax.Array) -> jax.Array:
  """``g`` times its leaf's (or slice's) AdaGN factor, in ``g``'s dtype."""
  factor = _stacked_axes.broadcastable(factor, g)
  return (g.astype(factor.dtype) * factor).astype(g.dtype)


def per_leaf_update(state, norm, leaves, treedef, **hyper):
  """The per-leaf AdaGN update from the leaves' norms (a vector laid out as
  the state's statistics): ``(updates, state)``."""
  step, factor, a, b = norm_history(
      state, norm, state.mu_norm.values, state.nu_norm.values, **hyper
  )
  lay = state.mu_norm.layout
  updates = treedef.unflatten([
      rescale(g, f) for g, f in zip(leaves, _leaf_stats.split(factor, lay))
  ])
  return updates, ScaleByGradNormHistoryState(
      step, _leaf_stats.LeafStats(a, lay), _leaf_stats.LeafStats(b, lay)
  )


def scale_by_grad_norm_history(
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    eps: float = 1e-8,
    total_steps: Optional[int] = None,
    eta_min: float = 0.5,
    reset_interval: int = 0,
    global_norm: bool = False,
    stacked_axes: _stacked_axes.StackedAxes = None,
) -> optax.GradientTransformation:
  r"""Rescales gradients by the history of their norm (AdaGN).

  With :math:`n = \|g\|_2` (per leaf, or over the whole tree with
  ``global_norm=True``), :math:`\gamma_1' = \gamma_1 s_t` (:math:`s_t` the
  cosine scale of :func:`spam_optax.cosine_momentum_scale`, 1 without
  ``total_steps``) and :math:`k` the bias-correction step:

  .. math::
    a_t &= \gamma_1' a_{t-1} + (1-\gamma_1') n, \qquad
    b_t = \gamma_2 b_{t-1} + (1-\gamma_2) n^2 \\
    c_t &= \frac{a_t/(1-\gamma_1'^k)}{\sqrt{b_t/(1-\gamma_2^k)} + \epsilon},
    \qquad g \leftarrow g\,c_t/n \quad (n > 0).

  The leaf's norm becomes :math:`c_t`, the ratio of the bias-corrected mean
  norm to the bias-corrected RMS norm: about 1 while the norm is steady, and
  well below 1 when a spike inflates :math:`n` (the spike enters
  :math:`b_t` squared). As in :func:`clip_by_running_max`, :math:`k`
  restarts after every multiple of ``reset_interval`` (official **quirk**:
  :math:`k = t` up to the first reset step included, then
  :math:`2, \dots, T+1`; 0 = never).

  The official code takes the norm per tensor. When a leaf stacks several
  tensors on leading axes (the layers of a scanned model), ``stacked_axes``
  keeps the norm and its history per slice, so the result equals that of the
  tensors as separate leaves.

  Args:
    gamma1: :math:`\gamma_1`, decay of the norm EMA.
    gamma2: :math:`\gamma_2`, decay of the squared-norm EMA.
    eps: added to the denominator.
    total_steps: official ``total_T``; enables the cosine decay of
      :math:`\gamma_1` to :math:`\eta_{min}\gamma_1`.
    eta_min: floor of the cosine scale.
    reset_interval: period after which :math:`k` restarts; 0 = never.
    global_norm: use one norm over all leaves instead of one per leaf (the
      official code is per leaf).
    stacked_axes: the number of leading axes of each leaf that index separate
      tensors: an int, a tree of ints with the structure of the params, a
      callable of the params returning one, or None (each leaf is one tensor).
      With ``optax.inject_hyperparams``, list an int or a callable in
      ``static_args``. It cannot be combined with ``global_norm``.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = spam_optax.scale_by_grad_norm_history(gamma1=0.7, gamma2=0.9)
    >>> state = opt.init(jnp.zeros(2))
    >>> u, state = opt.update(jnp.array([3.0, 4.0]), state)
    >>> print(u.round(6))  # a steady norm is rescaled to about 1
    [0.6 0.8]

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  _validation.check_unit_interval("gamma1", gamma1)
  _validation.check_unit_interval("gamma2", gamma2)
  _validation.check_non_negative("eps", eps)
  _validation.check_positive_int_or_none("total_steps", total_steps)
  _validation.check_closed_unit_interval("eta_min", eta_min)
  _validation.check_non_negative_int("reset_interval", reset_interval)
  _stacked_axes.check_stacked_axes(stacked_axes)
  if global_norm and not (stacked_axes is None or isinstance(stacked_axes, int)
                          and stacked_axes == 0):
    raise ValueError(
        "`stacked_axes` splits per-leaf norms into slices; it cannot be combined"
        " with `global_norm=True`."
    )

  def init_fn(params):
    # Each field its own array: a state whose fields share a buffer
    # cannot be donated to a jitted update.
    dtype = _numerics.tree_stat_dtype(params)
    if global_norm:
      return ScaleByGradNormHistoryState(
          jnp.zeros([], jnp.int32), jnp.zeros([], dtype), jnp.zeros([], dtype)
      )
    leaves, _, ns = _stacked_axes.flatten_with_counts(stacked_axes, params)
    shapes = [jnp.shape(p)[:n] for p, n in zip(leaves, ns)]
    return ScaleByGradNormHistoryState(
        jnp.zeros([], jnp.int32),
        _leaf_stats.zeros(params, dtype, shapes),
        _leaf_stats.zeros(params, dtype, shapes),
    )

  hyper = dict(gamma1=gamma1, gamma2=gamma2, eps=eps, total_steps=total_steps,
               eta_min=eta_min, reset_interval=reset_interval)

  def update_fn(updates, state, params=None):
    del params
    if global_norm:
      dtype = state.mu_norm.dtype
      norm = optax.tree.norm(jax.tree.map(lambda g: g.astype(dtype), updates))
      step, factor, a, b = norm_history(state, norm, state.mu_norm, state.nu_norm, **hyper)
      updates = jax.tree.map(lambda g: rescale(g, factor), updates)
      return updates, ScaleByGradNormHistoryState(step, a, b)

    leaves, treedef, ns = _stacked_axes.flatten_with_counts(stacked_axes, updates)
    dtype = state.mu_norm.values.dtype
    norm = jnp.sqrt(_leaf_stats.sums_of_squares(
        [g.astype(dtype) for g in leaves], ns).astype(dtype))
    return per_leaf_update(state, norm, leaves, treedef, **hyper)

  return optax.GradientTransformation(init_fn, update_fn)
