"""Projection layers and the SiLU-gated MLP.

Every projection runs through `project` (the product of an activation and a kernel);
quantization reaches it as an injected `dot_general` (see `models.quantization`), chosen
by a single `QuantConfig` (None: the plain bfloat16 matmul). `DenseGeneral` is one
projection; the MLP (gate, up) and attention (q, k, v) hold their kernels as
`ProjectionWeights` and multiply those that read the same input in one product
(`fused_projections`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from models import elementwise_kernels, pallas_platform, quantization
from models.quantization import QuantConfig


def _canonical(axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(a % ndim for a in axes)


class DenseGeneral(nn.Module):
  """A bias-free linear map contracting `axis` of the input into `features`.

  The kernel has shape `input[axis] + features` (Flax's (in, out) order) and the
  logical axis names `kernel_axes`. Parameters are kept in `param_dtype`; the
  matmul runs in `dtype` and returns `out_dtype` (default `dtype`).

  Attributes:
    features: output feature shape.
    kernel_axes: logical axis names of the kernel, one per kernel dimension.
    axis: input axes contracted.
    quant: fake quantization of this projection, or None.
    init_std: standard deviation of the normal initialiser.
  """

  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  axis: int | Sequence[int] = -1
  quant: QuantConfig | None = None
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  out_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = _canonical(self.axis, x.ndim)
    kernel_shape = tuple(x.shape[a] for a in axis) + features
    if len(self.kernel_axes) != len(kernel_shape):
      raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel shape {kernel_shape}")
    kernel = _kernel_param(self, kernel_shape, self.kernel_axes, self.init_std, self.param_dtype)
    quant, noise_key = _quant_and_key(self, self.quant)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    return project(x.astype(self.dtype), kernel, dims, quant, noise_key,
                   self.out_dtype or self.dtype)


def _kernel_param(module: nn.Module, shape, axes, init_std: float, param_dtype) -> jax.Array:
  """`module`'s "kernel" parameter: normal(init_std), logically partitioned as `axes`."""
  return module.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=init_std), tuple(axes)),
      tuple(shape),
      param_dtype,
  )


def _quant_and_key(module: nn.Module, quant: QuantConfig | None):
  """The quantization `module` runs and its rounding-noise key (None unless stochastic)."""
  if quant is None or not quant.needs_rng:
    return quant, None
  if module.is_initializing():
    # Shape-only pass: the noise would not change any parameter.
    return dataclasses.replace(quant, stochastic=False), None
  if not module.has_rng("quant"):
    raise ValueError("QuantConfig(stochastic=True) needs rngs={'quant': key} in model.apply")
  return quant, module.make_rng("quant")


def project(x: jax.Array, kernel: jax.Array, dims, quant: QuantConfig | None,
            noise_key: jax.Array | None, out_dtype) -> jax.Array:
  """`x · kernel` over `dims` in `x`'s dtype, fake-quantized when `quant` is set; the kernel
  arrives in its parameter dtype (quantized from the master copy)."""
  if quant is None:
    return lax.dot_general(x, kernel.astype(x.dtype), dims, preferred_element_type=out_dtype)
  dot_general = quantization.fake_quant_dot_general(quant, noise_key)
  return dot_general(x, kernel, dims, preferred_element_type=out_dtype)


class ProjectionWeights(nn.Module):
  """The parameters of one projection (what `DenseGeneral` holds) without its product:
  returns `(kernel, quant, noise_key)` for a caller that multiplies several at once."""

  features: int | Sequence[int]
  kernel_axes: Sequence[str | None]
  quant: QuantConfig | None = None
  init_std: float = 0.02
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    kernel = _kernel_param(self, (in_features,) + features, self.kernel_axes, self.init_std,
                           self.param_dtype)
    return (kernel,) + _quant_and_key(self, self.quant)


def fused_projections(x: jax.Array, weights: Sequence[tuple], dtype,
                      implementation: str = "xla") -> jax.Array:
  """Several projections of the same `x` (last axis contracted) as one product.

  `weights` are `ProjectionWeights` results `(kernel, quant, noise_key)` whose kernels
  share their shape `(in, *features)`; the result is `(…, n, *features)` in `dtype`, from
  the kernels stacked as `(in, n, *features)`: the forward product contracts its first
  axis and the backward one (the input gradient) its trailing ones, so both read that one
  buffer. With quantization each kernel is quantized on its own (as separate `nn.Linear`s
  are) and `x` once; stochastic rounding draws its noise per projection, so there the
  products stay apart and their results are stacked. Without quantization,
  `implementation` "pallas" stacks the kernels with `elementwise_kernels.stack` (16-byte
  loads and stores; XLA's concatenation moves a bf16 at a time) where their features stay
  16-byte aligned, "xla" with `jnp.stack`: the same values.
  """
  x = x.astype(dtype)
  axis = x.ndim - 1
  quant = weights[0][1]
  if quant is not None and quant.needs_rng:
    dims = (((axis,), (0,)), ((), ()))
    return jnp.stack([project(x, w, dims, quant, key, dtype) for w, _, key in weights],
                     axis=axis)
  kernels = [w for w, *_ in weights]
  if quant is not None:
    x = quantization.fake_quant_activation(quant, x, (), (axis,))
    kernels = [quantization.fake_quant_weight(quant, w, (0,)) for w in kernels]
  features = math.prod(kernels[0].shape[1:])
  if (implementation == "pallas" and quant is None
      and all(elementwise_kernels.aligned(features, d) for d in (dtype, kernels[0].dtype))):
    w = elementwise_kernels.stack(kernels, dtype)
  else:
    w = jnp.stack([k.astype(dtype) for k in kernels], axis=1)
  return lax.dot_general(x, w, (((axis,), (0,)), ((), ())), preferred_element_type=dtype)


