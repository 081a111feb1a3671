"""RoPE's split and its gradient, SwiGLU's forward and backward and the projections' stack as
Pallas kernels (interpreted here) against the XLA forms they replace and against NumPy."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import models
from models import attention, elementwise_kernels, linears, pallas_platform

import _triton_lowering

BF16 = jnp.bfloat16


def _rope_inputs(shape, dtype, seed=0):
  qkv = jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)
  batch, length, head_dim = shape[0], shape[1], shape[-1]
  positions = jnp.broadcast_to(jnp.arange(length) * 7 + 3, (batch, length))
  return (qkv,) + attention.rope_frequencies(positions, head_dim)


def _numpy_rope(qkv, cos, sin):
  x = np.asarray(qkv, np.float64)
  cos, sin = (np.asarray(a, np.float64)[:, :, None, :] for a in (cos, sin))
  half = x.shape[-1] // 2
  rot = lambda y: np.concatenate([-y[..., half:], y[..., :half]], -1)
  return [x[:, :, i] * cos + rot(x[:, :, i]) * sin for i in (0, 1)] + [x[:, :, 2]]


def _swiglu_inputs(lead, features, dtype, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  gate_up = (3 * jax.random.normal(k1, lead + (2, features))).astype(dtype)
  return gate_up, jax.random.normal(k2, lead + (features,)).astype(dtype)


def _numpy_swiglu_grad(gate_up, dh):
  x, g = np.asarray(gate_up, np.float64), np.asarray(dh, np.float64)
  gate, up = x[..., 0, :], x[..., 1, :]
  sig = 1 / (1 + np.exp(-gate))
  return np.stack([g * up * sig * (1 + gate * (1 - sig)), g * gate * sig], axis=-2)


# Shapes: heads and half head dims that are powers of two, and ones padded (3 heads; a head
# dimension of 12, halves of 6).
ROPE_SHAPES = [(2, 8, 3, 4, 16), (1, 6, 3, 3, 12)]
# Widths: one masked block (48 of 64), one whole block (32), and two blocks of 1024 of
# which the second is partly masked (1100).
SWIGLU_SHAPES = [((2, 3), 48), ((4,), 32), ((1, 2), 1100)]


class RopeSplitTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*ROPE_SHAPES)
  def test_bitwise_the_xla_forward(self, *shape):
    qkv, cos, sin = _rope_inputs(shape, BF16)
    got = self.variant(elementwise_kernels.rope_split)(qkv, cos, sin)
    chex.assert_trees_all_equal(got, attention.rope_qkv(qkv, cos, sin, "xla"))

  @parameterized.parameters(*ROPE_SHAPES)
  def test_matches_numpy(self, *shape):
    qkv, cos, sin = _rope_inputs(shape, jnp.float32, seed=1)
    for got, want in zip(elementwise_kernels.rope_split(qkv, cos, sin),
                         _numpy_rope(qkv, cos, sin)):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

  def test_rope_qkv_takes_it_forward_and_rope_grad_backward(self):
    qkv, cos, sin = _rope_inputs(ROPE_SHAPES[0], BF16)  # halves of 8 bf16: aligned
    grads = _rope_grads(qkv)

    def forward_and_backward(impl_is_pallas, qkv, grads):
      impl = "pallas" if impl_is_pallas else "xla"
      fwd, vjp = jax.vjp(lambda x: attention.rope_qkv(x, cos, sin, impl), qkv)
      return fwd, vjp(grads)

    f = lambda impl: jax.jit(forward_and_backward, static_argnums=0)(impl, qkv, grads)
    chex.assert_trees_all_equal(f(True), f(False))
    assert "pallas_call" in str(jax.make_jaxpr(
        lambda g: jax.vjp(lambda x: attention.rope_qkv(x, cos, sin, "pallas"), qkv)[1](g))(grads))

  def test_positions_shared_by_the_batch(self):
    qkv, cos, sin = _rope_inputs((3, 4, 3, 2, 16), BF16)
    cos, sin = cos[:1], sin[:1]  # (1, length, head_dim): every sequence at the same positions
    chex.assert_trees_all_equal(elementwise_kernels.rope_split(qkv, cos, sin),
                                attention.rope_qkv(qkv, cos, sin, "xla"))

  def test_refuses_other_shapes(self):
    with self.assertRaisesRegex(ValueError, "rope_split takes"):
      elementwise_kernels.rope_split(jnp.zeros((1, 2, 2, 4, 8)), jnp.zeros((1, 2, 8)),
                                     jnp.zeros((1, 2, 8)))


def _rope_grads(qkv, seed=5):
  return tuple(jax.random.normal(jax.random.key(seed + i), qkv[:, :, 0].shape).astype(qkv.dtype)
               for i in range(3))


def _xla_rope_grad(dq, dk, dv, cos, sin):
  bwd = attention._rope_qkv_bwd  # pylint: disable=protected-access
  return bwd("xla", (cos, sin), (dq, dk, dv))[0]


class RopeGradTest(parameterized.TestCase):

  @parameterized.parameters(*ROPE_SHAPES, (2, 128, 3, 2, 64))
  def test_the_xla_backward_up_to_a_fused_multiply_add(self, *shape):
    """Both jitted. g1·cos + g2·sin in float32 is rounded once or twice depending on whether
    XLA contracts it into a fused multiply-add, which differs between XLA's versions and
    between the kernel and XLA's form: where the bf16 results differ (a handful of ties in
    10⁵), by one bf16 step. v's gradient is copied: equal."""
    qkv, cos, sin = _rope_inputs(shape, BF16)
    grads = _rope_grads(qkv)
    got = jax.jit(elementwise_kernels.rope_grad)(*grads, cos, sin)
    want = jax.jit(_xla_rope_grad)(*grads, cos, sin)
    assert got.shape == qkv.shape and got.dtype == BF16
    got, want = (np.asarray(a, np.float32) for a in (got, want))
    differ = got != want
    assert differ.mean() < 1e-3
    np.testing.assert_array_less(np.abs(got - want)[differ], np.abs(want[differ]) * 2**-7 + 1e-30)
    np.testing.assert_array_equal(got[:, :, 2], want[:, :, 2])

  @parameterized.parameters(*ROPE_SHAPES)
  def test_matches_numpy(self, *shape):
    """The transpose of the rotation: ⟨rope(x), g⟩ = ⟨x, rope_grad(g)⟩ for q and k; v's
    gradient as it is."""
    qkv, cos, sin = _rope_inputs(shape, jnp.float32, seed=3)
    grads = _rope_grads(qkv)
    got = np.asarray(elementwise_kernels.rope_grad(*grads, cos, sin), np.float64)
    c, s_ = (np.asarray(a, np.float64)[:, :, None, :] for a in (cos, sin))
    half = shape[-1] // 2
    for part in (0, 1):
      g = np.asarray(grads[part], np.float64)
      g1, g2 = g[..., :half], g[..., half:]
      want = np.concatenate([g1 * c[..., :half] + g2 * s_[..., half:],
                             g2 * c[..., half:] - g1 * s_[..., :half]], -1)
      np.testing.assert_allclose(got[:, :, part], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, :, 2], np.asarray(grads[2]))
    x = np.asarray(qkv, np.float64)  # the adjoint identity, in float64
    for part, rotated in zip((0, 1), _numpy_rope(qkv, cos, sin)):
      lhs = np.sum(rotated * np.asarray(grads[part], np.float64))
      np.testing.assert_allclose(lhs, np.sum(x[:, :, part] * got[:, :, part]), rtol=1e-5)

  def test_refuses_other_shapes(self):
    with self.assertRaisesRegex(ValueError, "rope_grad takes"):
      elementwise_kernels.rope_grad(jnp.zeros((1, 2, 4, 8)), jnp.zeros((1, 2, 4, 8)),
                                    jnp.zeros((1, 2, 4, 6)), jnp.zeros((1, 2, 8)),
                                    jnp.zeros((1, 2, 8)))


