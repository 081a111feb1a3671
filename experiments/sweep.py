"""Sweeps: ``python -m experiments.sweep PRESET [--dry_run] [--jobs N] [--out DIR]``.

Expands a preset of :mod:`experiments.presets` into trainer runs
(``python -m experiments.pretrain ...``), one run directory each under ``runs/<preset>/``,
and runs them as subprocesses, N at a time. A run whose ``summary.json`` says it finished is
skipped; an interrupted one is started again with the same flags and resumes from its
checkpoint (the trainer does that by itself). A run that fails or diverges is recorded with
the last line of its stderr and the sweep goes on. ``--dry_run`` prints one trainer command
per line instead (to launch elsewhere, one per machine). At the end the summaries go into
``results.md``, ``results.csv`` and ``results.png`` in the sweep directory.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from experiments import plot, presets, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOOTH = 10  # steps in the moving average of the plotted training loss
LOCK = ".sweep.lock"


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  group: str
  optimizer: str
  lr: float
  precision: str
  seed: int
  extra: str
  flags: tuple[str, ...]  # trainer flags, without --save_dir / --name
  paper: float | None


def expand(preset: presets.Preset) -> list[Run]:
  """Every run of ``preset``, in grid order; names are unique within the preset."""
  runs = []
  for grid in preset.grids:
    for opt in grid.optimizers:
      for prec in grid.precisions:
        for lr in opt.lrs or grid.lrs:
          for seed in grid.seeds:
            for extra in grid.extras:
              parts = [grid.group, opt.label, prec.label, f"lr{lr:g}", f"s{seed}", extra.label]
              name = "-".join(p for p in parts if p).replace("+", "_")
              flags = (*grid.base, *opt.flags, *prec.flags, "--lr", f"{lr:g}", "--seed",
                       str(seed), *extra.flags)
              runs.append(Run(name, grid.group, opt.label, lr, prec.label, seed, extra.label,
                              flags, preset.paper.get((grid.group, opt.label, prec.label,
                                                       extra.label))))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"preset {preset.name}: duplicate run names")
  return runs


def trainer_args(run: Run, out: str) -> list[str]:
  return [*run.flags, "--name", run.name, "--save_dir", os.path.join(out, run.name),
          "--no-progress"]


def command(run: Run, out: str, python: str = "python") -> list[str]:
  return [python, "-m", "experiments.pretrain", *trainer_args(run, out)]


def _last_line(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    return None
  return lines[-1] if lines else None


def _lock(run_dir: str) -> bool:
  """Claims ``run_dir`` for this process (``.sweep.lock`` holds its pid); False if another
  live process holds it, so two sweeps of one preset never train the same run at once."""
  path = os.path.join(run_dir, LOCK)
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    try:
      with open(path, encoding="utf-8") as f:
        pid = int(f.read().strip() or 0)
      os.kill(pid, 0)
      return False  # held by a live process
    except (OSError, ValueError):  # stale: its process is gone
      os.remove(path)
      return _lock(run_dir)
  with os.fdopen(fd, "w") as f:
    f.write(str(os.getpid()))
  return True


def execute(run: Run, out: str, log=print) -> dict:
  """Runs one trainer subprocess (unless finished); returns the run's summary."""
  run_dir = os.path.join(out, run.name)
  done = summary.read(run_dir)
  if done and done.get("finished"):
    log(f"skip     {run.name} (finished)")
    return done
  os.makedirs(run_dir, exist_ok=True)
  if not _lock(run_dir):
    log(f"skip     {run.name} (another sweep is running it)")
    return done or {}
  try:
    done = summary.read(run_dir)  # it may have finished while we looked
    if done and done.get("finished"):
      log(f"skip     {run.name} (finished)")
      return done
    return _train(run, out, run_dir, log)
  finally:
    os.remove(os.path.join(run_dir, LOCK))


def _train(run: Run, out: str, run_dir: str, log) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  log(f"start    {run.name}")
  t0 = time.monotonic()
  with open(os.path.join(run_dir, "stdout.log"), "w", encoding="utf-8") as so, \
       open(os.path.join(run_dir, "stderr.log"), "w", encoding="utf-8") as se:
    rc = subprocess.run(command(run, out, sys.executable), cwd=REPO, env=env, stdout=so,
                        stderr=se, check=False).returncode
  s = summary.read(run_dir)
  if rc != 0:
    error = _last_line(os.path.join(run_dir, "stderr.log")) or f"exit status {rc}"
    if not (s and s.get("error")):  # the trainer records its own non-finite stop
      cfg = summary.read_json(os.path.join(run_dir, "config.json")) or {"name": run.name}
      s = summary.compute(summary.load_records(run_dir), cfg,
                          wall_s=time.monotonic() - t0, error=error)
      summary.write(run_dir, s)
  elif s is None:
    error = "the trainer exited without writing summary.json"
    s = {"finished": False, "diverged": False, "error": error}
  log(f"{_status(s):8s} {run.name}" + (f": {s['error']}" if s.get("error") else ""))
  return s


