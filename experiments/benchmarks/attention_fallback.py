"""A benchmark whose cuDNN attention or Pallas kernels fail is measured again with XLA's.

On a GPU, ``--attention auto`` asks for cuDNN's fused flash attention, and the refusals
cuDNN reports while tracing fall back to XLA's attention there (``models.attention``). Some
are only reported when XLA compiles the step (a cuDNN build without the kernel for this GPU,
a graph it cannot plan). Likewise ``--norm auto`` runs the residual add + RMSNorm as Pallas
kernels on one GPU (``models.norm_kernels``), and ``--elementwise auto`` RoPE's split and
SwiGLU (``models.elementwise_kernels``), which Triton compiles with the step. A
benchmark run on a lent device must not lose the measurement to any of them: :func:`run`
repeats it with ``--attention xla``, ``--elementwise xla`` or ``--norm xla`` and records why
in the result. A Triton failure that names neither group of kernels is put on the
element-wise kernels first, the newer.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from models.attention import failure_line, is_cudnn_attention_failure
from models.pallas_platform import is_pallas_failure

# (flag, what fails, recogniser, result key), in the order they are tried.
_FALLBACKS = (
    ("attention", "cuDNN attention", is_cudnn_attention_failure, "attention_fallback"),
    ("elementwise", "the Pallas element-wise kernels",
     lambda error: is_pallas_failure(error, "elementwise"), "elementwise_fallback"),
    ("norm", "the Pallas norm kernels", lambda error: is_pallas_failure(error, "norm"),
     "norm_fallback"),
)


def run(measure: Callable[[Any], dict], args) -> dict:
  """``measure(args)``; if that fails in cuDNN attention under ``--attention auto`` (or in
  the Pallas kernels under ``--elementwise auto``, ``--norm auto``), again with that flag
  ``xla``, the result noting the first error under ``attention_fallback``
  (``elementwise_fallback``, ``norm_fallback``)."""
  notes = {}
  while True:
    try:
      result = measure(args)
      result.update(notes)
      return result
    except Exception as error:  # pylint: disable=broad-except
      for flag, what, recognise, key in _FALLBACKS:
        if getattr(args, flag, "auto") == "auto" and recognise(error):
          break
      else:
        raise
      notes[key] = failure_line(error)
      print(f"{what} failed ({notes[key]}); measuring again with --{flag} xla", flush=True)
      args = copy.copy(args)
      setattr(args, flag, "xla")
