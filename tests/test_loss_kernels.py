"""The loss's reduction over the vocabulary and its gradient as Pallas kernels (interpreted
here) against NumPy in float64 and against XLA's forms, and the loss that runs them."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import models
from models import loss, loss_kernels, pallas_platform

import _triton_lowering


def _inputs(lead, vocab, dtype, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=lead + (vocab,)) * 4
  logits[..., 1] = -np.inf  # probability 0: adds nothing to the sum
  targets = rng.integers(0, vocab, size=lead)
  targets.flat[0] = -1  # outside the vocabulary (a padding id): picks nothing
  targets.flat[-1] = vocab  # the first column past the row: picks nothing either
  return jnp.asarray(logits, dtype), jnp.asarray(targets, jnp.int32)


def _numpy_stats(logits, targets):
  x = np.asarray(logits.astype(jnp.float32), np.float64)
  m = x.max(-1)
  s = np.exp(x - m[..., None]).sum(-1)
  t = np.asarray(targets)
  inside = (t >= 0) & (t < x.shape[-1])
  picked = np.where(inside, np.take_along_axis(x, np.clip(t, 0, x.shape[-1] - 1)[..., None],
                                               -1)[..., 0], 0.0)
  return m, s, picked


# Vocabularies: one block, masked (100 of 128); two whole blocks of 2048 (4096); two blocks,
# the second masked (2500); one block, whole (64). Leading shapes: rows in programs of two
# (2 × 4), of one (5: odd), and a batch of sequences (2, 3).
SHAPES = [((2, 4), 100, jnp.float32), ((2, 4), 4096, jnp.bfloat16), ((5,), 2500, jnp.float32),
          ((2, 3), 64, jnp.bfloat16)]


class SoftmaxStatsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SHAPES)
  def test_matches_numpy(self, lead, vocab, dtype):
    logits, targets = _inputs(lead, vocab, dtype)
    m, s, p = self.variant(loss_kernels.softmax_stats)(logits, targets)
    want_m, want_s, want_p = _numpy_stats(logits, targets)
    for got in (m, s, p):
      assert got.dtype == jnp.float32 and got.shape == lead
    np.testing.assert_array_equal(np.asarray(m), want_m.astype(np.float32))  # a max: exact
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=2e-6)
    np.testing.assert_array_equal(np.asarray(p), want_p.astype(np.float32))  # one logit
    assert np.asarray(p).flat[0] == 0 and np.asarray(p).flat[-1] == 0

  @parameterized.parameters(*SHAPES)
  def test_equals_the_xla_reduction_up_to_the_order_of_its_sums(self, lead, vocab, dtype):
    logits, targets = _inputs(lead, vocab, dtype, seed=1)
    got = jax.jit(loss_kernels.softmax_stats)(logits, targets)
    want = jax.jit(loss._reduce)(logits, targets)  # pylint: disable=protected-access
    np.testing.assert_array_equal(got[0], want[0])
    # XLA's form rescales its sum at every merge (above: the kernel is within 2e-6 of float64)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
    np.testing.assert_array_equal(got[2], want[2])

  def test_a_nan_logit_makes_the_loss_nan(self):
    """As XLA's form: the trainer skips a step whose loss is not finite."""
    logits, targets = _inputs((4,), 64, jnp.float32)
    logits = logits.at[2, 40].set(jnp.nan)
    nll = loss.token_nll(logits, targets, "pallas")
    assert np.isnan(nll[2]) and np.isfinite(np.delete(np.asarray(nll), 2)).all()

  def test_refuses_other_shapes(self):
    with pytest.raises(ValueError, match=r"softmax_stats takes logits \(…, vocab\) and targets"):
      loss_kernels.softmax_stats(jnp.zeros((2, 3, 8)), jnp.zeros((2,), jnp.int32))


def _grad_inputs(lead, vocab, dtype, seed=0):
  logits, targets = _inputs(lead, vocab, dtype, seed)
  m, s, _ = loss._reduce(logits, targets)  # pylint: disable=protected-access
  g = jnp.asarray(np.random.default_rng(seed + 7).normal(size=lead), jnp.float32)
  return logits, targets, m, s, g.at[(0,) * len(lead)].set(0.0)  # a masked token: 0


class SoftmaxGradTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SHAPES)
  def test_bitwise_the_xla_backward(self, lead, vocab, dtype):
    logits, targets, m, s, g = _grad_inputs(lead, vocab, dtype)
    got = self.variant(loss_kernels.softmax_grad)(logits, targets, m, s, g)
    bwd = loss._token_nll_bwd  # pylint: disable=protected-access
    want = self.variant(lambda *a: bwd("xla", a[:4], a[4])[0])(logits, targets, m, s, g)
    assert got.dtype == dtype and got.shape == logits.shape
    chex.assert_trees_all_equal(got, want)

  @parameterized.parameters(*SHAPES)
  def test_matches_numpy(self, lead, vocab, dtype):
    logits, targets, m, s, g = _grad_inputs(lead, vocab, dtype, seed=3)
    x = np.asarray(logits.astype(jnp.float32), np.float64)
    softmax = np.exp(x - x.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    one_hot = np.arange(vocab) == np.asarray(targets)[..., None]  # none outside the vocabulary
    want = np.asarray(g, np.float64)[..., None] * (softmax - one_hot)
    got = np.asarray(loss_kernels.softmax_grad(logits, targets, m, s, g), np.float32)
    tolerance = 1e-5 if dtype == jnp.float32 else 2**-8  # m, s: XLA's reduction, within 1e-5
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())
    assert (got[..., 1] == 0).all()  # the −inf logit: probability 0, no target there

  def test_refuses_other_shapes(self):
    logits, targets, m, s, g = _grad_inputs((2, 3), 64, jnp.float32)
    with pytest.raises(ValueError, match=r"softmax_grad takes logits \(…, vocab\)"):
      loss_kernels.softmax_grad(logits, targets, m, s, g[0])


def test_tiles():
  assert loss_kernels._rows(16384, 2) == 2  # pylint: disable=protected-access
  assert loss_kernels._rows(16384, 4) == 4  # pylint: disable=protected-access
  assert loss_kernels._rows(5, 2) == 1  # pylint: disable=protected-access
  # another tile gives the same statistics: four tokens a program, blocks of 64 columns
  logits, targets = _inputs((4, 2), 100, jnp.float32)
  for got, want in zip(loss_kernels.softmax_stats(logits, targets, (4, 64, 4)),
                       loss_kernels.softmax_stats(logits, targets)):
    np.testing.assert_allclose(got, want, rtol=2e-6)
  # and the gradient's: one token a program, 32 columns (four blocks, the last masked)
  args = _grad_inputs((4, 2), 100, jnp.float32)
  chex.assert_trees_all_equal(loss_kernels.softmax_grad(*args, tile=(1, 32, 4)),
                              loss_kernels.softmax_grad(*args))


class TokenNllTest(parameterized.TestCase):

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_pallas_and_xla_give_the_same_loss_and_gradient(self, dtype):
    logits, targets = _inputs((3, 8), 2048 + 64, dtype)  # two blocks, the second masked
    mask = jnp.ones(targets.shape).at[0, 1].set(0)

    def value_and_grad(implementation):
      f = lambda x: models.cross_entropy_loss(x, targets, mask,
                                              implementation=implementation)[0]
      return jax.jit(jax.value_and_grad(f))(logits)

    (value, grad), (want, want_grad) = value_and_grad("pallas"), value_and_grad("xla")
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32),
                               rtol=1e-5 if dtype == jnp.float32 else 8e-3, atol=1e-9)

  def test_the_kernel_runs_only_where_rows_are_16_byte_aligned(self):
    called = []
    real, real_grad = loss_kernels.softmax_stats, loss_kernels.softmax_grad
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(loss_kernels, "softmax_stats", lambda *a: called.append(1) or real(*a))
      patch.setattr(loss_kernels, "softmax_grad", lambda *a: called.append(2) or real_grad(*a))
      for vocab, dtype, runs in ((33, jnp.bfloat16, False), (40, jnp.bfloat16, True),
                                 (6, jnp.float32, False), (32000, jnp.bfloat16, True)):
        logits, targets = _inputs((2,), vocab, dtype)
        jax.grad(lambda x: jnp.sum(loss.token_nll(x, targets, "pallas")))(logits)
        assert called == ([1, 2] if runs else []), (vocab, dtype)
        assert loss_kernels.aligned(vocab, dtype) == runs
        called.clear()
      loss.token_nll(*_inputs((2,), 64, jnp.float32), None)  # a CPU's default: XLA's
      assert not called and pallas_platform.default_implementation() == "xla"

  def test_refuses_an_unknown_implementation(self):
    with pytest.raises(ValueError, match="implementation must be one of"):
      loss.token_nll(*_inputs((2,), 64, jnp.float32), "triton")


@pytest.mark.parametrize("shapes", [
    [((2, 8, 32000), jnp.bfloat16), ((2, 8), jnp.int32)],  # the models' vocabulary
    [((6, 100), jnp.float32), ((6,), jnp.int32)],  # one masked block, rows in pairs
])
def test_the_kernel_lowers_to_triton_for_a_gpu(shapes):
  """Lowered for CUDA from this host, as a GPU compiles it (Triton's lowering takes fewer
  primitives than Pallas's interpreter)."""
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
  mlir = _triton_lowering.mlir_for_cuda(loss_kernels.softmax_stats, *args)
  assert _triton_lowering.TRITON in mlir
  per_token = jax.ShapeDtypeStruct(shapes[1][0], jnp.float32)
  mlir = _triton_lowering.mlir_for_cuda(loss_kernels.softmax_grad, *args, per_token, per_token,
                                        per_token)
  assert _triton_lowering.TRITON in mlir
