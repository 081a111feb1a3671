"""AdaClip and AdaGN in one transformation equal the chain of the two pieces."""
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax
from spam_optax import _clip_and_norm_history
from spam_optax import _count
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp

HYPER = dict(gamma3=0.9, gamma1=0.6, gamma2=0.85, eps=1e-6, total_steps=12,
             eta_min=0.3, reset_interval=4)


def chain(gamma3, gamma1, gamma2, eps, total_steps, eta_min, reset_interval,
          stacked_axes=None):
  return optax.chain(
      spam_optax.clip_by_running_max(gamma3, reset_interval=reset_interval,
                                     stacked_axes=stacked_axes),
      spam_optax.scale_by_grad_norm_history(
          gamma1=gamma1, gamma2=gamma2, eps=eps, total_steps=total_steps,
          eta_min=eta_min, reset_interval=reset_interval, stacked_axes=stacked_axes))


def run(opt, grads, params, update=None, state=None, counts=None):
  """The updates of each step and the last state; ``counts`` collects each step's
  clipped-entry total."""
  update = update or opt.update
  state = opt.init(params) if state is None else state
  out = []
  for g in grads:
    u, state = update(g, state)
    out.append(u)
    if counts is not None:
      counts.append(int(spam_optax.spike_stats(state)["spike/clipped_total"]))
  return out, state


def assert_states_equal(got, want):
  """Same structure and layouts, counts equal, float statistics close."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    if jnp.issubdtype(g.dtype, jnp.integer):
      np.testing.assert_array_equal(g, w)
    else:
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


class ClipAndNormHistoryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_the_chain_of_the_pieces(self):
    params = to_jnp(nested_params())
    grads = [to_jnp(g) for g in gradient_sequence(11)]
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER)
    got_counts, want_counts = [], []
    got, got_state = run(fused, grads, params, self.variant(fused.update), counts=got_counts)
    want, want_state = run(chain(**HYPER), grads, params, counts=want_counts)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert_states_equal(got_state, want_state)
    # The spikes were clipped: the comparison covers the counts, not only zeros.
    assert got_counts == want_counts and max(got_counts) > 0, got_counts
    assert got[0]["layers"][1] is None

  @chex.variants(with_jit=True, without_jit=True)
  def test_states_are_interchangeable_with_the_chain(self):
    """Either restores the other's state (e.g. a checkpoint) and goes on the same."""
    params = to_jnp(nested_params())
    grads = [to_jnp(g) for g in gradient_sequence(10)]
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER)
    _, chain_state = run(chain(**HYPER), grads[:5], params)
    got, got_state = run(fused, grads[5:], params, self.variant(fused.update), chain_state)
    want, want_state = run(chain(**HYPER), grads, params)
    chex.assert_trees_all_close(got, want[5:], rtol=1e-6, atol=1e-7)
    assert_states_equal(got_state, want_state)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stacked_axes_bfloat16_and_nan(self):
    """Per-slice statistics of a stacked leaf, a bf16 leaf (the chain squares the
    clipped values as AdaClip returns them, in bf16) and a NaN row."""
    rng = np.random.default_rng(3)
    params = {"layers": jnp.zeros((3, 4, 5)), "half": jnp.zeros((6, 2), jnp.bfloat16),
              "empty": jnp.zeros((0, 4))}
    axes = {"layers": 1, "half": 0, "empty": 0}
    grads = []
    for t in range(8):
      g = {"layers": rng.normal(size=(3, 4, 5)).astype(np.float32),
           "half": rng.normal(size=(6, 2)).astype(jnp.bfloat16),
           "empty": np.zeros((0, 4), np.float32)}
      if t in (3, 6):
        g["layers"][1, 2, 3] *= 300.0
        g["half"][4, 1] *= 300.0
      if t == 7:
        g["layers"][2, 0, 0] = np.nan
      grads.append(to_jnp(g))
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER, stacked_axes=axes)
    got, got_state = run(fused, grads[:7], params, self.variant(fused.update))
    want, want_state = run(chain(**HYPER, stacked_axes=axes), grads[:7], params)
    chex.assert_trees_all_close(got, want, rtol=1e-2, atol=1e-3)  # bf16 leaf
    chex.assert_trees_all_close([u["layers"] for u in got], [u["layers"] for u in want],
                                rtol=1e-6, atol=1e-7)
    assert_states_equal(got_state, want_state)
    assert got_state[0].max_ema.tree()["layers"].shape == (3,)
    counts = got_state[0].clipped.as_dict()
    assert int(counts["layers"]) > 0 and int(counts["half"]) > 0
    # A NaN entry: its slice's statistics are NaN in both, the counts agree.
    got_nan, got_state = self.variant(fused.update)(grads[7], got_state)
    want_nan, want_state = chain(**HYPER, stacked_axes=axes).update(grads[7], want_state)
    np.testing.assert_array_equal(np.isnan(got_nan["layers"]), np.isnan(want_nan["layers"]))
    np.testing.assert_array_equal(got_state[0].clipped.values, want_state[0].clipped.values)


