"""Per-leaf statistics of a parameter tree held in one vector, and their reductions.

SPAM's clipped-entry counts and Stable-SPAM's running max and norm history are a
few numbers per parameter tensor. Held as one scalar per leaf, every leaf adds
its own small kernels to an update on a GPU (the second stage of each reduction,
the scalar arithmetic, one output buffer per statistic): about nine per leaf
for Stable-SPAM, for a few bytes each. Here they live in one vector per
statistic, and each reduction runs in two stages: a pass that reduces the
rows of the leaves (the part that reads the gradient; leaves of one shape are
read together, a few at a time, by one variadic reduction), then one small
reduction of the row results of all leaves together.
"""
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from spam_optax import _tree_util


class LeafLayout(NamedTuple):
  """Which entries of a :class:`LeafStats` vector belong to which leaf.

  Attributes:
    names: each leaf's key path joined with ``/`` (e.g. ``layers/0/w``), in
      the order of ``jax.tree.leaves`` of the parameters (``None`` leaves have
      no entry).
    shapes: the shape of each leaf's statistic: ``()`` for one number per
      leaf, ``leaf.shape[:n]`` for one per slice of a leaf with ``n`` stacked
      axes. The vector holds them flattened, one leaf after the other.
    treedef: the structure of the parameters, to give the statistics back as
      a tree of the same structure.
  """
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  treedef: Any

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(s) for s in self.shapes)

  @property
  def size(self) -> int:
    return sum(self.sizes)


@jax.tree_util.register_pytree_with_keys_class
class LeafStats:
  """A statistic of each leaf of a parameter tree, held in one vector.

  ``values`` is the only array (a pytree child: it is what jit, donation,
  sharding and checkpoints see); ``layout`` is static and names the leaf each
  entry belongs to. ``tree()`` gives the statistics back in the structure of
  the parameters, ``as_dict()`` by leaf path, each shaped as the leaf's
  statistic:

  >>> import jax.numpy as jnp, spam_optax
  >>> opt = spam_optax.clip_by_running_max()
  >>> state = opt.init({'w': jnp.zeros((2, 3)), 'b': jnp.zeros(3)})
  >>> state.clipped.values
  Array([0, 0], dtype=int32)
  >>> state.clipped.as_dict()
  {'b': Array(0, dtype=int32), 'w': Array(0, dtype=int32)}
  >>> state.max_ema.tree()['w']
  Array(0., dtype=float32)

  Attributes:
    values: the 1-D vector of all entries.
    layout: a :class:`LeafLayout`.
  """

  def __init__(self, values: Any, layout: LeafLayout):
    self.values = values
    self.layout = layout

  def tree_flatten_with_keys(self):
    return ((jax.tree_util.GetAttrKey("values"), self.values),), self.layout

  @classmethod
  def tree_unflatten(cls, layout, children):
    return cls(children[0], layout)

  def leaves(self) -> list[jax.Array]:
    """Each leaf's statistic, in the layout's order and shapes (for an
    abstract state, from ``jax.eval_shape``, their ``ShapeDtypeStruct``)."""
    if isinstance(self.values, jax.ShapeDtypeStruct):
      return [jax.ShapeDtypeStruct(s, self.values.dtype) for s in self.layout.shapes]
    return split(self.values, self.layout)

  def tree(self) -> Any:
    """The statistics in the structure of the parameters (``None`` leaves kept)."""
    return self.layout.treedef.unflatten(self.leaves())

  def as_dict(self) -> dict[str, jax.Array]:
    """``{leaf path: statistic}``, e.g. ``{'layers/0/w': Array(3, dtype=int32)}``."""
    return dict(zip(self.layout.names, self.leaves()))

  def __repr__(self) -> str:
    return f"LeafStats({self.values!r}, names={self.layout.names!r})"


def layout(tree: Any, shapes: Sequence[tuple[int, ...]] | None = None) -> LeafLayout:
  """The layout of one statistic per non-``None`` leaf of ``tree``.

  ``shapes`` gives each leaf's statistic shape (default ``()``), in the order
  of ``jax.tree.leaves(tree)``.
  """
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = tuple("/".join(_tree_util.path_names(p)) for p, _ in with_paths)
  if shapes is None:
    shapes = [()] * len(names)
  return LeafLayout(names, tuple(tuple(int(d) for d in s) for s in shapes), treedef)


def zeros(tree: Any, dtype: Any, shapes=None) -> LeafStats:
  """A :class:`LeafStats` of zeros for ``tree`` (see :func:`layout`)."""
  lay = layout(tree, shapes)
  return LeafStats(jnp.zeros([lay.size], dtype), lay)