def _xla_swiglu(gate_up):
  return linears.swiglu(gate_up, "xla")


class SwigluTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SWIGLU_SHAPES)
  def test_bitwise_the_xla_forward(self, lead, features):
    for dtype in (BF16, jnp.float32):
      gate_up = _swiglu_inputs(lead, features, dtype)[0]
      chex.assert_trees_all_equal(self.variant(elementwise_kernels.swiglu)(gate_up),
                                  self.variant(_xla_swiglu)(gate_up))

  @chex.variants(with_jit=True, without_jit=True)
  def test_bitwise_the_xla_forward_at_the_extremes(self):
    """exp(−gate) overflowing (gate ≪ 0: σ = 0 and −0 out), σ = 1, infinities and NaN."""
    gate = jnp.array([-200., -90., -20., -1e-3, 0., 1e-3, 20., 90., 200., jnp.inf, -jnp.inf,
                      jnp.nan, 3., -3., 0.5, -0.5])
    up = jnp.array([1., -2., 3., 4., jnp.inf, 5., -6., 7., 0., 2., 2., 1., jnp.nan, -jnp.inf,
                    1e30, -1e-30])
    for dtype in (BF16, jnp.float32):
      gate_up = jnp.stack([gate, up])[None].astype(dtype)
      got, want = (self.variant(f)(gate_up) for f in (elementwise_kernels.swiglu, _xla_swiglu))
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
      np.testing.assert_array_equal(np.signbit(np.asarray(got, np.float32)),
                                    np.signbit(np.asarray(want, np.float32)))

  @parameterized.parameters(*SWIGLU_SHAPES)
  def test_matches_numpy(self, lead, features):
    gate_up = np.asarray(_swiglu_inputs(lead, features, jnp.float32, seed=3)[0], np.float64)
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    np.testing.assert_allclose(np.asarray(elementwise_kernels.swiglu(jnp.asarray(gate_up,
                                                                                 jnp.float32))),
                               gate / (1 + np.exp(-gate)) * up, rtol=1e-6, atol=1e-6)

  def test_swiglu_takes_it_forward(self):
    gate_up = _swiglu_inputs((2, 3), 48, BF16)[0]
    jaxpr = lambda impl: str(jax.make_jaxpr(lambda x: linears.swiglu(x, impl))(gate_up))
    assert "pallas_call" in jaxpr("pallas")
    assert "pallas_call" not in jaxpr("xla")

  def test_refuses_other_shapes(self):
    with self.assertRaisesRegex(ValueError, "swiglu takes"):
      elementwise_kernels.swiglu(jnp.zeros((4, 3, 8)))


class SwigluGradTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SWIGLU_SHAPES)
  def test_bitwise_the_xla_backward(self, lead, features):
    gate_up, dh = _swiglu_inputs(lead, features, BF16)
    got = self.variant(elementwise_kernels.swiglu_grad)(gate_up, dh)
    want = linears._swiglu_grad_xla(gate_up, dh)[0]  # pylint: disable=protected-access
    chex.assert_trees_all_equal(got, want)

  @parameterized.parameters(*SWIGLU_SHAPES)
  def test_matches_numpy(self, lead, features):
    gate_up, dh = _swiglu_inputs(lead, features, jnp.float32, seed=2)
    np.testing.assert_allclose(np.asarray(elementwise_kernels.swiglu_grad(gate_up, dh)),
                               _numpy_swiglu_grad(gate_up, dh), rtol=1e-5, atol=1e-5)

  def test_swiglu_takes_it_backward(self):
    gate_up, dh = _swiglu_inputs((2, 3), 48, BF16)
    out = {impl: jax.vjp(lambda x, impl=impl: linears.swiglu(x, impl), gate_up)
           for impl in ("xla", "pallas")}
    chex.assert_trees_all_equal(out["pallas"][0], out["xla"][0])
    chex.assert_trees_all_equal(out["pallas"][1](dh), out["xla"][1](dh))

  def test_refuses_other_shapes(self):
    with self.assertRaisesRegex(ValueError, "swiglu_grad takes"):
      elementwise_kernels.swiglu_grad(jnp.zeros((4, 3, 8)), jnp.zeros((4, 8)))
    with self.assertRaisesRegex(ValueError, "swiglu_grad takes"):
      elementwise_kernels.swiglu_grad(jnp.zeros((4, 2, 8)), jnp.zeros((4, 6)))