class SkipUnclippedRowsTest(ClipAndNormHistoryTest):
  """The tests above with the norm's pass reading only the rows that hold a clipped entry
  (``_SKIP_UNCLIPPED_ROWS``): the same updates, states and counts as the chain."""

  def setUp(self):
    super().setUp()
    patcher = mock.patch.object(_clip_and_norm_history, "_SKIP_UNCLIPPED_ROWS", True)
    patcher.start()
    self.addCleanup(patcher.stop)

  @chex.variants(with_jit=True, without_jit=True)
  def test_wide_rows_with_a_few_clipped(self):
    """A 128×352 leaf (read as 22 rows of 2048) and a 2×3×352 stacked one, spikes in a few
    rows: the same as the chain, and the rows are gathered (a jaxpr gather) rather than all
    read again."""
    rng = np.random.default_rng(5)
    params = {"w": jnp.zeros((128, 352)), "s": jnp.zeros((2, 3, 352))}
    axes = {"w": 0, "s": 1}
    grads = []
    for t in range(6):
      g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
      if t in (2, 4):
        g["w"][7, 11] *= 50.0
        g["w"][100, 3] *= -80.0
        g["s"][1, 2, 5] *= 60.0
      grads.append(to_jnp(g))
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER, stacked_axes=axes)
    counts, want_counts = [], []
    got, got_state = run(fused, grads, params, self.variant(fused.update), counts=counts)
    want, want_state = run(chain(**HYPER, stacked_axes=axes), grads, params,
                           counts=want_counts)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert_states_equal(got_state, want_state)
    assert counts == want_counts and max(counts) > 0, counts
    jaxpr = jax.make_jaxpr(fused.update)(grads[0], fused.init(params))
    assert sum(e.primitive.name == "gather" for e in jaxpr.jaxpr.eqns) == 2

  def test_with_several_devices_every_row_is_read(self):
    # a gather of a sharded leaf's rows would move the leaf: not with more than one device
    params = {"w": jnp.zeros((4, 6))}
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER)
    with mock.patch.object(jax, "device_count", return_value=2):
      jaxpr = jax.make_jaxpr(fused.update)(params, fused.init(params))
    assert not any(e.primitive.name == "gather" for e in jaxpr.jaxpr.eqns)


def test_long_rows_are_counted_in_int32(monkeypatch):
  """Rows longer than float32 counts exactly are counted as int32 in the same reduction
  as the float32 sum of squares (the limit lowered so that small rows take that path)."""
  monkeypatch.setattr(_count, "_MAX_EXACT_ROW", 4)
  params = to_jnp(nested_params())
  grads = [to_jnp(g) for g in gradient_sequence(8)]
  got, got_state = run(spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER),
                       grads, params)
  want, want_state = run(chain(**HYPER), grads, params)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert_states_equal(got_state, want_state)
  terms = _count.changed_terms(jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]]),
                               jnp.array([[1.0, 0.0, 3.0, 0.0, 5.0]]), 0)
  assert terms.dtype == jnp.int32 and terms.tolist() == [[0, 1, 0, 1, 0]]


def test_stable_spam_uses_it_and_keeps_the_chain_state():
  """The alias's first element is the pair of AdaClip and AdaGN states."""
  params = to_jnp(nested_params())
  clip_state, norm_state = spam_optax.stable_spam(1e-3).init(params)[0]
  assert isinstance(clip_state, spam_optax.ClipByRunningMaxState)
  assert isinstance(norm_state, spam_optax.ScaleByGradNormHistoryState)


def test_bad_hyperparameters_fail_before_tracing():
  with pytest.raises(ValueError, match="gamma3"):
    spam_optax.clip_by_running_max_and_grad_norm_history(gamma3=1.5)
  with pytest.raises(ValueError, match="gamma1"):
    spam_optax.clip_by_running_max_and_grad_norm_history(gamma1=-0.1)
  with pytest.raises(ValueError, match="reset_interval"):
    spam_optax.clip_by_running_max_and_grad_norm_history(reset_interval=-1)


def test_under_inject_hyperparams_and_apply_if_finite():
  """The hyperparameters as injected arrays, and the piece behind apply_if_finite (a NaN
  step is skipped, the state kept), give the plain piece's updates."""
  params = to_jnp(nested_params())
  grads = [to_jnp(g) for g in gradient_sequence(8)]
  plain = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER)
  injected = optax.inject_hyperparams(
      spam_optax.clip_by_running_max_and_grad_norm_history,
      static_args=("total_steps", "reset_interval", "stacked_axes"))(**HYPER)
  want, _ = run(plain, grads, params)
  got, _ = run(injected, grads, params, jax.jit(injected.update))
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  guarded = optax.apply_if_finite(plain, max_consecutive_errors=2)
  bad = jax.tree.map(lambda g: g * np.nan, grads[3])
  got, _ = run(guarded, grads[:3] + [bad] + grads[3:], params, jax.jit(guarded.update))
  chex.assert_trees_all_close(got[:3] + got[4:], want, rtol=1e-6, atol=1e-7)
