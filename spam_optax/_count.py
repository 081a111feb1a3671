"""Counting the entries a clip changed."""

import jax
import jax.numpy as jnp

from spam_optax import _leaf_stats

# Float32 holds every integer up to 2**24 exactly, so a float32 sum of 0/1
# values is exact for rows up to this length.
_MAX_EXACT_ROW = 2**24


def changed_per_row(new: jax.Array, old: jax.Array) -> jax.Array:
  r"""The number of entries where ``new`` differs from ``old``, per row.

  A row here is a run of contiguous entries of the leaf (:func:`count_rows`);
  a scalar or a vector of odd length is one row.
  Returns shape
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
  view = count_rows(jnp.shape(new), itemsize=jnp.dtype(new.dtype).itemsize)
  new, old = jnp.reshape(new, view), jnp.reshape(old, view)
  # n leading axes kept, so that changed_terms' rows are this view's last axis
  terms = changed_terms(new, old, max(len(view) - 2, 0))
  counts = jnp.sum(terms, axis=-1) if view else terms
  return jnp.reshape(counts, (1, -1))


def true_per_row(mask: jax.Array, dtype=jnp.float32, itemsize: int = 4) -> jax.Array:
  """The number of true entries of ``mask`` per row (the rows :func:`count_rows` gives a
  leaf of ``itemsize``-byte entries, the values the mask is computed with), in
  :func:`changed_per_row`'s form: shape ``(1, rows)``, ``dtype`` (float32 and wider sums
  of 0/1 are exact up to :math:`2^{24}` a row; pass int32 for longer rows)."""
  view = count_rows(jnp.shape(mask), itemsize=itemsize)
  mask = jnp.reshape(mask, view)
  counts = jnp.sum(mask, axis=-1, dtype=dtype) if view else mask.astype(dtype)
  return jnp.reshape(counts, (1, -1))


def clipped_per_row(spike: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
  r"""The number of entries a clip replaced, per row, in :func:`changed_per_row`'s form:
  ``spike`` is the clip's mask, ``new`` and ``old`` the values after and before it.

  Where the program runs on a CPU, the entries that changed (:func:`changed_per_row`, which
  never reads what ``spike`` was computed from); on every other backend (GPU, TPU) the
  entries of ``spike``. The two differ only at a rounding tie (an entry flagged whose
  clipped value rounds back to the original) and in a row that holds a NaN.

  Why two forms: on XLA:CPU the mask of SPAM's clip reads the old second moment, and XLA
  copies the donated ``v`` so that the count can read it beside the in-place update, which
  the change avoids. On XLA:GPU the count of the change
  uses the clipped values a fourth time in the pass that updates the moments, and compiled
  for an H200 XLA stored the clipped bfloat16 gradient of 73 of a 350M LLaMA's 219 leaves
  in a pass of its own before that pass read it back (2.1 GB a training step, 73 kernels;
  the H100 compile fused them). Counted from the mask, which reads the ``v`` that pass
  reads anyway, the clip fuses into it on both. The choice is made when the program is
  lowered for its platform (``jax.lax.platform_dependent``): no conditional runs.
  """
  dtype = jax.eval_shape(changed_per_row, new, old).dtype
  itemsize = jnp.dtype(new.dtype).itemsize
  return jax.lax.platform_dependent(
      spike, new, old,
      cpu=lambda s, n, o: changed_per_row(n, o),
      default=lambda s, n, o: true_per_row(s, dtype, itemsize),
  )


def count_rows(shape: tuple[int, ...], one_device: bool | None = None,
               itemsize: int = 4) -> tuple[int, ...]:
  """The shape :func:`changed_per_row` views a leaf of ``shape`` (entries of
  ``itemsize`` bytes) as: each count sums one row along the view's last axis.

  On one device (``one_device``; by default when jax sees one device) a leaf
  of two or more axes is counted in rows of 128 contiguous entries (512 for
  2-byte entries, bfloat16 or float16: :func:`spam_optax._leaf_stats.short_row`)
  read across its axes where :func:`spam_optax._leaf_stats.short_rows` allows (a row-major
  leaf is contiguous, so the view is free). With the count fused in, the
  pass that writes the clipped values is a reduction on XLA:GPU, which sizes
  its launch by the rows: compiled for an H100, in float32 rows of 128 each
  thread loads and stores each operand once, 16 bytes at a time, as many
  threads as AdamW's element-wise pass has (why bfloat16 takes rows of 512:
  :func:`spam_optax._leaf_stats.short_row`). The row sums cost 4 bytes a row:
  1/32 of a byte an entry each way in rows of 128, 1/128 in rows of 512.

  Every other leaf is counted in rows along its last axis, every other axis
  kept, two at a time where that axis is odd and the one before it even
  (the pass loads one float32 at a time where a row is odd, or spans more
  than one axis of the outputs). With more than one device only the axis
  before the last is ever split, and by 2, so a leaf sharded over its
  leading axes is counted where it lies. With ``_leaf_stats._SHORT_ROWS`` off (the
  layout before the rows of 128, which the benchmarks time beside them), a
  matrix on one device whose rows are not a power of two long and whose
  size is a multiple of 2048 is counted in rows of 2048
  (:func:`spam_optax._leaf_stats.wide_rows`; SPAM's float32 update of a 1B
  LLaMA's 2048×5461 leaves went from 0.69× to 0.94× AdamW's rate with them
  on an H200).

  A vector of even length is rows of two: summed whole, its pass is one
  block of threads (128 for a 2048-entry norm scale, the H100 compile), and
  a 1B LLaMA's 49 norm scales took 0.25 ms of SPAM's update on an H200
  against 0.07 ms of AdamW's element-wise passes; as rows of two it runs on
  eight blocks of 256 threads (a sharded vector stays sharded over its rows
  where each shard's length is even).
  """
  shape = tuple(int(d) for d in shape)
  if len(shape) == 1 and shape[0] % 2 == 0:
    return (shape[0] // 2, 2)
  if len(shape) < 2:
    return shape
  short = (_leaf_stats.short_rows(shape, one_device, itemsize)
           if _leaf_stats._SHORT_ROWS else None)
  if short:
    return short
  lead, length = shape[:-1], shape[-1]
  if length % 2 and lead[-1] % 2 == 0:
    lead, length = lead[:-1] + (lead[-1] // 2,), 2 * length
  return _leaf_stats.wide_rows(shape, one_device) or lead + (length,)


def changed_terms(new: jax.Array, old: jax.Array, n: int) -> jax.Array:
  """Per entry, 1 where ``new`` differs from ``old``, else 0, and NaN where
  either is NaN: the terms whose row sums (rows of a leaf with ``n`` stacked
  axes, as in :func:`spam_optax._leaf_stats.rows_together`) are the counts.

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
