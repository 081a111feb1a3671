"""Sparse momentum: run an inner transformation on a random subset of each leaf.

SPAM's sparse variant keeps Adam's moments for only ``k = int(density * size)``
entries of each selected (by default 2-D) parameter. Here that is a wrapper:
each selected leaf is gathered at its mask into a compact ``(k,)`` vector, the
inner transformation sees only compact leaves (so its state is compact too),
and its updates are scattered back with zeros outside the mask.

Masks are sorted ``int32`` flat indices with a static length ``k``, so shapes
never depend on data: the wrapper jits once and works on sharded arrays. Its
periodic redraw is a ``lax.cond``, which XLA:GPU waits on the host for; a loop
that redraws the masks itself (:func:`redraw_masks`) keeps ``update`` free of it.
"""

from collections.abc import Callable
import numbers
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spam_optax import _tree_util
from spam_optax import _validation

MaskSampler = Callable[[jax.Array, int, int], jax.Array]
"""``sampler(key, size, k)``: sorted ``int32`` flat indices of shape ``(k,)``."""


class SparseMomentsState(NamedTuple):
  """State of :func:`sparse_moments`.

  Attributes:
    count: number of updates applied so far (``int32``, saturating).
    key: raw ``uint32`` PRNG key data used for the next mask redraw.
    masks: a tree with the structure of the params: sorted ``int32`` flat
      indices of shape ``(k,)`` for sparse leaves, ``optax.MaskedNode()`` for
      dense leaves (``None`` stays ``None``).
    inner_state: the inner transformation's state, built on compact params.
  """

  count: jax.Array
  key: jax.Array
  masks: Any
  inner_state: optax.OptState


def uniform_mask_sampler(key: jax.Array, size: int, k: int) -> jax.Array:
  """Draws ``k`` distinct flat indices out of ``size``, uniformly at random.

  The indices of the ``k`` smallest of ``size`` i.i.d. uniform scores: every
  ``k``-subset is equally likely, and the output shape is static.

  Args:
    key: a PRNG key.
    size: number of entries of the leaf (static).
    k: number of indices to draw (static), ``0 <= k <= size``.

  Returns:
    Sorted ``int32`` indices of shape ``(k,)``.

  Examples:
    >>> import jax
    >>> from spam_optax import uniform_mask_sampler
    >>> idx = uniform_mask_sampler(jax.random.key(0), 10, 3)
    >>> idx.shape, idx.dtype
    ((3,), dtype('int32'))
  """
  scores = jax.random.uniform(key, (size,))
  chosen = jnp.argsort(scores)[:k]
  return jnp.sort(chosen).astype(jnp.int32)


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_slot(x: Any) -> bool:
  # A position of the params tree: `None` leaves and dense-leaf markers count
  # as positions so that trees with and without them flatten alike.
  return x is None or _is_masked_node(x)


def _num_kept(density: float, size: int) -> int:
  return int(density * size)


def _is_static_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def sparse_leaf_mask(sparse_mask: _tree_util.MaskOrFn, params: Any) -> Any:
  """The tree of booleans marking the sparse leaves of ``params``.

  ``sparse_mask`` is such a tree, a callable of the params returning one, or
  None for the default: every 2-D leaf.
  """
  if sparse_mask is None:
    return jax.tree.map(lambda p: jnp.ndim(p) == 2, params)
  return sparse_mask(params) if callable(sparse_mask) else sparse_mask