# Kernels stacked: two of 48 features (one masked block of 64), cast from float32; three of
# (2, 8) features; two of 1100 (the second block of 1024 masked), five rows (one a program).
STACK_SHAPES = [(2, (6, 48), jnp.float32, BF16), (3, (8, 2, 8), BF16, BF16),
                (2, (5, 1100), BF16, BF16), (3, (4, 3, 16), jnp.float32, jnp.float32)]


class StackTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*STACK_SHAPES)
  def test_bitwise_jnp_stack_and_its_gradient(self, n, shape, dtype, out_dtype):
    keys = jax.random.split(jax.random.key(n), n)
    kernels = tuple(jax.random.normal(k, shape).astype(dtype) for k in keys)
    got = self.variant(lambda *k: elementwise_kernels.stack(k, out_dtype))(*kernels)
    want = jnp.stack([k.astype(out_dtype) for k in kernels], axis=1)
    assert got.dtype == want.dtype
    chex.assert_trees_all_equal(got, want)
    weights = jnp.arange(want.size, dtype=jnp.float32).reshape(want.shape) % 7 - 3
    grad = lambda f: jax.grad(lambda *k: jnp.sum(f(k).astype(jnp.float32) * weights),
                              argnums=tuple(range(n)))(*kernels)
    got_grads = self.variant(lambda: grad(lambda k: elementwise_kernels.stack(k, out_dtype)))()
    want_grads = grad(lambda k: jnp.stack([x.astype(out_dtype) for x in k], axis=1))
    chex.assert_trees_all_equal(got_grads, want_grads)  # each in its kernel's dtype

  def test_refuses_other_shapes(self):
    with pytest.raises(ValueError, match="stack takes kernels of one shape"):
      elementwise_kernels.stack([jnp.zeros((4, 8)), jnp.zeros((4, 16))], BF16)
    with pytest.raises(ValueError, match="stack takes kernels of one shape"):
      elementwise_kernels.stack([jnp.zeros((8,))], BF16)


def test_tiles():
  """Rows a power of two dividing the rows given, within 8192 elements a tile."""
  assert elementwise_kernels._rows(16384, 16 * 64) == 8  # pylint: disable=protected-access
  assert elementwise_kernels._rows(16384, 2 * 1024) == 4  # pylint: disable=protected-access
  assert elementwise_kernels._rows(6, 64) == 2  # pylint: disable=protected-access
  assert elementwise_kernels._rows(5, 64) == 1  # pylint: disable=protected-access
  assert elementwise_kernels._rows(16384, 1024, 2048) == 2  # pylint: disable=protected-access
  # RoPE's kernels with another tile (rows a program, warps): the same values
  qkv, cos, sin = _rope_inputs((2, 8, 3, 4, 16), BF16)
  for tile in ((64, 4), (2048, 8)):
    chex.assert_trees_all_equal(elementwise_kernels.rope_split(qkv, cos, sin, tile=tile),
                                elementwise_kernels.rope_split(qkv, cos, sin))
    grads = _rope_grads(qkv)
    chex.assert_trees_all_equal(elementwise_kernels.rope_grad(*grads, cos, sin, tile=tile),
                                elementwise_kernels.rope_grad(*grads, cos, sin))


