"""models/attention.py: `pallas_attention`, jax's Pallas flash-attention kernel, against
XLA's causal attention. On the CPU the kernel runs in Pallas's interpreter, with the same
blocks, masks and backward kernels as on a GPU."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _model_pairs
import models
from models import attention


def _xla(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _with_grads(f, q, k, v, do):
  out, vjp = jax.vjp(f, q, k, v)
  return (out,) + tuple(vjp(do))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 16, 2, 16), (1, 256, 2, 64)], ids=["short", "two_blocks"])
def test_output_and_gradients_match_xla(dtype, tol, shape):
  """The output and dq, dk, dv, each within `tol` of the largest value of XLA's; 256 tokens
  are two blocks of queries and of keys, where the causal mask skips a block."""
  q, k, v, do = (jax.random.normal(key, shape, dtype)
                 for key in jax.random.split(jax.random.key(0), 4))
  got = jax.jit(lambda *a: _with_grads(attention.pallas_attention, *a))(q, k, v, do)
  want = jax.jit(lambda *a: _with_grads(_xla, *a))(q, k, v, do)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * float(np.abs(b).max()), err_msg=name)


@pytest.mark.parametrize("size", [64, 128])
def test_other_blocks_give_the_same_result(size):
  """Blocks of 64 or 128 for every kernel: four, two or one block of 256 tokens."""
  shape = (1, 256, 2, 64)
  q, k, v, do = (jax.random.normal(key, shape, jnp.float32)
                 for key in jax.random.split(jax.random.key(1), 4))
  blocks = {name: size for name in attention.PALLAS_BLOCKS}
  got = jax.jit(lambda *a: _with_grads(
      lambda q, k, v: attention.pallas_attention(q, k, v, blocks), *a))(q, k, v, do)
  want = jax.jit(lambda *a: _with_grads(_xla, *a))(q, k, v, do)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), err_msg=name)


def test_llama_with_pallas_attention_matches_xla():
  """The whole model, the same parameters: logits and gradients within bf16 rounding."""
  config = models.LlamaConfig(name="tiny", hidden_size=48, intermediate_size=96, num_heads=2,
                              num_layers=2, vocab_size=64, max_seq_len=16, dtype="bfloat16",
                              param_dtype="float32")
  _model_pairs.assert_same_model(config.replace(attention_implementation="xla"),
                                 config.replace(attention_implementation="pallas"))


def test_refusals(monkeypatch):
  q = jnp.zeros((1, 160, 1, 16), jnp.float32)
  with pytest.raises(ValueError, match="at most 128 tokens or a multiple of 128, got 160"):
    attention.causal_attention(q, q, q, "pallas")
  with pytest.raises(ValueError, match="blocks of at most 128"):
    attention.pallas_attention(q[:, :16], q[:, :16], q[:, :16],
                               dict(attention.PALLAS_BLOCKS, block_q=256))
  attention.check_pallas_length(128)
  attention.check_pallas_length(384)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="a kernel for GPUs; this JAX backend is tpu"):
    attention.pallas_attention(q[:, :16], q[:, :16], q[:, :16])
  assert models.get_config("llama_9m", attention_implementation="pallas")
  with pytest.raises(ValueError, match="None, 'xla', 'cudnn' or 'pallas'"):
    models.get_config("llama_9m", attention_implementation="flash")
