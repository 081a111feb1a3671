"""A run directory belongs to one configuration: the guard that runs before anything is written.

``config.json`` in the run directory describes the run its checkpoints and ``metrics.jsonl``
belong to. A rerun into the same directory (a resume) is compared with it field by field:

* fields in :data:`RESUMABLE` may change across a resume (more steps, other evaluation and
  checkpoint intervals, another mesh, ...): the change is allowed, ``config.json`` is updated
  and the resume is appended to ``resumes.jsonl`` with the changed fields;
* every other field changes the optimizer state or what the run means (model, optimizer and
  its hyperparameters, precision, quantization, batch, data, seed): the rerun is refused with
  one line naming the differing fields, and nothing in the directory is touched.

A field not listed in :data:`RESUMABLE` (including fields added later) counts as changing the
run; list a new field there only if a resumed run stays the same run when it changes.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from experiments import config

# TrainConfig fields that may differ between a run and its resumption.
RESUMABLE = frozenset({
    "num_training_steps",  # extend (or shorten) the run; the schedule follows the new length
    "eval_every", "save_every", "keep_checkpoints", "stop_after",
    "progress", "peak_tflops",  # reporting only
    "gc_every",  # when Python collects its garbage, between steps
    # layout / memory, same numbers (the number of processes must stay the same: each one's
    # loader position is saved apart, and a checkpoint restores only into as many)
    "mesh", "distributed", "activation_checkpointing", "remat_policy",
    # the same attention, residual add + RMSNorm, RoPE split and SwiGLU by another kernel
    "attention", "norm", "elementwise",
    "resume", "name", "save_dir",  # where the run lives, not what it is
    "inject_nan_at_step", "inject_signal",  # debugging
})


def log_dir_of(cfg: config.TrainConfig) -> str:
  """Where ``config.json`` and the metrics live: ``--save_dir``, or ``runs/<name>`` for a
  bucket (checkpoints go to the bucket, the small files stay local)."""
  return f"runs/{cfg.name}" if "://" in cfg.save_dir else cfg.save_dir


def _as_saved(cfg: config.TrainConfig) -> dict:
  return json.loads(cfg.to_json())


def changed_fields(saved: dict, cfg: config.TrainConfig) -> dict[str, list]:
  """``{field: [saved value, new value]}`` for every field that differs.

  A field missing from the saved file (a newer version added it) is compared with its default.
  """
  new = _as_saved(cfg)
  default = _as_saved(config.TrainConfig())
  return {k: [saved.get(k, default.get(k)), v] for k, v in new.items()
          if saved.get(k, default.get(k)) != v}


def holds_checkpoints(save_dir: str) -> bool:
  """Whether ``<save_dir>/checkpoints`` holds a finished checkpoint (orbax names each one by
  its step; unfinished ones carry a temporary suffix). A bucket counts as holding one."""
  if "://" in save_dir:
    return True
  directory = os.path.join(save_dir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def check(cfg: config.TrainConfig) -> dict[str, list] | None:
  """Refuses (one line, nothing written) a rerun that would change the run in its directory.

  Returns the allowed changes for a directory that already holds a run, None for a new one
  (also for a directory whose earlier attempt never wrote a checkpoint: nothing to protect).
  """
  for path, flag in ((cfg.save_dir, "--save_dir"), (log_dir_of(cfg), "run directory")):
    if "://" not in path and os.path.exists(path) and not os.path.isdir(path):
      config.fail(f"{flag} {path} is an existing file, not a directory")
  saved_path = os.path.join(log_dir_of(cfg), "config.json")
  if not os.path.exists(saved_path):
    return None
  try:
    with open(saved_path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    config.fail(f"{saved_path} is unreadable ({e}); pick another --save_dir")
  changes = changed_fields(saved, cfg)
  refused = sorted(k for k in changes if k not in RESUMABLE)
  if refused and not holds_checkpoints(cfg.save_dir):
    return None  # an attempt that never saved (a crash, Ctrl-C while compiling): start anew
  if refused:
    shown = ", ".join(f"--{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
    config.fail(f"{log_dir_of(cfg)} holds a run with other settings ({shown}); "
                "rerun with its settings to resume, or pick another --save_dir")
  return changes


def write_atomically(path: str, text: str) -> None:
  """Writes ``path`` through a temporary file and ``os.replace``: never half written."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp.")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def record(cfg: config.TrainConfig, changes: dict[str, list] | None, start_step: int | None
           ) -> None:
  """Writes ``config.json`` and, for a rerun, appends it to ``resumes.jsonl`` (process 0)."""
  log_dir = log_dir_of(cfg)
  os.makedirs(log_dir, exist_ok=True)
  write_atomically(os.path.join(log_dir, "config.json"), cfg.to_json())
  if changes is not None:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "step": start_step or 0, "changed": changes}
    with open(os.path.join(log_dir, "resumes.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(entry) + "\n")
