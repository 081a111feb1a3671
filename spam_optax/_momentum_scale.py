"""Stable-SPAM's cosine decay of the momentum coefficients (``total_T``)."""
from typing import Any, Optional

import jax
import jax.numpy as jnp


def cosine_momentum_scale(
    step: jax.Array, total_steps: Optional[Any], eta_min: Any
) -> jax.Array:
  r"""Scale applied to :math:`\beta_1` and :math:`\gamma_1` at ``step`` (1-based).

  :math:`s_t = \eta_{min} + (1-\eta_{min})(1 + \cos(\pi t/(T_{total}+1)))/2`,
  or the Python float 1.0 when ``total_steps`` is None.
  """
  if total_steps is None:
    # A Python float keeps `1 - beta * scale` in double precision.
    return 1.0
  cos = jnp.cos(jnp.pi * step / (jnp.asarray(total_steps) + 1))
  return eta_min + (1 - eta_min) * (1 + cos) / 2
