"""Process-wide JAX settings the trainer and the benchmarks start with.

``apply()`` runs first thing in ``main`` of the trainer and of each benchmark, before
anything is compiled. One setting so far:

* ``jax_threefry_gpu_kernel_lowering``: on a GPU, jax's threefry random-bit generator is
  lowered to jax's own CUDA/ROCm kernel instead of being expanded into XLA operations. The
  bits are the same (the same Threefry-2x32 function); what changes is compilation. XLA
  inlines the expanded hash into every fusion that draws random numbers, so a program that
  draws once per parameter (a model's initialisation, a sparse-momentum mask redraw) spends
  seconds compiling each of those fusions: on an H100 the initialisation of LLaMA 350M
  (219 parameters) took longer to compile than the 60 s a benchmark part had, and 1.3B
  Gaussian benchmark inputs over 100 s. With the kernel the same initialisation compiles in
  seconds. It has no effect on a CPU or TPU. The price: the kernel writes its random bits
  to memory, where XLA's expansion generated them inside the fusion that uses them. A step
  that draws at every call pays that traffic: stochastic rounding of the activations
  (`QuantConfig(stochastic=True)`, not the default) writes 4 bytes per activation element
  per projection, which the quantizer reads back. There, `JAX_THREEFRY_GPU_KERNEL_LOWERING=0` trades
  the compile time back for it.

A value the user sets in the environment (``JAX_THREEFRY_GPU_KERNEL_LOWERING=0``) wins. jax
has said it may remove the option; a jax without it is left as it is.
"""
from __future__ import annotations

import os

import jax

THREEFRY_GPU_KERNEL = "jax_threefry_gpu_kernel_lowering"


def apply(environ=None) -> dict:
  """Applies the settings the environment leaves unset; returns those applied."""
  environ = os.environ if environ is None else environ
  applied = {}
  if THREEFRY_GPU_KERNEL.upper() not in environ:
    try:
      jax.config.update(THREEFRY_GPU_KERNEL, True)
      applied[THREEFRY_GPU_KERNEL] = True
    except AttributeError:  # this jax no longer has the option
      pass
  return applied
