"""Python's garbage collection during the training loop: on a schedule, not mid-step.

CPython's cyclic collector runs when enough objects have been allocated, and a full (oldest
generation) pass walks every tracked object of the process: the model's and the optimizer's
pytrees, jax's traced and compiled functions, the data pipeline. In a jax training process
that pass can take a few hundred milliseconds, and it lands on whichever step happens to
allocate past the threshold: that step's dispatch waits, the device drains its queue and
the step time spikes (reported for jax training loops in patrick-kidger/equinox#1145). The
loop allocates little that is cyclic; reference counting frees the rest.

:func:`scheduled` is what large training codebases do about it: one full collection, then
``gc.freeze()`` (everything alive before the loop, which lives as long as the run, is never
walked again), automatic collection off, and a collection every ``every`` steps at a step
boundary, walking only what the loop allocated since the freeze: milliseconds. ``every=0``
leaves Python's automatic collection as it is.
"""
from __future__ import annotations

import contextlib
import gc
import time
from typing import Callable, Iterator


@contextlib.contextmanager
def scheduled(every: int) -> Iterator[Callable[[int], float]]:
  """Within the block, collect only when the yielded ``collect(step)`` is called at a step
  whose number ``every`` divides (``every`` ≥ 1); it returns the seconds the collection
  took (0.0 when none was due). ``every == 0``: automatic collection as before, and
  ``collect`` never collects. The collector's state (enabled or not, frozen objects) is
  restored on exit, also on an exception."""
  if every < 0:
    raise ValueError(f"every must be >= 0 (0: Python's automatic collection), got {every}")
  if every == 0:
    yield lambda step: 0.0
    return
  was_enabled = gc.isenabled()
  gc.collect()  # garbage left by setup and compilation is freed, not frozen
  gc.freeze()
  gc.disable()

  def collect(step: int) -> float:
    if step % every:
      return 0.0
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0

  try:
    yield collect
  finally:
    gc.unfreeze()
    if was_enabled:
      gc.enable()


class Pauses:
  """The collector's passes while the block runs (``gc.callbacks``): for each, its
  generation, its duration in seconds and ``step_of()`` when it started (the caller's step
  or call count; None without it). A summary says how many passes of each generation, their
  total and the longest."""

  def __init__(self, step_of: Callable[[], int] | None = None):
    self._step_of = step_of
    self.passes: list[dict] = []
    self._start: tuple[float, int | None] | None = None

  def _callback(self, phase: str, info: dict) -> None:
    if phase == "start":
      self._start = (time.perf_counter(), self._step_of() if self._step_of else None)
    elif self._start is not None:
      t0, step = self._start
      self.passes.append({"generation": info["generation"], "step": step,
                          "s": round(time.perf_counter() - t0, 6)})
      self._start = None

  def __enter__(self) -> "Pauses":
    gc.callbacks.append(self._callback)
    return self

  def __exit__(self, *exc) -> None:
    gc.callbacks.remove(self._callback)

  def summary(self) -> dict:
    by_generation = {str(g): sum(p["generation"] == g for p in self.passes) for g in (0, 1, 2)}
    longest = max(self.passes, key=lambda p: p["s"], default=None)
    return {"passes": by_generation, "total_s": round(sum(p["s"] for p in self.passes), 6),
            "longest": longest}


def full_collection_s() -> float:
  """Seconds of one full collection now: the pause automatic collection would take at its
  next oldest-generation pass (what ``scheduled`` keeps out of the steps)."""
  t0 = time.perf_counter()
  gc.collect()
  return time.perf_counter() - t0
