"""Rematerialisation policies for the decoder block: what the backward pass keeps.

``block_residuals`` keeps, per block, what is expensive to recompute (the outputs of the
matrix products and of attention) and recomputes what is cheap (norms, RoPE, SiLU, casts)
from them. The block tags those tensors with `jax.ad_checkpoint.checkpoint_name`; the policy
saves the tagged ones and the outputs of cuDNN's attention forward (output and softmax
statistics, which its backward reads). Under `nn.scan` this is what decides the traffic:
without remat the scanned block stores every intermediate its backward reads (float32
norm inputs, five MLP intermediates, bf16 copies of the weights); with `nothing_saveable`
it recomputes the whole block, attention included.
"""
from __future__ import annotations

from typing import Callable

import jax

# The tensors of a block that `block_residuals` keeps.
SAVED_NAMES = ("query", "key", "value", "attention_out", "residual_mid", "mlp_gate_up")
_ATTENTION_FORWARD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


def block_residuals(prim, *avals, **params) -> bool:
  """Save the block's named matrix-product and attention outputs, and cuDNN attention's."""
  if prim.name in _ATTENTION_FORWARD:
    return True
  return jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES)(prim, *avals, **params)


POLICIES = {"block_residuals": block_residuals}


def policy(name: str) -> Callable:
  """The policy called ``name``: one of `POLICIES` or a `jax.checkpoint_policies` entry."""
  if name in POLICIES:
    return POLICIES[name]
  found = getattr(jax.checkpoint_policies, name, None)
  if not callable(found):
    raise ValueError(f"remat_policy {name!r} is not {', '.join(POLICIES)} or a "
                     "jax.checkpoint_policies entry (e.g. 'nothing_saveable', 'dots_saveable')")
  return found
