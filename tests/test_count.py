"""Tests of the clipped-entry count shared by the clips."""
from absl.testing import parameterized
import chex
import pytest
import jax
import jax.numpy as jnp
import numpy as np

from spam_optax import _count
from spam_optax import _leaf_stats
from _reference import enable_x64


def changed_pair(shape, dtype, seed):
  """Two arrays equal except at a random ~30% of entries."""
  rng = np.random.default_rng(seed)
  old = rng.normal(size=shape).astype(dtype)
  new = old.copy()
  change = rng.random(shape) < 0.3
  new[change] = (old[change] * rng.uniform(0.1, 0.9, size=shape)[change]).astype(dtype)
  return new, old


class CountChangedTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      ((), np.float32), ((7,), np.float32), ((33, 17), np.float32),
      ((3, 4, 5, 6), np.float32), ((0, 4), np.float32), ((64, 9), np.float64),
      ((48, 6), np.float32), ((32, 3, 7), np.float32),
  )
  def test_matches_numpy(self, shape, dtype):
    new, old = changed_pair(shape, dtype, seed=len(shape))
    got = self.variant(_count.count_changed)(jnp.asarray(new), jnp.asarray(old))
    want = int(np.sum(new != old))
    chex.assert_type(got, jnp.int32)
    chex.assert_shape(got, ())
    self.assertEqual(int(got), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_and_signed_zeros(self):
    old = jnp.asarray([1.0, -2.0, 3.0, 1e-3, 0.0, -0.0, 5.0], jnp.bfloat16)
    new = jnp.asarray([1.0, -1.0, 0.0, 1e-3, -0.0, 0.0, -0.0], jnp.bfloat16)
    # -0.0 == 0.0, so only the -2 -> -1, 3 -> 0 and 5 -> -0 entries changed.
    self.assertEqual(int(self.variant(_count.count_changed)(new, old)), 3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_infinities_count(self):
    old = jnp.asarray([[jnp.inf, 1.0, -jnp.inf, 2.0]])
    new = jnp.asarray([[10.0, 1.0, -10.0, jnp.inf]])
    self.assertEqual(int(self.variant(_count.count_changed)(new, old)), 3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_a_row_with_nan_counts_zero(self):
    old = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, jnp.nan, 3.0, 4.0]])
    new = jnp.asarray([[0.5, 2.0, 0.0, 4.0], [0.5, jnp.nan, 0.0, 4.0]])
    self.assertEqual(int(self.variant(_count.count_changed)(new, old)), 2)
    # rows of odd length are counted two at a time: the NaN's neighbour row too
    old, new = old[:, :3], new[:, :3]
    self.assertEqual(int(self.variant(_count.count_changed)(new, old)), 0)

  def test_counts_exactly_beyond_float32_integers(self):
    # 2**25 changed entries: a single float32 sum of ones would stop at 2**24.
    shape = (2**12, 2**13)
    old = jnp.zeros(shape, jnp.float32)
    new = jnp.ones(shape, jnp.float32)
    self.assertEqual(int(jax.jit(_count.count_changed)(new, old)), 2**25)

  def test_a_row_too_long_for_float32_sums(self):
    # One row of 2**24 + 1 entries takes the int32 path; NaN entries stay uncounted.
    old = jnp.zeros((1, 2**24 + 1), jnp.float32)
    new = old.at[0, ::2].set(1.0).at[0, 1].set(jnp.nan)
    self.assertEqual(int(jax.jit(_count.count_changed)(new, old)), 2**23 + 1)


@pytest.mark.parametrize("shape, rows", [
    ((64, 9), 32),         # a matrix: its rows; odd ones two at a time
    ((33, 17), 33),        # an odd number of odd rows: one at a time
    ((48, 6), 48),
    ((32, 3, 8), 6),       # 768 entries: rows of 128 across the axes
    ((32, 3, 4), 96),      # a last axis not a multiple of 8: the last axis
    ((4, 6, 7), 12),       # odd: two at a time
    ((4, 5, 7), 20),       # beside an odd axis: one at a time
    ((2, 4, 16, 64), 64),  # rows of 128
    ((2, 4, 16, 65), 64),  # an odd last axis: the last two axes, two at a time
    ((5,), 1), ((), 1),    # an odd vector or a scalar is one row
    ((6,), 3), ((2048,), 1024),  # an even vector: rows of two
])
def test_rows_of_the_count(shape, rows):
  new, old = changed_pair(shape, np.float32, seed=1)
  got = _count.changed_per_row(jnp.asarray(new), jnp.asarray(old))
  chex.assert_shape(got, (1, rows))
  # each entry counts a run of contiguous entries of the leaf
  want = np.reshape(new != old, (rows, -1)).sum(axis=1)
  np.testing.assert_array_equal(np.asarray(got)[0], want)


