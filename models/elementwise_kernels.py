"""RoPE's split of the fused q/k/v product and its backward, SwiGLU forward and backward and
the stack of the projections' kernels as Pallas kernels (Triton on a GPU).

All five are element-wise passes that XLA:GPU runs below the memory bandwidth, or may, because
of how it indexes them rather than of what they move (the PTX of the llama_350m training step
compiled for an H100):

* ``rope_split`` — forward, q and k are rotated out of the fused product (…, 3, heads, kv)
  and v is copied out of it for cuDNN's attention. XLA writes q and k in one kernel from
  the product's slices, loading a bf16 at a time where it cannot prove a slice aligned,
  and v in a second. Here one kernel reads the product's three slices and cos/sin, and
  writes q, k and v, with 16-byte loads and stores throughout.
* ``rope_grad`` — RoPE's backward: q's and k's gradients rotated back and v's copied into
  the stacked gradient of the fused product, which XLA's one kernel loads and stores 8
  bytes at a time, this one 16.
* ``swiglu`` — ``silu(gate) · up`` out of ``gate_up`` (…, 2, mlp), the larger of the
  forward's element-wise passes (6.5 GB a 350m step): XLA's kernel loads and stores 8 bytes
  at a time, this one 16.
* ``swiglu_grad`` — backward of ``silu(gate) · up`` over ``gate_up``: XLA's kernel (2.66
  TB/s on an H200, 4.0 ms of the 350m step) loads part of its operands two bytes at a
  time. Here each program reads a tile of gate, up and the output's gradient and writes
  both halves of the gradient, 16 bytes at a time.
* ``stack`` — the projections' kernels stacked for ``models.linears.fused_projections``'
  one product (gate and up; q, k and v): XLA's concatenation loads and stores a bf16 at a
  time. Here each program copies a tile of every kernel into its place, 16 bytes at a time.

The arithmetic is that of the XLA forms they replace (``models.attention.rope_qkv``,
``models.linears.swiglu``, ``jnp.stack``): the backward passes in float32, rounded once to
the output's dtype; SwiGLU's forward rounded after each operation, as XLA computes
``silu(gate) · up`` in bf16. On a backend other than a GPU the kernels run in Pallas's
interpreter (slow; for tests), where they agree with the XLA forms bit for bit, but for
RoPE's sums of two products, which XLA may round once (a fused multiply-add) or twice:
there, rarely, one bf16 step apart.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models import pallas_platform

_TILE_ELEMENTS = 8192  # elements of one array's tile (rows × the padded row)
_WIDTH = 1024  # columns one program takes: of gate and of up (SwiGLU), of each kernel (stack)
# RoPE's kernels: (elements of one array's tile at most, warps). Compiled for an H100 at the
# 350m step's shapes, 8192 and 4 warps hold 216–220 registers a thread (2048: 56). Timed
# alone on an H200 at a 350m layer's shapes: the split 0.062 ms at 2048 and 4 warps, 0.069
# at 4096 and 8, 0.089 at 8192 and 4 (XLA's form 0.075); its backward 0.065, 0.064 and
# 0.088 (XLA's 0.079).
ROPE_TILE = (2048, 4)
ROPE_GRAD_TILE = (2048, 4)


def aligned(elements: int, dtype) -> bool:
  """Whether runs of ``elements`` of ``dtype`` (a half of the head dimension for RoPE, the
  MLP's width for SwiGLU) keep every row and half 16-byte aligned, which the kernels' wide
  loads need: Triton loads a misaligned row (llama_1b's 5461-wide MLP) two bytes at a time,
  where XLA's form still stores 8. The models run the kernels only where this holds."""
  return elements * jnp.dtype(dtype).itemsize % 16 == 0


def _rows(n: int, row_elements: int, most: int = _TILE_ELEMENTS) -> int:
  """The largest power of two that divides ``n`` with ``rows · row_elements`` ≤ ``most``
  (at least 1)."""
  rows = 1
  while rows * 2 * row_elements <= most and n % (rows * 2) == 0:
    rows *= 2
  return rows


def _compiler_params(interpret: bool, warps: int = 4):
  return pallas_platform.compiler_params(interpret, num_warps=warps)


def _load(ref, index, mask):
  """``ref[index]``; where ``mask`` is False (padding past the array) read as 0."""
  return pallas_platform.load(ref, mask, index)


def _store(ref, index, value, mask):
  pallas_platform.store(ref, value, mask, index)


def _half(i: int):
  return pl.ds(i, 1)


# ------------------------------------------------------------------------------- RoPE split


def _rope_masks_and_tables(cos_ref, sin_ref, heads: int, half: int, padded: tuple):
  """The mask of the real heads and half-dimensions within a program's padded (…, heads_p,
  2, half_p) block (None when nothing is padded), and cos and sin for each half, as
  (rows, 1, 1, 1, half_p) float32 (the same for every head)."""
  heads_p, half_p = padded
  mask = table_mask = None
  if (heads_p, half_p) != (heads, half):
    # Masks built, not sliced from one another: Triton's lowering has no slice of a value.
    mask = ((jnp.arange(heads_p) < heads)[None, None, :, None, None]
            & (jnp.arange(half_p) < half)[None, None, None, None, :])
    table_mask = (jnp.arange(half_p) < half)[None, None, :]
  table = lambda ref, i: _load(ref, (slice(None), _half(i), slice(None)),
                               table_mask)[:, None, None].astype(jnp.float32)
  return mask, [table(cos_ref, i) for i in (0, 1)], [table(sin_ref, i) for i in (0, 1)]


def _rope_kernel(qkv_ref, cos_ref, sin_ref, q_out, k_out, v_out, *, heads: int, half: int):
  _, _, heads_p, _, half_p = qkv_ref.shape
  mask, cos, sin = _rope_masks_and_tables(cos_ref, sin_ref, heads, half, (heads_p, half_p))
  at = lambda part, i: (slice(None), _half(part), slice(None), _half(i), slice(None))
  out_at = lambda i: (slice(None), slice(None), slice(None), _half(i), slice(None))
  for part, out in ((0, q_out), (1, k_out)):
    x1, x2 = (_load(qkv_ref, at(part, i), mask).astype(jnp.float32) for i in (0, 1))
    # x·cos + rotate_half(x)·sin, rotate_half(x) = (−x2, x1): HF LLaMA's rotation.
    _store(out, out_at(0), (x1 * cos[0] + (-x2) * sin[0]).astype(out.dtype), mask)
    _store(out, out_at(1), (x2 * cos[1] + x1 * sin[1]).astype(out.dtype), mask)
  for i in (0, 1):
    _store(v_out, out_at(i), _load(qkv_ref, at(2, i), mask), mask)


class _RopeLayout(NamedTuple):
  """How RoPE's kernels see (…, heads, head_dim) arrays: ``n`` rows of (…), each as (heads,
  2, half), padded to powers of two in a program's block, ``rows`` of them a program."""
  lead: tuple
  n: int
  heads: int
  half: int
  padded: tuple
  rows: int


def _rope_layout(lead, heads: int, head_dim: int, tile: tuple) -> _RopeLayout:
  half = head_dim // 2
  padded = pallas_platform.pow2_at_least(heads), pallas_platform.pow2_at_least(half)
  n = math.prod(lead)
  return _RopeLayout(tuple(lead), n, heads, half, padded,
                     _rows(n, padded[0] * 2 * padded[1], tile[0]))


def _rope_tables(layout: _RopeLayout, cos: jax.Array, sin: jax.Array):
  """cos and sin broadcast to (…, head_dim) and viewed as (n, 2, half), and their spec."""
  shape = layout.lead + (2 * layout.half,)
  tables = tuple(jnp.broadcast_to(a, shape).reshape(layout.n, 2, layout.half)
                 for a in (cos, sin))
  return tables, pl.BlockSpec((layout.rows, 2, layout.padded[1]), lambda i: (i, 0, 0))


def _rope_block(layout: _RopeLayout, stacked: int):
  """The spec of a program's block of ``stacked`` (1, or 3 padded to 4) arrays' rows."""
  return pl.BlockSpec((layout.rows, stacked, layout.padded[0], 2, layout.padded[1]),
                      lambda i: (i, 0, 0, 0, 0))


def rope_split(qkv: jax.Array, cos: jax.Array, sin: jax.Array, tile: tuple = ROPE_TILE):
  """``(q, k, v)`` out of ``qkv`` (batch, length, 3, heads, head_dim), q and k rotated by
  ``cos``, ``sin`` (batch, length, head_dim, or any shape that broadcasts to it):
  ``models.attention.rope_qkv``'s forward as one kernel. Each program takes rows of (batch ×
  length) whole: the stacked axis, the heads and each half of the head dimension padded to
  powers of two (the padding never read). ``tile``: (elements of an array's tile at most,
  warps), ``ROPE_TILE`` unless a benchmark compares others."""
  *lead, three, heads, head_dim = qkv.shape
  if three != 3 or head_dim % 2:
    raise ValueError(f"rope_split takes (…, 3, heads, even head_dim), got {qkv.shape}")
  layout = _rope_layout(lead, heads, head_dim, tile)
  n, half = layout.n, layout.half
  tables, table_spec = _rope_tables(layout, cos, sin)
  out = jax.ShapeDtypeStruct((n, 1, heads, 2, half), qkv.dtype)
  q, k, v = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_rope_kernel, heads=heads, half=half),
      out_shape=(out, out, out),
      grid=(n // layout.rows,),
      in_specs=[_rope_block(layout, 4), table_spec, table_spec],
      out_specs=(_rope_block(layout, 1),) * 3,
      compiler_params=_compiler_params(interpret, tile[1]),
      interpret=interpret,
  )(qkv.reshape(n, 3, heads, 2, half), *tables))
  shape = tuple(lead) + (heads, head_dim)
  return q.reshape(shape), k.reshape(shape), v.reshape(shape)


