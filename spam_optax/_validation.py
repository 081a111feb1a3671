"""Construction-time checks of hyperparameters.

Only concrete values are checked: under ``optax.inject_hyperparams`` inside a
jitted update the hyperparameters are tracers and cannot be inspected without a
host sync, so they are passed through (they were checked at ``init``, where
``inject_hyperparams`` calls the factory with concrete arrays).
"""
from typing import Any, Optional

import jax
import numpy as np


def _concrete(name: str, value: Any) -> Optional[np.ndarray]:
  """Returns ``value`` as a 0-d NumPy number, or None if it cannot be inspected.

  Raises ``ValueError`` for values that are not numbers at all (a string, a
  list), which would otherwise fail later with an unrelated error.
  """
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number):
    if isinstance(value, (str, bytes)) or arr.dtype == object:
      raise ValueError(f"`{name}` must be a number, got {value!r}.")
    return None
  return arr


def check_non_negative(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is >= 0 (or not concrete)."""
  x = _concrete(name, value)
  if x is not None and not x >= 0:
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def check_non_negative_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= 0 (or not concrete).

  An integer is a Python ``int`` or an array of integer dtype (as
  ``optax.inject_hyperparams`` makes of one): ``2.5`` and ``2.0`` are refused,
  since these values count steps.
  """
  x = _concrete(name, value)
  if x is None:
    return
  if isinstance(value, bool) or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
  if not x >= 0:
    raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")


def check_positive_int_or_none(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is None or an integer > 0."""
  check_non_negative_int(name, value)
  x = _concrete(name, value)
  if x is not None and not x > 0:
    raise ValueError(f"`{name}` must be None or an integer > 0, got {value!r}.")


def check_learning_rate(value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is a schedule or a number >= 0."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  x = _concrete("learning_rate", value)
  if x is None:
    raise ValueError(
        "`learning_rate` must be a number or an optax schedule, got"
        f" {value!r}."
    )
  if not x >= 0:
    raise ValueError(f"`learning_rate` must be >= 0, got {value!r}.")


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` lies in [0, 1) (or not concrete)."""
  x = _concrete(name, value)
  if x is not None and not 0.0 <= x < 1.0:
    raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")


def check_closed_unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` lies in [0, 1] (or not concrete)."""
  x = _concrete(name, value)
  if x is not None and not 0.0 <= x <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")


def check_density(value: Any) -> float:
  """Returns the density as a Python float; ``ValueError`` unless in (0, 1].

  The density sets array shapes, so it must be a static Python number.
  """
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    raise ValueError(
        "`density` sets array shapes and must be a static Python float; with"
        " `optax.inject_hyperparams` pass `static_args=('density',)`."
    )
  x = None if isinstance(value, bool) else _concrete("density", value)
  if x is None or not 0.0 < x <= 1.0:
    raise ValueError(f"`density` must be a number in (0, 1], got {value!r}.")
  return float(x)