def test_the_models_take_the_kernels_only_where_rows_stay_16_byte_aligned(monkeypatch):
  """llama_1b's 5461-wide MLP: Triton would load its misaligned rows two bytes at a time, so
  the models keep XLA's form there (and for any width or half head dimension like it)."""
  assert elementwise_kernels.aligned(2736, BF16) and elementwise_kernels.aligned(32, BF16)
  assert not elementwise_kernels.aligned(5461, BF16)
  assert not elementwise_kernels.aligned(1100, BF16) and elementwise_kernels.aligned(1100,
                                                                                     jnp.float32)
  called = []
  real_swiglu, real_rope = elementwise_kernels.swiglu_grad, elementwise_kernels.rope_split
  real_forward = elementwise_kernels.swiglu
  monkeypatch.setattr(elementwise_kernels, "swiglu_grad",
                      lambda *a: called.append("swiglu") or real_swiglu(*a))
  monkeypatch.setattr(elementwise_kernels, "swiglu",
                      lambda *a: called.append("swiglu_forward") or real_forward(*a))
  monkeypatch.setattr(elementwise_kernels, "rope_split",
                      lambda *a: called.append("rope") or real_rope(*a))
  real_rope_grad = elementwise_kernels.rope_grad
  monkeypatch.setattr(elementwise_kernels, "rope_grad",
                      lambda *a: called.append("rope_grad") or real_rope_grad(*a))
  for features, expected in ((1100, []), (48, ["swiglu_forward", "swiglu"])):
    gate_up, dh = _swiglu_inputs((1, 2), features, BF16)
    jax.eval_shape(lambda x, d: jax.vjp(lambda y: linears.swiglu(y, "pallas"), x)[1](d),
                   gate_up, dh)  # traced: the kernels taken, nothing computed
    assert called == expected, features
    called.clear()
  for shape, expected in (((1, 2, 3, 2, 12), []), ((1, 2, 3, 2, 16), ["rope", "rope_grad"])):
    qkv, cos, sin = _rope_inputs(shape, BF16)  # halves of 6 or 8 bf16
    jax.eval_shape(lambda x, d: jax.vjp(lambda y: attention.rope_qkv(y, cos, sin, "pallas"),
                                        x)[1](d), qkv, _rope_grads(qkv))
    assert called == expected, shape
    called.clear()
  real_stack = elementwise_kernels.stack
  monkeypatch.setattr(elementwise_kernels, "stack",
                      lambda *a: called.append("stack") or real_stack(*a))
  x = jnp.ones((2, 16), BF16)
  for features, quant, expected in ((1100, None, []), (48, None, ["stack"]),
                                    (48, models.QuantConfig(weight_group=16), [])):
    weights = [(jnp.ones((16, features), jnp.float32), quant, None) for _ in range(2)]
    jax.eval_shape(lambda: linears.fused_projections(x, weights, BF16, "pallas"))
    assert called == expected, (features, quant)
    called.clear()
  jax.eval_shape(lambda: linears.fused_projections(x, weights[:1] * 2, BF16, "xla"))
  assert not called


def test_the_config_picks_and_refuses():
  assert pallas_platform.default_implementation() == "xla"  # a CPU
  assert pallas_platform.triton_available()  # the installed jax's Pallas has it