def _rope_grad_kernel(dq_ref, dk_ref, dv_ref, cos_ref, sin_ref, out_ref, *, heads: int,
                      half: int):
  _, _, heads_p, _, half_p = dq_ref.shape
  mask, cos, sin = _rope_masks_and_tables(cos_ref, sin_ref, heads, half, (heads_p, half_p))
  at = lambda i: (slice(None), slice(None), slice(None), _half(i), slice(None))
  out_at = lambda part, i: (slice(None), _half(part), slice(None), _half(i), slice(None))
  for part, ref in ((0, dq_ref), (1, dk_ref)):
    g1, g2 = (_load(ref, at(i), mask).astype(jnp.float32) for i in (0, 1))
    # g·cos − rotate_half(g·sin), rotate_half(y) = (−y2, y1): RoPE's transpose.
    _store(out_ref, out_at(part, 0), (g1 * cos[0] + g2 * sin[1]).astype(out_ref.dtype), mask)
    _store(out_ref, out_at(part, 1), (g2 * cos[1] - g1 * sin[0]).astype(out_ref.dtype), mask)
  for i in (0, 1):
    _store(out_ref, out_at(2, i), _load(dv_ref, at(i), mask).astype(out_ref.dtype), mask)


def rope_grad(dq: jax.Array, dk: jax.Array, dv: jax.Array, cos: jax.Array, sin: jax.Array,
              tile: tuple = ROPE_GRAD_TILE):
  """The gradient of ``rope_split``'s ``qkv`` (…, 3, heads, head_dim), in ``dv``'s dtype,
  from the gradients of q, k and v (…, heads, head_dim): q's and k's rotated back,
  ``g·cos − rotate_half(g·sin)``, and v's as it is, stacked. ``models.attention.rope_qkv``'s
  backward as one kernel, each program rows of (batch × length) whole, 16 bytes at a time
  (XLA's kernel moves 8). ``tile`` as ``rope_split``'s, ``ROPE_GRAD_TILE`` by default."""
  *lead, heads, head_dim = dq.shape
  if dk.shape != dq.shape or dv.shape != dq.shape or head_dim % 2:
    raise ValueError(f"rope_grad takes dq, dk, dv of one shape (…, heads, even head_dim), got "
                     f"{dq.shape}, {dk.shape}, {dv.shape}")
  layout = _rope_layout(lead, heads, head_dim, tile)
  n, half = layout.n, layout.half
  tables, table_spec = _rope_tables(layout, cos, sin)
  grads = tuple(g.reshape(n, 1, heads, 2, half) for g in (dq, dk, dv))
  out = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_rope_grad_kernel, heads=heads, half=half),
      out_shape=jax.ShapeDtypeStruct((n, 3, heads, 2, half), dv.dtype),
      grid=(n // layout.rows,),
      in_specs=[_rope_block(layout, 1)] * 3 + [table_spec, table_spec],
      out_specs=_rope_block(layout, 4),
      compiler_params=_compiler_params(interpret, tile[1]),
      interpret=interpret,
  )(*grads, *tables))
  return out.reshape(tuple(lead) + (3, heads, head_dim))


