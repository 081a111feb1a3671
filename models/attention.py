"""Causal multi-head self-attention with rotary position embeddings (RoPE)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from models import elementwise_kernels, pallas_platform
from models.linears import DenseGeneral, ProjectionWeights, fused_projections
from models.quantization import QuantConfig


def rope_frequencies(positions: jax.Array, head_dim: int, theta: float = 10000.0):
  """cos and sin of shape positions.shape + (head_dim,), in float32.

  HF LLaMA's layout: frequencies θ^(−2i/d) for i < d/2, repeated for both halves.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  """HF LLaMA's `rotate_half`: `concat(-x2, x1)` for the halves `x1, x2` of the last axis.

  Computed as the halves' axis reversed and signed, `flip(x.reshape(…, 2, d/2))·(−1, 1)`:
  the same values, but each element of the result reads its partner at the same offset of
  the other half, so that XLA:GPU loads and stores it several elements at a time (slices
  joined along the last axis load one bf16 at a time). Its transpose is `-rotate_half`.
  """
  d = x.shape[-1]
  halves = x.reshape(x.shape[:-1] + (2, d // 2))
  sign = np.array([[-1.0], [1.0]], dtype=np.float32).astype(x.dtype)
  return (jnp.flip(halves, axis=-2) * sign).reshape(x.shape)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """`x·cos + rotate_half(x)·sin` in float32, returned in `x`'s dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def _between(cos: jax.Array, sin: jax.Array, ndim: int):
  """cos and sin of shape (batch, length, head_dim) broadcast over the axes between."""
  between = tuple(range(2, ndim - 1))
  return jnp.expand_dims(cos, between), jnp.expand_dims(sin, between)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotates `x` of shape (batch, length, ..., head_dim) by its positions (`positions`:
  (batch, length)), the same rotation for every index of the axes between (heads).

  Uses the "rotate half" pairing of HF LLaMA (feature i with i + d/2), so weights
  ported from the PyTorch model need no permutation. Computed in float32.
  """
  cos, sin = rope_frequencies(positions, x.shape[-1], theta)
  return _rotate(x, *_between(cos, sin, x.ndim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def rope_qkv(qkv: jax.Array, cos: jax.Array, sin: jax.Array, implementation: str = "xla"):
  """q, k and v from the fused projection `qkv` (batch, length, 3, heads, head_dim), q and
  k rotated by RoPE (`cos`, `sin`: (batch, length, head_dim), `rope_frequencies`).

  The forward pass is `apply_rope` on q and k, v sliced out as it is; with `implementation`
  "pallas", one kernel that writes all three (`elementwise_kernels.rope_split`, the same
  values), where half the head dimension keeps rows 16-byte aligned
  (`elementwise_kernels.aligned`). The backward pass is written out so that the gradient of
  `qkv` is one element-wise pass over its stacked shape: each element selects its own
  gradient (q's, k's or v's) and q's and k's are rotated back, `g·cos − rotate_half(g·sin)`.
  (Differentiated automatically, the slices' gradients are zero-padded to the stacked shape
  and added, and XLA:GPU reads padded operands one bf16 at a time: the pass ran at half the
  bandwidth on an H200.) With "pallas" that pass is one kernel too
  (`elementwise_kernels.rope_grad`, 16-byte loads and stores where XLA's moves 8). No
  cotangent for `cos`, `sin`.
  """
  if implementation == "pallas" and elementwise_kernels.aligned(qkv.shape[-1] // 2, qkv.dtype):
    return elementwise_kernels.rope_split(qkv, cos, sin)
  qk = _rotate(qkv[..., :2, :, :], *_between(cos, sin, qkv.ndim))
  return qk[..., 0, :, :], qk[..., 1, :, :], qkv[..., 2, :, :]


def _rope_qkv_fwd(qkv, cos, sin, implementation):
  return rope_qkv(qkv, cos, sin, implementation), (cos, sin)


def _rope_qkv_bwd(implementation, res, grads):
  zeros = jnp.zeros_like(res[0]), jnp.zeros_like(res[1])
  if implementation == "pallas" and elementwise_kernels.aligned(grads[0].shape[-1] // 2,
                                                                grads[0].dtype):
    return (elementwise_kernels.rope_grad(*grads, *res),) + zeros
  cos, sin = _between(*res, len(grads[0].shape) + 1)
  dq, dk, dv = (g[..., None, :, :] for g in grads)
  which = np.arange(3).reshape(3, 1, 1)  # a constant: q, k, v along the stacked axis
  g = jnp.where(which == 0, dq, jnp.where(which == 1, dk, dv)).astype(jnp.float32)
  rotated = g * cos - rotate_half(g * sin)
  dqkv = jnp.where(which < 2, rotated, g).astype(grads[2].dtype)
  return (dqkv,) + zeros


rope_qkv.defvjp(_rope_qkv_fwd, _rope_qkv_bwd)


def _compute_capability() -> float:
  """The first device's CUDA compute capability (e.g. 9.0 for an H100), 0 if unknown."""
  return pallas_platform.compute_capability()


_CUDNN_MARKERS = ("cudnn", "fmha", "dot_product_attention", "flash attention")


def is_cudnn_attention_failure(error: BaseException) -> bool:
  """Whether ``error``, raised tracing, compiling or running a step, comes from cuDNN's
  attention (the refusals cuDNN reports only when XLA compiles the step, e.g. a cuDNN build
  without the kernel for this GPU), so that ``attention_implementation="xla"`` avoids it."""
  text = f"{type(error).__name__}: {error}".lower()
  return any(marker in text for marker in _CUDNN_MARKERS)


def failure_line(error: BaseException, limit: int = 300) -> str:
  """The first line of ``error``'s message (its type's name if it has none), cut at
  ``limit`` characters: what a one-line report of the failure quotes."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     implementation: str | None = None) -> jax.Array:
  """Causal `jax.nn.dot_product_attention` over (batch, length, heads, head_dim).

  `implementation` "xla" or "cudnn" is passed through; "pallas" is `pallas_attention`. None
  picks: cuDNN's fused flash attention on a GPU where it applies, XLA otherwise. JAX's own
  None means XLA today (its automatic choice is a TODO), so the choice is made here: on a
  GPU of compute capability 8.0 or newer (Ampere, Hopper, ...; cuDNN's flash attention needs
  it, and older GPUs would fail only at compile time) "cudnn" is traced first, and its
  trace-time refusals (inputs not fp16/bf16, head size, cuDNN version) fall back to "xla".
  """
  if implementation == "pallas":
    return pallas_attention(q, k, v)
  if implementation is None:
    if jax.default_backend() == "gpu" and _compute_capability() >= 8.0:
      try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
      except (ValueError, NotImplementedError, RuntimeError):
        pass
    implementation = "xla"
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def check_pallas_length(length: int) -> None:
  """Raises ValueError unless `pallas_attention` takes sequences of `length` tokens."""
  if length > _PALLAS_MAX_BLOCK and length % _PALLAS_MAX_BLOCK:
    raise ValueError(f"attention 'pallas' takes sequences of at most {_PALLAS_MAX_BLOCK} "
                     f"tokens or a multiple of {_PALLAS_MAX_BLOCK}, got {length}")


# The Pallas kernel's blocks of queries and keys, as its `BlockSizes`: the forward's, then
# those of the backward's one kernel for dk and dv (its grid) and for dq, which must split
# the sequence alike. These are jax's defaults. A block longer than the sequence is cut to
# it; a longer sequence must be a multiple of every block, hence `check_pallas_length`.
PALLAS_BLOCKS = dict(block_q=128, block_k=128, block_q_dkv=32, block_kv_dkv=32,
                     block_q_dq=32, block_kv_dq=32)
_PALLAS_MAX_BLOCK = 128


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     blocks: dict | None = None) -> jax.Array:
  """Causal flash attention as jax's Pallas kernel for GPUs
  (`jax.experimental.pallas.ops.gpu.attention.mha`, written in Triton), over (batch,
  length, heads, head_dim), scaled by 1/sqrt(head_dim) as `jax.nn.dot_product_attention`.

  Forward and backward are each fused kernels, as cuDNN's are; scores and softmax stay in
  float32 inside them. On a CPU the kernel is interpreted, for tests only, and compiled for
  a GPU from a host without one it is the Triton kernel (`pallas_platform.on_platform`).
  The sequence length must be at most 128 or a multiple of 128 (`check_pallas_length`).
  `blocks` (default `PALLAS_BLOCKS`, each at most 128) sets the kernel's blocks; a jax
  without `BlockSizes` takes the forward's two and derives the backward's.
  """
  backend = jax.default_backend()
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"attention 'pallas' is a kernel for GPUs; this JAX backend is {backend}")
  check_pallas_length(q.shape[1])
  blocks = PALLAS_BLOCKS if blocks is None else blocks
  if max(blocks.values()) > _PALLAS_MAX_BLOCK:
    raise ValueError(f"attention 'pallas' blocks of at most {_PALLAS_MAX_BLOCK}, got {blocks}")
  from jax.experimental.pallas.ops.gpu import attention as pallas_mha  # imports Triton's lowering
  if hasattr(pallas_mha, "BlockSizes"):
    sizes = dict(block_sizes=pallas_mha.BlockSizes(**blocks))
  else:
    sizes = dict(block_q=blocks["block_q"], block_k=blocks["block_k"])
  return pallas_platform.on_platform(lambda interpret: pallas_mha.mha(
      q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret, **sizes))


class Attention(nn.Module):
  """Causal self-attention: q/k/v/o projections, RoPE, `causal_attention`.

  The q, k, v kernels are (embed, heads, kv) and the o kernel (heads, kv, embed);
  all four may be fake-quantized. q, k and v run as one product against their kernels
  stacked as (embed, 3, heads, kv) (`fused_projections`): the input is read once and
  the backward pass makes one input gradient instead of three to be summed. Scores,
  softmax and the AV product stay in the compute dtype (the softmax itself runs in
  float32 inside JAX).
  """

  num_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  quant: QuantConfig | None = None
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | None = None
  # The stack of q's, k's and v's kernels and RoPE's split of the fused product: "pallas"
  # (`elementwise_kernels.stack`, `rope_split`), "xla", or None
  # (`pallas_platform.default_implementation`).
  elementwise_implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    heads = (self.num_heads, self.head_dim)
    qkv_axes = ("batch", "length", "heads", "kv")
    weights = lambda name: ProjectionWeights(heads, ("embed", "heads", "kv"), self.quant,
                                             self.init_std, self.param_dtype,
                                             name=name)(x.shape[-1])
    implementation = (self.elementwise_implementation
                      or pallas_platform.default_implementation())
    qkv = fused_projections(x, [weights("q_proj"), weights("k_proj"), weights("v_proj")],
                            self.dtype, implementation)
    qkv = nn.with_logical_constraint(qkv, ("batch", "length", None, "heads", "kv"))
    # q and k rotated together, v sliced out as it is (cuDNN's attention takes each whole):
    # forward, one kernel writes q and k; backward, one element-wise pass writes the
    # gradient of the fused product (`rope_qkv`).
    q, k, v = rope_qkv(qkv, *rope_frequencies(positions, self.head_dim, self.rope_theta),
                       implementation)
    # Named for `models.remat.block_residuals`: kept for the backward pass, not recomputed.
    q = checkpoint_name(q, "query")
    k = checkpoint_name(k, "key")
    q = nn.with_logical_constraint(q, qkv_axes)
    k = nn.with_logical_constraint(k, qkv_axes)
    v = nn.with_logical_constraint(checkpoint_name(v, "value"), qkv_axes)
    out = causal_attention(q, k, v, self.implementation)
    out = nn.with_logical_constraint(checkpoint_name(out, "attention_out"), qkv_axes)
    return DenseGeneral(
        features=x.shape[-1],
        axis=(-2, -1),
        kernel_axes=("heads", "kv", "embed"),
        quant=self.quant,
        init_std=self.init_std,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="o_proj",
    )(out)
