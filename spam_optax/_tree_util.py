"""A tree map for per-leaf functions that return several outputs."""
from typing import Any, Callable

import jax


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