def test_the_default_is_pallas_on_one_gpu_with_tritons_backend(monkeypatch):
  monkeypatch.setattr(pallas_platform.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(pallas_platform.jax, "device_count", lambda: 1)
  monkeypatch.setattr(pallas_platform, "compute_capability", lambda: 9.0)
  monkeypatch.setattr(pallas_platform, "triton_available", lambda: True)
  assert pallas_platform.default_implementation() == "pallas"
  monkeypatch.setattr(pallas_platform.jax, "device_count", lambda: 2)  # XLA partitions them
  assert pallas_platform.default_implementation() == "xla"
  monkeypatch.setattr(pallas_platform.jax, "device_count", lambda: 1)
  monkeypatch.setattr(pallas_platform, "compute_capability", lambda: 7.5)  # before Ampere
  assert pallas_platform.default_implementation() == "xla"
  monkeypatch.setattr(pallas_platform, "compute_capability", lambda: 9.0)
  monkeypatch.setattr(pallas_platform, "triton_available", lambda: False)  # a jax without it
  assert pallas_platform.default_implementation() == "xla"


def test_a_jax_without_pallas_triton_backend_is_told_apart(monkeypatch):
  def gone():
    raise ImportError("cannot import name 'triton' from 'jax.experimental.pallas'")

  pallas_platform.triton_available.cache_clear()
  monkeypatch.setattr(pallas_platform, "triton", gone)
  try:
    assert not pallas_platform.triton_available()
  finally:
    pallas_platform.triton_available.cache_clear()
  with pytest.raises(ValueError, match="elementwise_implementation 'triton' is not"):
    models.get_config("llama_9m", elementwise_implementation="triton")


def test_llama_with_the_kernels_is_the_same_model():
  """The whole model under `nn.scan` (the block rematerialised: each kernel's forward runs
  again in the backward pass): the same loss and gradients, bit for bit, with the kernels as
  with XLA's forms."""
  config = models.LlamaConfig(name="tiny", hidden_size=48, intermediate_size=80, num_heads=3,
                              num_layers=2, vocab_size=64, max_seq_len=8, dtype="bfloat16",
                              param_dtype="float32", scan_layers=True,
                              norm_implementation="xla", elementwise_implementation="xla")
  tokens = jax.random.randint(jax.random.key(0), (2, config.max_seq_len), 0, config.vocab_size)
  params = jax.jit(models.Llama(config).init)(jax.random.key(1), tokens)["params"]

  def loss_and_grads(cfg):
    def loss(p):
      logits = models.Llama(cfg).apply({"params": p}, tokens).astype(jnp.float32)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return jax.jit(jax.value_and_grad(loss))(params)

  chex.assert_trees_all_equal(
      loss_and_grads(config.replace(elementwise_implementation="pallas")),
      loss_and_grads(config))


def test_failures_name_their_kernels():
  triton = "INTERNAL: Triton compilation failed for pallas_call {}\nmore"
  rope = RuntimeError(triton.format("_rope_kernel"))
  norm = RuntimeError(triton.format("add_rms_norm"))
  anonymous = RuntimeError("INTERNAL: Triton compilation failed")
  failure = models.is_pallas_failure
  assert failure(rope) and failure(norm)
  assert failure(rope, "elementwise") and not failure(rope, "norm")
  assert failure(norm, "norm") and not failure(norm, "elementwise")
  assert failure(anonymous, "norm") and failure(anonymous, "elementwise")
  assert not failure(MemoryError("out of memory"), "elementwise")


@pytest.mark.parametrize("kernel, shapes", [
    ("rope_split", [((2, 8, 3, 4, 64), BF16), ((2, 8, 64), jnp.float32),
                    ((2, 8, 64), jnp.float32)]),
    ("rope_split", [((2, 8, 3, 12, 96), BF16), ((2, 8, 96), jnp.float32),  # masked heads, halves
                    ((2, 8, 96), jnp.float32)]),
    ("swiglu_grad", [((2, 8, 2, 2736), BF16), ((2, 8, 2736), BF16)]),  # the last block masked
    ("swiglu_grad", [((2, 8, 2, 64), BF16), ((2, 8, 64), BF16)]),
    ("rope_grad", [((2, 8, 4, 64), BF16)] * 3 + [((2, 8, 64), jnp.float32)] * 2),
    ("rope_grad", [((2, 8, 12, 96), BF16)] * 3 + [((2, 8, 96), jnp.float32)] * 2),  # masked
    ("swiglu", [((2, 8, 2, 2736), BF16)]),  # the last block masked
    ("swiglu", [((2, 8, 2, 64), jnp.float32)]),
    ("stack", [((1024, 2736), BF16)] * 2),  # llama_350m's gate and up, the last block masked
    ("stack", [((64, 4, 16), jnp.float32)] * 3),  # three, cast to bf16
], ids=["rope", "rope_masked", "swiglu_masked", "swiglu", "rope_grad", "rope_grad_masked",
        "swiglu_forward_masked",
        "swiglu_forward", "stack_masked", "stack3"])
def test_the_kernels_lower_to_triton_for_a_gpu(kernel, shapes):
  """Lowered for CUDA from this host, as a GPU compiles them: Triton's lowering takes fewer
  primitives than Pallas's interpreter (no slice of a value, for one), which the tests
  above run."""
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  f = getattr(elementwise_kernels, kernel)
  if kernel == "stack":
    f = lambda *kernels: elementwise_kernels.stack(kernels, BF16)
  assert _triton_lowering.TRITON in _triton_lowering.mlir_for_cuda(f, *args)
