"""A benchmark whose cuDNN attention fails to compile is measured again with XLA's.

On a GPU, ``--attention auto`` asks for cuDNN's fused flash attention, and the refusals
cuDNN reports while tracing fall back to XLA's attention there (``models.attention``). Some
are only reported when XLA compiles the step (a cuDNN build without the kernel for this GPU,
a graph it cannot plan). A benchmark run on a lent device must not lose the measurement to
that: :func:`run` repeats it once with ``--attention xla`` and records why in the result.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from models.attention import failure_line, is_cudnn_attention_failure


def run(measure: Callable[[Any], dict], args) -> dict:
  """``measure(args)``; if that fails in cuDNN attention under ``--attention auto``, once
  more with ``--attention xla``, the result noting the first error under
  ``attention_fallback``."""
  try:
    return measure(args)
  except Exception as error:  # pylint: disable=broad-except
    if getattr(args, "attention", "auto") != "auto" or not is_cudnn_attention_failure(error):
      raise
    first_line = failure_line(error)
    print(f"cuDNN attention failed ({first_line}); measuring again with --attention xla",
          flush=True)
    retry = copy.copy(args)
    retry.attention = "xla"
    result = measure(retry)
    result["attention_fallback"] = first_line
    return result