def _sparse_flags(
    sparse_mask: _tree_util.MaskOrFn, params: Any
) -> tuple[list[bool], Any]:
  """Flags per params position (``None`` positions included) and the treedef."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=_is_slot)
  flags = treedef.flatten_up_to(sparse_leaf_mask(sparse_mask, params))
  return [p is not None and bool(f) for p, f in zip(leaves, flags)], treedef


def _compact(tree: Any, masks: Any) -> Any:
  """Gathers every sparse leaf of ``tree`` at its mask into a ``(k,)`` vector."""
  if tree is None:
    return None
  leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_slot)
  mask_leaves = treedef.flatten_up_to(masks)
  out = []
  for x, idx in zip(leaves, mask_leaves):
    if x is None or idx is None or _is_masked_node(idx):
      out.append(x)
    else:
      out.append(
          jnp.reshape(x, (-1,)).at[idx].get(
              indices_are_sorted=True,
              unique_indices=True,
              mode="promise_in_bounds",
          )
      )
  return treedef.unflatten(out)


def _expand(compact: Any, masks: Any, like: Any) -> Any:
  """Scatters compact leaves back to the shapes of ``like``, zero elsewhere."""
  leaves, treedef = jax.tree.flatten(compact, is_leaf=_is_slot)
  mask_leaves = treedef.flatten_up_to(masks)
  like_leaves = treedef.flatten_up_to(like)
  out = []
  for u, idx, ref in zip(leaves, mask_leaves, like_leaves):
    if u is None or idx is None or _is_masked_node(idx):
      out.append(u)
    else:
      full = jnp.zeros((jnp.size(ref),), u.dtype)
      full = full.at[idx].set(
          u,
          indices_are_sorted=True,
          unique_indices=True,
          mode="promise_in_bounds",
      )
      out.append(jnp.reshape(full, jnp.shape(ref)))
  return treedef.unflatten(out)


def _carry_over(values: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
  """Values at ``new`` indices: taken from ``old`` where present, else zero."""
  if old.shape[0] == 0:
    return values
  pos = jnp.minimum(jnp.searchsorted(old, new), old.shape[0] - 1)
  hit = old[pos] == new
  return jnp.where(hit, values[pos], jnp.zeros((), values.dtype))


def _movable_leaves(inner_state: Any, masks: Any) -> dict[int, int]:
  """Which inner-state leaves hold compact entries, and of which sparse leaf.

  Every subtree of the inner state shaped like the params is visited; its
  floating leaves whose shape is the compact ``(k,)`` shape of their leaf
  move with the mask. Other leaves (counts, per-leaf scalars, dense leaves)
  stay as they are.

  Returns:
    ``{index in jax.tree.leaves(inner_state): index in the mask leaves}``.
  """
  params_def = jax.tree.structure(
      jax.tree.map(lambda _: 0, masks, is_leaf=_is_masked_node)
  )
  mask_leaves = jax.tree.leaves(masks, is_leaf=_is_masked_node)
  leaves, inner_def = jax.tree.flatten(inner_state)
  positions = inner_def.unflatten(list(range(len(leaves))))
  found = {}

  def is_params_like(x):
    return jax.tree.structure(x) == params_def

  def visit(sub, pos):
    if not is_params_like(sub):
      return
    flat_pos = params_def.flatten_up_to(pos)
    flat_sub = params_def.flatten_up_to(sub)
    for j, (x, i, mask) in enumerate(zip(flat_sub, flat_pos, mask_leaves)):
      if (
          not _is_masked_node(mask)
          and hasattr(x, "dtype")
          and jnp.issubdtype(x.dtype, jnp.inexact)
          and jnp.shape(x) == mask.shape
      ):
        found[i] = j

  jax.tree.map(visit, inner_state, positions, is_leaf=is_params_like)
  return found


def _carry_over_all(
    moving: list[jax.Array], which: list[int], old_masks: Any, new_masks: Any
) -> list[jax.Array]:
  old = jax.tree.leaves(old_masks, is_leaf=_is_masked_node)
  new = jax.tree.leaves(new_masks, is_leaf=_is_masked_node)
  return [_carry_over(x, old[j], new[j]) for x, j in zip(moving, which)]


def _remap_inner_state(inner_state: Any, old_masks: Any, new_masks: Any) -> Any:
  """Moves the compact moments from ``old_masks`` to ``new_masks``."""
  found = _movable_leaves(inner_state, old_masks)
  leaves, inner_def = jax.tree.flatten(inner_state)
  order = sorted(found)
  moved = _carry_over_all(
      [leaves[i] for i in order], [found[i] for i in order], old_masks,
      new_masks,
  )
  for i, x in zip(order, moved):
    leaves[i] = x
  return inner_def.unflatten(leaves)


def _mask_specs(flags: list[bool], leaves: list[Any], density: float) -> list:
  """Per params position: None (a ``None`` leaf), ``MaskedNode`` (dense) or ``(size, k)``."""
  specs = []
  for flag, x in zip(flags, leaves):
    if x is None:
      specs.append(None)
    elif not flag:
      specs.append(optax.MaskedNode())
    else:
      size = int(jnp.size(x))
      specs.append((size, _num_kept(density, size)))
  return specs


def _draw_masks(
    key: jax.Array, specs: list, treedef: Any, sampler: MaskSampler
) -> Any:
  """A mask per sparse position of ``specs`` (leaf ``i`` draws from ``fold_in(key, i)``)."""
  out = []
  for i, spec in enumerate(specs):
    if spec is None or _is_masked_node(spec):
      out.append(spec)
    else:
      size, k = spec
      idx = sampler(jax.random.fold_in(key, i), size, k)
      out.append(jnp.asarray(idx, jnp.int32))
  return treedef.unflatten(out)


def _next_masks(key_data: jax.Array, specs: list, treedef: Any,
                sampler: MaskSampler) -> tuple[Any, jax.Array]:
  """A redraw: the new masks and the key data for the one after."""
  key, draw_key = jax.random.split(jax.random.wrap_key_data(key_data))
  return _draw_masks(draw_key, specs, treedef, sampler), jax.random.key_data(key)


def sparse_moments(
    inner: optax.GradientTransformation,
    *,
    density: float,
    sparse_mask: _tree_util.MaskOrFn = None,
    reset_interval: int = 0,
    seed: int = 0,
    sampler: Optional[MaskSampler] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Applies ``inner`` to a random subset of the entries of sparse leaves.

  For each sparse leaf with ``n`` entries a mask of exactly
  ``k = int(density * n)`` flat indices :math:`I` is kept. Each step

  .. math::
    \tilde g = g_I, \quad (\tilde u, s) = \mathrm{inner}(\tilde g, s, p_I),
    \quad u_I = \tilde u, \quad u_{\bar I} = 0.

  Dense leaves go to ``inner`` unchanged. After step :math:`t` (1-based)
  whenever :math:`(t + 1) \bmod T = 0` (``T = reset_interval``; 0 = never)
  every mask is redrawn with ``sampler``; inner-state entries (floating leaves
  of the compact ``(k,)`` shape) at indices in both the old and the new mask
  are carried over, the others start at zero. Masks chosen elsewhere (recorded
  ones, another schedule) are set with :func:`replace_masks`. The redraw is a
  ``lax.cond`` in ``update``; on a GPU, where XLA waits on the host for a
  conditional's predicate, a loop can instead build the wrapper with
  ``reset_interval=0`` and call :func:`redraw_masks` after the steps
  :func:`redraw_due` names: the same masks, moments and updates.

  Args:
    inner: the transformation run on the compact tree (e.g. Adam).
    density: fraction of entries kept, in ``(0, 1]``; static.
    sparse_mask: a tree of booleans with the structure of the params, or a
      callable returning one from the params (as in ``optax.masked``); ``True``
      marks a sparse leaf. Default: every 2-D leaf.
    reset_interval: redraw period ``T``; ``0`` never redraws. An int, or an
      int array (e.g. under ``optax.inject_hyperparams``).
    seed: seed of the mask draws.
    sampler: ``sampler(key, size, k)`` returning sorted ``int32`` indices of
      shape ``(k,)``; default :func:`uniform_mask_sampler`.

  Returns:
    A ``GradientTransformationExtraArgs``; extra arguments go to ``inner``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from spam_optax import sparse_moments
    >>> tx = sparse_moments(optax.adam(1e-2), density=0.25)
    >>> params = {'w': jnp.ones((4, 4)), 'b': jnp.zeros((4,))}
    >>> state = tx.init(params)
    >>> state.masks['w'].shape
    (4,)
    >>> updates, state = tx.update(params, state, params)
    >>> int((updates['w'] != 0).sum())
    4

  References:
    Huang et al., `SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training <https://arxiv.org/abs/2501.06842>`_, 2025 (arXiv:2501.06842).
  """
  density = _validation.check_density(density)
  _validation.check_non_negative_int("reset_interval", reset_interval)
  sampler = uniform_mask_sampler if sampler is None else sampler
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    flags, treedef = _sparse_flags(sparse_mask, params)
    leaves = treedef.flatten_up_to(params)
    for flag, x in zip(flags, leaves):
      if flag and jnp.size(x) > jnp.iinfo(jnp.int32).max:
        raise ValueError(f"sparse leaf of shape {jnp.shape(x)} is too large "
                         "for int32 indices.")
    key, draw_key = jax.random.split(jax.random.key(seed))
    masks = _draw_masks(draw_key, _mask_specs(flags, leaves, density), treedef,
                        sampler)
    inner_state = inner.init(_compact(params, masks))
    return SparseMomentsState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key_data(key),
        masks=masks,
        inner_state=inner_state,
    )

  def update_fn(updates, state, params=None, **extra_args):
    masks = state.masks
    compact_updates, inner_state = inner.update(
        _compact(updates, masks),
        state.inner_state,
        _compact(params, masks),
        **extra_args,
    )
    new_updates = _expand(compact_updates, masks, updates)
    count = optax.safe_int32_increment(state.count)
    key = state.key

    # A static interval of 0 never redraws and needs no branch; an array one
    # (from `optax.inject_hyperparams`) is tested at run time.
    if not (_is_static_int(reset_interval) and reset_interval == 0):
      leaves, treedef = jax.tree.flatten(updates, is_leaf=_is_slot)
      flags = [
          not (idx is None or _is_masked_node(idx))
          for idx in treedef.flatten_up_to(masks)
      ]

      # Only the masks, the key and the compact leaves that move with the
      # masks go through the branch: XLA copies every branch operand that is
      # also read elsewhere (here by the update) on the no-redraw path, so
      # dense leaves' moments must stay out of it.
      found = _movable_leaves(inner_state, masks)
      inner_leaves, inner_def = jax.tree.flatten(inner_state)
      order = sorted(found)
      which = [found[i] for i in order]

      specs = _mask_specs(flags, leaves, density)

      def redraw(operands):
        masks, moving, key = operands
        new_masks, key = _next_masks(key, specs, treedef, sampler)
        moving = _carry_over_all(moving, which, masks, new_masks)
        return new_masks, moving, key

      interval = jnp.asarray(reset_interval, jnp.int32)
      # `count % T == T - 1` is `(t + 1) % T == 0` without overflowing at the
      # saturated count.
      masks, moving, key = jax.lax.cond(
          (interval > 0)
          & (count % jnp.maximum(interval, 1) == interval - 1),
          redraw,
          lambda operands: operands,
          (masks, [inner_leaves[i] for i in order], key),
      )
      for i, x in zip(order, moving):
        inner_leaves[i] = x
      inner_state = inner_def.unflatten(inner_leaves)

    return new_updates, SparseMomentsState(
        count=count, key=key, masks=masks, inner_state=inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def replace_masks(opt_state: optax.OptState, masks: Any) -> optax.OptState:
  """Sets the masks of every :class:`SparseMomentsState` in ``opt_state``.

  The inner moments are carried over from the old masks to the new ones the
  same way as at a scheduled redraw, so this is the hook for masks chosen
  outside the optimizer (recorded masks, a custom schedule).

  Args:
    opt_state: an optimizer state containing ``SparseMomentsState`` (for
      example the state of ``spam(..., density=d)``).
    masks: a tree with the structure of the params holding sorted ``int32``
      indices of the current ``(k,)`` shape for sparse leaves; entries at
      dense leaves are ignored (``None`` or ``optax.MaskedNode()``).

  Returns:
    The state with the new masks and the moments moved onto them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from spam_optax import sparse_moments, replace_masks
    >>> tx = sparse_moments(optax.sgd(1.0), density=0.5)
    >>> state = tx.init({'w': jnp.ones((2, 2))})
    >>> state = replace_masks(state, {'w': jnp.array([0, 3])})
    >>> state.masks['w'].tolist()
    [0, 3]
  """

  def replace(node):
    if not isinstance(node, SparseMomentsState):
      return node
    old_leaves, treedef = jax.tree.flatten(node.masks, is_leaf=_is_slot)
    given = treedef.flatten_up_to(masks)
    new_leaves = []
    for old, new in zip(old_leaves, given):
      if old is None or _is_masked_node(old):
        new_leaves.append(old)
        continue
      new = jnp.asarray(new, jnp.int32)
      if new.shape != old.shape:
        raise ValueError(
            f"mask of shape {new.shape} given where {old.shape} is kept."
        )
      new_leaves.append(new)
    new_masks = treedef.unflatten(new_leaves)
    inner_state = _remap_inner_state(node.inner_state, node.masks, new_masks)
    return node._replace(masks=new_masks, inner_state=inner_state)

  return jax.tree.map(
      replace,
      opt_state,
      is_leaf=lambda x: isinstance(x, SparseMomentsState),
  )


def redraw_masks(
    opt_state: optax.OptState,
    params: Any,
    *,
    sampler: Optional[MaskSampler] = None,
) -> optax.OptState:
  r"""Redraws the masks of every :class:`SparseMomentsState` in ``opt_state`` now.

  This is the redraw that :func:`sparse_moments` makes inside ``update`` after
  step :math:`t` when :math:`(t + 1) \bmod T = 0` — the same new masks from
  the state's key, the same moments carried over, the key advanced — as a
  function of its own, for a training loop that schedules it on the host
  (:func:`redraw_due`) and builds the wrapper with ``reset_interval=0``
  (``spam(..., redraw_masks_in_update=False)``). Then ``update`` holds no
  ``lax.cond``: on a GPU, XLA runs a conditional by copying its predicate to
  the host and waiting for it, so every update would stop the host until the
  device reaches it, and the next step could not be queued behind it.

  Args:
    opt_state: an optimizer state containing ``SparseMomentsState``.
    params: the parameters, or their ``jax.ShapeDtypeStruct`` (only the sizes
      of the sparse leaves are read).
    sampler: the mask sampler the wrapper was built with; default
      :func:`uniform_mask_sampler`.

  Returns:
    The state with new masks and the moments moved onto them.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from spam_optax import sparse_moments, redraw_masks, redraw_due
    >>> tx = sparse_moments(optax.adam(1e-2), density=0.25)  # no redraw inside
    >>> params = {'w': jnp.ones((4, 4))}
    >>> state = tx.init(params)
    >>> for step in range(1, 5):
    ...   _, state = tx.update(params, state, params)
    ...   if redraw_due(step, reset_interval=2):  # after steps 1 and 3
    ...     state = redraw_masks(state, params)
    >>> state.masks['w'].shape
    (4,)
  """
  sampler = uniform_mask_sampler if sampler is None else sampler

  def redraw(node):
    if not isinstance(node, SparseMomentsState):
      return node
    mask_leaves, treedef = jax.tree.flatten(node.masks, is_leaf=_is_slot)
    specs = [
        m if m is None or _is_masked_node(m)
        else (int(np.prod(np.shape(p))), int(m.shape[0]))
        for m, p in zip(mask_leaves, treedef.flatten_up_to(params))
    ]
    new_masks, key = _next_masks(node.key, specs, treedef, sampler)
    inner_state = _remap_inner_state(node.inner_state, node.masks, new_masks)
    return node._replace(masks=new_masks, inner_state=inner_state, key=key)

  return jax.tree.map(
      redraw, opt_state, is_leaf=lambda x: isinstance(x, SparseMomentsState)
  )


def redraw_due(count: int, reset_interval: int) -> bool:
  r"""Whether the masks are redrawn after update number ``count`` (1-based).

  The schedule :func:`sparse_moments` keeps inside ``update``:
  :math:`(t + 1) \bmod T = 0` with :math:`T` = ``reset_interval`` (0: never),
  for a loop that calls :func:`redraw_masks` itself. ``count`` counts the
  wrapper's updates, which is the loop's step unless something skips updates
  (``optax.apply_if_finite``, ``optax.MultiSteps``' mini-steps).

  Examples:
    >>> from spam_optax import redraw_due
    >>> [t for t in range(1, 12) if redraw_due(t, 4)]
    [3, 7, 11]
  """
  return reset_interval > 0 and count % reset_interval == reset_interval - 1
