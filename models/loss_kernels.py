"""The loss's passes over the vocabulary as Pallas kernels (Triton on a GPU).

``models.loss.token_nll``'s forward reduces each token's logits to three numbers: the largest
logit, the sum of exponentials relative to it and the target's logit. XLA:GPU runs that
variadic reduction (``lax.reduce`` with the streaming log-sum-exp's combine) as a tree: it
views each 32,000-entry row as 128 × 250, so every row starts 500 bytes after the last and
is loaded 4 bytes at a time, and it applies the whole combine, an exponential and four
selects, to every logit. On an H200 that kernel moved 1.27 TB/s (0.84 ms of the llama_350m
step for 1.07 GB).

``softmax_stats``: each program takes a few tokens and walks their rows in blocks of
columns: per block the largest logit, then the sum rescaled once to the new maximum,
``exp(x − m)`` for every logit, and the target's logit picked where its column is. The
values are those of the XLA form up to the order of the float32 sums.

``softmax_grad``: the backward, ``g · (softmax − one_hot)``, a tile of tokens × columns a
program, which XLA's element-wise kernel reads and writes 8 bytes at a time; the same
values as XLA's form bit for bit in the interpreter.

The loads and stores are 16 bytes wide where a row is 16-byte aligned (``aligned``); the
models call the kernels only there. On a backend other than a GPU the kernels run in
Pallas's interpreter (slow; for tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from models import pallas_platform

# The tile: tokens (rows) of one program at most, columns of each block of a row, warps.
# Timed alone on an H200 (16384 tokens × 32000 columns, bf16): 1×4096, 8 warps 0.535 ms;
# 2×2048, 4 warps 0.551; 2×2048, 8 warps 0.638; 4×2048, 8 warps 0.713 (XLA's two passes
# 0.677).
TILE = (1, 4096, 8)
# The gradient's tile: tokens and columns of one program (at most), warps.
GRAD_TILE = (4, 2048, 8)


def aligned(vocab: int, dtype) -> bool:
  """Whether each row of ``vocab`` logits of ``dtype`` starts 16 bytes after a 16-byte
  boundary, which the kernel's wide loads need (llama's 32,000 in bf16 or float32 do)."""
  return vocab * jnp.dtype(dtype).itemsize % 16 == 0


def _tiling(n: int, vocab: int, tile: tuple) -> tuple[int, int, int]:
  """Tokens a program (the largest power of two ≤ the tile's that divides ``n``), columns a
  block (the tile's, at most the vocabulary's next power of two), warps."""
  most_rows, most_width, warps = tile
  return _rows(n, most_rows), min(most_width, pallas_platform.pow2_at_least(vocab)), warps


def _rows(n: int, most: int) -> int:
  """The largest power of two ≤ ``most`` that divides ``n``."""
  rows = 1
  while rows * 2 <= most and n % (rows * 2) == 0:
    rows *= 2
  return rows


def _stats_kernel(logits_ref, targets_ref, m_ref, s_ref, p_ref, *, vocab: int, width: int):
  rows = targets_ref.shape[0]
  target = targets_ref[...][:, None]
  neg_inf = jnp.full((), -jnp.inf, jnp.float32)

  def block(j, carry):
    m, s, p = carry
    columns = j * width + lax.broadcasted_iota(jnp.int32, (1, width), 1)
    inside = None if vocab % width == 0 else columns < vocab
    index = (slice(None), pl.ds(pl.multiple_of(j * width, width), width))
    x = pallas_platform.load(logits_ref, inside, index).astype(jnp.float32)  # 0 outside
    # The target's logit where its column is (a target outside the vocabulary picks none).
    p = p + jnp.sum(jnp.where(columns == target, x, 0.0), axis=1)
    if inside is not None:
      x = jnp.where(inside, x, neg_inf)
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    # Equal maxima (−inf included) keep the sum as it is; a −inf logit adds nothing.
    factor = jnp.where(m == m_new, 1.0, jnp.exp(m - m_new))
    e = jnp.where(x == neg_inf, 0.0, jnp.exp(x - m_new[:, None]))
    return m_new, s * factor + jnp.sum(e, axis=1), p

  zeros = jnp.zeros((rows,), jnp.float32)
  m, s, p = lax.fori_loop(0, pl.cdiv(vocab, width), block,
                          (jnp.full((rows,), -jnp.inf, jnp.float32), zeros, zeros))
  m_ref[...], s_ref[...], p_ref[...] = m, s, p


def softmax_stats(logits: jax.Array, targets: jax.Array, tile: tuple = TILE):
  """Per token of ``logits`` (…, vocab), in float32 and of shape ``targets.shape``: the
  largest logit ``m``, ``s = Σ exp(logit − m)`` and the logit of ``targets`` (…) (0 where a
  target lies outside the vocabulary): ``models.loss``'s reduction as one kernel. ``tile``:
  ``(tokens a program at most, columns a block, warps)``, ``TILE`` unless a benchmark
  compares others."""
  *lead, vocab = logits.shape
  if tuple(lead) != tuple(targets.shape):
    raise ValueError(f"softmax_stats takes logits (…, vocab) and targets (…), got "
                     f"{logits.shape} and {targets.shape}")
  n = targets.size
  rows, width, warps = _tiling(n, vocab, tile)
  row_spec = pl.BlockSpec((rows,), lambda i: (i,))
  out = jax.ShapeDtypeStruct((n,), jnp.float32)
  m, s, p = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_stats_kernel, vocab=vocab, width=width),
      out_shape=(out, out, out),
      grid=(n // rows,),
      in_specs=[pl.BlockSpec((rows, vocab), lambda i: (i, 0)), row_spec],
      out_specs=(row_spec, row_spec, row_spec),
      compiler_params=pallas_platform.compiler_params(interpret, num_warps=warps),
      interpret=interpret,
  )(logits.reshape(n, vocab), targets.reshape(n).astype(jnp.int32)))
  return m.reshape(targets.shape), s.reshape(targets.shape), p.reshape(targets.shape)


def _softmax_grad_kernel(logits_ref, targets_ref, m_ref, s_ref, g_ref, out_ref, *, vocab: int):
  width = out_ref.shape[1]
  columns = pl.program_id(1) * width + lax.broadcasted_iota(jnp.int32, (1, width), 1)
  inside = None if vocab % width == 0 else columns < vocab
  x = pallas_platform.load(logits_ref, inside).astype(jnp.float32)
  column = lambda ref: ref[...][:, None]
  # XLA's form in ``models.loss``: g · (exp(x − m) / s − one_hot(target)), in float32.
  one_hot = (columns == column(targets_ref)).astype(jnp.float32)
  softmax = jnp.exp(x - column(m_ref)) / column(s_ref)
  pallas_platform.store(out_ref, (column(g_ref) * (softmax - one_hot)).astype(out_ref.dtype),
                        inside)


def softmax_grad(logits: jax.Array, targets: jax.Array, m: jax.Array, s: jax.Array,
                 g: jax.Array, tile: tuple = GRAD_TILE) -> jax.Array:
  """``g · (softmax(logits) − one_hot(targets))`` in the logits' dtype, given the forward's
  ``m`` and ``s`` (``softmax_stats``) and the loss's gradient ``g`` per token (all of
  ``targets.shape``): ``models.loss.token_nll``'s backward as one kernel, each program a
  tile of tokens × columns read and written 16 bytes at a time (the last columns masked)."""
  *lead, vocab = logits.shape
  if any(tuple(a.shape) != tuple(lead) for a in (targets, m, s, g)):
    raise ValueError(f"softmax_grad takes logits (…, vocab) and targets, m, s, g (…), got "
                     f"{logits.shape} and {[tuple(a.shape) for a in (targets, m, s, g)]}")
  n = targets.size
  rows, width, warps = _tiling(n, vocab, tile)
  row_spec = pl.BlockSpec((rows,), lambda i, j: (i,))
  tile_spec = pl.BlockSpec((rows, width), lambda i, j: (i, j))
  flat = lambda a, dtype=jnp.float32: a.reshape(n).astype(dtype)
  out = pallas_platform.on_platform(lambda interpret: pl.pallas_call(
      functools.partial(_softmax_grad_kernel, vocab=vocab),
      out_shape=jax.ShapeDtypeStruct((n, vocab), logits.dtype),
      grid=(n // rows, pl.cdiv(vocab, width)),
      in_specs=[tile_spec, row_spec, row_spec, row_spec, row_spec],
      out_specs=tile_spec,
      compiler_params=pallas_platform.compiler_params(interpret, num_warps=warps),
      interpret=interpret,
  )(logits.reshape(n, vocab), flat(targets, jnp.int32), flat(m), flat(s), flat(g)))
  return out.reshape(logits.shape)
