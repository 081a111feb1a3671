"""Tree helpers shared by the blocks: multi-output maps, key paths, leaf masks."""
from typing import Any, Callable, Optional, Union

import jax

MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]
"""A tree of booleans with the structure of the params, or a callable of the
params returning one (as the ``mask`` of :func:`optax.masked`)."""


def tree_map_unzip(fn: Callable[..., tuple], n_out: int, tree: Any, *rest: Any):
  """Maps ``fn`` over leaves and unzips its ``n_out`` outputs into trees.

  Unlike ``jax.tree.map`` followed by an ``is_leaf`` on tuples, this is safe for
  trees that themselves contain tuples. ``None`` leaves are kept as ``None``.
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outs = [fn(*args) for args in zip(leaves, *rest_leaves)]
  return tuple(
      treedef.unflatten([o[i] for o in outs]) for i in range(n_out)
  )


def path_names(path: Any) -> tuple[str, ...]:
  """The names along a key path of ``jax.tree_util``, e.g. ``('layers', '0', 'w')``.

  A dict key gives its key, a sequence index its index, a named-tuple or
  dataclass field its name.
  """
  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return tuple(name(entry) for entry in path)

