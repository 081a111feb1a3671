"""Tests of `sparse_moments`: compact inner state on random masks of each leaf."""
import json
import subprocess
import sys
import textwrap

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spam_optax import redraw_due
from spam_optax import redraw_masks
from spam_optax import replace_masks
from spam_optax import spam
from spam_optax import sparse_moments
from spam_optax import SparseMomentsState
from spam_optax import uniform_mask_sampler

import _processes
from _reference import REFERENCE_DIR
from _reference import alias_kwargs
from _reference import enable_x64

def _load(name):
  with np.load(REFERENCE_DIR / f"{name}.npz") as data:
    arrays = {key: data[key] for key in data.files}
  return json.loads(str(arrays.pop("meta"))), arrays


def _replay_sparse(name):
  """Runs `spam(..., density=d)` on recorded gradients with recorded masks.

  Returns the worst relative error over all steps and leaves, entry by entry
  and per leaf as ||p - p_ref|| / ||p_ref|| (the metric of the dense replays).
  """
  meta, arrays = _load(name)
  names = list(meta["params"])
  params = {n: jnp.asarray(arrays[f"p0/{n}"]) for n in names}
  opt = spam(density=meta["density"], **alias_kwargs(meta))
  state = opt.init(params)

  @jax.jit
  def step(grads, state, params, masks):
    state = replace_masks(state, masks)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  entrywise = leafwise = 0.0
  for t in range(meta["steps"]):
    grads = {n: jnp.asarray(arrays[f"g/{n}"][t]) for n in names}
    masks = {n: arrays[f"mask/{n}"][t] if f"mask/{n}" in arrays else None
             for n in names}
    params, state = step(grads, state, params, masks)
    for n in names:
      want = arrays[f"p/{n}"][t]
      got = np.asarray(params[n])
      assert got.dtype == want.dtype
      err = np.abs(got - want)
      entrywise = max(entrywise, float(np.max(err / np.abs(want))))
      leafwise = max(leafwise, float(np.linalg.norm(err) / np.linalg.norm(want)))
  return entrywise, leafwise


def test_spam_sparse_replay_float64():
  with enable_x64(True):
    entrywise, _ = _replay_sparse("spam_sparse_float64")
  assert entrywise < 1e-10, entrywise


def test_spam_sparse_replay_float32():
  # Entry by entry, float32 rounding of the ~0.3-sized values leaves errors of
  # ~1e-5 relative to the few entries that pass near zero (5e-5 here, the same
  # as in the dense replays), so the error is measured per leaf in norm, as in
  # tests/test_reference_replay.py.
  _, leafwise = _replay_sparse("spam_sparse_float32")
  assert leafwise < 3e-5, leafwise


# ---------------------------------------------------------------------------
# The wrapper alone, against a NumPy reference.

_B1, _B2, _EPS, _LR = 0.9, 0.999, 1e-8, 0.05


def _nested_params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "enc": {"w": f(6, 5), "b": f(5), "skip": None},
      "dec": [f(4, 7), None, f(3)],
  }


def _grads(params, steps):
  rng = np.random.default_rng(1)
  return [
      jax.tree.map(
          lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params
      )
      for _ in range(steps)
  ]


class _NumpyAdamLeaf:
  """Adam on one leaf, optionally restricted to a mask with carry-over."""

  def __init__(self, shape, mask):
    self.shape = shape
    self.mask = None if mask is None else [int(i) for i in mask]
    n = len(self.mask) if mask is not None else int(np.prod(shape))
    self.m = np.zeros(n)
    self.v = np.zeros(n)

  def update(self, g, t):
    g = np.asarray(g, np.float64).reshape(-1)
    if self.mask is not None:
      g = g[self.mask]
    self.m = _B1 * self.m + (1 - _B1) * g
    self.v = _B2 * self.v + (1 - _B2) * g * g
    mhat = self.m / (1 - _B1**t)
    vhat = self.v / (1 - _B2**t)
    u = -_LR * mhat / (np.sqrt(vhat) + _EPS)
    if self.mask is None:
      return u.reshape(self.shape)
    full = np.zeros(int(np.prod(self.shape)))
    full[self.mask] = u
    return full.reshape(self.shape)

  def redraw(self, new_mask):
    new_mask = [int(i) for i in new_mask]
    where = {j: i for i, j in enumerate(self.mask)}
    pick = lambda x: np.array([x[where[j]] if j in where else 0.0
                               for j in new_mask])
    self.m, self.v = pick(self.m), pick(self.v)
    self.mask = new_mask


class SparseMomentsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    reset_interval, steps = 4, 11
    params = _nested_params()
    tx = sparse_moments(
        optax.adam(_LR, b1=_B1, b2=_B2, eps=_EPS),
        density=0.3,
        reset_interval=reset_interval,
        seed=7,
    )
    state = tx.init(params)
    update = self.variant(tx.update)

    flat_params, _ = jax.tree.flatten(params)
    flat_masks = jax.tree.leaves(
        state.masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    ref = [
        _NumpyAdamLeaf(
            p.shape, None if isinstance(m, optax.MaskedNode) else np.asarray(m)
        )
        for p, m in zip(flat_params, flat_masks)
    ]
    # Leaves in order: dec[0] (4, 7), dec[2] (3,), enc.b (5,), enc.w (6, 5).
    self.assertEqual([r.mask is not None for r in ref],
                     [True, False, False, True])
    self.assertLen(ref[0].mask, 8)  # int(0.3 * 28)
    self.assertLen(ref[3].mask, 9)  # int(0.3 * 30)

    for t, grads in enumerate(_grads(params, steps), start=1):
      updates, state = update(grads, state, params)
      self.assertIsNone(updates["enc"]["skip"])
      self.assertIsNone(updates["dec"][1])
      for r, g, u in zip(ref, jax.tree.leaves(grads), jax.tree.leaves(updates)):
        np.testing.assert_allclose(u, r.update(g, t), rtol=2e-5, atol=1e-7)
      masks = jax.tree.leaves(
          state.masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
      for r, m in zip(ref, masks):
        if r.mask is None:
          continue
        if (t + 1) % reset_interval == 0:
          r.redraw(np.asarray(m))
        else:
          np.testing.assert_array_equal(m, r.mask)
      # The compact moments follow the carried-over reference moments.
      mu = state.inner_state[0].mu
      np.testing.assert_allclose(mu["dec"][0], ref[0].m, rtol=2e-5, atol=1e-7)
      np.testing.assert_allclose(mu["enc"]["w"], ref[3].m, rtol=2e-5, atol=1e-7)

  @parameterized.parameters(
      ((7, 13), 0.01), ((7, 13), 0.25), ((64, 3), 0.5), ((1, 5), 0.3),
      ((100, 100), 0.25), ((9, 11), 1.0),
  )
  def test_exact_count(self, shape, density):
    size = int(np.prod(shape))
    k = int(density * size)
    params = {"w": jnp.ones(shape), "b": jnp.ones(shape[-1:])}
    tx = sparse_moments(optax.sgd(1.0), density=density, reset_interval=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):  # crosses a redraw
      updates, state = update(params, state, params)
      mask = np.asarray(state.masks["w"])
      self.assertEqual(mask.shape, (k,))
      self.assertEqual(mask.dtype, np.int32)
      np.testing.assert_array_equal(mask, np.unique(mask))
      self.assertTrue(np.all((mask >= 0) & (mask < size)))
      self.assertIsInstance(state.masks["b"], optax.MaskedNode)
      self.assertEqual(int(np.count_nonzero(updates["w"])), k)
      self.assertEqual(int(np.count_nonzero(updates["b"])), shape[-1])

  def test_state_is_compact(self):
    shape, density = (512, 256), 0.25
    k = int(density * shape[0] * shape[1])
    params = {"w": jnp.zeros(shape), "b": jnp.zeros(shape[1])}
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    sparse = sparse_moments(optax.adam(1e-3), density=density).init(params)
    dense = optax.adam(1e-3).init(params)
    # mu, nu of k float32 entries + k int32 indices; dense leaf and scalars.
    expected = 3 * 4 * k + 2 * 4 * shape[1]
    self.assertBetween(nbytes(sparse) - expected, 0, 64)
    self.assertLess(nbytes(sparse) / nbytes(dense), 0.4)
    self.assertLess(max(x.size for x in jax.tree.leaves(sparse)), k + 1)

  def test_masks_deterministic_per_seed(self):
    params = {"w": jnp.zeros((20, 30)), "v": jnp.zeros((30, 20))}

    def masks_after(seed, steps):
      tx = sparse_moments(optax.sgd(0.1), density=0.1, reset_interval=3,
                          seed=seed)
      state = tx.init(params)
      update = jax.jit(tx.update)
      history = [state.masks]
      for _ in range(steps):
        _, state = update(params, state, params)
        history.append(state.masks)
      return jax.tree.map(np.asarray, history)

    a, b, c = masks_after(3, 6), masks_after(3, 6), masks_after(4, 6)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.array_equal(a[0]["w"], c[0]["w"]))
    self.assertFalse(np.array_equal(a[0]["w"], a[0]["v"]))
    # Redraws after steps 2 and 5 only: (t + 1) % 3 == 0.
    changed = [not np.array_equal(a[i]["w"], a[i + 1]["w"]) for i in range(6)]
    self.assertEqual(changed, [False, True, False, False, True, False])

  def test_no_redraw_when_interval_is_zero(self):
    params = {"w": jnp.zeros((8, 8))}
    tx = sparse_moments(optax.sgd(0.1), density=0.5)
    state = tx.init(params)
    first = np.asarray(state.masks["w"])
    for _ in range(5):
      _, state = tx.update(params, state, params)
    np.testing.assert_array_equal(state.masks["w"], first)

  def test_one_compilation(self):
    params = {"w": jnp.zeros((8, 8)), "b": jnp.zeros(8)}
    tx = sparse_moments(optax.adam(0.1), density=0.5, reset_interval=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(7):
      _, state = update(params, state, params)
    self.assertEqual(update._cache_size(), 1)  # pylint: disable=protected-access

  @parameterized.parameters(0, 0.0, -0.5, 1.01, 2, float("nan"), "0.5", None)
  def test_density_validated(self, density):
    with self.assertRaises(ValueError) as raised:
      sparse_moments(optax.sgd(0.1), density=density)
    message = str(raised.exception)
    self.assertIn("density", message)
    self.assertNotIn("\n", message)

  def test_sparse_mask_tree_and_callable(self):
    params = {"w": jnp.ones((4, 6)), "b": jnp.ones(10)}
    for mask in ({"w": False, "b": True},
                 lambda p: jax.tree.map(lambda x: x.ndim == 1, p)):
      tx = sparse_moments(optax.sgd(1.0), density=0.5, sparse_mask=mask)
      state = tx.init(params)
      self.assertIsInstance(state.masks["w"], optax.MaskedNode)
      self.assertEqual(state.masks["b"].shape, (5,))
      updates, _ = tx.update(params, state, params)
      self.assertEqual(int(np.count_nonzero(updates["b"])), 5)
      self.assertEqual(int(np.count_nonzero(updates["w"])), 24)

  def test_replace_masks_carries_moments_over(self):
    params = {"w": jnp.zeros((2, 4)), "b": jnp.zeros(3)}
    grads = {"w": jnp.arange(8.0).reshape(2, 4) + 1.0, "b": jnp.ones(3)}
    tx = optax.chain(
        sparse_moments(optax.sgd(1.0, momentum=0.5), density=0.5),
        optax.scale(1.0),
    )
    state = tx.init(params)
    state = replace_masks(state, {"w": np.array([1, 2, 5, 6]), "b": None})
    _, state = tx.update(grads, state, params)
    trace = state[0].inner_state[0].trace
    np.testing.assert_array_equal(trace["w"], [2.0, 3.0, 6.0, 7.0])
    state = replace_masks(state, {"w": np.array([0, 2, 6, 7]), "b": None})
    trace = state[0].inner_state[0].trace
    np.testing.assert_array_equal(state[0].masks["w"], [0, 2, 6, 7])
    np.testing.assert_array_equal(trace["w"], [0.0, 3.0, 7.0, 0.0])
    np.testing.assert_array_equal(trace["b"], [1.0, 1.0, 1.0])
    with self.assertRaises(ValueError):
      replace_masks(state, {"w": np.array([0, 1]), "b": None})

  @chex.variants(with_jit=True, without_jit=True)
  def test_redraw_masks_outside_update_is_the_redraw_inside(self):
    reset_interval, steps = 4, 11
    params = _nested_params()
    inner = optax.adam(_LR, b1=_B1, b2=_B2, eps=_EPS)
    inside = sparse_moments(inner, density=0.3, reset_interval=reset_interval, seed=7)
    outside = sparse_moments(inner, density=0.3, seed=7)
    update_in, update_out = self.variant(inside.update), self.variant(outside.update)
    redraw = self.variant(redraw_masks)
    state_in, state_out = inside.init(params), outside.init(params)
    chex.assert_trees_all_equal(state_in, state_out)
    redrawn = []
    for t, grads in enumerate(_grads(params, steps), start=1):
      updates_in, state_in = update_in(grads, state_in, params)
      updates_out, state_out = update_out(grads, state_out, params)
      if redraw_due(t, reset_interval):
        redrawn.append(t)
        state_out = redraw(state_out, params)
      chex.assert_trees_all_equal(updates_in, updates_out)
      chex.assert_trees_all_equal(state_in, state_out)
    self.assertEqual(redrawn, [3, 7, 11])
    self.assertFalse(
        np.array_equal(state_in.masks["enc"]["w"], inside.init(params).masks["enc"]["w"]))

  def test_redraw_masks_with_a_custom_sampler_and_abstract_params(self):
    def last_k(key, size, k):
      del key
      return jnp.arange(size - k, size, dtype=jnp.int32)

    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    tx = sparse_moments(optax.sgd(1.0, momentum=0.5), density=0.25)
    state = replace_masks(tx.init(params), {"w": np.array([12, 13, 14, 15]), "b": None})
    _, state = tx.update(params, state, params)
    shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    new = redraw_masks(state, shapes, sampler=last_k)
    np.testing.assert_array_equal(new.masks["w"], [12, 13, 14, 15])
    np.testing.assert_array_equal(new.inner_state[0].trace["w"], [1.0] * 4)
    self.assertIsInstance(new.masks["b"], optax.MaskedNode)
    self.assertFalse(np.array_equal(new.key, state.key))
    with self.assertRaises(ValueError):  # another tree than the params'
      redraw_masks(state, {"w": shapes["w"]})

  def test_redraw_due(self):
    self.assertEqual([t for t in range(1, 10) if redraw_due(t, 3)], [2, 5, 8])
    self.assertEqual([t for t in range(1, 10) if redraw_due(t, 1)], list(range(1, 10)))
    self.assertFalse(any(redraw_due(t, 0) for t in range(1, 10)))

  def test_uniform_mask_sampler(self):
    size, k, draws = 40, 10, 4000
    keys = jax.random.split(jax.random.key(0), draws)
    idx = jax.jit(jax.vmap(lambda key: uniform_mask_sampler(key, size, k)))(keys)
    idx = np.asarray(idx)
    self.assertEqual(idx.shape, (draws, k))
    self.assertTrue(np.all(np.diff(idx, axis=1) > 0))
    freq = np.bincount(idx.reshape(-1), minlength=size) / draws
    np.testing.assert_allclose(freq, k / size, atol=0.03)

  def test_custom_sampler(self):
    def first_k(key, size, k):
      del key, size
      return jnp.arange(k, dtype=jnp.int32)

    tx = sparse_moments(optax.sgd(1.0), density=0.25, sampler=first_k)
    state = tx.init({"w": jnp.ones((4, 4))})
    np.testing.assert_array_equal(state.masks["w"], [0, 1, 2, 3])
    self.assertIsInstance(state, SparseMomentsState)


def test_spam_with_masks_redrawn_by_the_loop():
  """`spam(..., redraw_masks_in_update=False)` and `redraw_masks` after the steps
  `redraw_due` names: the alias's own trajectory, with no conditional in the
  compiled update."""
  params = _nested_params()
  kwargs = dict(learning_rate=1e-2, density=0.3, reset_interval=3, warmup_steps=2,
                clip_delay=1, weight_decay=0.1, seed=5)
  inside = spam(**kwargs)
  outside = spam(**kwargs, redraw_masks_in_update=False)
  update_in, update_out = jax.jit(inside.update), jax.jit(outside.update)
  redraw = jax.jit(redraw_masks, donate_argnums=0)
  p_in, p_out = params, params
  s_in, s_out = inside.init(params), outside.init(params)
  for t, grads in enumerate(_grads(params, 8), start=1):
    u_in, s_in = update_in(grads, s_in, p_in)
    u_out, s_out = update_out(grads, s_out, p_out)
    p_in, p_out = optax.apply_updates(p_in, u_in), optax.apply_updates(p_out, u_out)
    if redraw_due(t, 3):
      s_out = redraw(s_out, p_out)
    chex.assert_trees_all_equal(p_in, p_out)
    chex.assert_trees_all_equal(s_in, s_out)
  # The program as compiled (the count's choice of form for the platform is resolved when
  # lowered: XLA folds its switch on a constant).
  compiled = lambda tx, state: (
      jax.jit(tx.update).lower(grads, state, params).compile().as_text())
  assert " conditional(" in compiled(inside, s_in)
  assert " conditional(" not in compiled(outside, s_out)


def test_sharded_params_in_subprocess(tmp_path):
  """Params sharded over two (host) devices give the unsharded result."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from spam_optax import sparse_moments
      assert jax.device_count() == 2, jax.devices()
      mesh = Mesh(np.array(jax.devices()), ("x",))
      shard = NamedSharding(mesh, P("x", None))
      params = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(8)}
      tx = sparse_moments(optax.adam(0.1), density=0.25, reset_interval=2)
      def run(params):
        state = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(3):
          updates, state = update(params, state, params)
          params = optax.apply_updates(params, updates)
        return params
      plain = run(params)
      sharded = run({"w": jax.device_put(params["w"], shard), "b": params["b"]})
      assert sharded["w"].sharding.is_equivalent_to(shard, 2), sharded["w"].sharding
      np.testing.assert_allclose(sharded["w"], plain["w"], rtol=1e-6)
      print("ok")
  """)
  env = _processes.env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")
