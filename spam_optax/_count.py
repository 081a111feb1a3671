"""Counting the entries a clip changed."""
import math

import jax
import jax.numpy as jnp

from spam_optax import _leaf_stats

# Float32 holds every integer up to 2**24 exactly, so a float32 sum of 0/1
# values is exact for rows up to this length.
_MAX_EXACT_ROW = 2**24

# The least number of entries :func:`changed_per_row` sums in one row, where a
# leaf has axes enough to choose.
_MIN_ROW = 1024


def changed_per_row(new: jax.Array, old: jax.Array) -> jax.Array:
  r"""The number of entries where ``new`` differs from ``old``, per row.

  A row here is a run of at least ``_MIN_ROW`` contiguous entries of the leaf
  (:func:`count_rows`); a vector or a scalar is one row. Returns shape
  ``(1, rows)``, the form :func:`leaf_counts` sums over all leaves at once:
  float (at least float32, exact), or int32 for float32 rows longer than
  :math:`2^{24}`. :func:`row_totals` turns it into int32.

  A clip changes exactly the entries it clips (up to a rounding tie, where the
  clipped value rounds back to the original one and nothing changed). Each row
  is counted as the sum of :func:`changed_terms`. It reads only the values
  before and after the clip, never the statistic the clip compared against,
  so SPAM's in-place ``v`` update needs no copy of the old ``v``, and XLA
  fuses it into the pass that writes the clipped values. Entries where either
  side is NaN are not counted, nor the other entries of their row (such a
  step has NaN moments anyway; ``docs/optimizers.md``).
  """
  view = count_rows(jnp.shape(new))
  new, old = jnp.reshape(new, view), jnp.reshape(old, view)
  keep = max(len(view) - 1, 0)
  counts = jnp.sum(
      changed_terms(new, old, keep - 1 if keep else 0),
      axis=tuple(range(keep, len(view))),
  )
  return jnp.reshape(counts, (1, -1))


def count_rows(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape :func:`changed_per_row` views a leaf of ``shape`` as: its last
  axis is the rows it sums, every other axis is kept.

  The rows are the fewest trailing axes of the leaf that hold at least
  ``_MIN_ROW`` entries, keeping the first axis (so a matrix is summed along its
  rows), and a row of odd length is taken two at a time when the axis before
  it is even. With the count fused in, the pass that writes the clipped values
  is a reduction on XLA:GPU, which loads and stores two float32 at a time when
  the rows are even and one at a time when they are odd; measured on an H200,
  SPAM's update of a 1B LLaMA's 2048×5461 MLP leaves ran at half the rate of
  its other leaves. Rows millions of entries long (a leaf of stacked layers
  summed per layer) are split by XLA into two reductions, which also slows
  the pass. Only the last kept axis is ever split, and by 2, so a leaf
  sharded over its leading axes is counted where it lies.
  """
  shape = tuple(int(d) for d in shape)
  if len(shape) < 2:
    return shape
  keep = len(shape) - 1
  while keep > 1 and math.prod(shape[keep:]) < _MIN_ROW:
    keep -= 1
  lead, length = shape[:keep], math.prod(shape[keep:])
  if length % 2 and lead[-1] % 2 == 0:
    lead, length = lead[:-1] + (lead[-1] // 2,), 2 * length
  return lead + (length,)


def changed_terms(new: jax.Array, old: jax.Array, n: int) -> jax.Array:
  """Per entry, 1 where ``new`` differs from ``old``, else 0, and NaN where
  either is NaN: the terms whose row sums (rows of a leaf with ``n`` stacked
  axes, as in :func:`spam_optax._leaf_stats.reduce_rows`) are the counts.

  At least float32, as ``ceil(min(|new - old|, 1))`` (``jnp.sum(new != old)``
  materializes an int32 mask on XLA:CPU, and ``|sign(new - old)|`` runs there
  at a speed that depends on the data, and zeroing NaN entries here costs a
  full-size temporary there); int32 (NaN: 0) where a float32 row is longer
  than :math:`2^{24}`, so that every row sum is exact.
  """
  dtype = jnp.promote_types(jnp.promote_types(new.dtype, old.dtype), jnp.float32)
  diff = jnp.abs(new.astype(dtype) - old.astype(dtype))
  changed = jnp.ceil(jnp.minimum(diff, 1))  # NaN stays NaN
  if (_leaf_stats.row_length(jnp.shape(changed), n) > _MAX_EXACT_ROW
      and dtype == jnp.float32):
    return (changed == 1).astype(jnp.int32)  # NaN: not counted
  return changed


def row_totals(rows: jax.Array, axis: int = -1) -> jax.Array:
  """Sums row counts (:func:`changed_per_row`'s, or sums of
  :func:`changed_terms`) over ``axis`` as int32; a row that holds a NaN
  counts 0."""
  if jnp.issubdtype(rows.dtype, jnp.floating):
    rows = jnp.where(jnp.isnan(rows), 0, rows).astype(jnp.int32)
  return jnp.sum(rows, axis=axis, dtype=jnp.int32)


def count_changed(new: jax.Array, old: jax.Array) -> jax.Array:
  """The number of entries where ``new`` differs from ``old`` (int32 scalar):
  :func:`changed_per_row` summed."""
  return row_totals(changed_per_row(new, old), axis=None)


def leaf_counts(rows: list, like) -> _leaf_stats.LeafStats:
  """One int32 count per leaf from each leaf's :func:`changed_per_row`, in a
  :class:`~spam_optax._leaf_stats.LeafStats` laid out as ``like``: the row
  counts of all leaves are converted and summed together."""
  values = _leaf_stats.combine_rows(rows, row_totals)
  return _leaf_stats.LeafStats(values.astype(jnp.int32), like.layout)
