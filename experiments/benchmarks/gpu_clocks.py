"""The GPU's clocks, power and slowdown reasons while timed work runs, sampled by ``nvidia-smi``.

A step timed on the host can take longer than the same step in a short profile when the GPU
lowers its clocks under a long, power-hungry load (its power cap, or heat). ``sampling()``
queries ``nvidia-smi --query-gpu=...`` every N ms beside the timed work and ``summary`` says what
the GPU ran at meanwhile: the SM and memory clocks (median, least, most), the power drawn and
the temperature, and which of NVML's clock-event reasons were active in what share of the
samples (``software power cap``, ``hardware slowdown``, ``software thermal slowdown``...).
Two timings of the same step at different SM clocks are not comparable as they stand.

  with gpu_clocks.sampling() as clocks:
    times = timing.in_flight_times(run_once, 20)
  result["gpu_clocks"] = clocks.summary()   # {} where there is no nvidia-smi

Without ``nvidia-smi`` (a CPU, or a GPU machine without NVIDIA's tools) nothing runs and the
summary is ``{"error": "..."}``; a sampler never makes the timed work fail. The GPU sampled is
the first of ``CUDA_VISIBLE_DEVICES`` when it is a number, else GPU 0: a one-GPU benchmark's.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import threading
import time

# NVML's clock-event reasons (``nvidia-smi -q -d PERFORMANCE``), by bit of the active mask.
REASONS = {
    0x1: "idle",
    0x2: "applications clocks setting",
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x10: "sync boost",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake slowdown",
    0x100: "display clock setting",
}
VALUES = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")
# The active reasons' field: its current name, then the name drivers before 535 know.
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")


def reasons(mask: int) -> list[str]:
  """The names of the reasons set in ``mask`` (unknown bits as ``0x...``)."""
  names = [name for bit, name in REASONS.items() if mask & bit]
  rest = mask & ~sum(REASONS)
  return names + ([hex(rest)] if rest else [])


def _number(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:  # "[N/A]", "[Not Supported]"
    return None


def parse(lines: list[str]) -> list[dict]:
  """Samples from ``nvidia-smi --format=csv,noheader,nounits`` lines of ``VALUES`` and the
  reasons' mask; lines that are not such a sample (a header, a cut-off last line) are left out.
  """
  samples = []
  for line in lines:
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != len(VALUES) + 1:
      continue
    values = [_number(c) for c in cells[:-1]]
    try:
      mask = int(cells[-1], 16)
    except ValueError:
      mask = None
    if all(v is None for v in values) and mask is None:
      continue
    samples.append(dict(zip(("sm_mhz", "mem_mhz", "power_w", "temperature_c"), values),
                        reasons=mask))
  return samples


def summarize(samples: list[dict]) -> dict:
  """Median, least and most SM clock; median memory clock; median and most power; most
  temperature; each active reason's share of the samples."""
  if not samples:
    return {"error": "no samples"}
  out = {"samples": len(samples)}
  column = lambda key: [s[key] for s in samples if s.get(key) is not None]
  sm = column("sm_mhz")
  if sm:
    out.update(sm_mhz_median=statistics.median(sm), sm_mhz_min=min(sm), sm_mhz_max=max(sm))
  for key, stats in (("mem_mhz", ("median",)), ("power_w", ("median", "max")),
                     ("temperature_c", ("max",))):
    values = column(key)
    for stat in stats if values else ():
      out[f"{key}_{stat}"] = statistics.median(values) if stat == "median" else max(values)
  masks = column("reasons")
  if masks:
    counts = {}
    for mask in masks:
      for name in reasons(mask):
        counts[name] = counts.get(name, 0) + 1
    out["reasons"] = {name: round(n / len(masks), 3) for name, n in sorted(counts.items())}
  return out


def gpu_index() -> str:
  first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
  return first if first.isdigit() else "0"


def _query(executable: str, field: str) -> list[str]:
  return [executable, f"--id={gpu_index()}",
          "--query-gpu=" + ",".join(VALUES + (field,)), "--format=csv,noheader,nounits"]


