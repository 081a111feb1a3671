"""experiments/benchmarks/bench_model.py: one initialisation per model for all its quantizations."""
import json

import models
from experiments.benchmarks import bench_model

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


def test_parameters_made_once_per_model(tmp_path, monkeypatch, capsys):
  out = tmp_path / "model.json"
  inits = _count_inits(monkeypatch)
  bench_model.main(ARGS + ["--json", str(out)])
  assert inits == [None]  # one init, without quantization, shared by bf16 and int4
  rows = json.loads(out.read_text())
  assert [(r["model"], r["quant"]) for r in rows] == [("llama_9m", "bf16"), ("llama_9m", "int4")]
  assert list(rows[0]) == ["model", "quant", "batch", "seq_len", "scan_layers", "remat", "params",
                           "step_s", "compile_s", "first_step_s", "tokens_per_s",
                           "model_tflops_per_s", "mfu", "loss"]
  assert rows[0]["params"] == rows[1]["params"] and rows[1]["step_s"] > 0
  assert abs(rows[0]["loss"] - rows[1]["loss"]) < 0.05  # same parameters, int4 noise aside
  assert "| llama_9m | int4 | 2×16 |" in capsys.readouterr().out
