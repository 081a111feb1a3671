"""A Pallas kernel as Triton on a GPU and in Pallas's interpreter elsewhere.

The models' Pallas kernels (the residual add + RMSNorm, the flash attention) are written
for GPUs. On a CPU they run interpreted, slowly, so that the tests run them; compiled for a
GPU from a host without one (``jax.experimental.topologies``, ``experiments.benchmarks.
aot_gpu``), they must be the Triton kernels although the host's backend is the CPU.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

T = TypeVar("T")


def on_platform(call: Callable[[bool], T]) -> T:
  """``call(interpret)``: Triton for CUDA, Pallas's interpreter on every other platform.

  On a GPU backend that is ``call(False)``. Elsewhere the choice is left to the lowering
  (``lax.platform_dependent``), so that compiling for a GPU from a host without one gets the
  Triton kernels, where jax lowers only the branch of the platform it lowers for; older jax
  lowers every branch, and there the interpreter is used.
  """
  if jax.default_backend() == "gpu":
    return call(False)
  if not lowering_prunes_branches():
    return call(True)
  return jax.lax.platform_dependent(cuda=lambda: call(False), default=lambda: call(True))


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...]


@functools.lru_cache(maxsize=None)
def lowering_prunes_branches() -> bool:
  """Whether this jax lowers a Triton branch of ``lax.platform_dependent`` for the default
  backend without error, i.e. leaves out the branches of other platforms."""
  def probe(x):
    copy = lambda interpret: pl.pallas_call(
        _copy_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)
    return jax.lax.platform_dependent(cuda=lambda: copy(False), default=lambda: copy(True))
  try:
    jax.jit(probe).lower(jax.ShapeDtypeStruct((8, 128), jnp.float32))
  except Exception:  # pylint: disable=broad-except
    return False
  return True
