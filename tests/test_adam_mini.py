"""Adam-mini (experiments.adam_mini): the LLaMA block partition and the update rule."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from experiments import adam_mini
from models.config import LlamaConfig

HIDDEN, INTER, HEADS, LAYERS, VOCAB = 16, 24, 2, 2, 11
HEAD_DIM = HIDDEN // HEADS
TINY = LlamaConfig(name="tiny", hidden_size=HIDDEN, intermediate_size=INTER, num_heads=HEADS,
                   num_layers=LAYERS, vocab_size=VOCAB, max_seq_len=16)

# Blocks per leaf, from the paper's partition: q, k per head; v, o, MLP and the head per
# output neuron; the embedding per token; a norm scale is one block.
EXPECTED_BLOCKS = {
    "q_proj": HEADS, "k_proj": HEADS, "v_proj": HIDDEN, "o_proj": HIDDEN,
    "gate_proj": INTER, "up_proj": INTER, "down_proj": HIDDEN,
    "embed_tokens": VOCAB, "lm_head": VOCAB,
    "input_layernorm": 1, "post_attention_layernorm": 1, "norm": 1,
}


def _params():
  boxed = models.abstract_variables(TINY)["params"]
  shapes = nn.meta.unbox(boxed)
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32) for s in leaves])


def _module(path):
  names = [str(k.key) for k in path]
  return names[-2]


def test_partition_blocks_per_leaf():
  counts = adam_mini.num_blocks(_params())
  seen = set()
  for path, n in jax.tree_util.tree_flatten_with_path(counts)[0]:
    seen.add(_module(path))
    assert n == EXPECTED_BLOCKS[_module(path)], (jax.tree_util.keystr(path), n)
  assert seen == set(EXPECTED_BLOCKS)


def test_partition_scan_layers_layout_is_per_layer():
  """Decoder leaves stacked under ``layers`` (leading layer axis): blocks never span layers."""
  unstacked = _params()
  layers = [unstacked[f"layers_{i}"] for i in range(LAYERS)]
  scanned = {k: v for k, v in unstacked.items() if not k.startswith("layers_")}
  scanned["layers"] = jax.tree.map(lambda *x: jnp.stack(x), *layers)
  counts = adam_mini.num_blocks(scanned)
  for path, n in jax.tree_util.tree_flatten_with_path(counts["layers"])[0]:
    assert n == LAYERS * EXPECTED_BLOCKS[_module(path)], jax.tree_util.keystr(path)
  state = adam_mini.scale_by_adam_mini().init(scanned)
  chex.assert_shape(state.nu["layers"]["self_attn"]["q_proj"]["kernel"], (LAYERS, 1, HEADS, 1))
  chex.assert_shape(state.nu["embed_tokens"]["embedding"], (VOCAB, 1))


def _torch_rows(path, x):
  """The leaf as the official code sees it: a torch (out, in) matrix viewed as block rows."""
  module = _module(path)
  if module in ("q_proj", "k_proj"):  # (embed, heads, hd) -> weight (heads*hd, embed) -> heads
    return x.reshape(HIDDEN, -1).T.reshape(HEADS, -1)
  if module == "v_proj":
    return x.reshape(HIDDEN, -1).T
  if module == "o_proj":
    return x.reshape(-1, HIDDEN).T
  if module in ("gate_proj", "up_proj", "down_proj", "lm_head"):
    return x.T
  if module == "embed_tokens":
    return x
  return x.reshape(1, -1)  # norms: one block


def _numpy_adam_mini(params, grads, lrs, b1, b2, eps, wd):
  """The official Adam_mini.step in float64, block by block on torch-layout rows."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  p = [np.asarray(x, np.float64) for _, x in flat]
  m = [np.zeros_like(x) for x in p]
  v = [np.zeros(_torch_rows(path, x).shape[0]) for (path, _), x in zip(flat, p)]
  for t, (g_tree, lr) in enumerate(zip(grads, lrs), start=1):
    g_leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(g_tree)]
    for i, ((path, _), g) in enumerate(zip(flat, g_leaves)):
      rows = _torch_rows(path, g)
      v[i] = b2 * v[i] + (1 - b2) * np.mean(rows * rows, axis=1)
      if "norm" not in _module(path):
        p[i] = p[i] * (1 - lr * wd)
      m[i] = b1 * m[i] + (1 - b1) * g
      h = np.sqrt(v[i]) / np.sqrt(1 - b2**t) + eps
      m_rows = _torch_rows(path, m[i]) / (1 - b1**t)
      update_rows = m_rows / h[:, None]
      # back from rows to the leaf's layout: invert _torch_rows on an index array
      idx = _torch_rows(path, np.arange(g.size).reshape(g.shape))
      update = np.empty(g.size)
      update[idx.ravel()] = update_rows.ravel()
      p[i] = p[i] - lr * update.reshape(g.shape)
  return jax.tree.unflatten(treedef, p)


class AdamMiniTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference_over_ten_steps(self):
    params = _params()
    rng = np.random.default_rng(1)
    leaves, treedef = jax.tree.flatten(params)
    # Gradient scales differ per step and leaf so that the block means matter.
    grads = [jax.tree.unflatten(treedef, [
        jnp.asarray(rng.normal(0, 10.0 ** rng.uniform(-3, 0), x.shape), jnp.float32)
        for x in leaves]) for _ in range(10)]
    schedule = optax.linear_schedule(1e-2, 1e-3, 10)
    kw = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    opt = adam_mini.adam_mini(schedule, **kw)
    update = self.variant(opt.update)
    state = opt.init(params)
    got = params
    for g in grads:
      updates, state = update(g, state, got)
      got = optax.apply_updates(got, updates)
    want = _numpy_adam_mini(params, grads, [float(schedule(t)) for t in range(10)],
                            kw["b1"], kw["b2"], kw["eps"], kw["weight_decay"])
    chex.assert_trees_all_close(got, jax.tree.map(lambda x: x.astype(np.float32), want),
                                rtol=2e-5, atol=1e-6)
    chex.assert_equal(int(state[0].count), 10)

  def test_one_second_moment_per_block(self):
    params = _params()
    state = adam_mini.scale_by_adam_mini().init(params)
    n_nu = sum(x.size for x in jax.tree.leaves(state.nu))
    assert n_nu == sum(jax.tree.leaves(adam_mini.num_blocks(params)))
    assert n_nu < 0.1 * sum(x.size for x in jax.tree.leaves(params))
