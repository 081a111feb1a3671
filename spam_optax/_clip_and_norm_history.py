"""Stable-SPAM's AdaClip and AdaGN as one transformation, in fewer passes."""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from spam_optax import _adaptive_clip
from spam_optax import _count
from spam_optax import _grad_norm_history
from spam_optax import _leaf_stats
from spam_optax import _numerics
from spam_optax import _stacked_axes


# Whether the norm and the count are read off the max's pass (_split_rows), the norm's own
# pass running only in a step where some row cannot be settled that way; off, every step
# reads the gradient twice for its statistics (the benchmarks time that beside it,
# `stable_spam (two statistics passes)`).
_ONE_PASS = True


def _split_rows(state, leaves, ns, gamma3, k, dtype):
  r"""The max's pass, each row also split at :math:`L`: ``(split, rows)``, ``split`` the
  vector of :math:`L` per leaf slice, ``rows`` per leaf the ``(slices, rows)`` arrays of
  the row's max :math:`|g|`, its sum of :math:`g^2` (in ``dtype``) over the entries at most
  :math:`L` and over those above, the least :math:`|g|` above :math:`L` (:math:`+\infty`
  for none) and how many are above.

  :math:`L` is the previous step's running max corrected as it was,
  :math:`L' = m_{t-1} / (1 - \gamma_3^{k-1})` (:math:`+\infty` for :math:`k = 1`), less
  8 units in the last place. Why: :math:`\hat m_t = L' + b\,(\max|g| - L')` with
  :math:`b = (1-\gamma_3)/(1-\gamma_3^k) \le 1`, so an entry at most :math:`L'` is never
  clipped, and one above it is clipped unless it lies within a fraction :math:`b` (0.1%
  once :math:`k` is large) of the way from :math:`L'` to the max. The entries above
  :math:`L` of a row are then, but in rare steps, all clipped or all kept
  (:func:`_settled_rows`); the 8 units keep a max that equals :math:`L'` (a gradient that
  repeats) above :math:`L` whatever the rounding of :math:`\hat m_t`.
  """
  clip = state.max_ema.values.dtype
  previous = _numerics.one_minus_power(gamma3, k - 1).astype(clip)
  below = 1 - 8 * jnp.finfo(clip).eps
  split = jnp.where(k > 1, state.max_ema.values / previous * below, jnp.inf).astype(clip)
  ats = [_stacked_axes.broadcastable(at, g)
         for g, at in zip(leaves, _leaf_stats.split(split, state.max_ema.layout))]
  return split, _split_statistics(leaves, ats, tuple(ns), clip, dtype)


# Jitted, so that an update run without jit (op by op) compiles these once rather than
# each operation (each variadic reduction anew); under jit they are inlined.
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _split_statistics(leaves, ats, ns, clip, dtype):
  """:func:`_split_rows`' row statistics, ``ats`` each leaf's :math:`L` broadcastable."""
  members = []
  for g, at in zip(leaves, ats):
    size = jnp.abs(g.astype(clip))
    above = size > at
    squares = jnp.square(g.astype(dtype))
    zero = jnp.zeros([], dtype)
    members.append((size, jnp.where(above, zero, squares), jnp.where(above, squares, zero),
                    jnp.where(above, size, jnp.inf), above.astype(jnp.int32)))
  ops = (jax.lax.max, jax.lax.add, jax.lax.add, jax.lax.min, jax.lax.add)
  return _leaf_stats.rows_together(members, ns, ops, identities=(0, 0, 0, jnp.inf, 0))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _settled_rows(rows, split, threshold, g_dtype, clip, dtype):
  r"""One leaf's row sums of its clipped squares and its clip count, from
  :func:`_split_rows`' statistics of its rows (``rows``) and its :math:`L` (``split``),
  and whether each row's are exact: ``(squares, counts, exact)``, ``(slices, rows)`` each.

  A row is settled when none of its entries is clipped (its max is at most
  :math:`\hat m_t`), or when its entries at most :math:`L` are kept
  (:math:`\min(L, \text{row max}) \le \hat m_t`) and those above are all clipped:

  * one entry above :math:`L`, the row's max: its clipped value is computed as the clip
    computes it, and counted if the clip changes it;
  * several, all above :math:`\hat m_t`: their clipped squares are their sum of squares
    times :math:`(\hat m_t/\max|g|)^2`, all counted, where the clip changes every one
    (the ratio at most :math:`1 - 4\epsilon`, :math:`\hat m_t` a normal number) and the
    clipped values keep the clip's dtype (a bfloat16 leaf rounds each one: not settled).

  Rows holding a NaN or an infinity, or whose sums overflow, are not settled. The clip
  compares in ``clip``, its dtype, and so does this.
  """
  row_max, low, high, least, above = rows
  slices = row_max.shape[0]
  m_hat, ratio, split = (jnp.reshape(x, (slices, 1)) for x in threshold + (split,))
  info = jnp.finfo(clip)
  kept = row_max <= m_hat
  top = row_max * ratio  # the clip of the row's max
  one = (above == 1) & ~kept
  many = ((above > 1) & (least > m_hat) & (ratio < 1 - 4 * info.eps)
          & (m_hat >= info.tiny))
  if jnp.dtype(g_dtype) != jnp.dtype(clip):
    many = jnp.zeros_like(many)
  low_kept = jnp.minimum(split, row_max) <= m_hat
  finite = jnp.isfinite(low) & jnp.isfinite(high) & jnp.isfinite(row_max)
  exact = (kept | (low_kept & (one | many))) & finite
  top_square = jnp.square(top.astype(g_dtype).astype(dtype))
  squares = low + jnp.where(one, top_square,
                            jnp.where(many, high * jnp.square(ratio.astype(dtype)), high))
  counts = jnp.where(one, (top != row_max).astype(above.dtype), jnp.where(many, above, 0))
  return squares, counts, exact