_FIELDS: dict = {}  # nvidia-smi's path → the reasons' field it answers


class Sampler:
  """``nvidia-smi`` queried every ``interval_ms`` (after the previous answer) from ``start()``
  to ``stop()``, by a thread of this process. Each query is its own ``nvidia-smi`` call that
  exits after answering: a looping one (``--loop-ms``) writes to a file through a buffer
  that stopping it may lose."""

  def __init__(self, interval_ms: int = 50, executable: str = "nvidia-smi"):
    if interval_ms < 1:
      raise ValueError(f"interval_ms must be >= 1, got {interval_ms}")
    self.interval_ms = interval_ms
    self.executable = executable
    self._thread = None
    self._stop = threading.Event()
    self._samples: list[dict] = []
    self._error = None
    self._t0 = self._wall_s = None

  def _field(self, path: str) -> str | None:
    """The reasons' field this nvidia-smi answers with a sample, by a one-shot query (once
    per executable)."""
    if path in _FIELDS:
      return _FIELDS[path]
    for field in REASON_FIELDS:
      try:
        done = subprocess.run(_query(path, field), capture_output=True, text=True, timeout=10)
      except (OSError, subprocess.SubprocessError) as e:
        self._error = f"{self.executable}: {type(e).__name__}: {e}"
        return None
      if done.returncode == 0 and parse(done.stdout.splitlines()):
        _FIELDS[path] = field
        return field
      last = (done.stdout + done.stderr).strip().splitlines()[-1:]
      self._error = f"{self.executable} --query-gpu={field} answered {done.returncode}: " + (
          last[0][:200] if last else "nothing")
    return None

  def _sample(self, query: list) -> None:
    while not self._stop.is_set():
      try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=5)
        self._samples.extend(parse(done.stdout.splitlines()))
      except (OSError, subprocess.SubprocessError):
        pass  # a missed sample; the next query tries again
      self._stop.wait(self.interval_ms / 1e3)

  def start(self) -> "Sampler":
    path = shutil.which(self.executable)
    if path is None:
      self._error = f"{self.executable} not found"
      return self
    field = self._field(path)
    if field is None:
      return self
    self._error = None
    self._t0 = time.perf_counter()
    self._thread = threading.Thread(target=self._sample, args=(_query(path, field),),
                                    daemon=True)
    self._thread.start()
    return self

  def stop(self) -> "Sampler":
    if self._thread is None:
      return self
    self._stop.set()
    self._thread.join()
    self._thread = None
    self._wall_s = time.perf_counter() - self._t0
    return self

  def summary(self) -> dict:
    """``summarize`` of the samples with the sampled seconds, or ``{"error": ...}``."""
    if self._error:
      return {"error": self._error}
    out = summarize(self._samples)
    if self._wall_s is not None and "error" not in out:
      out["seconds"] = round(self._wall_s, 3)
    return out


@contextlib.contextmanager
def sampling(interval_ms: int = 50, executable: str = "nvidia-smi"):
  """A started ``Sampler``, stopped when the block ends (also when it raises)."""
  sampler = Sampler(interval_ms, executable).start()
  try:
    yield sampler
  finally:
    sampler.stop()


def one_line(summary: dict) -> str:
  """``SM 1755 MHz (1650–1980), 612 W, 61 °C, software power cap 80%`` or the error."""
  if not summary or summary.get("error"):
    return f"clocks: {summary.get('error', 'not sampled') if summary else 'not sampled'}"
  parts = []
  if "sm_mhz_median" in summary:
    parts.append(f"SM {summary['sm_mhz_median']:.0f} MHz ({summary['sm_mhz_min']:.0f}–"
                 f"{summary['sm_mhz_max']:.0f})")
  if "power_w_median" in summary:
    parts.append(f"{summary['power_w_median']:.0f} W")
  if "temperature_c_max" in summary:
    parts.append(f"{summary['temperature_c_max']:.0f} °C")
  parts += [f"{name} {100 * share:.0f}%" for name, share in summary.get("reasons", {}).items()
            if name != "idle"]
  return "clocks: " + ", ".join(parts)
