"""Shared inputs for the per-block tests: a nested tree with a None leaf and spikes."""
import jax
import jax.numpy as jnp
import numpy as np


def nested_params():
  """A nested tree of several ranks, with a list and a ``None`` leaf."""
  rng = np.random.default_rng(0)
  return {
      "dense": {"w": rng.normal(size=(4, 3)).astype(np.float32),
                "b": rng.normal(size=(3,)).astype(np.float32)},
      "layers": [rng.normal(size=(2, 2, 2)).astype(np.float32), None],
      "scalar": np.float32(0.5),
  }


def gradient_sequence(steps, spike_steps=(4, 9), seed=1):
  """Gaussian gradients shaped like ``nested_params`` with a few huge spikes."""
  rng = np.random.default_rng(seed)
  params = nested_params()
  seq = []
  for t in range(1, steps + 1):
    def draw(p):
      g = rng.normal(size=np.shape(p)).astype(np.float32)
      if t in spike_steps:
        flat = g.reshape(-1)
        flat[0] *= 1000.0
      return g
    seq.append(jax.tree.map(draw, params))
  return seq


def to_jnp(tree):
  return jax.tree.map(jnp.asarray, tree)
