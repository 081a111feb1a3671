"""A fresh Python process on the CPU, for what must not share the test's process: exit
statuses, signals, ``jax.distributed``."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# What conftest adds to XLA_FLAGS for the whole suite and the processes it starts (LLVM at
# -O0: faster compiles; see conftest).
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def without_suite_flags() -> str:
  """``XLA_FLAGS`` of this process without the suite's: for processes that run programs
  long enough that LLVM's optimizations pay for themselves (a tiny model trained and
  profiled for a dozen steps ran each step in 741 ms at -O0, in 171 at the default)."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if f not in SUITE_XLA_FLAGS.split())


def env(**extra) -> dict:
  """The test's environment with the repository importable, JAX on one CPU device (unless
  ``XLA_FLAGS`` in ``extra`` says otherwise): the suite's XLA flags, then ``extra``'s."""
  out = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out.update(extra)
  out["XLA_FLAGS"] = " ".join(filter(None, [SUITE_XLA_FLAGS, extra.get("XLA_FLAGS")]))
  return out


def run_trainer(argv, cwd, timeout=300) -> subprocess.CompletedProcess:
  """``python -m experiments.pretrain ARGV``, its output captured."""
  return subprocess.run([sys.executable, "-m", "experiments.pretrain", *argv], cwd=cwd,
                        env=env(), capture_output=True, text=True, timeout=timeout)
