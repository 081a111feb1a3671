"""Replays the recorded official trajectories (dense scenarios) through the aliases."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax
from _reference import REFERENCE_DIR
from _reference import alias_kwargs
from _reference import enable_x64

TOLERANCE = {"float64": 1e-10, "float32": 3e-5}

DENSE_FILES = sorted(
    p.name for p in REFERENCE_DIR.glob("*.npz") if "sparse" not in p.name
)


def optimizer_from_meta(meta):
  """Builds our alias from the official hyperparameters in a reference file."""
  alias = spam_optax.spam if meta["optimizer"] == "spam" else spam_optax.stable_spam
  return alias(**alias_kwargs(meta))


def replay(opt, p0, grads):
  """Applies ``opt`` to the recorded gradients; returns params after each step."""

  @jax.jit
  def run(p0, grads):
    def step(carry, g):
      params, state = carry
      updates, state = opt.update(g, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params

    return jax.lax.scan(step, (p0, opt.init(p0)), grads)[1]

  return run(p0, grads)


def max_relative_error(got, want):
  """Max over steps of ||got_t - want_t|| / ||want_t|| (one leaf)."""
  got = np.asarray(got, np.float64).reshape(len(want), -1)
  want = np.asarray(want, np.float64).reshape(len(want), -1)
  return float(
      np.max(np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1))
  )


def test_all_dense_scenarios_are_covered():
  assert len(DENSE_FILES) == 16, DENSE_FILES


@pytest.mark.parametrize("filename", DENSE_FILES)
def test_replay_matches_official_trajectory(filename):
  data = np.load(REFERENCE_DIR / filename)
  meta = json.loads(str(data["meta"]))
  dtype = meta["dtype"]
  with enable_x64(dtype == "float64"):
    opt = optimizer_from_meta(meta)
    names = list(meta["params"])
    p0 = {n: jnp.asarray(data[f"p0/{n}"]) for n in names}
    grads = {n: jnp.asarray(data[f"g/{n}"]) for n in names}
    params = replay(opt, p0, grads)
    for n in names:
      assert params[n].dtype == np.dtype(dtype)
      err = max_relative_error(params[n], data[f"p/{n}"])
      assert err < TOLERANCE[dtype], (filename, n, err)


@pytest.mark.parametrize("filename", [f for f in DENSE_FILES if "stable" in f])
def test_two_statistics_passes_replay_the_official_trajectory(filename, monkeypatch):
  """Stable-SPAM with its norm and count from a second pass over the gradient every step
  (``_clip_and_norm_history._ONE_PASS`` off) replays the official trajectories too."""
  from spam_optax import _clip_and_norm_history
  monkeypatch.setattr(_clip_and_norm_history, "_ONE_PASS", False)
  test_replay_matches_official_trajectory(filename)
