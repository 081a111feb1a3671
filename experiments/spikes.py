"""Loss and gradient-norm spikes of a finished (or running) run, counted on the host.

A value ``x_t`` of a per-step series (training loss, global gradient norm) is a **spike** when

    x_t > k · median(x_{t-W}, …, x_{t-1})        (the previous W finite values)

or when ``x_t`` is not finite. The median needs at least ``min_history`` previous finite
values; earlier steps are never spikes. Non-finite values count as spikes and are left out of
later baselines; a spike stays in the baseline of the steps after it, but a median over W
values moves only when more than half of them are high, so one spike does not hide the next.
The count is the number of spike steps (a spike lasting three steps counts three).

The defaults (docs/training.md, *Spike counts*): W = 50 previous steps and k = 5 for the
gradient norm, k = 1.2 for the loss. A rolling baseline over recent steps is how OLMo 2 scores
spikes (arXiv:2501.00656, a rolling window of the last 1000 values; our runs are 10² to 10⁴
steps long, so 50); the median instead of the mean (and the ratio instead of a number of
standard deviations) makes the baseline robust to the spikes it is looking for. In healthy runs
of the offline demo the gradient norm stays below 2× and the loss below 1.06× of the rolling
median; the SPAM paper (arXiv:2501.06842) calls gradient spikes values 50×–1000× the typical
magnitude, so k = 5 flags only clear spikes, and a loss 20% above its recent median (about
0.5 nats at the demo's loss) is a jump that noise does not make.
"""
from __future__ import annotations

import numpy as np

WINDOW = 50
MIN_HISTORY = 10
LOSS_FACTOR = 1.2
GRAD_NORM_FACTOR = 5.0


def spike_mask(values, *, factor: float, window: int = WINDOW,
               min_history: int = MIN_HISTORY) -> np.ndarray:
  """Boolean mask of the spike steps of ``values`` (a 1-D sequence; None = not finite)."""
  x = np.asarray([np.nan if v is None else v for v in values], np.float64)
  finite = np.isfinite(x)
  spikes = ~finite
  history = x[finite]  # finite values in order; position j of history <- index idx[j]
  idx = np.flatnonzero(finite)
  for j, t in enumerate(idx):
    prev = history[max(0, j - window):j]
    if len(prev) >= min_history and x[t] > factor * np.median(prev):
      spikes[t] = True
  return spikes


def count_spikes(values, *, factor: float, window: int = WINDOW,
                 min_history: int = MIN_HISTORY) -> int:
  """Number of spike steps in ``values`` (see the module docstring)."""
  return int(np.sum(spike_mask(values, factor=factor, window=window, min_history=min_history)))
