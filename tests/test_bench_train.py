"""experiments/benchmarks/bench_train.py runs end to end at a tiny size and reports both measurements."""
import json

from experiments.benchmarks import bench_train


def test_bench_train_smoke(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench_train.main(["--models", "llama_9m", "--optimizers", "spam", "--batch", "2",
                    "--length", "16", "--steps", "1", "--warmup", "0", "--loader_batches", "2",
                    "--json", str(out)])
  text = capsys.readouterr().out
  assert "loader: --dataset stdlib" in text and "| llama_9m | spam | float32 | 2×16 |" in text
  result = json.loads(out.read_text())
  step, loader = result["steps"][0], result["loader"]
  assert step["tokens_per_s"] > 0 and step["mfu"] is None  # no peak on CPU
  assert loader["tokens_per_s"] > 0 and loader["batch"] == 2 and loader["length"] == 16
