"""experiments/benchmarks/bench_model.py: one initialisation per model for all its
quantizations, and its profiles saved after the timing."""
import json

import models
from experiments.benchmarks import bench_model, profile_summary

ARGS = ["--models", "llama_9m", "--quant", "bf16,int4", "--batch", "2", "--seq_len", "16",
        "--steps", "1", "--warmup", "0"]


def _count_inits(monkeypatch) -> list:
  """The quantization of each ``Llama.init`` on the benchmark's batch (``count_params``
  also inits, on shapes of its own)."""
  inits = []
  init = models.Llama.init

  def counting(self, rng, tokens, *a, **kw):
    if tuple(tokens.shape) == (2, 16):
      inits.append(self.quant)
    return init(self, rng, tokens, *a, **kw)

  monkeypatch.setattr(models.Llama, "init", counting)
  return inits


def test_one_init_per_model_and_profiles_after_saving(tmp_path, monkeypatch, capsys):
  """One run: one init shared by bf16 and int4; each profile taken after the timing was
  saved, and a profiler that fails keeps the timing."""
  out, prof = tmp_path / "model.json", tmp_path / "prof"
  inits = _count_inits(monkeypatch)
  seen = []
  capture = profile_summary.capture

  def first_fails(run_once, calls, log_dir, **kw):
    seen.append(json.loads(out.read_text()))  # what the JSON held when the profiler started
    if len(seen) == 1:
      raise RuntimeError("profiler busy")
    return capture(run_once, calls, log_dir, **kw)

  monkeypatch.setattr(profile_summary, "capture", first_fails)
  bench_model.main(ARGS + ["--json", str(out), "--profile", str(prof), "--profile_calls", "2"])
  assert inits == [None]  # one init, without quantization, shared by bf16 and int4
  rows = json.loads(out.read_text())
  assert [(r["model"], r["quant"]) for r in rows] == [("llama_9m", "bf16"), ("llama_9m", "int4")]
  assert list(rows[0]) == ["model", "quant", "batch", "seq_len", "scan_layers", "remat",
                           "logits_dtype", "attention", "norm", "elementwise", "params",
                           "step_s", "step_s_synced", "compile_s", "first_step_s", "tokens_per_s",
                           "model_tflops_per_s", "mfu", "loss", "profile"]
  assert rows[0]["params"] == rows[1]["params"] and rows[1]["step_s"] > 0
  assert all(r["step_s_synced"] > 0 for r in rows)
  assert rows[0]["tokens_per_s"] == 2 * 16 / rows[0]["step_s"]  # rates: as a loop runs
  assert abs(rows[0]["loss"] - rows[1]["loss"]) < 0.05  # same parameters, int4 noise aside
  assert "| llama_9m | int4 | 2×16 |" in capsys.readouterr().out
  # The profiles: the JSON saved before each, the first one's failure recorded.
  assert [len(rows) for rows in seen] == [1, 2]
  assert "profile" not in seen[0][0] and seen[0][0]["step_s"] > 0
  assert "profile" in seen[1][0] and "profile" not in seen[1][1]
  bf16, int4 = rows
  assert bf16["profile"] == {"error": "RuntimeError: profiler busy", "xplane": None}
  p = int4["profile"]
  assert p["source"] == "cpu" and p["calls"] == 2 and p["categories"]["matmul"] > 0
  assert 0 < p["busy_ms_per_call"] <= p["span_ms_per_call"]
  assert p["xplane"].startswith(str(prof / "llama_9m-int4")) and int4["step_s"] > 0
