"""Fake quantizers against a NumPy reference of the scheme in docs/models.md."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import quantization as qz
from models.quantization import QuantConfig, get_quant_config


# ---------------------------------------------------------------------------
# NumPy references, written group by group from the scheme's formulas.


def _np_groups(flat, group, pad_value):
  n = flat.size
  pad = -n % group
  return np.concatenate([flat, np.full(pad, pad_value, flat.dtype)]).reshape(-1, group), n


def np_weight_int(w, bits, group):
  """w in PyTorch (out, in) layout."""
  g, n = _np_groups(w.astype(np.float32).ravel(), group, w.ravel()[-1])
  out = np.empty_like(g)
  max_int = 2**bits - 1
  for i, row in enumerate(g):
    scale = np.float32(max(row.max() - row.min(), np.float32(1e-5))) / np.float32(max_int)
    zero = np.clip(-np.round(row.min() / scale), 0, max_int)
    q = np.clip(np.round(row / scale) + zero, 0, max_int)
    out[i] = (q - zero) * scale
  return out.ravel()[:n].reshape(w.shape)


def _np_topk_keep(row, topk):
  keep = np.zeros(row.shape, bool)
  if topk:
    # Stable sort on −|x|: ties go to the lower index, like lax.top_k.
    keep[np.argsort(-np.abs(row), kind="stable")[:topk]] = True
  return keep


def np_act_int(x, bits, group, topk, noise=None):
  g, n = _np_groups(x.astype(np.float32).ravel(), group, 0.0)
  out = np.empty_like(g)
  qmax = 2 ** (bits - 1) - 1
  for i, row in enumerate(g):
    keep = _np_topk_keep(row, topk)
    rest = np.where(keep, 0, row)
    s = np.float32(max(np.abs(rest).max(), np.float32(1e-6)))
    y = rest * np.float32(qmax / s)
    if noise is not None:
      y = y + noise.reshape(g.shape)[i]
    q = np.clip(np.round(y), -qmax - 1, qmax)
    out[i] = np.where(keep, row, q * s / np.float32(qmax))
  return out.ravel()[:n].reshape(x.shape)


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def np_fp4(x, group, topk, fmt):
  g, n = _np_groups(x.astype(np.float32).ravel(), group, 0.0)
  out = np.empty_like(g)
  for i, row in enumerate(g):
    keep = _np_topk_keep(row, topk)
    rest = np.where(keep, 0, row)
    alpha = np.float32(max(np.abs(rest).max(), np.float32(1e-6)))
    if fmt == "paper":
      deq = np.clip(np.round(rest / (alpha / 4)), -4, 4) * (alpha / 4)
    else:
      y = np.abs(rest) * np.float32(6 / alpha)
      # Nearest E2M1 magnitude; on a tie, the one with an even mantissa.
      d = np.abs(y[:, None] - E2M1[None, :])
      best = np.argmin(d + 1e-7 * (np.arange(8) % 2)[None, :], axis=1)
      deq = np.sign(rest) * E2M1[best] * np.float32(alpha / 6)
    out[i] = np.where(keep, row, deq)
  return out.ravel()[:n].reshape(x.shape)


def _heavy_tailed(seed, shape):
  # Student-t values: a few outliers per group, as real activations have.
  return np.random.default_rng(seed).standard_t(2.0, size=shape).astype(np.float32)


SHAPES = [(4, 256), (3, 200), (1376,), (5, 7, 96)]

# Jitted once per static configuration: one compilation instead of one per op.
weight_int = jax.jit(qz.quantize_weight_int, static_argnums=(1, 2))
act_int = jax.jit(qz.quantize_act_int, static_argnums=(1, 2, 3))
fp4 = jax.jit(qz.quantize_fp4, static_argnums=(1, 2, 3))


def quant_matmul(cfg, dims):
  return jax.jit(lambda x, w: qz.fake_quant_dot_general(cfg)(x, w, dims))


# ---------------------------------------------------------------------------
# Values against the references.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_int_matches_reference(shape, bits):
  w = _heavy_tailed(0, shape) * 0.02
  got = np.asarray(weight_int(w, bits, 256))
  np.testing.assert_allclose(got, np_weight_int(w, bits, 256), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,topk", [(4, 2), (8, 2), (4, 0), (4, 1), (4, 6)])
def test_act_int_matches_reference(shape, bits, topk):
  x = _heavy_tailed(1, shape)
  got = np.asarray(act_int(x, bits, 256, topk))
  np.testing.assert_allclose(got, np_act_int(x, bits, 256, topk), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["paper", "e2m1"])
def test_fp4_matches_reference(shape, fmt):
  x = _heavy_tailed(2, shape)
  got = np.asarray(fp4(x, 256, 2, fmt))
  np.testing.assert_allclose(got, np_fp4(x, 256, 2, fmt), rtol=1e-6, atol=1e-7)


def _np_ranked_keep_and_rest_max(row, topk):
  """The top-k of |row| as `jnp.argmax` ranks them (NaN first, ties to the lower index) and
  the largest |x| of the rest (NaN if the rest holds one)."""
  a = np.abs(row)
  order = sorted(range(a.size), key=lambda i: (not np.isnan(a[i]), -np.nan_to_num(a[i]), i))
  keep = np.zeros(a.shape, bool)
  keep[order[:topk]] = True
  rest = a[~keep]
  return keep, (np.float32(np.nan) if np.isnan(rest).any() else rest.max())


_TOPK_PATHS = {"one pass": qz._topk_in_one_pass, "passes": qz._topk_by_passes,  # pylint: disable=protected-access
               "dispatch": qz._topk_and_rest_max}  # pylint: disable=protected-access


@pytest.mark.parametrize("path,topk", [(p, k) for p in _TOPK_PATHS for k in (1, 2)]
                         + [("dispatch", 0), ("dispatch", 3), ("passes", 3)])
@pytest.mark.parametrize("jit", [True, False])
def test_topk_and_rest_max(path, topk, jit):
  """Ties (values on a half grid), constant and zero groups, NaNs in and out of the top-k;
  the one-pass reduction (what an accelerator runs) and the passes (a CPU) alike."""
  rng = np.random.default_rng(topk)
  g = (np.round(rng.standard_normal((40, 16)) * 2) / 2).astype(np.float32)
  g[1], g[2] = 0.0, -1.5
  g[3, 5] = np.nan
  g[4, [2, 9]] = np.nan
  g[5, [0, 3, 7]] = np.nan
  g[6, :] = np.nan
  g[7, [4, 11]] = [3.0, -3.0]
  f = jax.jit(_TOPK_PATHS[path], static_argnums=1) if jit else _TOPK_PATHS[path]
  keep, rest_max = (np.asarray(x) for x in f(jnp.asarray(g), topk))
  assert keep.shape == g.shape and rest_max.shape == (40, 1)
  for i, row in enumerate(g):
    want_keep, want_max = _np_ranked_keep_and_rest_max(row, topk)
    np.testing.assert_array_equal(keep[i], want_keep, err_msg=f"group {i}")
    np.testing.assert_array_equal(rest_max[i, 0], want_max, err_msg=f"group {i}")


def test_accelerators_read_each_activation_group_once():
  """Lowered for a GPU, the INT4 activation quantizer has one reduction (the ranked top-2
  and the rest's maximum together); for a CPU, the passes."""
  from jax import export  # pylint: disable=import-outside-toplevel
  f = jax.jit(lambda x: qz.quantize_act_int(x, 4, 256, 2))
  x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
  reduces = {}
  for platform in ("cuda", "cpu"):
    text = export.export(f, platforms=[platform])(x).mlir_module()
    reduces[platform] = [line.count(" init: ") for line in text.splitlines()
                         if "stablehlo.reduce(" in line]
  assert 6 in reduces["cuda"]  # (value, index) × 3 ranks
  if tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 5):
    # Older jax keeps both branches in either module (XLA drops the other one).
    assert reduces["cuda"] == [6]
    assert len(reduces["cpu"]) >= 2 and 6 not in reduces["cpu"]


