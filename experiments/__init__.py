"""Pretraining LLaMA with SPAM / Stable-SPAM in JAX: run as ``python -m experiments.pretrain``."""
import re

import jax

# jax.set_mesh (the mesh context of the trainer and the benchmarks) is in jax 0.7.1 and later;
# pyproject.toml's `train` extra asks for it.
MIN_JAX = (0, 7, 1)


def check_jax_version(version: str) -> None:
  """Raises ImportError, one line, for a jax older than :data:`MIN_JAX`."""
  parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
  if parts < MIN_JAX:
    need = ".".join(map(str, MIN_JAX))
    raise ImportError(f"experiments/ needs jax>={need} (jax.set_mesh); installed jax "
                      f"{version}: pip install -U 'jax>={need}' (or the project's [train] extra)")


check_jax_version(jax.__version__)