def _status(s: dict | None) -> str:
  if not s:
    return "pending"
  if s.get("diverged"):
    return "diverged"
  if s.get("error"):
    return "failed"
  return "finished" if s.get("finished") else "partial"


# ---- collection

COLUMNS = (  # (key, header, better: "min" | "max" | None, format)
    ("final_eval_perplexity", "final val ppl", "min", "{:.2f}"),
    ("best_eval_perplexity", "best val ppl", "min", "{:.2f}"),
    ("paper_perplexity", "paper ppl", None, "{:.2f}"),
    ("loss_spikes", "loss spikes", "min", "{:d}"),
    ("grad_norm_spikes", "grad-norm spikes", "min", "{:d}"),
    ("max_grad_norm", "max grad norm", "min", "{:.3g}"),
    ("skipped_steps", "skipped", None, "{:d}"),
    ("steps", "steps", None, "{:d}"),
    ("wall_s", "wall s", None, "{:.0f}"),
    ("tokens_per_s", "tokens/s", "max", "{:,.0f}"),
)


def rows(runs: list[Run], out: str) -> list[dict]:
  """One flat dict per run: its labels, status and summary values."""
  table = []
  for run in runs:
    s = summary.read(os.path.join(out, run.name)) or {}
    row = {"run": run.name, "group": run.group, "optimizer": run.optimizer,
           "precision": run.precision, "lr": run.lr, "seed": run.seed, "extra": run.extra,
           "status": _status(s or None), "paper_perplexity": run.paper}
    for key, *_ in COLUMNS:
      if key != "paper_perplexity":
        row[key] = s.get(key)
    row["error"] = s.get("error")
    table.append(row)
  return table


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _best(table: list[dict]) -> set[tuple[int, str]]:
  """(row index, column) of the best value of each column within each (group, precision)."""
  marks = set()
  blocks = {}
  for i, r in enumerate(table):
    blocks.setdefault((r["group"], r["precision"]), []).append(i)
  for idx in blocks.values():
    for key, _, better, _ in COLUMNS:
      vals = [(table[i][key], i) for i in idx if _finite(table[i][key])
              and table[i]["status"] != "pending"]
      if better and vals:
        target = (min if better == "min" else max)(v for v, _ in vals)
        marks |= {(i, key) for v, i in vals if v == target}
  return marks


def _fmt(v, fmt: str) -> str:
  if v is None:
    return "–"
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  try:
    return fmt.format(v)
  except (ValueError, TypeError):
    return str(v)


def write_markdown(preset: presets.Preset, table: list[dict], path: str) -> None:
  marks = _best(table)
  header = ["run", "optimizer", "precision", "lr"] + [h for _, h, _, _ in COLUMNS] + ["status"]
  scope = "per model size and precision" if any(r["group"] for r in table) else "per precision"
  lines = [f"# {preset.name}", "", preset.description + ".", "",
           f"Best value of each column in **bold** (lowest perplexity, spikes and gradient norm, "
           f"highest throughput), {scope}. Perplexity = exp(validation loss) at the last step."]
  if preset.paper:
    lines.append(f"'paper ppl' is the value reported in {preset.paper_source} for that row.")
  lines.append("")
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, r in enumerate(table):
    cells = [r["run"], r["optimizer"] + (f" ({r['extra']})" if r["extra"] else ""),
             r["precision"], f"{r['lr']:g}"]
    for key, _, _, fmt in COLUMNS:
      cell = _fmt(r[key], fmt)
      cells.append(f"**{cell}**" if (i, key) in marks else cell)
    status = r["status"] + (f": {r['error']}" if r["error"] else "")
    cells.append(status.replace("|", "/"))
    lines.append("| " + " | ".join(cells) + " |")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def write_csv(table: list[dict], path: str) -> None:
  fields = ["run", "group", "optimizer", "precision", "lr", "seed", "extra", "status"] + [
      k for k, *_ in COLUMNS] + ["error"]
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in table:
      w.writerow({k: r.get(k) for k in fields})


