"""``python -m experiments.plot``: a PNG from one or more runs' metrics.jsonl."""
import json
import math

from experiments import plot


def _write_run(path, offset, spikes):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 0, "eval_loss": 5.5, "eval_perplexity": math.exp(5.5)}) + "\n")
    for step in range(1, 41):
      record = {"step": step, "loss": 5.0 / math.sqrt(step) + offset, "lr": 1e-3,
                "grad_norm": 1.0 + (10.0 if step == 17 else 0.0), "tokens_per_s": 1e4,
                "mfu": None}
      if spikes:
        record.update({"spike/clipped_total": 3 if step % 9 == 0 else 0,
                       "spike/clipped/layers_0/mlp/up_proj/kernel": 1,
                       "reset/steps_since_reset": step % 10})
      if step % 20 == 0:
        record.update(eval_loss=record["loss"] + 0.1, eval_perplexity=1.0)
      f.write(json.dumps(record) + "\n")


def test_plot_writes_a_png_for_several_runs(tmp_path):
  _write_run(tmp_path / "adam", 0.2, spikes=False)
  _write_run(tmp_path / "spam", 0.0, spikes=True)
  out = tmp_path / "cmp.png"
  plot.main([str(tmp_path / "adam"), str(tmp_path / "spam"), "-o", str(out), "--smooth", "3"])
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_load_merges_lines_of_the_same_step_and_finds_resets(tmp_path):
  run = tmp_path / "r"
  run.mkdir()
  (run / "metrics.jsonl").write_text(
      json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 3, "eval_loss": 2.0})
      + "\n" + json.dumps({"step": 4, "loss": 0.5, "reset/steps_since_reset": 0}) + "\n")
  records = plot.load_metrics(str(run))
  assert records == [{"step": 3, "loss": 1.0, "eval_loss": 2.0},
                     {"step": 4, "loss": 0.5, "reset/steps_since_reset": 0}]
  assert plot._spike_keys([("r", [{"step": 1, "spike/clipped_total": 2,
                                   "spike/clipped/a/b": 1}])]) == ["spike/clipped_total"]