def split(values: jax.Array, lay: LeafLayout) -> list[jax.Array]:
  """The pieces of a vector laid out as ``lay``, one per leaf, in their shapes."""
  out, start = [], 0
  for shape, size in zip(lay.shapes, lay.sizes):
    out.append(jnp.reshape(values[start:start + size], shape))
    start += size
  return out


def _row_axes(shape: Sequence[int], n: int) -> tuple[int, int]:
  """How many leading axes a row reduction keeps, and the number of rows."""
  keep = n + 1 if len(shape) >= n + 2 else n
  return keep, (shape[n] if keep > n else 1)


def row_length(shape: Sequence[int], n: int) -> int:
  """The number of entries in one row of a leaf of ``shape`` with ``n``
  stacked axes (see :func:`rows_together`)."""
  keep, _ = _row_axes(shape, n)
  return math.prod(shape[keep:])


# How many leaves of one shape one grouped reduction reads (rows_together). Measured on an
# H200, Stable-SPAM's two statistics passes over a 1B LLaMA's 219 leaves took 4.00 ms read
# eight leaves a reduction, 3.43 ms a leaf a reduction, 3.36 ms a leaf a reduction in the
# rows of _WIDE_ROWS: one leaf each.
_GROUP = 1
# Whether rows_together reads, on one device, a matrix whose rows are not a power of two
# long in rows of WIDE_ROW entries across its axes (see _wide_view).
_WIDE_ROWS = True
# The row length of wide_rows.
WIDE_ROW = 2048


