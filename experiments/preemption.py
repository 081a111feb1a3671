"""Stopping on SIGINT / SIGTERM without losing work: finish the step, save it, exit.

Cloud TPU and spot GPU VMs send SIGTERM shortly before they go away; Ctrl-C sends SIGINT.
The first signal only sets a flag: the loop finishes the step in flight, writes a checkpoint
of it and exits with status 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
A second signal exits at once; orbax writes a checkpoint into a temporary directory and
renames it only when complete, so the last complete checkpoint stays the latest.

With several processes all hosts must save the same step. As MaxText does (through orbax's
``CheckpointManager.reached_preemption``), the loop asks
``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` every step: JAX's
preemption service catches SIGTERM on any host, agrees on a step with the others and answers
True on every host at that step. There the Python handler leaves SIGTERM to JAX and turns
SIGINT into a SIGTERM for it. With one process that call answers False and the handler's flag
decides: the same ``reached`` call either way.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
  """The run stopped on a signal; the exit status is 128 + the signal number."""

  def __init__(self, signum: int):
    super().__init__(128 + signum)
    self.signum = signum


class Preemption:
  """Signal handlers for the run, as a context manager (restores the previous handlers).

  Before :meth:`arm` (set-up, compilation) there is nothing to save: a signal stops at once.
  """

  def __init__(self):
    self.signum: int | None = None
    self.armed = False
    self._previous = {}

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only
    multi = jax.process_count() > 1  # after jax.distributed.initialize
    for s in SIGNALS:
      if multi and s == signal.SIGTERM:
        continue  # JAX's preemption service handles it
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  def arm(self) -> None:
    """From now on a (first) signal stops the loop after the step in flight, with a save."""
    self.armed = True

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if not self.armed:  # nothing trained yet: nothing to save
      os.write(2, f"\n{name} before training started: stopping, nothing to save\n".encode())
      raise Interrupted(signum)
    if self.signum is not None:
      os.write(2, f"\n{name} again: exiting now; the last complete checkpoint is kept\n".encode())
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = signum
    if jax.process_count() > 1:  # let every host agree on the step through JAX's service
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """True (on every host at the same step) once the run must save and stop."""
    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    return jax.process_count() == 1 and self.signum is not None