# ---------------------------------------------------------------------------- SwiGLU forward


def _swiglu_fwd_kernel(gate_up_ref, out_ref, *, features: int):
  width = out_ref.shape[-1]
  mask = out_mask = None
  if features % width:
    columns = (pl.program_id(1) * width + jnp.arange(width)) < features
    mask, out_mask = columns[None, None, :], columns[None, :]
  gate, up = (_load(gate_up_ref, (slice(None), _half(i), slice(None)), mask)[:, 0, :]
              for i in (0, 1))
  # XLA's `silu(gate) · up` as it computes it in gate_up's dtype: σ(g) = 1 / (1 + exp(−g)),
  # then g·σ, then ·up, each operation in float32 and rounded to the dtype.
  rounded = lambda v: v.astype(gate.dtype).astype(jnp.float32)
  g, u = gate.astype(jnp.float32), up.astype(jnp.float32)
  sig = rounded(1.0 / rounded(rounded(jnp.exp(-g)) + 1.0))
  _store(out_ref, (slice(None), slice(None)), (rounded(g * sig) * u).astype(out_ref.dtype),
         out_mask)


def swiglu(gate_up: jax.Array) -> jax.Array:
  """``silu(gate) · up`` of ``gate_up`` (…, 2, mlp), in its dtype: ``models.linears.swiglu``'s
  forward as one kernel. Each program takes rows × 1024 columns of gate and up and writes
  that tile of the output, 16 bytes at a time (XLA's kernel moves 8); the last columns are
  masked when 1024 does not divide the width."""
  *lead, two, features = gate_up.shape
  if two != 2:
    raise ValueError(f"swiglu takes gate_up (…, 2, f), got {gate_up.shape}")
  n = gate_up.size // (2 * features)
  width = min(_WIDTH, pallas_platform.pow2_at_least(features))
  rows = _rows(n, 2 * width)
  out = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_swiglu_fwd_kernel, features=features),
      out_shape=jax.ShapeDtypeStruct((n, features), gate_up.dtype),
      grid=(n // rows, pl.cdiv(features, width)),
      in_specs=[pl.BlockSpec((rows, 2, width), lambda i, j: (i, 0, j))],
      out_specs=pl.BlockSpec((rows, width), lambda i, j: (i, j)),
      compiler_params=_compiler_params(interpret),
      interpret=interpret,
  )(gate_up.reshape(n, 2, features)))
  return out.reshape(tuple(lead) + (features,))