def _clipped_rows_pass(leaves, ns, thresholds, clip, dtype):
  """The norm's and the count's row sums in one reduction of the clipped leaves: per leaf
  ``(squares, counts)``, ``(slices, rows)`` each."""
  terms = []
  for g, n, t in zip(leaves, ns, thresholds):
    new = _adaptive_clip.clip_leaf(g, t, clip)
    terms.append((jnp.square(new.astype(g.dtype).astype(dtype)),
                  _count.changed_terms(new, g.astype(clip), n)))
  return _leaf_stats.rows_together(terms, ns, jax.lax.add)


def _totals(partials, like):
  """Per leaf slice, the sum of the clipped squares, and per leaf the clip count (int32),
  from each leaf's ``(squares, counts)`` row sums: two vectors, the row sums of all leaves
  reduced together (``like``: the state's count statistics, for their layout)."""
  squares = _leaf_stats.combine_rows([s for s, _ in partials], jnp.sum)
  counts = _count.leaf_counts([jnp.reshape(c, (1, -1)) for _, c in partials], like)
  return squares, counts.values


def _one_pass(state, leaves, ns, gamma3, reset_interval, dtype):
  """AdaClip's statistics and the clipped leaves' totals from one pass over the gradient
  where every row is settled (:func:`_settled_rows`), else from a second pass
  (:func:`_clipped_rows_pass`), run only then: ``(step, max_ema, thresholds, squares,
  counts)``, the first three as :func:`spam_optax._adaptive_clip.running_max` gives them,
  the last two as :func:`_totals`."""
  clip = state.max_ema.values.dtype
  lay = state.max_ema.layout
  step, k = _adaptive_clip.bias_step(state, reset_interval)
  split, rows = _split_rows(state, leaves, ns, gamma3, k, dtype)
  m, m_hat, ratio = _adaptive_clip.running_thresholds(state, [r[0] for r in rows], gamma3, k)

  def thresholds_of(m_hat, ratio):
    return list(zip(_leaf_stats.split(m_hat, lay), _leaf_stats.split(ratio, lay)))

  thresholds = thresholds_of(m_hat, ratio)
  settled = [_settled_rows(r, at, t, jnp.dtype(g.dtype), clip, dtype) for r, at, t, g in
             zip(rows, _leaf_stats.split(split, lay), thresholds, leaves)]
  # how many rows of each slice are not settled, the rows of all leaves reduced together
  # (a reduction of one concatenated vector would be split by XLA into one per leaf)
  unsettled_rows = _leaf_stats.combine_rows(
      [(~e).astype(jnp.int32) for _, _, e in settled], jnp.sum)
  from_rows = _totals([(s, c) for s, c, _ in settled], state.clipped)

  def second_pass(leaves, m_hat, ratio, _):
    # The barrier keeps XLA from running this pass whatever the predicate: it turns a
    # conditional of reductions and element-wise ops into a select of both branches.
    leaves = jax.lax.optimization_barrier(leaves)
    partials = _clipped_rows_pass(leaves, ns, thresholds_of(m_hat, ratio), clip, dtype)
    return _totals(partials, state.clipped)

  def settled_totals(*operands):
    return operands[3]

  unsettled = jnp.any(unsettled_rows > 0)
  if isinstance(unsettled, jax.core.Tracer):
    # Few arrays cross the conditional (XLA:GPU copies each one into and out of it): the
    # leaves, and the thresholds and totals as one vector each.
    squares, counts = jax.lax.cond(unsettled, second_pass, settled_totals,
                                   leaves, m_hat, ratio, from_rows)
  else:  # run op by op: the branch taken, without compiling the other
    squares, counts = (second_pass if unsettled else settled_totals)(
        leaves, m_hat, ratio, from_rows)
  return step, m, thresholds, squares, counts


