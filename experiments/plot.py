"""Plots runs from their ``metrics.jsonl``: ``python -m experiments.plot RUN_DIR [...] -o out.png``.

Four panels, one line per run: training loss (validation loss as markers), global gradient
norm (log scale), the learning rate, and the number of gradient entries the optimizer clipped
per step (``spike/clipped_total`` from ``spam_optax.spike_stats``; dotted lines mark momentum
resets), when the run logged them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib


def load_metrics(run_dir: str) -> list[dict]:
  path = pathlib.Path(run_dir)
  if path.is_dir():
    path = path / "metrics.jsonl"
  if not path.exists():
    raise SystemExit(f"{run_dir}: no metrics.jsonl")
  records = {}
  with path.open(encoding="utf-8") as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        records[r["step"]] = {**records.get(r["step"], {}), **r}  # a resumed run rewrites steps
  return [records[s] for s in sorted(records)]


def _series(records, key):
  pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [p[1] for p in pts]


def _spike_keys(runs) -> list[str]:
  """Run-level spike counters (``spike/clipped_total``), not the per-parameter ones."""
  keys = []
  for _, records in runs:
    for r in records:
      for k, v in r.items():
        if (k.startswith("spike/") and k.count("/") == 1 and k not in keys
            and isinstance(v, (int, float))):
          keys.append(k)
  return keys


def _reset_steps(records) -> list[int]:
  """Steps at which a momentum reset happened (the reset clock went back)."""
  x, y = _series(records, "reset/steps_since_reset")
  return [s for s, prev, cur in zip(x[1:], y, y[1:]) if cur < prev]


def plot_runs(run_dirs, out: str, *, smooth: int = 1) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = [(os.path.basename(os.path.normpath(d)), load_metrics(d)) for d in run_dirs]
  spike_keys = _spike_keys(runs)
  fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
  ax_loss, ax_gn, ax_lr, ax_spk = axes.ravel()
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (name, records) in enumerate(runs):
    c = colors[i % len(colors)]
    x, y = _series(records, "loss")
    if smooth > 1 and len(y) >= smooth:
      y = [sum(y[max(0, j - smooth + 1):j + 1]) / len(y[max(0, j - smooth + 1):j + 1])
           for j in range(len(y))]
    ax_loss.plot(x, y, color=c, lw=1, label=f"{name} train")
    ex, ey = _series(records, "eval_loss")
    if ex:
      ax_loss.plot(ex, ey, "o--", color=c, ms=4, lw=1, label=f"{name} val")
    ax_gn.plot(*_series(records, "grad_norm"), color=c, lw=0.8, label=name)
    ax_lr.plot(*_series(records, "lr"), color=c, lw=1, label=name)
    styles = ["-", "--", ":", "-."]
    for j, key in enumerate(spike_keys):
      sx, sy = _series(records, key)
      if sx:
        ax_spk.plot(sx, sy, styles[j % len(styles)], color=c, lw=0.8, label=f"{name} {key}")
    for k, s in enumerate(_reset_steps(records)):
      ax_spk.axvline(s, color=c, alpha=0.3, lw=0.8, ls=":",
                     label=f"{name} momentum reset" if k == 0 else None)
  ax_loss.set(title="loss (lines: train, markers: validation)", xlabel="step", ylabel="loss")
  ax_gn.set(title="gradient global norm", xlabel="step", yscale="log")
  ax_lr.set(title="learning rate", xlabel="step")
  ax_spk.set(title="clipped gradient entries per step" if spike_keys
             else "spike statistics (none logged)", xlabel="step")
  if spike_keys:
    ax_spk.set_yscale("symlog", linthresh=1)
  for ax in axes.ravel():
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__)
  p.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
  p.add_argument("-o", "--out", default=None, help="PNG path (default: <first run>/metrics.png)")
  p.add_argument("--smooth", type=int, default=1, help="moving average of the training loss")
  args = p.parse_args(argv)
  out = args.out or os.path.join(args.runs[0], "metrics.png")
  print(plot_runs(args.runs, out, smooth=args.smooth))


if __name__ == "__main__":
  main()