# --------------------------------------------------------------------------- SwiGLU backward


def _swiglu_kernel(gate_up_ref, dh_ref, out_ref, *, features: int):
  width = dh_ref.shape[-1]
  mask = dh_mask = None
  if features % width:
    columns = (pl.program_id(1) * width + jnp.arange(width)) < features
    mask, dh_mask = columns[None, None, :], columns[None, :]
  halves = [(slice(None), _half(i), slice(None)) for i in (0, 1)]
  gate, up = (_load(gate_up_ref, h, mask).astype(jnp.float32) for h in halves)
  dh = _load(dh_ref, (slice(None), slice(None)), dh_mask).astype(jnp.float32)[:, None, :]
  sig = jax.nn.sigmoid(gate)
  # d/dgate silu(gate)·up = up·σ·(1 + gate·(1 − σ));  d/dup = silu(gate) = gate·σ.
  _store(out_ref, halves[0], (dh * (up * sig * (1.0 + gate * (1.0 - sig)))).astype(out_ref.dtype),
         mask)
  _store(out_ref, halves[1], (dh * (gate * sig)).astype(out_ref.dtype), mask)


def swiglu_grad(gate_up: jax.Array, dh: jax.Array) -> jax.Array:
  """The gradient of ``silu(gate) · up`` with respect to ``gate_up`` (…, 2, mlp), given the
  output's gradient ``dh`` (…, mlp): ``models.linears.swiglu``'s backward as one kernel, in
  ``gate_up``'s dtype. Each program takes rows × 1024 columns of gate, up and ``dh`` (the
  last columns masked when 1024 does not divide the width)."""
  *lead, two, features = gate_up.shape
  if two != 2 or dh.shape != tuple(lead) + (features,):
    raise ValueError(f"swiglu_grad takes gate_up (…, 2, f) and dh (…, f), got {gate_up.shape} "
                     f"and {dh.shape}")
  n = dh.size // features
  width = min(_WIDTH, pallas_platform.pow2_at_least(features))
  rows = _rows(n, 2 * width)
  spec = pl.BlockSpec((rows, 2, width), lambda i, j: (i, 0, j))
  out = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_swiglu_kernel, features=features),
      out_shape=jax.ShapeDtypeStruct((n, 2, features), gate_up.dtype),
      grid=(n // rows, pl.cdiv(features, width)),
      in_specs=[spec, pl.BlockSpec((rows, width), lambda i, j: (i, j))],
      out_specs=spec,
      compiler_params=_compiler_params(interpret),
      interpret=interpret,
  )(gate_up.reshape(n, 2, features), dh.reshape(n, features)))
  return out.reshape(gate_up.shape)


