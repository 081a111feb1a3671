"""A fresh Python process on the CPU, for what must not share the test's process: exit
statuses, signals, ``jax.distributed``."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(**extra) -> dict:
  """The test's environment with the repository importable, JAX on one CPU device."""
  out = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out.pop("XLA_FLAGS", None)
  out.update(extra)
  return out


def run_trainer(argv, cwd, timeout=300) -> subprocess.CompletedProcess:
  """``python -m experiments.pretrain ARGV``, its output captured."""
  return subprocess.run([sys.executable, "-m", "experiments.pretrain", *argv], cwd=cwd,
                        env=env(), capture_output=True, text=True, timeout=timeout)
