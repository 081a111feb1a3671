"""Construction-time checks of hyperparameters.

Only concrete values are checked: under ``optax.inject_hyperparams`` inside a
jitted update the hyperparameters are tracers and cannot be inspected without a
host sync, so they are passed through (they were checked at ``init``).
"""
from typing import Any, Optional

import jax
import numpy as np


def _concrete(value: Any) -> Optional[float]:
  """Returns ``value`` as a Python float, or None if it cannot be inspected."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
    return None
  return float(arr)


def check_non_negative(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is >= 0 (or not concrete)."""
  x = _concrete(value)
  if x is not None and not x >= 0:
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` lies in [0, 1) (or not concrete)."""
  x = _concrete(value)
  if x is not None and not 0.0 <= x < 1.0:
    raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def check_closed_unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` lies in [0, 1] (or not concrete)."""
  x = _concrete(value)
  if x is not None and not 0.0 <= x <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


def check_density(value: Any) -> None:
  """Raises ``ValueError`` unless the density lies in (0, 1]."""
  if value is None:
    return
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    raise ValueError(
        "`density` sets array shapes and must be a static Python float; with"
        " `optax.inject_hyperparams` pass `static_args=('density',)`."
    )
  x = _concrete(value)
  if x is None or not 0.0 < x <= 1.0:
    raise ValueError(f"`density` must be in (0, 1], got {value!r}.")


def check_positive_or_none(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is None or > 0."""
  x = _concrete(value)
  if x is not None and not x > 0:
    raise ValueError(f"`{name}` must be None or > 0, got {value!r}.")
