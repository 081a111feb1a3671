"""Numerics shared by the blocks: statistics dtypes and accurate bias corrections."""
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def one_minus_power(decay: Any, count: jax.Array) -> jax.Array:
  r"""Returns :math:`1 - \beta^k` accurately.

  Computed as :math:`-\mathrm{expm1}(k \log\beta)` with :math:`\log\beta` taken
  in double precision when :math:`\beta` is a Python number. The direct
  formula loses most digits in float32 for :math:`\beta` close to 1 (e.g.
  :math:`1 - 0.99999` is off by 0.1% once 0.99999 is rounded to float32).

  Args:
    decay: :math:`\beta`, a Python float or a scalar array.
    count: :math:`k`, an integer scalar.

  Returns:
    A floating scalar in the default float dtype (or the dtype of ``decay``).
  """
  if isinstance(decay, (int, float, np.floating, np.integer)):
    log_decay = math.log(decay) if decay > 0 else -math.inf
  else:
    decay = jnp.asarray(decay)
    if not jnp.issubdtype(decay.dtype, jnp.floating):
      decay = decay.astype(jnp.result_type(float))
    log_decay = jnp.log(decay)
  return -jnp.expm1(count * log_decay)


def stat_dtype(dtype: Any) -> Any:
  """Dtype of scalar statistics: at least float32, float64 for float64 leaves."""
  return jnp.promote_types(jnp.float32, dtype)


def tree_stat_dtype(tree: Any) -> Any:
  """:func:`stat_dtype` of all of ``tree``'s leaves together (float32 for none)."""
  dtypes = [jnp.result_type(x) for x in jax.tree.leaves(tree)] or [jnp.float32]
  return stat_dtype(jnp.result_type(*dtypes))