def test_round_half_to_even():
  # Activation group whose rest scales to exactly ±0.5, ±1.5, ±2.5 levels.
  s = 7.0  # max|rest| → 7 levels of 1.0 each
  x = np.array([100.0, -90.0, s, 0.5, 1.5, 2.5, -0.5, -2.5] + [0.0] * 248, np.float32)
  got = np.asarray(act_int(x, 4, 256, 2))
  np.testing.assert_allclose(got[:8], [100.0, -90.0, 7.0, 0.0, 2.0, 2.0, -0.0, -2.0], rtol=1e-6)
  y = np.array([8.0, -8.0, 4.0, 0.5, 1.5, 2.5] + [0.0] * 250, np.float32)  # α/4 = 1
  np.testing.assert_array_equal(np.asarray(fp4(y, 256, 2, "paper"))[:6],
                                [8.0, -8.0, 4.0, 0.0, 2.0, 2.0])


@pytest.mark.parametrize("bits", [4, 8])
def test_levels_per_group(bits):
  x = _heavy_tailed(3, (8, 256))
  w = np.asarray(weight_int(x, bits, 256)).reshape(-1, 256)
  a = np.asarray(act_int(x, bits, 256, 2)).reshape(-1, 256)
  f = np.asarray(fp4(x, 256, 2, "paper")).reshape(-1, 256)
  e = np.asarray(fp4(x, 256, 2, "e2m1")).reshape(-1, 256)
  for gw, ga, gf, ge in zip(w, a, f, e):
    assert len(np.unique(gw)) <= 2**bits
    assert len(np.unique(ga)) <= 2**bits - 1 + 2  # symmetric grid uses −qmax…qmax
    assert len(np.unique(gf)) <= 9 + 2
    assert len(np.unique(ge)) <= 15 + 2
  # Activations: apart from the 2 exact values, integer multiples of s/qmax.
  qmax = 2 ** (bits - 1) - 1
  g = np.asarray(x, np.float32).reshape(-1, 256)[0]
  keep = _np_topk_keep(g, 2)
  s = np.abs(g[~keep]).max()
  levels = a[0][~keep] / (s / qmax)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  np.testing.assert_array_equal(a[0][keep], g[keep])