@pytest.mark.parametrize("shape, view", [
    ((2048, 5461), (1024, 10922)),          # a 1B LLaMA's gate and up kernels
    ((24, 2048, 5461), (24, 1024, 10922)),  # the same, layers stacked
    ((5461, 2048), (5461, 2048)),
    ((32, 64, 2048), (32, 64, 2048)),       # heads × head_dim × hidden
    ((2048, 32, 64), (2048, 32, 64)),
    ((2048, 32000), (2048, 32000)),         # the LM head
    ((3, 5), (3, 5)), ((7,), (7,)), ((), ()),
    ((2048,), (1024, 2)),                   # a norm scale: rows of two
])
def test_count_rows_with_several_devices(shape, view):
  """Rows never cross an axis but the one before the last (split by 2)."""
  assert _count.count_rows(shape, one_device=False) == view


@pytest.mark.parametrize("shape, view", [
    ((2048, 5461), (87376, 128)),           # rows of 128 across the axes
    ((5461, 2048), (87376, 128)),
    ((2048, 32000), (512000, 128)),
    ((32, 64, 2048), (32768, 128)),
    ((2048, 32, 64), (32768, 128)),
    ((24, 1024, 2736), (525312, 128)),      # layers stacked, a last axis of 8s
    ((24, 2048, 5461), (24, 1024, 10922)),  # layers stacked, an odd last axis: as before
    ((24, 2048), (384, 128)),
    ((4, 1536), (48, 128)),
    ((3, 5), (3, 5)), ((33, 17), (33, 17)),  # sizes that 128 does not divide
    ((7,), (7,)), ((), ()), ((2048,), (1024, 2)),
])
def test_count_rows_on_one_device(shape, view):
  assert _count.count_rows(shape, one_device=True) == view


@pytest.mark.parametrize("shape, view", [
    ((2048, 5461), (21844, 512)),           # rows of 512 across the axes
    ((2736, 1024), (5472, 512)),            # a 350M LLaMA's down projection
    ((1024, 16, 64), (2048, 512)),
    ((32000, 1024), (64000, 512)),
    ((24, 1024, 2736), (131328, 512)),      # layers stacked, a last axis of 8s
    ((24, 2048, 5461), (24, 1024, 10922)),  # layers stacked, an odd last axis: as before
    ((4, 1536), (12, 512)),
    ((4, 160), (4, 160)), ((3, 5), (3, 5)),  # sizes that 512 does not divide
    ((7,), (7,)), ((), ()), ((2048,), (1024, 2)),
])
def test_count_rows_of_two_byte_entries_on_one_device(shape, view):
  """bfloat16 and float16 leaves: rows of 512 (``_leaf_stats.short_row``)."""
  assert _count.count_rows(shape, one_device=True, itemsize=2) == view
  several = _count.count_rows(shape, one_device=False)
  assert _count.count_rows(shape, one_device=False, itemsize=2) == several


@pytest.mark.parametrize("dtype, row", [(jnp.float32, 128), (jnp.float64, 128),
                                        (jnp.bfloat16, 512), (jnp.float16, 512)])