def wide_rows(shape: Sequence[int], one_device: bool | None = None) -> tuple[int, int] | None:
  """``(size // WIDE_ROW, WIDE_ROW)``: a matrix of ``shape`` viewed as rows of
  ``WIDE_ROW`` entries across its axes, where its own rows are not a power of two long
  and its size is a multiple of ``WIDE_ROW``; None for any other shape, or with more than
  one device (``one_device``, by default whether jax sees one), where a sharded leaf
  would be moved. A row-major matrix is contiguous: the view moves nothing.
  """
  if len(shape) != 2:
    return None
  if one_device is None:
    one_device = on_one_device()
  size, length = math.prod(shape), shape[-1]
  if not one_device or length & (length - 1) == 0 or size % WIDE_ROW:
    return None
  return (size // WIDE_ROW, WIDE_ROW)


# The row length of short_rows for entries of 4 bytes or more, and for narrower ones (bfloat16,
# float16), and whether SPAM's clip count (spam_optax._count.count_rows) and global_norm take
# them (bench_optimizer times the update with the rows before them,
# `spam (count rows as before)`, beside it).
SHORT_ROW = 128
NARROW_SHORT_ROW = 512
_SHORT_ROWS = True


def short_row(itemsize: int = 4) -> int:
  """The row length :func:`short_rows` views a leaf whose update runs on entries of
  ``itemsize`` bytes in: ``SHORT_ROW`` (128) for 4 bytes or more, ``NARROW_SHORT_ROW``
  (512) for 2 bytes or fewer.

  Why two: SPAM's update pass, with its clip count fused in, is a row reduction on
  XLA:GPU. Compiled for an H200 (ptxas), the bfloat16 pass of a 350M LLaMA's leaves in
  rows of 128 or 256 loops over each thread's eight entries through a 304-byte array on
  the stack, and on an H200 it ran at 0.6 TB/s (8.6 ms for AdamW's 1.6); in rows of 512
  each thread takes four entries at a time, 8-byte loads and stores, no stack. Float32
  rows of 128 load 16 bytes at a time without a stack (SPAM's 1B update at 1.02× AdamW's
  time on an H200).
  """
  return SHORT_ROW if itemsize >= 4 else NARROW_SHORT_ROW


def short_rows(shape: Sequence[int], one_device: bool | None = None,
               itemsize: int = 4) -> tuple[int, int] | None:
  """``(size // row, row)``, ``row`` the :func:`short_row` of ``itemsize``-byte entries,
  for a leaf of two or more axes whose size is a multiple of ``row``, on one device
  (``one_device``; by default whether jax sees one), where it is a matrix or its last axis
  is a multiple of 8; None otherwise. A row-major leaf is contiguous: the view moves
  nothing.

  A leaf of three or more axes with an odd last axis, e.g. a scanned 1B LLaMA's
  (24, 2048, 5461) MLP leaves, is left out: compiled for an H100, SPAM's update counting
  its clipped entries in rows of 128 across its axes loads and stores one float at a time
  (of a 2048×5461 matrix, 16 bytes at a time).
  """
  return _rows_across(shape, short_row(itemsize), one_device)


def _rows_across(shape: Sequence[int], row: int,
                 one_device: bool | None = None) -> tuple[int, int] | None:
  """``(size // row, row)`` where :func:`short_rows` allows rows of ``row`` entries."""
  shape = tuple(int(d) for d in shape)
  if len(shape) < 2 or math.prod(shape) % row:
    return None
  if len(shape) > 2 and shape[-1] % 8:
    return None
  if one_device is None:
    one_device = on_one_device()
  if not one_device:
    return None
  return (math.prod(shape) // row, row)


# When set, rows_together reads every leaf without stacked axes that short_rows' rules allow
# in rows of this many entries across its axes, on one device, instead of _wide_view's
# choice (the benchmarks time Stable-SPAM's statistics so, `stable_spam (statistics in rows
# of 512)`, beside the library's). None: off.
_STATS_ROW = None


def _wide_view(shape: Sequence[int], n: int) -> tuple[int, int] | None:
  """The view rows_together reduces a leaf of ``shape`` (``n`` stacked axes) as, or None
  to keep its rows: :func:`wide_rows`, with ``_WIDE_ROWS`` set, for a leaf with no
  stacked axes.

  Compiled for an H100, a reduction over the rows of a 2048×5461 matrix loads one float
  at a time; over the same entries as 5461 rows of 2048, two at a time (one leaf a
  reduction; grouped eight at a time, again one float).
  """
  if _STATS_ROW and n == 0:
    across = _rows_across(shape, _STATS_ROW)
    if across:
      return across
  return wide_rows(shape) if _WIDE_ROWS and n == 0 else None


def row_view(shape: Sequence[int], n: int) -> tuple[int, int, int]:
  """``(slices, rows, row length)``: the view :func:`rows_together` reads a leaf of
  ``shape`` with ``n`` stacked axes as (its result is ``(slices, rows)``). Row-major, so
  reshaping the leaf to it moves nothing."""
  shape = _wide_view(shape, n) or tuple(shape)
  keep, rows = _row_axes(shape, n)
  return math.prod(shape[:n]), rows, math.prod(shape[keep:])


def on_one_device() -> bool:
  """Whether jax sees one device: then no leaf is sharded, and a reduction may read leaves
  together or view a leaf across its axes without moving data."""
  return jax.device_count() == 1


def rows_together(
    members: Sequence[Sequence[jax.Array]],
    ns: Sequence[int],
    op: Callable[[jax.Array, jax.Array], jax.Array] | Sequence[Callable],
    view: Callable[[Sequence[int], int], tuple[int, int] | None] | None = None,
    identities: Sequence[Any] | None = None,
) -> list[tuple[jax.Array, ...]]:
  """The first stage of per-slice reductions of many leaves: each array reduced
  over the rows of its slices, those of one shape read together.

  ``members[i]`` holds one or more arrays of leaf ``i``'s shape (e.g. its
  squares and its clip-count terms), ``ns[i]`` its stacked axes, which index
  the slices. A row is one index of the slice's first axis and everything
  after it (a slice of rank 0 or 1 is one row; :func:`row_view`). Each array
  is reduced over the rows with ``op`` (``jax.lax.add``, or ``jax.lax.max``
  of non-negative values: 0 must be its identity; a sequence gives the
  ``j``-th array of every member its ``j``-th op, and ``identities`` then
  each op's identity in place of 0, e.g. ``jnp.inf`` for ``jax.lax.min``) and
  comes back as ``(slices, rows)``, in the order given.

  Leaves of the same shapes, dtypes and stacked axes can be reduced ``_GROUP``
  at a time by one variadic reduction, whose outputs are each their own
  operand's (one kernel reads them all). Measured on an H200, one leaf a
  reduction was the faster (see ``_GROUP``), so that is the default; the
  arrays of one leaf (``members[i]``) are always read by one reduction. On
  one device a matrix whose rows are not a power of two long is read in rows
  of ``WIDE_ROW`` across its axes (:func:`wide_rows`, a free view); otherwise
  the reduction never reshapes an operand, so a sharded leaf is reduced where
  it lies. ``view(shape, n)``, if given, replaces that choice: the 2-D view to
  read a leaf as, or None for its own rows. With more than one device each
  leaf is reduced alone: leaves of one shape may be sharded differently (a
  column- and a row-parallel projection), and one reduction of both would
  make XLA move one of them to the other's layout.
  """
  group = _GROUP if on_one_device() else 1
  ops = tuple(op) if isinstance(op, Sequence) else None
  out: list = [None] * len(members)
  groups: dict[tuple, list[int]] = {}
  for i, (arrays, n) in enumerate(zip(members, ns)):
    key = (n,) + tuple((jnp.shape(x), jnp.result_type(x)) for x in arrays)
    groups.setdefault(key, []).append(i)
  for key, indices in groups.items():
    n, shape = key[0], key[1][0]
    seen_as = (view or _wide_view)(shape, n)
    if seen_as:
      shape = seen_as
    keep, rows = _row_axes(shape, n)
    for start in range(0, len(indices), group):
      chunk = indices[start:start + group]
      operands = tuple(jnp.reshape(x, shape) if seen_as else x
                       for i in chunk for x in members[i])
      starts = [identities[j] if identities else 0
                for i in chunk for j in range(len(members[i]))]
      zeros = tuple(jnp.full([], v, jnp.result_type(x)) for v, x in zip(starts, operands))
      each = [ops[j] if ops else op for i in chunk for j in range(len(members[i]))]
      results = jax.lax.reduce(
          operands, zeros, lambda a, b: tuple(f(p, q) for f, p, q in zip(each, a, b)),
          tuple(range(keep, len(shape))),
      )
      results = [jnp.reshape(r, (math.prod(shape[:n]), rows)) for r in results]
      for i in chunk:
        k = len(members[i])
        out[i], results = tuple(results[:k]), results[k:]
  return out


def combine_rows(partials: Sequence[jax.Array],
                 reduce: Callable[..., jax.Array]) -> jax.Array:
  """Reduces each ``(slices, rows)`` array of ``partials`` over its rows, all
  leaves at once: arrays with the same number of rows and dtype are stacked
  and reduced together (``reduce(stacked, axis=1)``), and the results put back
  in order, one entry per slice.

  Deterministic: a fixed tree of reductions, no atomics.
  """
  if not partials:
    return jnp.zeros([0], jnp.float32)
  groups: dict[tuple, list[int]] = {}
  for i, p in enumerate(partials):
    groups.setdefault((p.shape[1], jnp.dtype(p.dtype)), []).append(i)
  pieces: list[Any] = [None] * len(partials)
  for members in groups.values():
    stacked = jnp.concatenate([partials[i] for i in members], axis=0)
    reduced = reduce(stacked, axis=1)
    start = 0
    for i in members:
      size = partials[i].shape[0]
      pieces[i] = reduced[start:start + size]
      start += size
  return jnp.concatenate(pieces)


def global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all entries of all leaves of ``tree`` (``None`` leaves
  skipped), accumulated in float32 or wider whatever the leaves' dtype.

  The value of ``optax.tree.norm`` up to rounding, in two stages like the
  statistics above: the squares of each leaf summed over its rows
  (:func:`rows_together`), then the row sums of all leaves at once
  (:func:`combine_rows`). ``optax.tree.norm`` reduces each leaf to a scalar of
  the leaf's dtype and adds the scalars: on a GPU two small kernels per leaf
  (342 of the 1,307 kernels of a 350M LLaMA's bf16 training step compiled for
  an H100, against 39 here), and for bfloat16 leaves a sum rounded to 8 bits
  after every leaf.

  On one device a leaf of two or more axes is read in the rows of SPAM's clip
  count (:func:`short_rows`, rows of 128 or 512 across its axes; with ``_SHORT_ROWS`` off,
  as the statistics above): a training step that logs its gradient's norm
  beside SPAM's update then reduces the same rows of the same gradient in both,
  and XLA:GPU merges the two reductions of a leaf into one kernel where it can
  (compiled for an H100: in a 130M LLaMA's bf16 step those of its q, k, v, o,
  down and embedding leaves, in a 350M's those of o and the embedding).
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  arrays = []
  for x in leaves:
    x = jnp.asarray(x)
    seen_as = _count_view(jnp.shape(x), jnp.dtype(x.dtype).itemsize)
    if seen_as:
      x = jnp.reshape(x, seen_as)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    arrays.append(jnp.abs(x) if jnp.iscomplexobj(x) else x)
  return jnp.sqrt(jnp.sum(sums_of_squares(arrays, [0] * len(arrays), view=_own_rows)))


def _count_view(shape: Sequence[int], itemsize: int) -> tuple[int, int] | None:
  """The rows of SPAM's clip count of a leaf of ``itemsize``-byte entries where they apply
  (:func:`short_rows`), else :func:`_wide_view`'s."""
  short = short_rows(shape, itemsize=itemsize) if _SHORT_ROWS else None
  return short or _wide_view(shape, 0)


def _own_rows(shape: Sequence[int], n: int) -> None:
  """A ``view`` for :func:`rows_together`: each array read in its own rows."""
  return None


def sums_of_squares(arrays: Sequence[jax.Array], ns: Sequence[int],
                    view: Callable | None = None) -> jax.Array:
  """Each slice's sum of squares of ``arrays`` (the slices of ``ns`` stacked
  axes, as in :func:`rows_together`, read as ``view`` gives), one vector in the
  arrays' dtype: the rows of each array reduced, then all row sums at once."""
  partials = rows_together([(jnp.square(x),) for x in arrays], ns, jax.lax.add, view)
  return combine_rows([p for (p,) in partials], jnp.sum)