def test_constant_and_zero_groups_are_finite():
  z = np.zeros((512,), np.float32)
  c = np.full((256,), 0.3, np.float32)
  for out in (weight_int(z, 4, 256), act_int(z, 4, 256, 2),
              fp4(z, 256, 2, "paper"), weight_int(c, 4, 256)):
    assert np.all(np.isfinite(np.asarray(out)))


def test_weight_zero_point_clip_quirk():
  # Official quirk, kept: the zero point is clipped to [0, 2^b − 1], so a group
  # that does not straddle 0 cannot represent its own range. An all-positive
  # group saturates at (max − min) and a constant group collapses to 1e-5.
  c = np.full((256,), 0.3, np.float32)
  np.testing.assert_allclose(np.asarray(weight_int(c, 4, 256)), 1e-5, rtol=1e-5)
  pos = np.linspace(0.1, 0.2, 256, dtype=np.float32)
  got = np.asarray(weight_int(pos, 4, 256))
  np.testing.assert_allclose(got.max(), 0.1, rtol=1e-5)
  np.testing.assert_allclose(got, np_weight_int(pos, 4, 256), rtol=1e-6)


# ---------------------------------------------------------------------------
# The injected dot_general: official grouping of Flax kernels and STE gradients.


def test_dot_general_groups_the_weight_in_pytorch_layout():
  cfg = QuantConfig(quantize_acts=False)
  x = _heavy_tailed(4, (2, 3, 200))
  kernel = _heavy_tailed(5, (200, 96)) * 0.02  # Flax (in, out)
  dims = (((2,), (0,)), ((), ()))
  got = quant_matmul(cfg, dims)(jnp.asarray(x), jnp.asarray(kernel))
  w_ref = np_weight_int(kernel.T, 4, 256).T  # quantized as torch's (out, in)
  np.testing.assert_allclose(np.asarray(got), x @ w_ref, rtol=1e-5, atol=1e-5)
  # Grouping the Flax layout directly would differ: 200·96 is not row-aligned.
  assert not np.allclose(np_weight_int(kernel, 4, 256), w_ref)


