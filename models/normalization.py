"""RMSNorm as LLaMA uses it: statistics in float32, a learned per-feature scale."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import norm_kernels, pallas_platform


def default_implementation() -> str:
  """What `implementation=None` runs: "pallas" on one GPU of compute capability ≥ 8.0
  (Ampere, Hopper, ...), "xla" elsewhere (`pallas_platform.default_implementation`): with
  several devices the norms stay XLA's, which partitions them."""
  return pallas_platform.default_implementation()


class RMSNorm(nn.Module):
  """`x / sqrt(mean(x²) + eps) · scale`, normalised in float32 whatever the compute dtype.

  Like the HF LLaMA layer, the normalised activations are cast back to the compute
  dtype before the scale is applied. The scale starts at one.

  Called with `residual`, it first adds it, `x + residual` in `x`'s dtype as the residual
  stream of a pre-norm block does, and returns `(x + residual, norm(x + residual))`.
  `implementation` "pallas" runs the add and the norm as one kernel each way
  (`models.norm_kernels`); "xla" leaves them to XLA; None picks (`default_implementation`).
  """

  eps: float = 1e-6
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None):
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],),
        self.param_dtype,
    )
    implementation = self.implementation or default_implementation()
    if implementation == "pallas":
      scale = scale.astype(self.dtype)
      if residual is None:
        return norm_kernels.rms_norm(x, scale, self.eps, jnp.dtype(self.dtype))
      return norm_kernels.add_rms_norm(x, residual.astype(x.dtype), scale, self.eps,
                                       jnp.dtype(self.dtype))
    if residual is not None:
      x = x + residual.astype(x.dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    y = y * scale.astype(self.dtype)
    return y if residual is None else (x, y)
