"""Per-slice statistics for leaves that stack several tensors on leading axes."""
import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

StackedAxes = Optional[Union[int, Any, Callable[[Any], Any]]]
"""How many leading axes of each leaf index separate tensors: an int for every
leaf, a tree of ints with the structure of the params, a callable of the params
returning one, or None (0: each leaf is one tensor)."""


def check_stacked_axes(value: StackedAxes) -> None:
  """Raises ``ValueError`` for a negative or non-integer ``stacked_axes`` int.

  Trees and callables are checked leaf by leaf when they meet the params.
  """
  if value is None or callable(value) or not _is_number(value):
    return
  _static_count(value)


def stacked_counts(stacked_axes: StackedAxes, tree: Any) -> Any:
  """The number of stacked axes of each leaf of ``tree``, as a tree of ints.

  Raises ``ValueError`` when a count is negative, not a static integer, or more
  than the leaf's rank.
  """
  if callable(stacked_axes):
    stacked_axes = stacked_axes(tree)
  leaves, treedef = jax.tree.flatten(tree)
  if stacked_axes is None:
    counts = [0] * len(leaves)
  elif _is_number(stacked_axes):
    counts = [stacked_axes] * len(leaves)
  else:
    counts = treedef.flatten_up_to(stacked_axes)
  out = []
  for leaf, n in zip(leaves, counts):
    n = 0 if n is None else _static_count(n)
    if n > jnp.ndim(leaf):
      raise ValueError(
          f"`stacked_axes` is {n} for a leaf of shape {jnp.shape(leaf)}: at most"
          " its rank."
      )
    out.append(n)
  return treedef.unflatten(out)


def flatten_with_counts(stacked_axes: StackedAxes, tree: Any) -> tuple:
  """``(leaves, treedef, counts)``: ``tree``'s leaves, its structure and the
  number of stacked axes of each leaf (:func:`stacked_counts`), as lists."""
  leaves, treedef = jax.tree.flatten(tree)
  return leaves, treedef, treedef.flatten_up_to(stacked_counts(stacked_axes, tree))


def broadcastable(stat: jax.Array, x: Any) -> jax.Array:
  """``stat`` (shape ``x.shape[:n]``) with trailing unit axes to broadcast on ``x``.

  A scalar stays a scalar: broadcast from rank 0, it gives the sharding
  propagation nothing to carry onto ``x`` (a ``(1, ...)`` piece of a sharded
  statistics vector would)."""
  if not jnp.ndim(stat):
    return stat
  return jnp.reshape(stat, stat.shape + (1,) * (jnp.ndim(x) - stat.ndim))


def _is_number(value: Any) -> bool:
  return isinstance(value, (numbers.Number, np.ndarray, jax.Array))


def _static_count(value: Any) -> int:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        "`stacked_axes` must be a static integer; under"
        " `optax.inject_hyperparams`, name it in `static_args`."
    )
  x = np.asarray(value)
  if isinstance(value, bool) or x.ndim or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"`stacked_axes` must be an integer >= 0, got {value!r}.")
  if x < 0:
    raise ValueError(f"`stacked_axes` must be an integer >= 0, got {value!r}.")
  return int(x)
