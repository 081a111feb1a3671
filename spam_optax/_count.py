"""Counting the entries a clip changed, as one fused float reduction."""
import jax
import jax.numpy as jnp

# Float32 holds every integer up to 2**24 exactly, so a float32 sum of 0/1
# values is exact for rows up to this length.
_MAX_EXACT_ROW = 2**24


def count_changed(new: jax.Array, old: jax.Array) -> jax.Array:
  r"""Returns the number of entries where ``new`` differs from ``old`` (int32).

  Used for the clipped-entry counts of :func:`spam_optax.scale_by_spam`,
  :func:`spam_optax.spam_clip` and :func:`spam_optax.clip_by_running_max`:
  a clip changes exactly the entries it clips (up to a rounding tie, where the
  clipped value rounds back to the original one and nothing changed).

  Computed as :math:`\sum_i \lceil\min(|\mathrm{new}_i - \mathrm{old}_i|,
  1)\rceil` (1 where the entries differ, 0 where they are equal) per row (last
  axis) in at least float32, exact because a row has fewer than :math:`2^{24}`
  entries (longer float32 rows are counted by comparison); the row counts are
  then summed as int32. It reads only the values before and after the clip,
  never the statistic the clip compared against. Why this form rather than
  ``jnp.sum(new != old)``: see BENCHMARKS.md, "Optimizer update".

  Entries where either side is NaN are not counted; a row that holds one
  counts 0 (such a step has NaN moments anyway; see ``docs/optimizers.md``).

  Args:
    new: the values after the clip.
    old: the values before it (same shape).

  Returns:
    An int32 scalar.
  """
  dtype = jnp.promote_types(jnp.promote_types(new.dtype, old.dtype), jnp.float32)
  diff = jnp.abs(new.astype(dtype) - old.astype(dtype))
  changed = jnp.ceil(jnp.minimum(diff, 1))  # NaN stays NaN
  if changed.ndim == 0:
    changed = changed.reshape(1, 1)
  elif changed.shape[-1] > _MAX_EXACT_ROW and dtype == jnp.float32:
    return jnp.sum(changed == 1, dtype=jnp.int32)  # NaN entries not counted
  rows = jnp.sum(changed, axis=-1)
  rows = jnp.where(jnp.isnan(rows), 0, rows)
  return jnp.sum(rows.astype(jnp.int32), dtype=jnp.int32)
