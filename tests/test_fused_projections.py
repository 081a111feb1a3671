"""Projections run as one product (`models.linears.fused_projections`) equal the separate
projections of the official code, in every quantization, stochastic rounding included:
the MLP's gate/up with `swiglu`'s written-out backward pass against
`down(silu(gate(x)) · up(x))` differentiated automatically, and attention's q/k/v against
three `DenseGeneral`s."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import models
from models.attention import Attention, apply_rope, causal_attention
from models.linears import MLP, DenseGeneral, swiglu


class TwoProjectionMLP(nn.Module):
  """The reference: gate and up as two `DenseGeneral`s, SiLU differentiated by jax."""

  intermediate_size: int
  quant: models.QuantConfig | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda features, axes, name: DenseGeneral(
        features, axes, quant=self.quant, dtype=self.dtype, name=name)
    gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


QUANTS = {
    "bf16": None,
    "int4": models.QuantConfig(),
    "int8_group_straddles_rows": models.QuantConfig(weight_bits=8, weight_group=48),
    "int4_stochastic": models.QuantConfig(stochastic=True),
    "fp4": models.QuantConfig(fp4=True),
}


def _assert_same_layer(ours, ref, x, *rest):
  """Same parameters (names, shapes, initial values), outputs and gradients (of the
  parameters and of `x`), float32; returns our output and the parameters it used."""
  params = nn.meta.unbox(ours.init(jax.random.key(0), x, *rest)["params"])
  chex.assert_trees_all_equal(params,
                              nn.meta.unbox(ref.init(jax.random.key(0), x, *rest)["params"]))
  # Weights far from their initial scale, so that the quantizers' groups matter.
  params = jax.tree.map(lambda p: p * 30.0, params)
  cot = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)

  def run(module):
    def f(p, x):
      y = module.apply({"params": p}, x, *rest, rngs={"quant": jax.random.key(7)})
      return jnp.sum(y * cot), y
    (_, y), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads

  got_y, got_grads = run(ours)
  want_y, want_grads = run(ref)
  chex.assert_trees_all_close(got_y, want_y, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, rtol=1e-4, atol=1e-4)
  return got_y, params


@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_mlp_equals_two_projections(quant):
  """Same parameters (names, shapes, initial values), forward and gradients, float32."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  ours = MLP(40, quant=QUANTS[quant], dtype=jnp.float32)
  ref = TwoProjectionMLP(40, quant=QUANTS[quant])
  got_y, params = _assert_same_layer(ours, ref, x)
  if QUANTS[quant] is not None and QUANTS[quant].stochastic:  # the noise reaches the product
    other = ours.apply({"params": params}, x, rngs={"quant": jax.random.key(8)})
    assert not np.allclose(np.asarray(other), np.asarray(got_y))


class ThreeProjectionAttention(nn.Module):
  """The reference: q, k, v and o as four `DenseGeneral`s."""

  num_heads: int
  head_dim: int
  quant: models.QuantConfig | None = None

  @nn.compact
  def __call__(self, x, positions):
    heads = (self.num_heads, self.head_dim)
    dense = lambda features, axis, axes, name: DenseGeneral(
        features, axes, axis=axis, quant=self.quant, dtype=jnp.float32, name=name)
    q, k, v = (dense(heads, -1, ("embed", "heads", "kv"), name)(x)
               for name in ("q_proj", "k_proj", "v_proj"))
    out = causal_attention(apply_rope(q, positions), apply_rope(k, positions), v, "xla")
    return dense(x.shape[-1], (-2, -1), ("heads", "kv", "embed"), "o_proj")(out)


@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_attention_equals_three_projections(quant):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  ours = Attention(4, 8, quant=QUANTS[quant], dtype=jnp.float32, implementation="xla")
  ref = ThreeProjectionAttention(4, 8, quant=QUANTS[quant])
  _assert_same_layer(ours, ref, x, positions)


def _reference(gate_up):
  gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
  return gate / (1.0 + np.exp(-gate)) * up


class SwigluTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((3, 2, 5), (4, 2, 1), (2, 3, 2, 6))
  def test_value_and_gradient_match_numpy(self, *shape):
    rng = np.random.default_rng(sum(shape))
    gate_up = rng.normal(size=shape) * 3.0
    dh = rng.normal(size=shape[:-2] + shape[-1:])
    y, vjp = self.variant(lambda a: jax.vjp(swiglu, a))(jnp.asarray(gate_up, jnp.float32))
    (grad,) = vjp(jnp.asarray(dh, jnp.float32))
    np.testing.assert_allclose(y, _reference(gate_up), rtol=1e-5, atol=1e-6)
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    sig = 1.0 / (1.0 + np.exp(-gate))
    want = np.stack([dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig], axis=-2)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_gradient_is_the_float32_one_rounded(self):
    rng = np.random.default_rng(3)
    gate_up = jnp.asarray(rng.normal(size=(4, 2, 16)) * 3.0, jnp.bfloat16)
    dh = jnp.asarray(rng.normal(size=(4, 16)), jnp.bfloat16)
    grad = self.variant(lambda a, d: jax.vjp(swiglu, a)[1](d)[0])(gate_up, dh)
    want = jax.vjp(swiglu, gate_up.astype(jnp.float32))[1](dh.astype(jnp.float32))[0]
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(want.astype(jnp.bfloat16)))
    y = self.variant(swiglu)(gate_up)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(nn.silu(gate_up[:, 0]) * gate_up[:, 1]))