def test_count_takes_the_rows_of_the_values_dtype(dtype, row):
  """Both forms of the count view a leaf in the rows of the clipped values' dtype, the
  mask's form given that dtype's size."""
  assert jax.device_count() == 1
  with enable_x64(dtype == jnp.float64):
    new = jnp.zeros((4, 1536), dtype)
    assert jax.eval_shape(_count.changed_per_row, new, new).shape == (1, 6144 // row)
    mask = jnp.zeros((4, 1536), bool)
    got = jax.eval_shape(_count.clipped_per_row, mask, new, new)
    assert got.shape == (1, 6144 // row)
    assert _leaf_stats.short_row(jnp.dtype(dtype).itemsize) == row


@pytest.mark.parametrize("shape, view", [
    ((2048, 5461), (5461, 2048)),           # rows of 2048 across the axes
    ((24, 2048, 5461), (24, 1024, 10922)),  # layers stacked: rows as before
    ((2048, 32000), (32000, 2048)),
    ((5461, 2048), (5461, 2048)),           # rows that are a power of two stay
    ((32, 64, 2048), (32, 64, 2048)),
    ((2048, 32, 64), (2048, 32, 64)),
    ((24, 2048), (24, 2048)),
    ((4, 4096), (4, 4096)),                 # any power of two stays
    ((4, 1536), (3, 2048)),
    ((3, 5), (3, 5)), ((33, 17), (33, 17)),  # sizes that 2048 does not divide
    ((7,), (7,)), ((), ()), ((2048,), (1024, 2)),
])
def test_count_rows_on_one_device_without_short_rows(shape, view, monkeypatch):
  """The layout before the rows of 128, which the benchmarks time beside them."""
  monkeypatch.setattr(_leaf_stats, "_SHORT_ROWS", False)
  assert _count.count_rows(shape, one_device=True) == view


@pytest.mark.parametrize("short_rows, rows", [(True, 48), (False, 3)])
def test_count_across_axes_is_exact(short_rows, rows, monkeypatch):
  """Counted in rows of 128 (or, without them, 2048) across the axes, each row is a
  contiguous run of the leaf."""
  assert jax.device_count() == 1  # the suite's own process sees one CPU device
  monkeypatch.setattr(_leaf_stats, "_SHORT_ROWS", short_rows)
  new, old = changed_pair((4, 1536), np.float32, seed=3)
  got = _count.changed_per_row(jnp.asarray(new), jnp.asarray(old))
  chex.assert_shape(got, (1, rows))
  want = np.reshape(new != old, (rows, -1)).sum(axis=1)
  np.testing.assert_array_equal(np.asarray(got)[0], want)
  assert int(_count.count_changed(jnp.asarray(new), jnp.asarray(old))) == int((new != old).sum())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(33, 17), (4, 6, 7), (4, 1536), (6,), (5,), ()])
def test_true_per_row_counts_the_mask_in_the_rows_of_the_count(shape, dtype):
  rng = np.random.default_rng(len(shape))
  mask = rng.random(shape) < 0.3
  got = _count.true_per_row(jnp.asarray(mask), itemsize=jnp.dtype(dtype).itemsize)
  values = jnp.zeros(shape, dtype)
  want_shape = jax.eval_shape(_count.changed_per_row, values, values).shape
  chex.assert_shape(got, want_shape)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got)[0],
                                np.reshape(mask, (want_shape[1], -1)).sum(axis=1))


def test_clipped_per_row_counts_the_change_on_a_cpu():
  """Where the clip flags an entry whose value does not change (a rounding tie), the CPU's
  count of the change leaves it out; the mask's count, taken on other backends, has it."""
  old = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
  new = jnp.asarray([[1.0, 2.0, 0.5, 4.0]])
  spike = jnp.asarray([[False, True, True, False]])  # entry 1: flagged, unchanged
  for fn in (_count.clipped_per_row, jax.jit(_count.clipped_per_row)):
    got = fn(spike, new, old)
    chex.assert_trees_all_equal(got, _count.changed_per_row(new, old))
    assert int(_count.row_totals(got, axis=None)) == 1
  assert int(_count.row_totals(_count.true_per_row(spike), axis=None)) == 2


def test_clipped_per_row_has_the_form_of_the_change_count():
  """Both forms give the same shape and dtype, as ``jax.lax.platform_dependent`` needs."""
  for dtype in (jnp.float32, jnp.bfloat16):
    new = jnp.zeros((48, 6), dtype)
    got = jax.eval_shape(_count.clipped_per_row, jnp.zeros((48, 6), bool), new, new)
    want = jax.eval_shape(_count.changed_per_row, new, new)
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
