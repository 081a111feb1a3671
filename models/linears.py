"""Projection layers and the SiLU-gated MLP.

`DenseGeneral` is the one layer through which every projection runs; quantization
reaches it as an injected `dot_general` (see `models.quantization`), chosen by a
single `QuantConfig` (None: the plain bfloat16 matmul).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from models import quantization
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
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=self.init_std), tuple(self.kernel_axes)
        ),
        kernel_shape,
        self.param_dtype,
    )
    x = x.astype(self.dtype)
    dims = ((axis, tuple(range(len(axis)))), ((), ()))
    out_dtype = self.out_dtype or self.dtype
    if self.quant is None:
      return lax.dot_general(
          x, kernel.astype(self.dtype), dims, preferred_element_type=out_dtype
      )
    quant, noise_key = self.quant, None
    if quant.needs_rng:
      if self.is_initializing():
        # Shape-only pass: the noise would not change any parameter.
        quant = dataclasses.replace(quant, stochastic=False)
      elif not self.has_rng("quant"):
        raise ValueError(
            "QuantConfig(stochastic=True) needs rngs={'quant': key} in model.apply"
        )
      else:
        noise_key = self.make_rng("quant")
    dot_general = quantization.fake_quant_dot_general(quant, noise_key)
    return dot_general(x, kernel, dims, preferred_element_type=out_dtype)


class MLP(nn.Module):
  """LLaMA's SiLU-gated MLP: `down(silu(gate(x)) · up(x))`."""

  intermediate_size: int
  quant: QuantConfig | None = None
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, axes, name: DenseGeneral(
        features=features,
        kernel_axes=axes,
        quant=self.quant,
        init_std=self.init_std,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )
    # Named for `models.remat.block_residuals`: kept for the backward pass, not recomputed.
    gate = checkpoint_name(dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x),
                           "mlp_gate")
    up = checkpoint_name(dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x), "mlp_up")
    h = nn.silu(gate) * up
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(h)
