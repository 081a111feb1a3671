"""`models.token_nll`: the one-pass cross-entropy against NumPy in float64, its gradient,
its dtypes and its edge cases (huge, −inf and tied logits)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import models


def _nll(logits, targets):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(x, np.asarray(targets)[..., None], -1)[..., 0]


def _grad(logits, targets, g):
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.asarray(g, np.float64)[..., None] * (p - np.eye(x.shape[-1])[np.asarray(targets)])


class TokenNllTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((7,), 1.0), ((3, 11), 4.0), ((2, 3, 300), 10.0), ((2, 5, 1), 1.0))
  def test_value_and_gradient_match_numpy(self, shape, scale):
    rng = np.random.default_rng(len(shape))
    logits = (rng.normal(size=shape) * scale).astype(np.float32)
    targets = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    g = rng.normal(size=shape[:-1]).astype(np.float32)
    nll, vjp = self.variant(lambda x, t: jax.vjp(lambda y: models.token_nll(y, t), x))(
        jnp.asarray(logits), jnp.asarray(targets))
    assert nll.dtype == jnp.float32 and nll.shape == shape[:-1]
    np.testing.assert_allclose(nll, _nll(logits, targets), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], _grad(logits, targets, g),
                               rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("xla", "pallas")
  def test_extreme_logits(self, implementation):
    # Huge values (no overflow), −inf entries (probability 0), all-equal rows; rows of four
    # float32 are 16-byte aligned, so "pallas" runs the kernel (interpreted here).
    logits = np.array([[1e4, -1e4, 3e3, 1e4],
                       [-np.inf, 0.0, -np.inf, 1.0],
                       [2.5, 2.5, 2.5, 2.5]], np.float32)
    targets = np.array([0, 3, 2], np.int32)
    nll, vjp = self.variant(lambda x, t: jax.vjp(
        lambda y: models.token_nll(y, t, implementation), x))(
            jnp.asarray(logits), jnp.asarray(targets))
    # Row 0 is lse − picked at 1e4, where a float32 step is 1e-3.
    np.testing.assert_allclose(nll, [np.log(2.0), np.log1p(np.exp(-1.0)), np.log(4.0)],
                               rtol=1e-6, atol=1e-3)
    grad = np.asarray(vjp(jnp.ones(3))[0])
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, _grad(np.nan_to_num(logits, neginf=-1e30), targets,
                                           np.ones(3)), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_logits(self):
    """Computed in float32 from bf16 logits; the gradient is the float32 one, rounded."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(4, 6, 50)) * 3, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 50, (4, 6)), jnp.int32)
    f = lambda x: jnp.sum(models.token_nll(x, targets))
    nll = self.variant(models.token_nll)(logits, targets)
    np.testing.assert_allclose(nll, _nll(np.asarray(logits.astype(jnp.float32)), targets),
                               rtol=2e-6, atol=2e-6)
    grad = self.variant(jax.grad(f))(logits)
    want = jax.grad(f)(logits.astype(jnp.float32)).astype(jnp.bfloat16)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(want))


class CombineTest(chex.TestCase):
  """The reduction's merge of two partial (max, sum of exp(x − max), picked) triples."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_merge_matches_numpy(self):
    rng = np.random.default_rng(0)
    n = 4000
    special = np.array([np.inf, -np.inf, 0.0, -0.0, 88.0, -88.0], np.float32)
    m_a = np.concatenate([(rng.standard_normal(n) * 30).astype(np.float32), special,
                          special, [-np.inf, np.inf, 3.0]]).astype(np.float32)
    m_b = np.concatenate([(rng.standard_normal(n) * 30).astype(np.float32), special,
                          special[::-1], [-np.inf, np.inf, 3.0]]).astype(np.float32)
    m_b[:50] = m_a[:50]  # equal maxima
    s_a, s_b = (rng.uniform(0, 50, m_a.size).astype(np.float32) for _ in range(2))
    s_a[-3], s_b[-3] = 0.0, 0.0  # two empty partials (the reduction's identity)
    p_a, p_b = (rng.standard_normal(m_a.size).astype(np.float32) for _ in range(2))
    m, s, p = self.variant(models.loss._combine)(  # pylint: disable=protected-access
        tuple(map(jnp.asarray, (m_a, s_a, p_a))), tuple(map(jnp.asarray, (m_b, s_b, p_b))))
    want_m = np.maximum(m_a, m_b).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
      factor = lambda m_x: np.where(m_x == want_m, 1.0, np.exp(m_x.astype(np.float64) - want_m))
      want_s = s_a * factor(m_a) + s_b * factor(m_b)
    np.testing.assert_array_equal(np.asarray(m), want_m.astype(np.float32))
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=3e-7, atol=0)
    np.testing.assert_allclose(np.asarray(p), p_a.astype(np.float64) + p_b, rtol=1e-7)
    assert np.isfinite(np.asarray(s)).all()  # never exp(nan), never inf · 0
