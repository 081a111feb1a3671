"""The spike detector (experiments.spikes) on hand-made sequences, against a direct NumPy loop."""
import numpy as np
import pytest

from experiments import spikes


def reference_mask(values, factor, window, min_history):
  """Straight from the definition: x_t > factor * median of the previous `window` finite values."""
  out, history = [], []
  for v in values:
    if v is None or not np.isfinite(v):
      out.append(True)
      continue
    prev = history[-window:]
    out.append(len(prev) >= min_history and v > factor * float(np.median(prev)))
    history.append(v)
  return np.array(out)


def test_isolated_spikes_are_found_and_nothing_else():
  x = [1.0] * 20 + [6.0] + [1.0] * 10 + [4.9] + [1.0] * 5 + [50.0] + [1.0] * 3
  mask = spikes.spike_mask(x, factor=5.0, window=10, min_history=5)
  np.testing.assert_array_equal(np.flatnonzero(mask), [20, 37])
  assert spikes.count_spikes(x, factor=5.0, window=10, min_history=5) == 2


def test_no_spikes_before_min_history_and_a_falling_series_has_none():
  x = [1.0, 100.0, 1.0, 1.0, 1.0]
  assert spikes.count_spikes(x, factor=5.0, window=10, min_history=3) == 0
  falling = np.linspace(5.5, 2.0, 200)
  assert spikes.count_spikes(falling, factor=1.2) == 0


def test_non_finite_values_are_spikes_and_leave_the_baseline_alone():
  x = [2.0] * 12 + [None, float("nan"), float("inf")] + [2.0] * 3 + [11.0]
  mask = spikes.spike_mask(x, factor=5.0, window=10, min_history=10)
  np.testing.assert_array_equal(np.flatnonzero(mask), [12, 13, 14, 18])


def test_median_baseline_is_not_pulled_up_by_one_spike():
  # A mean over the window would rise to ~10.9 after the first spike and hide the second.
  x = [1.0] * 10 + [100.0] + [1.0] * 3 + [8.0]
  np.testing.assert_array_equal(
      np.flatnonzero(spikes.spike_mask(x, factor=5.0, window=10, min_history=5)), [10, 14])


@pytest.mark.parametrize("factor, window, min_history", [(5.0, 50, 10), (1.2, 7, 3), (2.0, 1, 1)])
def test_matches_the_reference_on_a_noisy_series(factor, window, min_history):
  rng = np.random.default_rng(0)
  x = list(np.exp(rng.normal(0.0, 0.5, 400)) * np.linspace(3.0, 1.0, 400))
  for i in rng.choice(400, 12, replace=False):
    x[i] = x[i] * rng.choice([3.0, 10.0, 100.0]) if i % 5 else float("nan")
  np.testing.assert_array_equal(
      spikes.spike_mask(x, factor=factor, window=window, min_history=min_history),
      reference_mask(x, factor, window, min_history))
