"""Two LLaMA configurations that must compute the same model (another kernel for one
operation): the same parameters, logits and gradients, to bf16 rounding."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

import models


def assert_same_model(reference: models.LlamaConfig, other: models.LlamaConfig) -> None:
  """Logits within 3% and each gradient within 5% of the largest value of `reference`'s,
  the mean log-partition within 1e-3, on one batch of random tokens."""
  tokens = jax.random.randint(jax.random.key(0), (2, reference.max_seq_len), 0,
                              reference.vocab_size)
  ref, oth = models.Llama(reference), models.Llama(other)
  # Compiled: run op by op (each operation, and each step of an interpreted kernel's loop,
  # dispatched alone) the comparison took twice as long.
  params = jax.jit(ref.init)(jax.random.key(1), tokens)["params"]
  chex.assert_trees_all_equal_shapes_and_dtypes(
      params, jax.eval_shape(oth.init, jax.random.key(1), tokens)["params"])

  def loss(model, params):
    logits = model.apply({"params": params}, tokens).astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

  (l_r, logits_r), g_r = jax.jit(jax.value_and_grad(lambda p: loss(ref, p), has_aux=True))(params)
  (l_o, logits_o), g_o = jax.jit(jax.value_and_grad(lambda p: loss(oth, p), has_aux=True))(params)
  np.testing.assert_allclose(logits_o, logits_r, atol=3e-2 * float(jnp.abs(logits_r).max()))
  np.testing.assert_allclose(l_o, l_r, rtol=1e-3)
  for path, a, b in zip(*zip(*jax.tree_util.tree_leaves_with_path(g_o)),
                        jax.tree.leaves(g_r)):
    scale = float(jnp.abs(b).max()) or 1.0
    np.testing.assert_allclose(a, b, atol=5e-2 * scale, err_msg=jax.tree_util.keystr(path))
