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


def default_implementation() -> str:
  """What the models' kernel switches left at None run: "pallas" on one GPU of compute
  capability ≥ 8.0 (Ampere, Hopper, ...) with a jax that still has Pallas's Triton backend
  (``triton_available``), "xla" elsewhere. The Pallas kernels are opaque to XLA's sharding
  propagation, so with several devices their operations stay XLA's, which partitions them."""
  if jax.default_backend() != "gpu" or jax.device_count() != 1:
    return "xla"
  return "pallas" if compute_capability() >= 8.0 and triton_available() else "xla"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
  """Whether this jax has Pallas's Triton backend (``jax.experimental.pallas.triton``), which
  the models' kernels are written for. jax 0.11 deprecates it ("will be removed in a future
  JAX version"); without it the kernel switches' default is XLA's forms, the same values."""
  try:
    triton()
  except ImportError:
    return False
  return True


def compute_capability() -> float:
  """The first device's CUDA compute capability (e.g. 9.0 for an H100), 0 if unknown."""
  try:
    return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
  except (TypeError, ValueError):
    return 0.0


# What a failure of each group of the models' kernels names (its module, its functions).
KERNEL_NAMES = {
    "norm": ("norm_kernels", "rms_norm"),
    "elementwise": ("elementwise_kernels", "rope_split", "rope_grad", "_rope_grad_kernel",
                    "swiglu_grad", "_rope_kernel",
                    "_swiglu_kernel", "_swiglu_fwd_kernel", "_stack_kernel", "loss_kernels",
                    "softmax_stats", "_stats_kernel", "softmax_grad", "_softmax_grad_kernel"),
}


def is_pallas_failure(error: BaseException, kernels: str | None = None) -> bool:
  """Whether ``error``, raised tracing, compiling or running a step, comes from the models'
  Pallas kernels (Pallas's lowering or Triton's compiler), so that their switch "xla"
  (``norm_implementation``, ``elementwise_implementation``) avoids it. With ``kernels``
  ("norm" or "elementwise"), whether it may come from that group: not if it names another."""
  text = f"{type(error).__name__}: {error}".lower()
  names = {k: tuple(n.lower() for n in v) for k, v in KERNEL_NAMES.items()}
  if not any(m in text for m in ("pallas", "triton") + sum(names.values(), ())):
    return False
  return kernels is None or not any(n in text for k, v in names.items() if k != kernels
                                    for n in v)


def pow2_at_least(n: int) -> int:
  """The least power of two ≥ ``n``: Triton's arrays have power-of-two sizes."""
  return 1 << max(0, (n - 1).bit_length())


def triton():
  """``jax.experimental.pallas.triton``, imported when a kernel is built."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=import-outside-toplevel
  return pl_triton


def compiler_params(interpret: bool, num_warps: int):
  """Triton's parameters for a kernel (``num_warps``, one stage); None interpreted."""
  if interpret:
    return None
  pl_triton = triton()
  params = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams")
  return params(num_warps=num_warps, num_stages=1)


def _whole(ref, index):
  """``index`` (a tuple of leading indices, or None) completed with whole axes."""
  index = () if index is None else tuple(index)
  return index + (slice(None),) * (len(ref.shape) - len(index))


def load(ref, mask, index=None):
  """``ref[index]`` (all of ``ref`` when None); where ``mask`` is False (padding past the
  array) read as 0."""
  if mask is None:
    return ref[_whole(ref, index)]
  masked = getattr(triton(), "load", None)
  if masked is None:  # jax < 0.5: pl.load takes the index
    return pl.load(ref, _whole(ref, index), mask=mask, other=0)
  return masked(ref if index is None else ref.at[index], mask=mask, other=0)


def store(ref, value, mask, index=None):
  """``ref[index] = value`` where ``mask`` is True (everywhere when None)."""
  if mask is None:
    ref[_whole(ref, index)] = value
    return
  masked = getattr(triton(), "store", None)
  if masked is None:
    pl.store(ref, _whole(ref, index), value, mask=mask)
  else:
    masked(ref if index is None else ref.at[index], value, mask=mask)


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
