"""experiments/benchmarks/bench_train.py runs end to end at a tiny size and reports both
measurements; with --profile and --hlo it keeps the trace's summary and the HLO's counts."""
import gc
import json
import os

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import spam_optax
from experiments.benchmarks import bench_train, gpu_clocks, profile_summary


class _Clocks:
  """A stand-in sampler: records which phase it sampled (what the profiler was doing then)."""
  phases = []

  def __init__(self, profiling):
    self.n = len(self.phases)
    self.phases.append(profiling)

  def summary(self):
    mhz = 1000.0 + self.n
    return {"samples": 1, "sm_mhz_median": mhz, "sm_mhz_min": mhz, "sm_mhz_max": mhz}


def test_bench_train_with_its_loader_profile_and_hlo(tmp_path, monkeypatch, capsys):
  """One run at a tiny size: the step's and the loader's rates, the collector's schedule,
  the GPU's clocks (a stand-in sampler: the real one without nvidia-smi is test_gpu_clocks'),
  the two profiles and the HLO's counts."""
  out, prof, hlo = tmp_path / "bench.json", tmp_path / "prof", tmp_path / "hlo"
  seen = []
  real = profile_summary.profile

  collector_on = []

  def spy(*a, **kw):  # what the JSON held when the profiler started
    seen.append(json.loads(out.read_text()))
    collector_on.append(gc.isenabled())
    return real(*a, **kw)

  monkeypatch.setattr(profile_summary, "profile", spy)
  profiling = []
  import contextlib  # pylint: disable=import-outside-toplevel

  @contextlib.contextmanager
  def sampling():
    yield _Clocks(bool(seen))  # the phases before the first profile, then the profile's
  monkeypatch.setattr(_Clocks, "phases", profiling)
  monkeypatch.setattr(gpu_clocks, "sampling", sampling)
  bench_train.main(["--models", "llama_9m", "--optimizers", "spam", "--batch", "2",
                    "--length", "16", "--steps", "1", "--warmup", "0", "--loader_batches", "2",
                    "--profile", str(prof), "--profile_calls", "2", "--hlo", str(hlo),
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
  assert "llama_9m-spam in flight: clocks: " in text
  assert "metrics writer, host ms per step (while the next step runs): llama_9m/spam " in text
  # Python's collector: the trainer's schedule (every 100 steps: none while 1 step is timed)
  gc_row = step["gc"]
  assert gc_row["every"] == 100 and gc_row["full_collection_s"] > 0
  assert gc_row["scheduled_collection_s"] > 0
  for phase in ("synced", "in_flight"):
    assert gc_row[phase]["passes"] == {"0": 0, "1": 0, "2": 0}, phase  # automatic: off
  assert len(seen) == 2  # the steps waited for, then in flight
  assert collector_on == [False, False]  # profiled on the trainer's collection schedule
  assert gc.isenabled()  # and Python's collector as it was after the benchmark
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
  # the GPU's clocks while the steps were timed (waited for, in flight) and profiled in flight
  assert profiling == [False, False, True]
  assert step["gpu_clocks_synced"]["sm_mhz_median"] == 1000.0
  assert step["gpu_clocks_in_flight"]["sm_mhz_median"] == 1001.0
  assert f["gpu_clocks"]["sm_mhz_median"] == 1002.0
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
  """``--two_executables``: the step compiled twice, the two run in turn; a step that
  donates its state (as the trainer's) gives the same states that way as one executable."""
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

  opt = spam_optax.spam(1e-2, warmup_steps=2, reset_interval=3)

  def train(params, opt_state, batch):
    grads = jax.grad(lambda p: jnp.sum((p["w"] * batch) ** 2))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
  batches = [jnp.full((3, 4), 0.5 + i) for i in range(7)]
  lowered = jax.jit(train, donate_argnums=(0, 1)).lower(params, opt.init(params), batches[0])
  finals = []
  for step in (lowered.compile(),
               bench_train.alternating(lowered.compile(), bench_train.twin_executable(lowered))):
    state = (jax.tree.map(jnp.copy, params), opt.init(params))
    for batch in batches:
      state = step(*state, batch)
    finals.append(jax.device_get(state))
  chex.assert_trees_all_equal(*finals)
