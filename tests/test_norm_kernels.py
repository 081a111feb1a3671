"""models/norm_kernels.py: the fused residual add + RMSNorm, against NumPy and against XLA.

On the CPU the Pallas kernels run in Pallas's interpreter, with the same tiles, padding
masks and backward loop as on a GPU.
"""
import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import _model_pairs
import models
from models import norm_kernels
from models.normalization import RMSNorm

EPS = 1e-6
BF16 = ml_dtypes.bfloat16


def _numpy_add_norm(x, h, scale, dtype):
  """HF LLaMA's arithmetic in NumPy: the sum rounded to the residual dtype, float32
  statistics, the normalised value rounded before the scale multiplies it."""
  s = x.astype(np.float32) if h is None else (x.astype(np.float32) + h.astype(np.float32))
  s = s.astype(dtype)
  s32 = s.astype(np.float32)
  r = 1.0 / np.sqrt((s32 * s32).sum(-1, keepdims=True, dtype=np.float32) / np.float32(s.shape[-1])
                    + np.float32(EPS))
  y = (s32 * r.astype(np.float32)).astype(dtype).astype(np.float32) * scale.astype(np.float32)
  return s, y.astype(dtype)


def _xla_add_norm(x, h, scale, dtype):
  s = x if h is None else x + h
  s32 = s.astype(jnp.float32)
  y = (s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, -1, keepdims=True) + EPS)).astype(dtype)
  return s, y * scale.astype(dtype)


def _ulps(a, b, dtype):
  """Largest difference in units of the dtype's spacing at b's magnitude."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  spacing = np.spacing(np.abs(b).astype(dtype)).astype(np.float32)
  return float(np.max(np.abs(a - b) / np.maximum(spacing, np.finfo(np.float32).tiny)))


@pytest.mark.parametrize("n,d,expected", [
    (16384, 1024, (8, 1024, 8)),
    (16384, 768, (8, 1024, 8)),  # 130m: padded to 1024, masked
    (16384, 2048, (4, 2048, 8)),
    (6, 96, (2, 128, 1)),
    (512, 48, (128, 64, 4)),
])
def test_tiles(n, d, expected):
  rows, width, steps = norm_kernels.tile(n, d)
  assert (rows, width, steps) == expected
  assert n % (rows * steps) == 0 and width >= d and rows * width <= 8192


@pytest.mark.parametrize("dtype", [BF16, np.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 5, 96), (512, 48)])
def test_forward_matches_numpy(dtype, shape):
  rng = np.random.RandomState(0)
  x, h = (rng.randn(*shape).astype(dtype) for _ in range(2))
  scale = (1 + 0.1 * rng.randn(shape[-1])).astype(dtype)
  want_s, want_y = _numpy_add_norm(x, h, scale, dtype)
  s, y = norm_kernels.add_rms_norm(jnp.asarray(x), jnp.asarray(h), jnp.asarray(scale), EPS,
                                   jnp.dtype(dtype))
  np.testing.assert_array_equal(np.asarray(s), want_s)  # the sum is exact
  # XLA's reciprocal square root may differ from NumPy's 1/sqrt by a few float32 ulps; in
  # bf16 that moves a rounding of x·r and then one of the scaled value: two ulps at most.
  ulps = 2 if dtype == BF16 else 8
  assert _ulps(y, want_y, dtype) <= ulps
  y_plain = norm_kernels.rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS, jnp.dtype(dtype))
  assert _ulps(y_plain, _numpy_add_norm(x, None, scale, dtype)[1], dtype) <= ulps


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-5)],
                         ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 5, 96), (1024, 64)])
def test_gradients_match_autodiff_of_the_xla_form(dtype, tol, shape):
  """Both inputs' gradients (the incoming gradient of the sum included) and the scale's,
  against ``jax.grad`` of the plain form; (1024, 64) walks eight tiles per program."""
  rng = np.random.RandomState(1)
  x, h, ds, dy = (jnp.asarray(rng.randn(*shape), dtype) for _ in range(4))
  scale = jnp.asarray(1 + 0.1 * rng.randn(shape[-1]), dtype)
  fused = lambda x, h, s: norm_kernels.add_rms_norm(x, h, s, EPS, jnp.dtype(dtype))
  plain = lambda x, h, s: _xla_add_norm(x, h, s, dtype)
  (got_s, got_y), vjp = jax.vjp(fused, x, h, scale)
  (want_s, want_y), want_vjp = jax.vjp(plain, x, h, scale)
  got, want = vjp((ds, dy)), want_vjp((ds, dy))
  for a, b in zip(got + (got_y,), want + (want_y,)):
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0)
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(got[1]))  # d(x+h)/dx = d/dh

  got = jax.vjp(lambda x, s: norm_kernels.rms_norm(x, s, EPS, jnp.dtype(dtype)), x, scale)[1](dy)
  want = jax.vjp(lambda x, s: plain(x, None, s)[1], x, scale)[1](dy)
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0)


def test_jit_and_no_jit_agree():
  rng = np.random.RandomState(2)
  x, h, dy = (jnp.asarray(rng.randn(4, 8, 96), jnp.bfloat16) for _ in range(3))
  scale = jnp.ones((96,), jnp.bfloat16)

  def loss(x, h, s):
    total, y = norm_kernels.add_rms_norm(x, h, s, EPS, jnp.dtype(jnp.bfloat16))
    return jnp.sum(total.astype(jnp.float32)) + jnp.vdot(y.astype(jnp.float32),
                                                         dy.astype(jnp.float32))

  eager = jax.grad(loss, argnums=(0, 1, 2))(x, h, scale)
  jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, h, scale)
  chex.assert_trees_all_equal(eager, jitted)


def test_the_module_picks_and_refuses():
  with pytest.raises(ValueError, match="norm_implementation 'triton' is not"):
    models.get_config("llama_9m", norm_implementation="triton")
  # No GPU here: None means XLA's.
  assert models.normalization.default_implementation() == "xla"
  x = jnp.asarray(np.random.RandomState(3).randn(2, 4, 32), jnp.bfloat16)
  outs = {}
  for impl in ("xla", "pallas"):
    norm = RMSNorm(EPS, jnp.bfloat16, jnp.float32, implementation=impl)
    params = norm.init(jax.random.key(0), x, x)
    outs[impl] = norm.apply(params, x, x), norm.apply(params, x)
  chex.assert_trees_all_equal_shapes_and_dtypes(outs["xla"], outs["pallas"])
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), outs["xla"]),
                              jax.tree.map(lambda a: a.astype(jnp.float32), outs["pallas"]),
                              atol=1.6e-2, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_llama_with_the_kernels_matches_xla(scan_layers):
  """The whole model: the same parameters, logits and gradients (to bf16 rounding) with
  the Pallas norms as with XLA's, unrolled and under `nn.scan` (whose first step adds a
  zero delta)."""
  config = models.LlamaConfig(name="tiny", hidden_size=48, intermediate_size=96, num_heads=2,
                              num_layers=2, vocab_size=64, max_seq_len=16, dtype="bfloat16",
                              param_dtype="float32", scan_layers=scan_layers)
  _model_pairs.assert_same_model(config.replace(norm_implementation="xla"),
                                 config.replace(norm_implementation="pallas"))