# ------------------------------------------------------------------- stacked projection kernels


def _stack_kernel(*refs, features: int):
  *in_refs, out_ref = refs
  width = in_refs[0].shape[-1]
  mask = None
  if features % width:
    mask = ((pl.program_id(1) * width + jnp.arange(width)) < features)[None, :]
  at = lambda j: (slice(None), _half(j), slice(None))
  for j, ref in enumerate(in_refs):
    value = _load(ref, (slice(None), slice(None)), mask).astype(out_ref.dtype)
    _store(out_ref, at(j), value[:, None, :], None if mask is None else mask[:, None, :])


def _stack_pallas(kernels, dtype):
  rows_in, *features = kernels[0].shape
  n, size = len(kernels), math.prod(features)
  width = min(_WIDTH, pallas_platform.pow2_at_least(size))
  rows = _rows(rows_in, pallas_platform.pow2_at_least(n) * width)
  in_spec = pl.BlockSpec((rows, width), lambda i, j: (i, j))
  out = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_stack_kernel, features=size),
      out_shape=jax.ShapeDtypeStruct((rows_in, n, size), dtype),
      grid=(rows_in // rows, pl.cdiv(size, width)),
      in_specs=[in_spec] * n,
      out_specs=pl.BlockSpec((rows, pallas_platform.pow2_at_least(n), width),
                             lambda i, j: (i, 0, j)),
      compiler_params=_compiler_params(interpret),
      interpret=interpret,
  )(*(k.reshape(rows_in, size) for k in kernels)))
  return out.reshape((rows_in, n) + tuple(features))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stack(dtype, dtypes, *kernels):
  del dtypes
  return _stack_pallas(kernels, dtype)


def _stack_fwd(dtype, dtypes, *kernels):
  del dtypes
  return _stack_pallas(kernels, dtype), None


def _stack_bwd(dtype, dtypes, residuals, g):
  del dtype, residuals
  return tuple(g[:, j].astype(d) for j, d in enumerate(dtypes))


_stack.defvjp(_stack_fwd, _stack_bwd)


def stack(kernels, dtype) -> jax.Array:
  """``jnp.stack([k.astype(dtype) for k in kernels], axis=1)`` as one kernel: projection
  kernels of one shape (in, *features) stacked as (in, n, *features) for
  ``models.linears.fused_projections``' one product, each read in tiles of rows × 1024
  columns of its flattened features and written into its place 16 bytes at a time (XLA's
  concatenation loads and stores a bf16 at a time). Its gradient is the stacked gradient's
  slices, each in its kernel's dtype, as ``jnp.stack``'s."""
  kernels = tuple(kernels)
  if not kernels or any(k.shape != kernels[0].shape for k in kernels) or kernels[0].ndim < 2:
    raise ValueError("stack takes kernels of one shape (in, *features), got "
                     f"{[k.shape for k in kernels]}")
  return _stack(jnp.dtype(dtype), tuple(jnp.dtype(k.dtype) for k in kernels), *kernels)