class MLP(nn.Module):
  """LLaMA's SiLU-gated MLP: `down(silu(gate(x)) · up(x))`.

  The parameters are HF's (`gate_proj`, `up_proj`, `down_proj`, each a `kernel`), but gate
  and up run as one product against the two kernels stacked as (embed, 2, mlp), whose
  output `gate_up` is what the backward pass keeps; `swiglu` then reads it once forward
  and once backward. With quantization each kernel is quantized on its own, as the
  official code's two `nn.Linear`s are, and the activation once (stochastic rounding
  draws its noise per projection, so there the two products stay apart).
  """

  intermediate_size: int
  quant: QuantConfig | None = None
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  # The stack of gate's and up's kernels and SwiGLU forward and backward: "pallas"
  # (`elementwise_kernels.stack`, `swiglu`, `swiglu_grad`), "xla", or None
  # (`pallas_platform.default_implementation`).
  elementwise_implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weights = lambda name: ProjectionWeights(
        self.intermediate_size, ("embed", "mlp"), self.quant, self.init_std, self.param_dtype,
        name=name)(x.shape[-1])
    implementation = (self.elementwise_implementation
                      or pallas_platform.default_implementation())
    gate_up = fused_projections(x, [weights("gate_proj"), weights("up_proj")], self.dtype,
                                implementation)
    gate_up = nn.with_logical_constraint(gate_up, ("batch", "length", None, "mlp"))
    # Named for `models.remat.block_residuals`: kept for the backward pass, not recomputed.
    h = swiglu(checkpoint_name(gate_up, "mlp_gate_up"), implementation)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return DenseGeneral(
        features=x.shape[-1],
        kernel_axes=("mlp", "embed"),
        quant=self.quant,
        init_std=self.init_std,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="down_proj",
    )(h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def swiglu(gate_up: jax.Array, implementation: str = "xla") -> jax.Array:
  """`silu(gate) · up` for `gate_up = stack([gate, up], axis=-2)`, in its dtype.

  The backward pass is written out so that it is one element-wise pass that reads
  `gate_up` and the output gradient and writes the gradient of `gate_up` in its stacked
  layout, the operand of the one backward product of the stacked kernel; its factors are
  computed in float32. (Differentiated automatically, XLA computes the sigmoid into a
  separate buffer, writes the two halves of the gradient apart and concatenates them.)
  With `implementation` "pallas" the forward and that pass are Pallas kernels
  (`elementwise_kernels.swiglu`, `swiglu_grad`, the same values) where the width keeps its
  rows 16-byte aligned (`elementwise_kernels.aligned`), XLA's forms elsewhere.
  """
  if implementation == "pallas" and elementwise_kernels.aligned(gate_up.shape[-1], gate_up.dtype):
    return elementwise_kernels.swiglu(gate_up)
  return nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]


def _swiglu_fwd(gate_up, implementation):
  return swiglu(gate_up, implementation), gate_up


def _swiglu_bwd(implementation, gate_up, dh):
  if implementation == "pallas" and elementwise_kernels.aligned(gate_up.shape[-1], gate_up.dtype):
    return (elementwise_kernels.swiglu_grad(gate_up, dh),)
  return _swiglu_grad_xla(gate_up, dh)


def _swiglu_grad_xla(gate_up, dh):
  x = gate_up.astype(jnp.float32)
  first = (jnp.arange(2) == 0)[:, None]
  # The gate at every element of the stacked shape, selected from it rather than broadcast
  # from its half: each element then computes its own sigmoid. Broadcast, σ(gate) is one
  # value that both halves read, and XLA:GPU's fusion cost model for an H200 stores it in
  # float32 and runs the backward as two kernels (0.99 GB a layer against 0.45 at 350m,
  # 5.7 ms of the step on an H200).
  gate = jnp.where(first, x, x[..., 0:1, :])
  up = x[..., 1:2, :]
  sig = jax.nn.sigmoid(gate)
  # d/dgate silu(gate)·up = up·σ·(1 + gate·(1 − σ));  d/dup = silu(gate) = gate·σ.
  # Both halves in one expression of the stacked shape: one kernel, nothing concatenated.
  factor = jnp.where(first, up * sig * (1.0 + gate * (1.0 - sig)), gate * sig)
  return ((dh.astype(jnp.float32)[..., None, :] * factor).astype(gate_up.dtype),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
