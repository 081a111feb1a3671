"""``summary.json``: one run in one small file, recomputed from ``metrics.jsonl``.

The trainer rewrites it at every evaluation and at the end; ``experiments.sweep`` reads it to
skip finished runs and collects it into its tables. Everything except the wall-clock time is
computed from ``metrics.jsonl`` (which a resumed run truncates to its checkpoint and extends),
so the summary of a resumed run is the summary of the whole run. The file is replaced
atomically (written to a temporary file, then ``os.replace``), so a reader never sees half.

Fields: ``finished`` (the run reached ``--num_training_steps``, or stopped on a non-finite
loss), ``diverged`` (a non-finite loss or gradient norm, or a final validation loss above the
initial one), ``error``, ``steps``, ``tokens``, ``initial_/final_/best_eval_loss`` and
``..._perplexity``, ``loss_spikes``, ``grad_norm_spikes`` (see :mod:`experiments.spikes`),
``max_grad_norm``, ``skipped_steps`` (``--optimizer skip_step``), ``wall_s`` (wall-clock
seconds of all sessions of the run, compilation and evaluation included), ``train_s`` and
``tokens_per_s`` (the timed training steps only), and ``config``.
"""
from __future__ import annotations

import json
import math
import os
import time

from experiments import plot, rundir, spikes

FILENAME = "summary.json"


def load_records(log_dir: str, extra=()) -> list[dict]:
  """``metrics.jsonl`` merged by step (a resumed run rewrites steps), plus ``extra`` records."""
  path = os.path.join(log_dir, "metrics.jsonl")
  records = plot.load_metrics(path) if os.path.exists(path) else []
  by_step = {r["step"]: r for r in records}
  for r in extra:
    if r is not None:
      by_step[r["step"]] = {**by_step.get(r["step"], {}), **r}
  return [by_step[s] for s in sorted(by_step)]


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def _ppl(loss):
  return math.exp(min(loss, 700.0)) if _finite(loss) else None


def compute(records: list[dict], config: dict, *, wall_s: float | None = None,
            finished: bool = False, error: str | None = None, diverged: bool = False) -> dict:
  """The summary of a run from its merged per-step records and its config (a dict)."""
  train = [r for r in records if r["step"] > 0 and "loss" in r]
  losses = [r["loss"] for r in train]
  norms = [r.get("grad_norm") for r in train]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  initial = next((v for s, v in evals if s == 0), None)
  final = evals[-1][1] if evals else None
  finite_evals = [v for _, v in evals if _finite(v)]
  best = min(finite_evals) if finite_evals else None
  non_finite = any(not _finite(v) for v in losses + norms) or (
      final is not None and not _finite(final))
  diverged = diverged or non_finite or (_finite(final) and _finite(initial) and final > initial)
  steps = train[-1]["step"] if train else 0
  tokens_per_step = (config.get("total_batch_size") or config.get("batch_size") or 0) * (
      config.get("max_length") or 0)
  timed = [r["tokens_per_s"] for r in train if _finite(r.get("tokens_per_s"))
           and r["tokens_per_s"] > 0]
  train_s = sum(tokens_per_step / v for v in timed) if timed else None
  finite_norms = [v for v in norms if _finite(v)]
  return {
      "name": config.get("name"),
      "finished": bool(finished or (diverged and error is not None)),
      "diverged": bool(diverged),
      "error": error,
      "steps": steps,
      "num_training_steps": config.get("num_training_steps"),
      "tokens": steps * tokens_per_step,
      "initial_eval_loss": initial,
      "final_eval_loss": final,
      "final_eval_perplexity": _ppl(final),
      "best_eval_loss": best,
      "best_eval_perplexity": _ppl(best),
      "loss_spikes": spikes.count_spikes(losses, factor=spikes.LOSS_FACTOR),
      "grad_norm_spikes": spikes.count_spikes(norms, factor=spikes.GRAD_NORM_FACTOR),
      "max_grad_norm": max(finite_norms) if finite_norms else None,
      "skipped_steps": (train[-1].get("skip/skipped_total") if train else None),
      "wall_s": wall_s,
      "train_s": train_s,
      "tokens_per_s": len(timed) * tokens_per_step / train_s if train_s else None,
      "config": config,
  }


def read_json(path: str) -> dict | None:
  """A JSON file's content, or None if it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read(log_dir: str) -> dict | None:
  """The run's ``summary.json``, or None."""
  return read_json(os.path.join(log_dir, FILENAME))


def write(log_dir: str, summary: dict) -> str:
  """Writes ``summary.json`` atomically; returns its path."""
  path = os.path.join(log_dir, FILENAME)
  rundir.write_atomically(path, json.dumps(summary, indent=1, allow_nan=True))
  return path


class RunSummary:
  """The trainer's handle: ``update()`` at every evaluation and at the end.

  ``wall_s`` adds this session's elapsed time to the time of the sessions before it (read
  from the existing ``summary.json`` when the run resumes from a checkpoint).
  """

  def __init__(self, log_dir: str, config: dict, *, start_step: int, enabled: bool = True):
    self.log_dir, self.config, self.enabled = log_dir, config, enabled
    previous = read(log_dir) if start_step > 0 and enabled else None
    self.wall_before = (previous or {}).get("wall_s") or 0.0
    self.t0 = time.monotonic()

  def update(self, *, latest=None, finished: bool = False, error: str | None = None,
             diverged: bool = False) -> dict | None:
    """``latest``: the newest record if ``metrics.jsonl`` does not hold it yet."""
    if not self.enabled:
      return None
    s = compute(load_records(self.log_dir, [latest]), self.config,
                wall_s=self.wall_before + time.monotonic() - self.t0, finished=finished,
                error=error, diverged=diverged)
    write(self.log_dir, s)
    return s
