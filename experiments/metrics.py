"""Per-step metrics: one JSON line per step in ``metrics.jsonl``, TensorBoard when available.

Fetching a step's scalars from the device waits for that step. The loop therefore hands the
writer step t's (still on-device) metrics right after dispatching step t+1, and the writer
fetches them while t+1 computes: the device never idles waiting for the host, and every step
is still logged. Throughput is measured between consecutive fetches.

The host must also keep up: its work per step (dispatch, this fetch, the records) has to
stay under the device's step. Many scalars of one kind, such as the clipped-entry count of
every parameter leaf, travel as one :class:`PackedScalars` vector (one transfer, and no
output buffer per scalar in the compiled step); their names come back on the host, in
``metrics.jsonl``. TensorBoard, at tens of microseconds a scalar, gets the unpacked ones only.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per chip, TFLOP/s, for MFU (device_kind prefixes as JAX reports them).
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0,
}


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for prefix, tflops in PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return tflops * 1e12
  return None  # CPUs and unknown chips: mfu is logged as null


@jax.tree_util.register_pytree_node_class
class PackedScalars:
  """Named int32 scalars as one vector: a pytree whose only leaf is the vector and whose
  names are static, so it can leave a jitted step and be fetched in one transfer."""

  def __init__(self, values, names: tuple[str, ...]):
    self.values, self.names = values, tuple(names)

  @classmethod
  def pack(cls, scalars: dict) -> "PackedScalars":
    names = tuple(scalars)
    values = jnp.stack([jnp.asarray(scalars[n], jnp.int32) for n in names]) if names else (
        jnp.zeros([0], jnp.int32))
    return cls(values, names)

  def tree_flatten(self):
    return (self.values,), self.names

  @classmethod
  def tree_unflatten(cls, names, children):
    return cls(children[0], names)

  def as_dict(self) -> dict:
    """``{name: int}`` of fetched values."""
    return dict(zip(self.names, np.asarray(self.values).tolist()))


def _scalar(x):
  v = np.asarray(x).item()
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else v  # JSON has no NaN; inf survives as a large float
  return v


class MetricsWriter:
  """Appends per-step records to ``metrics.jsonl`` (and TensorBoard if importable)."""

  def __init__(self, save_dir: str, *, tokens_per_step: int, flops_per_step: float,
               peak_flops: float | None, enabled: bool = True):
    self.tokens_per_step, self.flops_per_step = tokens_per_step, flops_per_step
    self.peak_flops = peak_flops
    self.enabled = enabled
    self.path = os.path.join(save_dir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8") if enabled else None  # pylint: disable=consider-using-with
    self._tb = self._open_tensorboard(save_dir) if enabled else None
    self._pending = None
    self._held = None
    self._last_time = None
    self._packed_names = set()  # metrics.jsonl only (see PackedScalars)

  @staticmethod
  def _open_tensorboard(save_dir):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      try:
        from torch.utils.tensorboard import SummaryWriter  # pylint: disable=import-outside-toplevel
      except ImportError:
        return None
    return SummaryWriter(os.path.join(save_dir, "tensorboard"))

  def push(self, step: int, device_metrics: dict) -> dict | None:
    """Queues step ``step``; writes and returns the previously queued step's record."""
    previous = self.flush()
    self._pending = (step, device_metrics)
    return previous

  def flush(self, hold: bool = False) -> dict | None:
    """Fetches the queued step (waiting for it) and returns its record.

    The record is written now, or with ``hold`` kept back so that :meth:`annotate` can add
    fields (evaluation results) to it first; the next call writes it.
    """
    self._release()
    if self._pending is None:
      return None
    step, device_metrics = self._pending
    self._pending = None
    values = jax.device_get(device_metrics)
    now = time.perf_counter()
    dt = None if self._last_time is None else now - self._last_time
    self._last_time = now
    record = {"step": step}
    packed = {}
    for k, v in values.items():
      if isinstance(v, PackedScalars):
        packed.update(v.as_dict())
      else:
        record[k] = _scalar(v)
    record.update(packed)
    self._packed_names.update(packed)
    record["tokens_per_s"] = self.tokens_per_step / dt if dt else None
    record["mfu"] = (self.flops_per_step / dt / self.peak_flops
                     if dt and self.peak_flops else None)
    if hold:
      self._held = record
    else:
      self.write(record)
    return record

  def annotate(self, fields: dict) -> None:
    """Adds fields to the held record (or writes them as their own line)."""
    if self._held is not None:
      self._held.update(fields)
    else:
      self.write(fields)

  def _release(self) -> None:
    if self._held is not None:
      record, self._held = self._held, None
      self.write(record)

  def reset_clock(self) -> None:
    """Restarts the throughput clock, so a pause (evaluation, a checkpoint) is not counted."""
    self._last_time = time.perf_counter()

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after ``step`` (all of them for a fresh run), so that a run
    resumed from its last checkpoint does not log the steps it repeats twice."""
    if not self.enabled:
      return
    self._file.close()
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and step > 0 and json.loads(line)["step"] <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(kept)
    self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and k not in self._packed_names and isinstance(v, (int, float)):
          self._tb.add_scalar(k, v, record["step"])

  def close(self) -> None:
    self.flush()
    self._release()
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