@pytest.mark.parametrize("shape,contracting", [
    ((512, 6, 16), (0,)),  # q/k/v: (embed, heads, head_dim)
    ((4, 64, 96), (0, 1)),  # o_proj: (heads, head_dim, embed), in = 256
    ((256, 40), (0,)),  # gate/up
    ((300, 40), (0,)),  # in not a multiple of the group: groups straddle rows (transposed)
    ((40, 256), (1,)),  # contracting axis last: transposed
])
@pytest.mark.parametrize("bits", [4, 8])
def test_weights_grouped_where_they_lie_equal_the_pytorch_layout(shape, contracting, bits):
  """A kernel with whole groups per output column is grouped in place, without the
  transposes to (out, in) and back; the values are those of the (out, in) grouping."""
  cfg = QuantConfig(weight_bits=bits)
  w = jnp.asarray(_heavy_tailed(7, shape) * 0.02)
  got = jax.jit(lambda w: qz.fake_quant_weight(cfg, w, contracting))(w)
  n_in = int(np.prod([shape[a] for a in contracting]))
  rest = [a for a in range(len(shape)) if a not in contracting]
  torch_layout = np.transpose(np.asarray(w), rest + list(contracting)).reshape(-1, n_in)
  want = np.transpose(np_weight_int(torch_layout, bits, 256).reshape(
      [shape[a] for a in rest + list(contracting)]), np.argsort(rest + list(contracting)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)
  # Bit for bit what the transposed grouping computes, both compiled (the same
  # straight-through value).
  order = rest + list(contracting)
  transposed = jax.jit(lambda w: jnp.transpose(qz.straight_through(
      jnp.transpose(w, order), functools.partial(qz.quantize_weight, cfg)), np.argsort(order)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(transposed(w)))
  jaxpr = str(jax.make_jaxpr(lambda w: qz.fake_quant_weight(cfg, w, contracting))(w))
  in_place = contracting == tuple(range(len(contracting))) and n_in % 256 == 0
  already_torch_layout = rest + list(contracting) == list(range(len(shape)))
  assert ("transpose" in jaxpr) == (not in_place and not already_torch_layout)


def test_dot_general_output_projection_layout():
  # o_proj: input (batch, length, heads, kv), kernel (heads, kv, embed).
  cfg = QuantConfig()
  x = _heavy_tailed(6, (2, 5, 4, 24))
  kernel = _heavy_tailed(7, (4, 24, 40)) * 0.02
  dims = (((2, 3), (0, 1)), ((), ()))
  got = quant_matmul(cfg, dims)(jnp.asarray(x), jnp.asarray(kernel))
  w_ref = np_weight_int(kernel.reshape(96, 40).T, 4, 256).T  # torch (embed, heads·kv)
  x_ref = np_act_int(x.reshape(10, 96), 4, 256, 2)
  np.testing.assert_allclose(np.asarray(got).reshape(10, 40), x_ref @ w_ref, rtol=1e-5, atol=1e-5)


def test_straight_through_gradients():
  cfg = QuantConfig()
  x = jnp.asarray(_heavy_tailed(8, (6, 128)))
  w = jnp.asarray(_heavy_tailed(9, (128, 64)) * 0.02)
  c = jax.random.normal(jax.random.key(10), (6, 64))
  dims = (((1,), (0,)), ((), ()))
  f = lambda x, w: jnp.sum(qz.fake_quant_dot_general(cfg)(x, w, dims) * c)
  gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  xq = qz.quantize_act(cfg, x)
  wq = qz.quantize_weight(cfg, w.T).T
  # Input gradient from the dequantized weight, weight gradient from the
  # dequantized activation.
  chex.assert_trees_all_close(gx, c @ wq.T, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(gw, xq.T @ c, rtol=1e-5, atol=1e-6)


def test_stochastic_rounding_is_unbiased():
  x = jnp.asarray(_heavy_tailed(11, (256,)))
  keys = jax.random.split(jax.random.key(12), 4000)
  samples = jax.jit(jax.vmap(lambda k: qz.quantize_act_int(x, 4, 256, 2, noise_key=k)))(keys)
  mean = np.asarray(jnp.mean(samples, axis=0))
  step = float(jnp.sort(jnp.abs(x))[-3]) / 7
  # Standard error of the mean ≤ step/2/√4000 ≈ 0.008·step; allow 5 sigma.
  np.testing.assert_allclose(mean, np.asarray(x), atol=0.04 * step)
  # Deterministic rounding is biased on the same data.
  det = np.asarray(act_int(x, 4, 256, 2))
  assert np.abs(det - np.asarray(x)).max() > 0.2 * step
  # And each sample is on the grid of the matching reference with that noise.
  noise = np.asarray(jax.random.uniform(keys[0], (1, 256), jnp.float32, -0.5, 0.5))
  np.testing.assert_allclose(np.asarray(samples[0]), np_act_int(np.asarray(x), 4, 256, 2, noise),
                             rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Config.


def test_defaults_follow_the_official_effective_settings():
  cfg = QuantConfig()
  assert (cfg.weight_bits, cfg.weight_group) == (4, 256)
  assert (cfg.resolved_act_bits, cfg.resolved_act_group, cfg.act_topk) == (4, 256, 2)
  assert not cfg.stochastic and not cfg.fp4
  eight = get_quant_config("int8")
  assert (eight.resolved_act_bits, eight.resolved_act_group) == (8, 256)
  split = QuantConfig(weight_bits=4, act_bits=8, act_group=64)
  assert (split.resolved_act_bits, split.resolved_act_group) == (8, 64)
  assert get_quant_config("bf16") is None
  assert get_quant_config("fp4").fp4 and get_quant_config("fp4_e2m1").fp4_format == "e2m1"
  with pytest.raises(ValueError, match="valid"):
    get_quant_config("int3")
  with pytest.raises(ValueError):
    QuantConfig(fp4_format="e3m0")


def test_stochastic_needs_a_key():
  with pytest.raises(ValueError, match="PRNG"):
    qz.fake_quant_dot_general(QuantConfig(stochastic=True))


def test_dense_general_quantizes_the_q_kernel_in_pytorch_layout():
  # q_proj: kernel (embed, heads, kv); torch stores it as (heads·kv, embed).
  from models.linears import DenseGeneral
  layer = DenseGeneral(features=(4, 24), kernel_axes=("embed", "heads", "kv"),
                       quant=QuantConfig(), dtype=jnp.float32)
  x = _heavy_tailed(12, (2, 3, 40))
  kernel = _heavy_tailed(13, (40, 4, 24)) * 0.02
  got = jax.jit(layer.apply)({"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x))
  w_ref = np_weight_int(kernel.reshape(40, 96).T, 4, 256).T
  x_ref = np_act_int(x.reshape(6, 40), 4, 256, 2)
  np.testing.assert_allclose(np.asarray(got).reshape(6, 96), x_ref @ w_ref, rtol=1e-5, atol=1e-5)
