"""LLaMA model: configs, exact parameter counts, causality, RoPE, sharding names, loss."""

import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models.attention import apply_rope, rope_frequencies, rope_qkv, rotate_half

TINY = models.LlamaConfig(
    name="tiny", hidden_size=64, intermediate_size=176, num_heads=4, num_layers=2,
    vocab_size=512, max_seq_len=64,
)


def _init(config, quant=None, length=16, seed=0):
  """Model, parameters drawn like `Llama.init` draws them, and tokens.

  Parameters come from NumPy on the shapes of `jax.eval_shape(model.init)`:
  compiling the real init costs seconds per config on CPU (`test_init` covers it).
  """
  model = models.Llama(config, quant=quant)
  rng = np.random.default_rng(seed)
  boxed = models.abstract_variables(config, quant)["params"]

  def draw(box):
    if box.names == ("norm",):
      return jnp.ones(box.value.shape, box.value.dtype)
    return jnp.asarray(rng.normal(0.0, config.init_std, box.value.shape), box.value.dtype)

  params = jax.tree.map(draw, boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, length)), jnp.int32)
  return model, params, tokens


def test_init():
  model = models.Llama(TINY)
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), tokens)
  params = nn.meta.unbox(variables["params"])
  chex.assert_trees_all_equal_shapes_and_dtypes(
      params, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                           nn.meta.unbox(models.abstract_variables(TINY)["params"])))
  assert set(variables) == {"params"}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if "layernorm" in name or name.startswith("['norm']"):
      np.testing.assert_array_equal(np.asarray(x), 1.0)
    else:
      assert x.dtype == jnp.float32 and abs(float(jnp.std(x)) - 0.02) < 0.003, name


# ---------------------------------------------------------------------------
# Configs and parameter counts.


@pytest.mark.parametrize("name,expected", [
    ("llama_60m", 58_073_600),
    ("llama_130m", 134_105_856),
    ("llama_350m", 367_969_280),
    ("llama_1b", 1_339_082_752),
])
def test_param_counts_match_the_official_models(name, expected):
  assert models.count_params(name) == expected


def test_known_shapes():
  for name, shape in {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12),
                      "350m": (1024, 2736, 16, 24), "1b": (2048, 5461, 32, 24)}.items():
    c = models.get_config(name)
    assert (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers) == shape
    assert (c.vocab_size, c.max_seq_len, c.rms_norm_eps, c.init_std) == (32000, 1024, 1e-6, 0.02)


def test_get_config_names_overrides_and_errors(tmp_path):
  assert models.get_config("60m") is models.get_config("llama_60m")
  assert models.get_config("LLaMA_60M").name == "llama_60m"
  assert models.get_config("llama_60m", vocab_size=32100).vocab_size == 32100
  assert models.count_params(models.get_config("9m", vocab_size=1000)) < models.count_params("9m")
  with pytest.raises(ValueError) as err:
    models.get_config("llama_61m")
  message = str(err.value)
  assert "\n" not in message and all(n in message for n in models.CONFIG_NAMES)


def test_get_config_reads_official_json(tmp_path):
  hf = {"architectures": ["LLaMAForCausalLM"], "hidden_act": "silu", "hidden_size": 768,
        "intermediate_size": 2048, "initializer_range": 0.02, "max_sequence_length": 1024,
        "model_type": "llama", "num_attention_heads": 12, "num_hidden_layers": 12,
        "pad_token_id": -1, "rms_norm_eps": 1e-06, "vocab_size": 32000}
  path = tmp_path / "llama_130m.json"
  path.write_text(json.dumps(hf))
  c = models.get_config(str(path))
  assert c.replace(name="llama_130m") == models.get_config("130m")
  assert models.count_params(c) == 134_105_856


@pytest.mark.parametrize("name", models.CONFIG_NAMES)
def test_every_config_traces_forward_and_backward(name):
  """Forward+backward of each named size's widths, shapes only (nothing allocated). Two
  layers: every layer is the same module, and tracing 32 of them costs seconds a size."""
  config = models.get_config(name)
  config = config.replace(num_layers=min(config.num_layers, 2))
  quant = models.QuantConfig() if name in ("llama_9m", "llama_60m") else None
  model = models.Llama(config, quant=quant)
  variables = models.abstract_variables(config, quant, batch=2, length=8)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)

  def loss_and_grad(params, tokens):
    def loss(p):
      logits = model.apply({"params": p}, tokens)
      return models.cross_entropy_loss(logits[:, :-1], tokens[:, 1:])[0]
    return jax.value_and_grad(loss)(params)

  params = nn.meta.unbox(variables["params"])
  loss, grads = jax.eval_shape(loss_and_grad, params, tokens)
  assert loss.shape == () and loss.dtype == jnp.float32
  chex.assert_trees_all_equal_shapes_and_dtypes(grads, params)


