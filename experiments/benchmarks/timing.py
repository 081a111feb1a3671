"""Step times two ways: waiting for each step, and with one step in flight as the trainer runs.

``synced_times`` waits for every call before the next is dispatched, so each time holds the
host's work of launching the call (argument handling, XLA's executable launch: on a GPU the
update and launch of the CUDA graph) plus the device's. A training loop does not wait:
``experiments.pretrain`` dispatches step n, then fetches step n-1's metrics, so the host
prepares step n while the device still runs step n-1. ``in_flight_s`` times calls the same
way; when the host's share of a call is shorter than the device's, it is the device's time.
``back_to_back_s`` does the same for a chain of donated calls, waiting only for the last.
On an H100, the 60M trainer step took 18.3 ms waited for, of which the device computed
13.7 ms: the host's launch of a step of 700 kernels and 234 donated buffers is the rest.
"""
from __future__ import annotations

import time
from typing import Callable

import jax


def synced_times(call: Callable[[], object], n: int) -> list[float]:
  """Seconds of each of ``n`` calls of ``call()``, each waited for before the next."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  return times


def in_flight_s(call: Callable[[], object], n: int) -> float:
  """Seconds per call of ``n`` calls with one in flight: ``call()`` dispatches call i, then
  call i-1's result is waited for (the trainer's fetch of step i-1's metrics).

  One more call runs first, untimed: the clock starts when it completes, with the next one
  already dispatched, and stops when the n-th timed call completes. So the n intervals are
  those of a loop already running, without the host's launch of the very first call.
  """
  return sum(in_flight_times(call, n)) / n


def in_flight_times(call: Callable[[], object], n: int) -> list[float]:
  """The ``n`` intervals of ``in_flight_s`` (seconds), each from one timed call's completion
  to the next's: a mean that hides one slow step among fast ones shows here as its maximum.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  previous = call()
  result = call()
  jax.block_until_ready(previous)
  times, t0 = [], time.perf_counter()
  previous = result
  for _ in range(n - 1):
    result = call()
    jax.block_until_ready(previous)
    t1 = time.perf_counter()
    times.append(t1 - t0)
    t0 = t1
    previous = result
  jax.block_until_ready(previous)
  times.append(time.perf_counter() - t0)
  return times


def back_to_back_s(call: Callable[[], object], n: int) -> float:
  """Seconds per call of ``n`` calls dispatched back to back, only the last waited for: for
  a chain whose calls donate their outputs to the next (an optimizer update without
  metrics), where an earlier result can no longer be waited for. The host runs ahead by
  as many calls as jax queues; the device runs them in order."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  t0 = time.perf_counter()
  result = None
  for _ in range(n):
    result = call()
  jax.block_until_ready(result)
  return (time.perf_counter() - t0) / n
