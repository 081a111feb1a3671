"""Tests of `LeafStats` (per-leaf statistics in one vector) and its two-stage reductions."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

import spam_optax
from spam_optax import _count
from spam_optax import _leaf_stats

from _reference import enable_x64

# (shape, stacked axes): scalars, vectors, matrices, rank 3, stacked and empty leaves.
LEAVES = [((), 0), ((5,), 0), ((3, 4), 0), ((2, 3, 4), 0), ((3, 4), 1), ((2, 3, 4), 1),
          ((2, 3, 4), 2), ((4,), 1), ((0, 4), 0), ((3, 7), 0), ((6, 4), 1)]


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for shape, _ in LEAVES]


def _numpy_rows(x, n, op):
  """``op`` of each row of each slice (rows: the index of the slice's first axis), as
  ``(slices, rows)``."""
  keep = n + 1 if x.ndim >= n + 2 else n
  slices, rows = int(np.prod(x.shape[:n])), (x.shape[n] if keep > n else 1)
  if x.size == 0:
    return np.zeros((slices, rows), x.dtype)
  return np.asarray(op(x, axis=tuple(range(keep, x.ndim)))).reshape(slices, rows)


def _rows(xs, ns, op):
  """``rows_together`` of single arrays."""
  return [p for (p,) in _leaf_stats.rows_together([(x,) for x in xs], ns, op)]


def _numpy_per_slice(x, n, op):
  """``op`` of each slice over the axes after the first ``n``, flattened."""
  if x.size == 0:
    return np.zeros(int(np.prod(x.shape[:n])), x.dtype)
  return np.asarray(op(x, axis=tuple(range(n, x.ndim)))).reshape(-1)


class CombineRowsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_max_and_sum_per_slice_match_numpy(self):
    xs = _arrays()
    ns = [n for _, n in LEAVES]
    max_of = lambda x, axis: jnp.max(x, axis=axis, initial=0.0)
    sum_of = lambda x, axis: jnp.sum(x, axis=axis)

    def stats(xs):
      return (
          _leaf_stats.combine_rows(_rows([jnp.abs(x) for x in xs], ns, jax.lax.max), max_of),
          _leaf_stats.combine_rows(_rows([x * x for x in xs], ns, jax.lax.add), sum_of))

    got_max, got_sum = self.variant(stats)([jnp.asarray(x) for x in xs])
    want_max = np.concatenate([_numpy_per_slice(np.abs(x), n, np.max)
                               for x, n in zip(xs, ns)])
    want_sum = np.concatenate([_numpy_per_slice(x * x, n, np.sum) for x, n in zip(xs, ns)])
    chex.assert_shape(got_max, (sum(int(np.prod(s[:n])) for s, n in LEAVES),))
    np.testing.assert_array_equal(got_max, want_max)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @mock.patch.object(_leaf_stats, "_GROUP", 3)
  def test_rows_together_matches_numpy_per_leaf(self):
    """Leaves of one shape reduced together (more of them than one group holds), members
    of two arrays of different dtypes, max and sum: each result is its own leaf's."""
    xs = _arrays(2) + _arrays(3) + [np.ones((3, 4), np.float32)] * (_leaf_stats._GROUP + 3)
    ns = [n for _, n in LEAVES] * 2 + [0] * (_leaf_stats._GROUP + 3)
    members = [(x * x, (np.abs(x) > 1).astype(np.int32)) for x in xs]
    sums = self.variant(lambda m: _leaf_stats.rows_together(m, ns, jax.lax.add))(
        [tuple(jnp.asarray(a) for a in m) for m in members])
    maxes = self.variant(lambda xs: _rows(xs, ns, jax.lax.max))(
        [jnp.abs(jnp.asarray(x)) for x in xs])
    assert len(sums) == len(maxes) == len(xs)
    for (squares, counts), top, (a, b), x, n in zip(sums, maxes, members, xs, ns):
      assert counts.dtype == jnp.int32 and squares.dtype == jnp.float32
      np.testing.assert_allclose(squares, _numpy_rows(a, n, np.sum), rtol=1e-6,
                                 err_msg=str(x.shape))
      np.testing.assert_array_equal(counts, _numpy_rows(b, n, np.sum), err_msg=str(x.shape))
      np.testing.assert_array_equal(top, _numpy_rows(np.abs(x), n, np.max),
                                    err_msg=str(x.shape))
      assert _leaf_stats.row_length(x.shape, n) * counts.size == x.size

  @mock.patch.object(_leaf_stats, "_GROUP", 8)
  def test_rows_together_reads_leaves_of_one_shape_in_one_reduction(self):
    xs = [jnp.ones((3, 4))] * (2 * _leaf_stats._GROUP) + [jnp.ones((4, 3)), jnp.ones((3, 4))]
    ns = [0] * len(xs)
    jaxpr = jax.make_jaxpr(
        lambda xs: _leaf_stats.rows_together([(x,) for x in xs], ns, jax.lax.add))(xs)
    reductions = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce"]
    # 2 full groups of (3, 4), one group of the last (3, 4) alone, one of (4, 3)
    assert sorted(len(e.invars) // 2 for e in reductions) == [1, 1, 8, 8]

  def test_with_several_devices_each_leaf_is_reduced_alone(self):
    # leaves of one shape may be sharded differently: no reduction may join them
    xs = [jnp.ones((3, 4))] * 3
    with mock.patch.object(jax, "device_count", return_value=2):
      jaxpr = jax.make_jaxpr(
          lambda xs: _leaf_stats.rows_together([(x,) for x in xs], [0] * 3, jax.lax.add))(xs)
    reductions = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce"]
    assert [len(e.invars) for e in reductions] == [2, 2, 2]

  def test_wide_rows_give_each_leaf_the_same_statistics(self):
    """With ``_WIDE_ROWS`` a matrix whose rows are not a power of two and whose size is a
    multiple of 2048 is reduced as rows of 2048 across its axes; its per-leaf max and sum
    are NumPy's, and every other leaf keeps its rows."""
    rng = np.random.default_rng(6)
    shapes = [((128, 352), 0), ((352, 128), 0), ((128, 352), 0), ((64, 96), 0),
              ((128, 256), 0), ((2, 128, 352), 1), ((5, 7), 0), ((33,), 0)]
    xs = [rng.standard_normal(s).astype(np.float32) for s, _ in shapes]
    ns = [n for _, n in shapes]
    max_of = lambda x, axis: jnp.max(x, axis=axis, initial=0.0)

    def stats(xs):
      rows = _rows([jnp.abs(x) for x in xs], ns, jax.lax.max)
      return [r.shape for r in rows], _leaf_stats.combine_rows(rows, max_of)

    with mock.patch.object(_leaf_stats, "_WIDE_ROWS", True), \
        mock.patch.object(_leaf_stats, "_GROUP", 2):
      row_shapes, got = stats([jnp.asarray(x) for x in xs])
      jitted = jax.jit(lambda xs: stats(xs)[1])([jnp.asarray(x) for x in xs])
    # 128×352: 22 rows of 2048; 64×96 (6144 entries): 3 rows of 2048; rows of 128 or 256
    # (powers of two), a stacked leaf, 5×7 and a vector keep theirs
    assert row_shapes == [(1, 22), (1, 352), (1, 22), (1, 3), (1, 128), (2, 128), (1, 5),
                          (1, 1)]
    want = np.concatenate([_numpy_per_slice(np.abs(x), n, np.max) for x, n in zip(xs, ns)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(jitted, want)
    with mock.patch.object(jax, "device_count", return_value=2), \
        mock.patch.object(_leaf_stats, "_WIDE_ROWS", True):
      assert _rows([jnp.zeros((128, 352))], [0], jax.lax.add)[0].shape == (1, 128)

  def test_row_shapes(self):
    rows = lambda shape, n: _rows([jnp.zeros(shape)], [n], jax.lax.add)[0].shape
    assert rows((), 0) == (1, 1)
    assert rows((5,), 0) == (1, 1)  # a vector is one row
    assert rows((2, 3, 4), 0) == (1, 2)
    assert rows((2, 3, 4), 1) == (2, 3)
    assert rows((2, 3, 4), 2) == (6, 1)
    assert rows((2, 3, 4), 3) == (24, 1)
    assert rows((0, 4), 0) == (1, 0)

  def test_deterministic(self):
    xs = [jnp.asarray(x) for x in _arrays(1)]
    f = jax.jit(lambda xs: _leaf_stats.combine_rows(
        _rows(xs, [0] * len(xs), jax.lax.add),
        lambda x, axis: jnp.sum(x, axis=axis)))
    np.testing.assert_array_equal(f(xs), f(xs))


class LeafCountsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_counts_per_leaf_and_nan_rows(self):
    old = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(5), "c": None,
           "d": jnp.zeros((2, 2, 2))}
    new = {"a": old["a"].at[0, 1].set(-1.0).at[2, :].set(0.5),
           "b": old["b"].at[3].set(jnp.nan).at[0].set(2.0),  # one row, with a NaN: 0
           "c": None, "d": old["d"].at[1, 0, 1].set(3.0)}
    like = _leaf_stats.zeros(old, jnp.int32)

    def counts(new, old):
      rows = [_count.changed_per_row(n, o)
              for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old))]
      return _count.leaf_counts(rows, like)

    got = self.variant(counts)(new, old)
    assert got.layout.names == ("a", "b", "d")
    assert {k: int(v) for k, v in got.as_dict().items()} == {"a": 5, "b": 0, "d": 1}
    assert got.values.dtype == jnp.int32


class GlobalNormTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @mock.patch.object(_leaf_stats, "_GROUP", 3)
  def test_matches_numpy_float64(self):
    """Every rank, empty and None leaves, more same-shaped leaves than one group holds,
    bfloat16 and complex leaves: the norm of all entries, as NumPy's in float64."""
    rng = np.random.default_rng(4)
    xs = _arrays(5) + [rng.standard_normal((3, 4)).astype(np.float32)
                       for _ in range(_leaf_stats._GROUP + 2)]
    bf16 = (rng.standard_normal((6, 5)) * 30).astype(jnp.bfloat16)
    cplx = (rng.standard_normal(7) + 1j * rng.standard_normal(7)).astype(np.complex64)
    tree = {"f32": [jnp.asarray(x) for x in xs], "none": None, "bf16": jnp.asarray(bf16),
            "nested": {"c": jnp.asarray(cplx)}}
    got = self.variant(_leaf_stats.global_norm)(tree)
    every = np.concatenate([np.asarray(x, np.float64).ravel() for x in xs]
                           + [np.asarray(bf16, np.float64).ravel(), np.abs(cplx).ravel()])
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(got, np.sqrt(np.sum(every ** 2)), rtol=1e-6)
    f32 = self.variant(_leaf_stats.global_norm)(tree["f32"])
    np.testing.assert_allclose(f32, optax.tree.norm(tree["f32"]), rtol=1e-6)

  def test_bfloat16_leaves_are_summed_in_float32(self):
    # optax.tree.norm adds the leaves' bfloat16 squared norms in bfloat16: 256 leaves of
    # squared norm 1 then sum to 256 + rounding; here to 256 exactly, and 257 stays 257
    tree = [jnp.ones((1,), jnp.bfloat16)] * 257
    got = jax.jit(_leaf_stats.global_norm)(tree)  # op by op: 257 leaves dispatched one by one
    assert float(got) ** 2 == pytest.approx(257.0, rel=1e-6)
    assert float(optax.tree.norm(tree)) ** 2 != pytest.approx(257.0, rel=1e-6)

  def test_empty_tree_and_float64(self):
    assert float(_leaf_stats.global_norm({"a": None})) == 0.0
    with enable_x64(True):
      x = jnp.asarray([1.0, 1e-9], jnp.float64)
      got = _leaf_stats.global_norm([x])
      assert got.dtype == jnp.float64
      assert float(got) == np.sqrt(1.0 + 1e-18)

  def test_read_in_the_rows_of_spams_count(self):
    """On one device, in the rows SPAM's clip count reads (128 across the axes, where
    ``short_rows`` allows), so that XLA can take both from one pass over a gradient; with
    ``_SHORT_ROWS`` off, as the statistics read them. The norm is the same."""
    rng = np.random.default_rng(7)
    shapes = [(4, 1536), (2, 4, 16, 64), (2, 128, 5), (6, 5)]
    tree = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree))

    def reduced_shapes():
      jaxpr = jax.make_jaxpr(lambda t: _leaf_stats.global_norm(t))(tree)  # traced anew
      return sorted(tuple(e.invars[0].aval.shape) for e in jaxpr.jaxpr.eqns
                    if e.primitive.name == "reduce")

    for short, views in [(True, [(2, 128, 5), (6, 5), (48, 128), (64, 128)]),
                         (False, [(2, 4, 16, 64), (2, 128, 5), (3, 2048), (6, 5)])]:
      with mock.patch.object(_leaf_stats, "_SHORT_ROWS", short):
        assert reduced_shapes() == sorted(views)
        got = jax.jit(lambda t: _leaf_stats.global_norm(t))(tree)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for shape, view in [((4, 1536), (48, 128)), ((2, 4, 16, 64), (64, 128)),
                        ((2, 128, 5), None), ((6, 5), None), ((1024,), None)]:
      assert _leaf_stats.short_rows(shape, one_device=True) == view
      assert _leaf_stats.short_rows(shape, one_device=False) is None

  def test_two_byte_leaves_read_in_rows_of_512(self):
    """A bfloat16 leaf is read in the rows SPAM's count takes for it (512 across the axes),
    its squares summed in float32."""
    rng = np.random.default_rng(8)
    shapes = [(4, 1536), (2, 4, 16, 64), (4, 160)]
    tree = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in shapes]
    jaxpr = jax.make_jaxpr(_leaf_stats.global_norm)(tree)
    reduced = sorted(tuple(e.invars[0].aval.shape) for e in jaxpr.jaxpr.eqns
                     if e.primitive.name == "reduce")
    assert reduced == [(4, 160), (12, 512), (16, 512)]
    want = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree))
    got = jax.jit(_leaf_stats.global_norm)(tree)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for shape, view in [((4, 1536), (12, 512)), ((2, 4, 16, 64), (16, 512)),
                        ((4, 160), None), ((1024,), None)]:
      assert _leaf_stats.short_rows(shape, one_device=True, itemsize=2) == view
      assert _leaf_stats.short_rows(shape, one_device=False, itemsize=2) is None

  @mock.patch.object(_leaf_stats, "_GROUP", 8)
  def test_leaves_of_one_shape_read_in_one_reduction(self):
    tree = [jnp.ones((3, 4))] * _leaf_stats._GROUP + [jnp.ones(5)]
    jaxpr = jax.make_jaxpr(_leaf_stats.global_norm)(tree)
    reductions = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce"]
    assert sorted(len(e.invars) // 2 for e in reductions) == [1, 8]


def _params():
  return {"dense": {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, "skip": None,
          "stack": jnp.ones((2, 5)), "layers": [jnp.ones(()), jnp.ones((2, 2))]}


class LeafStatsTest(chex.TestCase):

  def test_one_array_child_and_views(self):
    params = _params()
    stats = _leaf_stats.zeros(params, jnp.float32, [(), (), (), (), (2,)])
    assert len(jax.tree.leaves(stats)) == 1
    assert stats.values.shape == (6,)
    assert stats.layout.names == ("dense/b", "dense/w", "layers/0", "layers/1", "stack")
    stats = jax.tree.map(lambda v: v + jnp.arange(6.0), stats)
    tree = stats.tree()
    assert tree["skip"] is None
    assert float(tree["dense"]["w"]) == 1.0 and float(tree["layers"][1]) == 3.0
    np.testing.assert_array_equal(tree["stack"], [4.0, 5.0])
    assert list(stats.as_dict()) == list(stats.layout.names)

  def test_through_jit_and_eval_shape(self):
    state = spam_optax.stable_spam(1e-3).init(_params())
    out = jax.jit(lambda s: s)(state)
    chex.assert_trees_all_equal(out, state)
    assert out[0][0].max_ema.layout == state[0][0].max_ema.layout
    abstract = jax.eval_shape(spam_optax.stable_spam(1e-3).init, _params())
    leaf = abstract[0][0].max_ema.tree()["dense"]["w"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == ()

  def test_state_arrays_do_not_grow_with_leaves(self):
    """Two statistics arrays per transformation, whatever the number of leaves."""
    def n_state_arrays(n_leaves):
      params = {f"w{i}": jnp.ones((2, 3)) for i in range(n_leaves)}
      return len(jax.tree.leaves(spam_optax.stable_spam(1e-3).init(params)))
    moments = 2  # Stable-SPAM's mu and nu: one per leaf
    assert n_state_arrays(30) - n_state_arrays(3) == moments * 27
    spam_arrays = lambda n: len(jax.tree.leaves(spam_optax.spam(1e-3).init(
        {f"w{i}": jnp.ones((2, 3)) for i in range(n)})))
    assert spam_arrays(30) - spam_arrays(3) == 2 * 27


def test_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  opt = spam_optax.stable_spam(1e-3)
  params = _params()
  state = opt.init(params)
  grads = jax.tree.map(lambda p: 0.1 * p, params)
  _, state = opt.update(grads, state, params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "ckpt", state)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(tmp_path / "ckpt", jax.eval_shape(opt.init, params))
  chex.assert_trees_all_equal(restored, state)
  assert restored[0][0].clipped.layout == state[0][0].clipped.layout

if __name__ == "__main__":
  absltest.main()