# ---------------------------------------------------------------------------
# Behaviour of the forward pass.


@pytest.mark.parametrize("quant", [None, models.QuantConfig(act_group=32)], ids=["bf16", "int4"])
def test_causality(quant):
  model, params, tokens = _init(TINY.replace(dtype="float32"), quant)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % TINY.vocab_size)
  apply = jax.jit(model.apply)
  a, b = apply({"params": params}, tokens), apply({"params": params}, changed)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert a.shape == (2, 16, TINY.vocab_size) and a.dtype == jnp.float32
  # With act_group=32 and 64 features, a group never spans two tokens, so the
  # activation quantizer is causal too (groups of 256 would straddle 4 tokens).
  np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
  assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def _np_rope(x, positions, theta=10000.0):
  """Reference: HF LLaMA's rotate-half RoPE, pair (i, i + d/2) rotated by p·θ^(−2i/d)."""
  d = x.shape[-1]
  out = np.empty_like(x, dtype=np.float64)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      p = positions[b, t]
      for i in range(d // 2):
        angle = p * theta ** (-2.0 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        x1, x2 = x[b, t, :, i], x[b, t, :, i + d // 2]
        out[b, t, :, i] = x1 * c - x2 * s
        out[b, t, :, i + d // 2] = x2 * c + x1 * s
  return out


def test_rope_matches_numpy_reference():
  x = np.random.default_rng(0).normal(size=(2, 7, 3, 16)).astype(np.float32)
  positions = np.array([np.arange(7), np.arange(100, 107)])
  got = jax.jit(apply_rope)(jnp.asarray(x), jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(got), _np_rope(x, positions), rtol=1e-4, atol=1e-4)
  # Relative: the q·k product depends only on the distance between positions.
  q = jnp.asarray(x[:1, :1])
  k = jnp.asarray(x[:1, 1:2])
  dots = [jnp.sum(apply_rope(q, jnp.array([[p]])) * apply_rope(k, jnp.array([[p + 3]])))
          for p in (0, 50)]
  np.testing.assert_allclose(float(dots[0]), float(dots[1]), rtol=1e-4)



def test_rope_of_stacked_heads_is_each_slice_rotated_bitwise():
  """The attention rotates q and k stacked (batch, length, 2, heads, head_dim) in one pass:
  each slice comes out bit for bit as it does rotated alone, in bfloat16 as in float32."""
  rng = np.random.default_rng(1)
  positions = jnp.asarray(np.array([np.arange(5), np.arange(40, 45)]))
  for dtype in (jnp.bfloat16, jnp.float32):
    qk = jnp.asarray(rng.normal(size=(2, 5, 2, 4, 8)) * 4, dtype)
    stacked = jax.jit(apply_rope)(qk, positions)
    for i in range(2):
      alone = jax.jit(apply_rope)(qk[:, :, i], positions)
      np.testing.assert_array_equal(np.asarray(stacked[:, :, i], np.float32),
                                    np.asarray(alone, np.float32))

def _np_rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def test_rotate_half_is_hf_rotate_half_bitwise():
  """`rotate_half` (the halves' axis flipped and signed) is HF's `cat(-x2, x1)`."""
  rng = np.random.default_rng(4)
  for dtype in (np.float32, jnp.bfloat16):
    for shape in ((8,), (3, 2, 16), (2, 5, 3, 4, 64)):
      x = rng.normal(size=shape).astype(dtype)
      got = jax.jit(rotate_half)(jnp.asarray(x))
      assert got.dtype == x.dtype
      np.testing.assert_array_equal(np.asarray(got, np.float32),
                                    _np_rotate_half(x.astype(np.float32)))


class RopeQkvTest(chex.TestCase):
  """`rope_qkv`: q, k and v out of the fused (batch, length, 3, heads, head_dim) product,
  with its backward pass written out."""

  def _inputs(self, dtype, seed=0):
    rng = np.random.default_rng(seed)
    qkv = rng.normal(size=(2, 5, 3, 4, 8)) * 3
    grads = [rng.normal(size=(2, 5, 4, 8)) for _ in range(3)]
    positions = jnp.asarray(np.array([np.arange(5), np.arange(40, 45)]))
    cos, sin = rope_frequencies(positions, 8)
    as_dtype = lambda a: jnp.asarray(a, dtype)
    return as_dtype(qkv), [as_dtype(g) for g in grads], positions, cos, sin

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_is_apply_rope_of_q_and_k_and_v_as_it_is(self):
    for dtype in (jnp.float32, jnp.bfloat16):
      qkv, _, positions, cos, sin = self._inputs(dtype)
      q, k, v = self.variant(rope_qkv)(qkv, cos, sin)
      for got, i in ((q, 0), (k, 1)):
        want = jax.jit(apply_rope)(qkv[:, :, i], positions)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
      np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(qkv[:, :, 2], np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_matches_numpy(self):
    """The gradient of the stacked product: each slice's gradient, q's and k's rotated back
    (RoPE's transpose: g·cos − rotate_half(g·sin)); none for the frequencies."""
    qkv, grads, _, cos, sin = self._inputs(jnp.float32)
    _, vjp = self.variant(lambda a, c, s: jax.vjp(rope_qkv, a, c, s))(qkv, cos, sin)
    dqkv, dcos, dsin = vjp(tuple(grads))
    c, s = (np.asarray(a, np.float64)[:, :, None] for a in (cos, sin))
    g = [np.asarray(a, np.float64) for a in grads]
    back = lambda d: d * c - _np_rotate_half(d * s)
    want = np.stack([back(g[0]), back(g[1]), g[2]], axis=2)
    np.testing.assert_allclose(np.asarray(dqkv), want, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(dcos)) and not np.any(np.asarray(dsin))

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_is_autodiffs_of_the_sliced_form(self):
    """The same gradient as autodiff of `apply_rope` on the slices, bit for bit in bfloat16
    (both round one float32 result) and in float32 to a rounding."""
    for dtype in (jnp.float32, jnp.bfloat16):
      qkv, grads, positions, cos, sin = self._inputs(dtype, seed=1)
      sliced = lambda a: (apply_rope(a[:, :, 0], positions), apply_rope(a[:, :, 1], positions),
                          a[:, :, 2])
      got = self.variant(lambda a, g: jax.vjp(lambda x: rope_qkv(x, cos, sin), a)[1](g)[0])(
          qkv, tuple(grads))
      want = jax.jit(lambda a, g: jax.vjp(sliced, a)[1](g)[0])(qkv, tuple(grads))
      assert got.dtype == dtype
      if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
      else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_remat_matches():
  model, params, tokens = _init(TINY.replace(dtype="float32"))
  remat = models.Llama(TINY.replace(dtype="float32", remat=True))

  def grads(m):
    f = lambda p: models.cross_entropy_loss(m.apply({"params": p}, tokens), tokens)[0]
    return jax.jit(jax.grad(f))(params)

  chex.assert_trees_all_close(grads(model), grads(remat), rtol=1e-5, atol=1e-7)


def test_bf16_logits_are_the_float32_logits_rounded():
  """`logits_dtype="bfloat16"` (HF LLaMA in bf16): the head's float32-accumulated output,
  rounded once; the loss stays float32 and the gradient follows the float32 head's."""
  model, params, tokens = _init(TINY)
  bf16 = models.Llama(TINY.replace(logits_dtype="bfloat16"))
  want = jax.jit(model.apply)({"params": params}, tokens)
  got = jax.jit(bf16.apply)({"params": params}, tokens)
  assert want.dtype == jnp.float32 and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want.astype(jnp.bfloat16), np.float32),
                             rtol=2**-8, atol=1e-6)

  def loss_and_grads(m):
    f = lambda p: models.cross_entropy_loss(m.apply({"params": p}, tokens), tokens)[0]
    return jax.jit(jax.value_and_grad(f))(params)

  (want_loss, want_g), (got_loss, got_g) = loss_and_grads(model), loss_and_grads(bf16)
  assert got_loss.dtype == jnp.float32
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-3)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  cos = flat(got_g) @ flat(want_g) / np.linalg.norm(flat(got_g)) / np.linalg.norm(flat(want_g))
  assert cos > 0.999, cos
  with pytest.raises(ValueError, match="logits_dtype"):
    TINY.replace(logits_dtype="float16")
  with pytest.raises(ValueError, match="remat_policy 'dots' is not"):
    TINY.replace(remat_policy="dots")


def test_int4_initial_loss_close_to_bf16():
  config = TINY.replace(hidden_size=256, intermediate_size=688, vocab_size=1024, num_layers=1)
  losses = {}
  for label, quant in (("bf16", None), ("int4", models.QuantConfig()),
                       ("fp4", models.get_quant_config("fp4"))):
    model, params, tokens = _init(config, quant, length=32)
    logits = jax.jit(model.apply)({"params": params}, tokens)
    losses[label] = float(models.cross_entropy_loss(logits[:, :-1], tokens[:, 1:])[0])
  assert abs(losses["int4"] - losses["bf16"]) < 0.03 * losses["bf16"], losses
  assert abs(losses["fp4"] - losses["bf16"]) < 0.03 * losses["bf16"], losses


def test_stochastic_quant_uses_the_quant_rng():
  model, params, tokens = _init(TINY, models.QuantConfig(stochastic=True))
  apply = jax.jit(model.apply)
  a = apply({"params": params}, tokens, rngs={"quant": jax.random.key(1)})
  b = apply({"params": params}, tokens, rngs={"quant": jax.random.key(1)})
  c = apply({"params": params}, tokens, rngs={"quant": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="quant"):
    model.apply({"params": params}, tokens)


def test_quant_changes_only_the_projections():
  params = nn.meta.unbox(models.abstract_variables(TINY)["params"])
  tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  int4 = models.Llama(TINY, quant=models.QuantConfig())
  seen = []

  def spy(next_fun, args, kwargs, context):
    projection = (models.linears.DenseGeneral, models.linears.ProjectionWeights)
    if context.method_name == "__call__" and isinstance(context.module, projection):
      seen.append(("/".join(context.module.path), context.module.quant is not None))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p, t: int4.apply({"params": p}, t), params, tokens)
  quantized = {p for p, q in seen if q}
  assert {p for p, q in seen if not q} == {"lm_head"}
  assert len(quantized) == 7 * TINY.num_layers
  assert {p.rsplit("/", 1)[-1] for p in quantized} == {
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ---------------------------------------------------------------------------
# Sharding names and the loss.


def test_logical_axis_names_on_every_param():
  variables = models.abstract_variables(TINY)
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == len(b.value.shape)
    assert set(b.names) <= set(models.LOGICAL_AXIS_NAMES)
  specs = nn.logical_to_mesh(nn.get_partition_spec(variables), models.DEFAULT_LOGICAL_AXIS_RULES)
  layer = specs["params"]["layers_0"]
  assert tuple(layer["mlp"]["gate_proj"]["kernel"]) == ("fsdp", "tensor")
  assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("fsdp", "tensor", None)
  assert tuple(specs["params"]["embed_tokens"]["embedding"]) == ("tensor", "fsdp")
  activation = nn.logical_to_mesh_axes(("batch", "length", "embed"), models.DEFAULT_LOGICAL_AXIS_RULES)
  assert tuple(activation) == (("data", "fsdp"), None, None)


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  mask = rng.integers(0, 2, size=(2, 5)).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  loss, n = models.cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                      jnp.asarray(targets), jnp.asarray(mask))
  ref_logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  ref_logp = ref_logits - np.log(np.exp(ref_logits).sum(-1, keepdims=True))
  ref = -(np.take_along_axis(ref_logp, targets[..., None], -1)[..., 0] * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(n) == mask.sum()
  full, n_all = models.cross_entropy_loss(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(float(full), nll.mean(), rtol=1e-5)
  assert float(n_all) == 10 and loss.dtype == jnp.float32


def test_cross_entropy_gradient_is_softmax_minus_one_hot():
  """d loss / d logits = mask · (softmax − one_hot(target)) / n_tokens, against NumPy."""
  rng = np.random.default_rng(1)
  logits = (rng.normal(size=(3, 4, 7)) * 4).astype(np.float32)
  targets = rng.integers(0, 7, size=(3, 4))
  mask = (rng.random((3, 4)) < 0.7).astype(np.float32)
  grad = jax.grad(lambda x: models.cross_entropy_loss(x, jnp.asarray(targets),
                                                      jnp.asarray(mask))[0])(jnp.asarray(logits))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = (p - np.eye(7, dtype=np.float32)[targets]) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-5, atol=1e-7)


def test_attention_asks_for_cudnn_on_a_gpu_and_falls_back_to_xla(monkeypatch):
  """`implementation=None`: cuDNN flash attention traced first on a GPU; a refusal → XLA."""
  from models import attention
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.float32) for _ in range(3))
  want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  real, calls = jax.nn.dot_product_attention, []

  def recording(*args, implementation=None, **kwargs):
    calls.append(implementation)
    if implementation == "cudnn":
      raise NotImplementedError("Q must be fp16/bf16")  # what cuDNN says to float32 inputs
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  chex.assert_trees_all_close(attention.causal_attention(q, k, v), want)
  assert calls == ["xla"]  # on the CPU, cuDNN is not asked for
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_compute_capability", lambda: 9.0)  # an H100
  calls.clear()
  chex.assert_trees_all_close(attention.causal_attention(q, k, v), want)
  assert calls == ["cudnn", "xla"]
  monkeypatch.setattr(attention, "_compute_capability", lambda: 7.0)  # a V100: XLA only
  calls.clear()
  chex.assert_trees_all_close(attention.causal_attention(q, k, v), want)
  assert calls == ["xla"]
  calls.clear()
  attention.causal_attention(q, k, v, "xla")
  assert calls == ["xla"]
  with pytest.raises(ValueError, match="attention_implementation"):
    TINY.replace(attention_implementation="flash")
