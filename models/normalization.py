"""RMSNorm as LLaMA uses it: statistics in float32, a learned per-feature scale."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x²) + eps) · scale`, normalised in float32 whatever the compute dtype.

  Like the HF LLaMA layer, the normalised activations are cast back to the compute
  dtype before the scale is applied. The scale starts at one.
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return y * scale.astype(self.dtype)
