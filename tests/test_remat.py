"""models/remat.py: what the backward pass keeps of a decoder block."""
import re

import jax
import jax.numpy as jnp
import pytest

import models
from models import remat

CFG = models.LlamaConfig(name="tiny", hidden_size=32, intermediate_size=64, num_heads=2,
                         num_layers=1, vocab_size=128, max_seq_len=32)


def _saved(policy, capsys):
  """The residuals ``jax.checkpoint`` keeps for one block under ``policy``, as printed."""
  block = models.llama.DecoderBlock(CFG)
  x = jnp.ones((2, 16, 32), jnp.bfloat16)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  params = jax.jit(block.init)(jax.random.key(0), (x, x), positions)

  def loss(p, x):
    f = jax.checkpoint(lambda p, x: block.apply(p, (x, x), positions), policy=policy)
    return sum(y.astype(jnp.float32).sum() for y in f(p, x))

  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, params, x)
  lines = capsys.readouterr().out.splitlines()
  return [l for l in lines if "from the argument" not in l and "from a constant" not in l]


def test_block_residuals_keeps_the_named_products_only(capsys):
  kept = _saved(remat.block_residuals, capsys)
  # One saved value per name, nothing else (no norm, cast or SiLU output): bf16 only, each
  # made where the model names it. (Older jax prints them as the output of the cast that
  # precedes the name, at the same source line.)
  # `residual_mid` leaves the block as the first of its outputs, so it is not stored apart.
  assert len(kept) == len(remat.SAVED_NAMES) - 1, kept
  assert all(l.startswith("bf16[") for l in kept), kept
  names = {l.split("named '")[1].split("'")[0] for l in kept if "named '" in l}
  assert names <= set(remat.SAVED_NAMES) - {"residual_mid"}
  for line in kept:
    path, number = re.search(r"from (\S+\.py):(\d+):", line).groups()
    with open(path, encoding="utf-8") as f:
      assert "checkpoint_name(" in f.read().splitlines()[int(number) - 1], line
  # Without remat, the same block keeps more, float32 norm inputs among them.
  everything = _saved(jax.checkpoint_policies.everything_saveable, capsys)
  assert len(everything) > len(kept) and any(l.startswith("f32[") for l in everything)


def test_policy_names():
  assert remat.policy("block_residuals") is remat.block_residuals
  assert remat.policy("nothing_saveable") is jax.checkpoint_policies.nothing_saveable
  with pytest.raises(ValueError, match="remat_policy 'dots' is not block_residuals"):
    remat.policy("dots")
