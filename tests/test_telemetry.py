"""Tests of `spike_stats`, the flat dict of spike and reset scalars for loggers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp

LEAF_KEYS = {"spike/clipped/dense/w", "spike/clipped/dense/b",
             "spike/clipped/layers/0", "spike/clipped/scalar"}


def spam_opt():
  return spam_optax.spam(1e-2, reset_interval=6, warmup_steps=2, clip_delay=2,
                         spike_threshold=50.0)


def train(opt, steps):
  params = to_jnp(nested_params())
  state = opt.init(params)
  update = jax.jit(opt.update)
  history = []
  for g in gradient_sequence(steps):
    u, state = update(to_jnp(g), state, params)
    params = optax.apply_updates(params, u)
    history.append(jax.jit(spam_optax.spike_stats)(state))
  return state, history


def test_spam_keys_and_counts():
  state, history = train(spam_opt(), 9)
  stats = spam_optax.spike_stats(state)
  assert set(stats) == LEAF_KEYS | {"spike/clipped_total",
                                    "reset/steps_since_reset"}
  # The spike at step 4 (first entry of every leaf) is clipped.
  assert int(history[3]["spike/clipped_total"]) >= 3
  assert int(history[3]["spike/clipped/dense/w"]) >= 1
  total = sum(int(history[3][k]) for k in LEAF_KEYS)
  assert total == int(history[3]["spike/clipped_total"])
  since = [int(h["reset/steps_since_reset"]) for h in history]
  assert since == [1, 2, 3, 4, 5, 0, 1, 2, 3]  # reset at step 6


def test_stable_spam_counts_adaclip_and_reset_timing():
  opt = spam_optax.stable_spam(1e-2, reset_interval=3, gamma3=0.5)
  _, history = train(opt, 6)
  assert int(history[3]["spike/clipped_total"]) >= 1
  since = [int(h["reset/steps_since_reset"]) for h in history]
  assert since == [1, 2, 0, 1, 2, 0]


def test_both_aliases_report_the_same_keys_and_reset_clock():
  # SPAM zeroes its moments before the update of a reset step, Stable-SPAM
  # after it; the reset clock reads 0 after the reset step for both.
  spam = spam_optax.spam(1e-2, reset_interval=3, warmup_steps=1, clip_delay=1)
  stable = spam_optax.stable_spam(1e-2, reset_interval=3)
  (s_spam, h_spam), (s_stable, h_stable) = train(spam, 6), train(stable, 6)
  keys = LEAF_KEYS | {"spike/clipped_total", "reset/steps_since_reset"}
  assert set(spam_optax.spike_stats(s_spam)) == keys
  assert set(spam_optax.spike_stats(s_stable)) == keys
  for history in (h_spam, h_stable):
    since = [int(h["reset/steps_since_reset"]) for h in history]
    assert since == [1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("wrap", ["inject", "multisteps", "apply_if_finite"])
def test_found_inside_wrappers(wrap):
  if wrap == "inject":
    opt = optax.inject_hyperparams(spam_optax.spam)(
        learning_rate=1e-2, reset_interval=6, warmup_steps=2, clip_delay=2,
        spike_threshold=50.0)
  elif wrap == "multisteps":
    opt = optax.MultiSteps(spam_opt(), every_k_schedule=1)
  else:
    opt = optax.apply_if_finite(spam_opt(), max_consecutive_errors=2)
  state, history = train(opt, 5)
  assert int(history[3]["spike/clipped_total"]) >= 3
  assert set(spam_optax.spike_stats(state)) >= LEAF_KEYS


def test_stand_alone_clip_and_empty_state():
  opt = optax.chain(spam_optax.spam_clip(50.0, clip_delay=2), optax.lion(1e-3))
  _, history = train(opt, 5)
  assert "reset/steps_since_reset" not in history[-1]
  assert int(history[3]["spike/clipped_total"]) >= 3
  # No SPAM piece: an empty dict (documented), so one call serves every run.
  assert spam_optax.spike_stats(optax.adam(1e-3).init(jnp.zeros(2))) == {}


def test_sparse_spam_reports_per_leaf():
  opt = spam_optax.spam(1e-2, density=0.5, reset_interval=6, warmup_steps=2,
                        clip_delay=2, spike_threshold=50.0)
  state, _ = train(opt, 3)
  stats = spam_optax.spike_stats(state)
  assert "spike/clipped/dense/w" in stats
  assert stats["spike/clipped_total"].dtype == np.int32
