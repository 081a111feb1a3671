"""Shared pytest configuration: run JAX on the CPU with deterministic settings."""
import json
import os
import shutil
import tempfile

import numpy as np
import pytest

from _processes import SUITE_XLA_FLAGS

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The suite's programs are small and run for milliseconds; on the CPU most of its time is
# XLA compiling them, and most of that is LLVM optimizing the generated code. LLVM at -O0
# (XLA's backend optimization level; the HLO passes and every rounding are unchanged) cuts
# that: a 2-core host ran the spike-guard tests in 19 s instead of 30. Set here, before jax
# is imported, so the processes the tests start inherit it (``_processes.env``).
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 SUITE_XLA_FLAGS]))

# One persistent compilation cache for the run: set here, before jax is imported, in the
# process pytest starts, so that its xdist workers and the command-line runs the tests start
# inherit it. A program compiled once (the tiny model's training step, compiled again by each
# run of a run-then-resume test) is read back from it, the same executable, by every later
# process. Removed when the run ends; a cache the environment names is left as it is.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="spam_optax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from _tiny_runs import write_tiny_model_config  # noqa: E402


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def tiny_model_config(tmp_path):
  """The tiny LLaMA config of the trainer's tests (see _tiny_runs), written under tmp_path."""
  return write_tiny_model_config(tmp_path)


@pytest.fixture
def tiny_args(tmp_path, tiny_model_config):
  """Flags for a few-step run of a 2-layer, width-32 LLaMA on a small local corpus."""
  model = tiny_model_config
  corpus = tmp_path / "corpus.jsonl"
  words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
  rng = np.random.default_rng(0)
  corpus.write_text("".join(
      json.dumps({"text": " ".join(rng.choice(words, size=12 + i % 9))}) + "\n"
      for i in range(300)))

  def args(run="run", **overrides):
    flags = {"model_config": model, "dataset": corpus, "packing": True, "batch_size": 4,
             "max_length": 32, "num_training_steps": 6, "warmup_steps": 2, "lr": 1e-2,
             "eval_every": 3, "save_every": 3, "eval_batches": 2, "dtype": "float32",
             "progress": False, "save_dir": tmp_path / run, "optimizer": "adamw"}
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
      if v is True:
        argv.append(f"--{k}")
      elif v is False:
        argv.append(f"--no-{k}")
      elif v is not None:
        argv += [f"--{k}", str(v)]
    return argv
  return args
