"""experiments/benchmarks/bench_train.py runs end to end at a tiny size and reports both
measurements; with --profile and --hlo it keeps the trace's summary and the HLO's counts."""
import json
import os

import pytest

from experiments.benchmarks import bench_train, profile_summary


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
  assert step["tokens_per_s"] == 2 * 16 / step["step_s"]  # as the trainer runs
  assert 0 < step["step_s_synced_min"] <= step["step_s_synced"]
  assert loader["tokens_per_s"] > 0 and loader["batch"] == 2 and loader["length"] == 16
  assert step["writer_s"] > 0
  assert "metrics writer, host ms per step (while the next step runs): llama_9m/spam " in text


def test_bench_train_profile_and_hlo(tmp_path, monkeypatch):
  out, prof, hlo = tmp_path / "bench.json", tmp_path / "prof", tmp_path / "hlo"
  seen = []
  real = profile_summary.profile

  def spy(*a, **kw):  # what the JSON held when the profiler started
    seen.append(json.loads(out.read_text()))
    return real(*a, **kw)

  monkeypatch.setattr(profile_summary, "profile", spy)
  bench_train.main(["--models", "llama_9m", "--optimizers", "spam", "--batch", "2",
                    "--length", "16", "--steps", "1", "--warmup", "0", "--no_loader",
                    "--profile", str(prof), "--profile_calls", "2", "--hlo", str(hlo),
                    "--json", str(out)])
  assert len(seen) == 2  # the steps waited for, then in flight
  before = seen[0]["steps"]
  assert len(before) == 1 and before[0]["step_s"] > 0 and "profile" not in before[0]
  (step,) = json.loads(out.read_text())["steps"]
  p = step["profile"]
  assert p["source"] == "cpu" and p["calls"] == 2
  assert 0 < p["busy_ms_per_call"] <= p["span_ms_per_call"]
  assert p["categories"]["matmul"] > 0 and p["top"]
  assert step["xplane"] == p["xplane"] and os.path.isfile(p["xplane"])
  assert p["xplane"].startswith(str(prof / "llama_9m-spam"))
  # and the same steps in flight, as the loop runs them
  f = step["profile_in_flight"]
  assert f["source"] == "cpu" and f["calls"] == 2
  assert f["xplane"].startswith(str(prof / "llama_9m-spam-in-flight"))
  assert 0 < f["busy_ms_per_call"] <= f["span_ms_per_call"] <= f["period_ms_per_call"]
  assert f["between_ms_per_call"] == pytest.approx(
      f["period_ms_per_call"] - f["span_ms_per_call"], abs=1e-3)
  h = step["hlo"]
  assert h["file"] == str(hlo / "train-llama_9m-spam.hlo.txt") and os.path.isfile(h["file"])
  assert h["ops"]["fusion"] > 0 and h["aliased_outputs"] > 0  # the donated state
  assert h["donation_warnings"] == []


def test_command_line_error_is_one_line_with_status_2():
  """A refused flag (cuDNN's attention on the CPU) ends the command with its one error line
  on stderr and status 2, as the trainer's do."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import _processes  # pylint: disable=import-outside-toplevel
  p = subprocess.run([sys.executable, "-m", "experiments.benchmarks.bench_train", "--models",
                      "llama_9m", "--optimizers", "spam", "--batch", "2", "--length", "16",
                      "--attention", "cudnn"], cwd=_processes.ROOT, env=_processes.env(),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == [
      "error: --attention cudnn needs a GPU (this JAX backend: cpu); use auto or xla"]


def test_two_executables_in_turn():
  """``--two_executables``: the step compiled twice, the two run in turn (the accelerator's
  tiny run checks that the trainer step gives the same loss that way)."""
  import jax
  import jax.numpy as jnp

  f = jax.jit(lambda x: x * 2.0)
  lowered = f.lower(jnp.ones(3))
  first = lowered.compile()
  second = bench_train.twin_executable(lowered)
  assert second is not first and second.as_text() == first.as_text()
  assert float(second(jnp.ones(3))[0]) == 2.0
  calls = []
  step = bench_train.alternating(lambda x: calls.append("a") or x, lambda x: calls.append("b") or x)
  for _ in range(5):
    step(0)
  assert calls == ["a", "b", "a", "b", "a"]