def clip_by_running_max_and_grad_norm_history(
    gamma3: float = 0.999,
    gamma1: float = 0.7,
    gamma2: float = 0.9,
    eps: float = 1e-8,
    total_steps: Optional[int] = None,
    eta_min: float = 0.5,
    reset_interval: int = 0,
    stacked_axes: _stacked_axes.StackedAxes = None,
) -> optax.GradientTransformation:
  r"""AdaClip then AdaGN, as Stable-SPAM runs them, in one transformation.

  The same as ``optax.chain(clip_by_running_max(gamma3, reset_interval,
  stacked_axes), scale_by_grad_norm_history(gamma1, gamma2, eps, total_steps,
  eta_min, reset_interval, stacked_axes=stacked_axes))``: the same updates
  (up to the order of float sums) and the same state, the tuple
  ``(ClipByRunningMaxState, ScaleByGradNormHistoryState)`` of that chain, so
  either can restore the other's checkpoints. Per leaf:

  .. math::
    \tilde g = \mathrm{clip}(g;\ \hat m_t) \ (\text{AdaClip}), \qquad
    g \leftarrow \tilde g \cdot \frac{\hat a_t}{(\sqrt{\hat b_t} + \epsilon)
    \,\|\tilde g\|} \ (\text{AdaGN})

  What differs is how many times the gradient is read. The chain reads each
  leaf three times: for :math:`\max|g|`, for the norm of the clipped leaf and
  in the update; the count of clipped entries needs the clipped leaf too, and
  XLA fuses it with the norm or the update only when its fusion heuristics
  happen to put them together (on a GPU, for about 60% of a LLaMA's leaves:
  the others are read a fourth time). Here the max's pass also splits each row
  at the previous step's corrected running max :math:`L`, which no entry at or
  below it can exceed after the update: it sums the squares on each side and
  keeps the least entry above :math:`L` and how many there are. In most steps
  that settles every row: its entries above :math:`L` are all kept or all
  clipped, so its clipped squares and count follow. Then every leaf is read
  twice, once for the statistics and once in the update. Where some row is
  not settled (an entry above :math:`L` kept beside one clipped, or several
  clipped in a bfloat16 leaf, which rounds each one), a second pass computes
  the norm and the count from the clipped leaves, in one reduction of each
  row; it is a conditional, run only in such a step (on a GPU, a node of the
  step's CUDA graph: the host does not wait).
  :func:`spam_optax.stable_spam` uses it.

  Args:
    gamma3: AdaClip's :math:`\gamma_3` (official ``gamma3``).
    gamma1: AdaGN's :math:`\gamma_1` (official ``gamma1``).
    gamma2: AdaGN's :math:`\gamma_2` (official ``gamma2``).
    eps: AdaGN's :math:`\epsilon`.
    total_steps: official ``total_T``; enables the cosine decay of
      :math:`\gamma_1`.
    eta_min: floor of that cosine scale.
    reset_interval: period after which both bias-correction steps restart
      (official ``update_proj_gap``); 0 = never.
    stacked_axes: the number of leading axes of each leaf that index separate
      tensors, as in :func:`spam_optax.clip_by_running_max`.

  Returns:
    A :class:`optax.GradientTransformation`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import spam_optax
    >>> opt = optax.chain(
    ...     spam_optax.clip_by_running_max_and_grad_norm_history(),
    ...     optax.adam(1e-3))
    >>> params = {'w': jnp.zeros(4)}
    >>> state = opt.init(params)
    >>> for g in ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 40.0]):
    ...   u, state = opt.update({'w': jnp.array(g)}, state, params)
    >>> print(state[0][0].clipped.tree()['w'])  # AdaClip clipped the 40
    1

  References:
    Huang et al., `Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam <https://arxiv.org/abs/2502.17055>`_, 2025.
  """
  clip = _adaptive_clip.clip_by_running_max(
      gamma3, reset_interval=reset_interval, stacked_axes=stacked_axes
  )
  hyper = dict(gamma1=gamma1, gamma2=gamma2, eps=eps, total_steps=total_steps,
               eta_min=eta_min, reset_interval=reset_interval)
  scale = _grad_norm_history.scale_by_grad_norm_history(
      **hyper, stacked_axes=stacked_axes
  )

  def init_fn(params):
    return clip.init(params), scale.init(params)

  def update_fn(updates, state, params=None):
    del params
    clip_state, scale_state = state
    leaves, treedef, ns = _stacked_axes.flatten_with_counts(stacked_axes, updates)
    clip_dtype = clip_state.max_ema.values.dtype
    dtype = scale_state.mu_norm.values.dtype
    if _ONE_PASS:
      step, m, thresholds, squares, counts = _one_pass(
          clip_state, leaves, ns, gamma3, reset_interval, dtype)
    else:
      step, m, thresholds = _adaptive_clip.running_max(
          clip_state, leaves, ns, gamma3, reset_interval)
      squares, counts = _totals(
          _clipped_rows_pass(leaves, ns, thresholds, clip_dtype, dtype), clip_state.clipped)
    clipped = [_adaptive_clip.clip_leaf(g, t, clip_dtype).astype(g.dtype)
               for g, t in zip(leaves, thresholds)]
    norm = jnp.sqrt(squares.astype(dtype))
    updates, scale_state = _grad_norm_history.per_leaf_update(
        scale_state, norm, clipped, treedef, **hyper
    )
    return updates, (
        _adaptive_clip.ClipByRunningMaxState(
            count=step,
            max_ema=_leaf_stats.LeafStats(m, clip_state.max_ema.layout),
            clipped=_leaf_stats.LeafStats(counts, clip_state.clipped.layout),
        ),
        scale_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
