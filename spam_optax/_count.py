"""Counting the entries a clip changed, as one fused float reduction per row."""

import jax
import jax.numpy as jnp

from spam_optax import _leaf_stats

# Float32 holds every integer up to 2**24 exactly, so a float32 sum of 0/1
# values is exact for rows up to this length.
_MAX_EXACT_ROW = 2**24


def changed_per_row(new: jax.Array, old: jax.Array) -> jax.Array:
  r"""The number of entries where ``new`` differs from ``old``, per row.

  Rows as in :func:`spam_optax._leaf_stats.reduce_rows`: one index of the
  leaf's first axis each (a vector or a scalar is one row). Returns shape
  ``(1, rows)``, the form :func:`leaf_counts` sums over all leaves at once:
  float (at least float32, exact) with NaN for a row that holds a NaN, or
  int32 for float32 rows longer than :math:`2^{24}`. :func:`row_totals` turns
  it into int32.

  A clip changes exactly the entries it clips (up to a rounding tie, where the
  clipped value rounds back to the original one and nothing changed). Each row
  is counted as :math:`\sum_i \lceil\min(|\mathrm{new}_i - \mathrm{old}_i|,
  1)\rceil` (1 where the entries differ, 0 where they are equal) in at least
  float32, exact because a row has fewer than :math:`2^{24}` entries (longer
  float32 rows are counted by comparison). It reads only the values before
  and after the clip, never the statistic the clip compared against, so XLA
  fuses it into the pass that writes the clipped values. Why this form rather
  than ``jnp.sum(new != old)``: see BENCHMARKS.md, "Optimizer update".

  Entries where either side is NaN are not counted; a row that holds one
  counts 0 (such a step has NaN moments anyway; see ``docs/optimizers.md``).
  """
  return _leaf_stats.reduce_rows(
      changed_terms(new, old, 0), 0, lambda x, axis: jnp.sum(x, axis=axis)
  )


def changed_terms(new: jax.Array, old: jax.Array, n: int) -> jax.Array:
  """Per entry, 1 where ``new`` differs from ``old``, else 0: the terms whose
  row sums (rows of a leaf with ``n`` stacked axes, as in
  :func:`spam_optax._leaf_stats.reduce_rows`) are :func:`changed_per_row`'s
  counts.

  At least float32 and NaN where either side is NaN; int32 (NaN: 0) where a
  float32 row is longer than :math:`2^{24}`, so that every row sum is exact.
  """
  dtype = jnp.promote_types(jnp.promote_types(new.dtype, old.dtype), jnp.float32)
  diff = jnp.abs(new.astype(dtype) - old.astype(dtype))
  changed = jnp.ceil(jnp.minimum(diff, 1))  # NaN stays NaN
  if (_leaf_stats.row_length(jnp.shape(changed), n) > _MAX_EXACT_ROW
      and dtype == jnp.float32):
    return (changed == 1).astype(jnp.int32)  # NaN: not counted
  return changed


def row_totals(rows: jax.Array, axis: int = -1) -> jax.Array:
  """Sums :func:`changed_per_row`'s counts over ``axis`` as int32 (a row that
  holds a NaN counts 0)."""
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
