"""Stable-SPAM's AdaClip and AdaGN as one transformation, in fewer passes."""
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from spam_optax import _adaptive_clip
from spam_optax import _count
from spam_optax import _grad_norm_history
from spam_optax import _leaf_stats
from spam_optax import _stacked_axes


# Whether, on one device, the norm's pass reads again only the rows that hold a clipped
# entry (_clipped_rows) rather than every row of every leaf.
_SKIP_UNCLIPPED_ROWS = False


def _clipped_rows(g, n, threshold, row_max, row_squares, clip_dtype, dtype):
  r"""One leaf's row sums of its clipped squares and of its clip count, ``(slices, rows)``
  each, reading again only the rows that hold a clipped entry.

  A row whose max :math:`|g|` is at most :math:`\hat m_t` is not clipped: its clipped
  squares are its squares, which the max's pass summed (``row_squares``), and its count is
  0. The other rows are gathered and clipped again. The gather reads the leaf's first row
  in place of each unclipped row, which the cache then serves, so a leaf with a few
  clipped rows is read from memory about once, not twice; a leaf with all rows clipped is
  read twice, as without the skip.
  """
  slices, rows, length = _leaf_stats.row_view(jnp.shape(g), n)
  m_hat, ratio = (jnp.reshape(x, (slices,)) for x in threshold)
  flags = row_max > m_hat[:, None]  # (slices, rows); a NaN max: False, as the clip's test
  index = jnp.where(jnp.reshape(flags, (-1,)), jnp.arange(slices * rows), 0)
  some = jnp.reshape(g, (slices * rows, length)).at[index].get(mode="promise_in_bounds")
  some = jnp.reshape(some, (slices, rows, length))
  new = _adaptive_clip.clip_leaf(some, (m_hat, ratio), clip_dtype)
  out = new.astype(g.dtype)
  squares = jnp.sum(jnp.square(out.astype(dtype)), axis=2)
  counts = jnp.sum(_count.changed_terms(new, some.astype(clip_dtype), 1), axis=2)
  return (jnp.where(flags, squares, row_squares),
          jnp.where(flags, counts, jnp.zeros([], counts.dtype)))


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
  the others are read a fourth time). Here the norm and the count are one
  reduction of each row, so every leaf is read three times.
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
    skip = _SKIP_UNCLIPPED_ROWS and _leaf_stats.on_one_device()
    step, m, thresholds, rows = _adaptive_clip.running_max(
        clip_state, leaves, ns, gamma3, reset_interval, squares_dtype=dtype if skip else None
    )
    clipped, terms = [], []
    for g, n, t in zip(leaves, ns, thresholds):
      new = _adaptive_clip.clip_leaf(g, t, clip_dtype)
      out = new.astype(g.dtype)  # what the chain hands from AdaClip to AdaGN
      clipped.append(out)
      if not skip:
        terms.append((jnp.square(out.astype(dtype)),
                      _count.changed_terms(new, g.astype(clip_dtype), n)))
    if skip:  # the rows with a clipped entry read again, the others summed already
      partials = [_clipped_rows(g, n, t, row_max, row_squares, clip_dtype, dtype)
                  for g, n, t, (row_max, row_squares) in zip(leaves, ns, thresholds, rows)]
    else:  # the norm's and the count's row sums in one reduction
      partials = _leaf_stats.rows_together(terms, ns, jax.lax.add)
    square_rows = [squares for squares, _ in partials]
    count_rows = [jnp.reshape(counts, (1, -1)) for _, counts in partials]
    sum_of = lambda x, axis: jnp.sum(x, axis=axis)
    norm = jnp.sqrt(_leaf_stats.combine_rows(square_rows, sum_of).astype(dtype))
    updates, scale_state = _grad_norm_history.per_leaf_update(
        scale_state, norm, clipped, treedef, **hyper
    )
    return updates, (
        _adaptive_clip.ClipByRunningMaxState(
            count=step,
            max_ema=_leaf_stats.LeafStats(m, clip_state.max_ema.layout),
            clipped=_count.leaf_counts(count_rows, clip_state.clipped),
        ),
        scale_state,
    )

  return optax.GradientTransformation(init_fn, update_fn)