def write_plot(table: list[dict], out: str, path: str) -> str:
  """Final validation perplexity against learning rate (one line per optimizer, one panel per
  precision; diverged runs as crosses at the top) and the training loss of each optimizer's
  best run."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel,unused-import

  precisions = list(dict.fromkeys(r["precision"] for r in table))
  fig, axes = plt.subplots(2, len(precisions), figsize=(6 * len(precisions), 8.5),
                           squeeze=False, constrained_layout=True)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  lines = list(dict.fromkeys((r["group"], r["optimizer"], r["extra"]) for r in table))
  style = {k: colors[i % len(colors)] for i, k in enumerate(lines)}
  good = [r["final_eval_perplexity"] for r in table if _finite(r["final_eval_perplexity"])]
  top = max(good) * 1.5 if good else 10.0
  for col, prec in enumerate(precisions):
    ax_lr, ax_loss = axes[0, col], axes[1, col]
    plotted = False
    for key in lines:
      sel = sorted((r for r in table if (r["group"], r["optimizer"], r["extra"]) == key
                    and r["precision"] == prec), key=lambda r: r["lr"])
      if not sel:
        continue
      label = " ".join(k for k in key if k)
      c = style[key]
      pts = [(r["lr"], r["final_eval_perplexity"]) for r in sel
             if _finite(r["final_eval_perplexity"]) and r["status"] != "pending"]
      if pts:
        ax_lr.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=c, label=label)
      bad = [r["lr"] for r in sel if r["status"] == "diverged"
             and not _finite(r["final_eval_perplexity"])]
      ax_lr.plot(bad, [top] * len(bad), "x", color=c, ms=9, mew=2)
      plotted = plotted or bool(pts or bad)
      done = [r for r in sel if _finite(r["final_eval_perplexity"])]
      if done:
        best = min(done, key=lambda r: r["final_eval_perplexity"])
        try:
          records = plot.load_metrics(os.path.join(out, best["run"]))
        except SystemExit:
          continue
        x, y = plot._series(records, "loss")  # pylint: disable=protected-access
        n = min(SMOOTH, len(y))
        if n > 1:  # trailing moving average; the first n-1 steps are dropped
          x, y = x[n - 1:], np.convolve(y, np.ones(n) / n, mode="valid")
        ax_loss.plot(x, y, color=c, lw=0.9, label=f"{label} (lr {best['lr']:g})")
    ax_lr.set(title=f"{prec}: final validation perplexity (x: non-finite)",
              xlabel="peak learning rate", ylabel="perplexity")
    if plotted:
      ax_lr.set(xscale="log", yscale="log")
      ax_lr.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax_lr.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax_loss.set(title=f"{prec}: training loss of each optimizer's best run\n"
                f"({SMOOTH}-step moving average)", xlabel="step",
                ylabel="loss")
    for ax in (ax_lr, ax_loss):
      ax.grid(alpha=0.3, which="both")
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def collect(preset: presets.Preset, runs: list[Run], out: str) -> list[dict]:
  table = rows(runs, out)
  write_markdown(preset, table, os.path.join(out, "results.md"))
  write_csv(table, os.path.join(out, "results.csv"))
  write_plot(table, out, os.path.join(out, "results.png"))
  return table


def main(argv=None) -> list[dict] | None:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("preset", help=f"one of {', '.join(presets.PRESETS)}")
  p.add_argument("--dry_run", action="store_true", help="print the trainer commands only")
  p.add_argument("--jobs", type=int, default=1, help="runs at once on this host")
  p.add_argument("--out", default=None, help="sweep directory (default: runs/<preset>)")
  args = p.parse_args(argv)
  if args.preset not in presets.PRESETS:
    raise SystemExit(f"error: unknown preset {args.preset!r}; choose one of "
                     f"{', '.join(presets.PRESETS)}")
  if args.jobs < 1:
    raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
  preset = presets.PRESETS[args.preset]
  out = args.out or os.path.join("runs", preset.name)
  if args.dry_run:
    for run in expand(preset):
      print(shlex.join(command(run, out)))
    return None
  return run_sweep(preset, out, jobs=args.jobs)


def run_sweep(preset: presets.Preset, out: str, *, jobs: int = 1) -> list[dict]:
  """Runs (or skips) every run of ``preset`` under ``out``, then collects the results."""
  runs = expand(preset)
  out = os.path.abspath(out)
  os.makedirs(out, exist_ok=True)
  log = lambda msg: print(msg, flush=True)  # pylint: disable=unnecessary-lambda-assignment
  log(f"{preset.name}: {len(runs)} runs in {out}, {jobs} at a time")
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    list(pool.map(lambda r: execute(r, out, log), runs))
  table = collect(preset, runs, out)
  log(f"results: {os.path.join(out, 'results.md')}, results.csv, results.png")
  return table


if __name__ == "__main__":
  main()
