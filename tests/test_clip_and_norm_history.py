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


def _equals_the_chain(variant):
  """The fused piece (``variant`` of its update) against the chain on spiky gradients."""
  params = to_jnp(nested_params())
  grads = [to_jnp(g) for g in gradient_sequence(11)]
  fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER)
  got_counts, want_counts = [], []
  got, got_state = run(fused, grads, params, variant(fused.update), counts=got_counts)
  want, want_state = run(chain(**HYPER), grads, params, counts=want_counts)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert_states_equal(got_state, want_state)
  # The spikes were clipped: the comparison covers the counts, not only zeros.
  assert got_counts == want_counts and max(got_counts) > 0, got_counts
  assert got[0]["layers"][1] is None


def _stacked_axes_bfloat16_and_nan(variant):
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
  got, got_state = run(fused, grads[:7], params, variant(fused.update))
  want, want_state = run(chain(**HYPER, stacked_axes=axes), grads[:7], params)
  chex.assert_trees_all_close(got, want, rtol=1e-2, atol=1e-3)  # bf16 leaf
  chex.assert_trees_all_close([u["layers"] for u in got], [u["layers"] for u in want],
                              rtol=1e-6, atol=1e-7)
  assert_states_equal(got_state, want_state)
  assert got_state[0].max_ema.tree()["layers"].shape == (3,)
  counts = got_state[0].clipped.as_dict()
  assert int(counts["layers"]) > 0 and int(counts["half"]) > 0
  # A NaN entry: its slice's statistics are NaN in both, the counts agree.
  got_nan, got_state = variant(fused.update)(grads[7], got_state)
  want_nan, want_state = chain(**HYPER, stacked_axes=axes).update(grads[7], want_state)
  np.testing.assert_array_equal(np.isnan(got_nan["layers"]), np.isnan(want_nan["layers"]))
  np.testing.assert_array_equal(got_state[0].clipped.values, want_state[0].clipped.values)


class ClipAndNormHistoryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_the_chain_of_the_pieces(self):
    _equals_the_chain(self.variant)

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
    _stacked_axes_bfloat16_and_nan(self.variant)


class TwoPassesTest(chex.TestCase):
  """The first and third tests above with the norm and the count from a second pass over
  the gradient in every step (``_ONE_PASS`` off), jitted: the same updates, states and
  counts as the chain (``test_reference_replay`` replays this form too)."""

  def setUp(self):
    super().setUp()
    patcher = mock.patch.object(_clip_and_norm_history, "_ONE_PASS", False)
    patcher.start()
    self.addCleanup(patcher.stop)

  @chex.variants(with_jit=True)
  def test_equals_the_chain_of_the_pieces(self):
    _equals_the_chain(self.variant)

  @chex.variants(with_jit=True)
  def test_stacked_axes_bfloat16_and_nan(self):
    _stacked_axes_bfloat16_and_nan(self.variant)


class OnePassTest(chex.TestCase):
  """The norm and the count read off the max's pass (``_ONE_PASS``, the default): which
  steps settle every row from it, and which run the second pass; the same updates, states
  and counts as the chain in both."""

  def second_passes(self):
    """A list that grows by one each time the second pass runs (a callback in it)."""
    ran, inner = [], _clip_and_norm_history._clipped_rows_pass

    def recorded(*args, **kwargs):
      jax.debug.callback(lambda: ran.append(1))
      return inner(*args, **kwargs)
    patcher = mock.patch.object(_clip_and_norm_history, "_clipped_rows_pass", recorded)
    patcher.start()
    self.addCleanup(patcher.stop)
    return ran

  def compare(self, params, grads, axes=None, bf16_leaves=(), **hyper):
    """Runs the piece (jitted) and the chain; returns, per step, whether the second pass
    ran."""
    hyper = {**HYPER, **hyper}
    ran = self.second_passes()
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**hyper, stacked_axes=axes)
    update, state, got, counts, second = jax.jit(fused.update), fused.init(params), [], [], []
    for g in grads:
      before = len(ran)
      u, state = update(g, state)
      jax.block_until_ready(u)
      got.append(u)
      counts.append(state[0].clipped.values)
      second.append(len(ran) > before)
    pieces = chain(**hyper, stacked_axes=axes)
    want, want_counts, want_state = [], [], pieces.init(params)
    want_update = jax.jit(pieces.update)
    for g in grads:
      u, want_state = want_update(g, want_state)
      want.append(u)
      want_counts.append(want_state[0].clipped.values)
    for name in params:
      tol = dict(rtol=1e-2, atol=1e-3) if name in bf16_leaves else dict(rtol=1e-6, atol=1e-7)
      chex.assert_trees_all_close([u[name] for u in got], [u[name] for u in want], **tol)
    np.testing.assert_array_equal(np.stack(counts), np.stack(want_counts))
    assert_states_equal(state, want_state)
    return second, np.stack(counts)

  def test_a_repeated_gradient_takes_one_pass(self):
    """The running max reaches the max of a gradient that repeats (the benchmarks'):
    after the first step, every step settles every row from the max's pass, the max's
    entry clipped or not by the rounding of the corrected running max."""
    rng = np.random.default_rng(0)
    g = {"w": jnp.asarray(rng.normal(size=(16, 64)), jnp.float32),
         "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
    params = jax.tree.map(jnp.zeros_like, g)
    second, _ = self.compare(params, [g] * 12, gamma3=0.999, reset_interval=0,
                             total_steps=None)
    assert not any(second[1:]), second

  def test_spikes_late_in_training_take_one_pass(self):
    """Spikes of one entry a row, and of several entries in one row, long after the bias
    correction has faded: clipped and counted from the max's pass alone."""
    rng = np.random.default_rng(1)
    params = {"w": jnp.zeros((32, 128)), "s": jnp.zeros((2, 8, 16))}
    grads = []
    for t in range(40):
      g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
      if t in (30, 35):
        g["w"][3, 5] *= 40.0
        g["w"][3, 70] *= -60.0  # two in one row, both far above the running max
        g["w"][20, 1] *= 80.0
        g["s"][1, 2, 3] *= 50.0
      grads.append(to_jnp(g))
    second, counts = self.compare(params, grads, axes={"w": 0, "s": 1}, gamma3=0.9,
                                  reset_interval=0, total_steps=None)
    assert counts[30][1] == 3, counts  # leaves in key order: s, w
    assert not second[30] and not second[35] and sum(second) <= 2, second

  def test_a_row_that_cannot_be_settled_is_read_again(self):
    """An entry just above the previous running max beside a spike in the same row (kept
    and clipped entries above L): the second pass runs, and the result is the chain's."""
    rng = np.random.default_rng(2)
    base = rng.uniform(-1.0, 1.0, size=(4, 32)).astype(np.float32)
    base[0, 0] = 1.0
    params = {"w": jnp.zeros((4, 32))}
    grads = [{"w": jnp.asarray(base)} for _ in range(10)]
    spiked = base.copy()
    spiked[2, 3] = 1.0 + 1e-4  # above L, yet below the new corrected max
    spiked[2, 9] = 50.0
    grads.append({"w": jnp.asarray(spiked)})
    second, counts = self.compare(params, grads, gamma3=0.9, reset_interval=0,
                                  total_steps=None)
    assert second[-1] and counts[-1].tolist() == [1], (second, counts)

  def test_bfloat16_row_with_two_clipped_entries_is_read_again(self):
    """A bf16 leaf rounds each clipped value: two clipped entries in one row are summed by
    the second pass; one is settled from the max's pass."""
    rng = np.random.default_rng(3)
    params = {"h": jnp.zeros((8, 64), jnp.bfloat16)}
    grads = []
    for t in range(30):
      g = rng.normal(size=(8, 64)).astype(np.float32)
      if t == 25:
        g[1, 2] = 70.0
      if t == 28:
        g[4, 2], g[4, 9] = 70.0, -90.0
      grads.append({"h": jnp.asarray(g, jnp.bfloat16)})
    second, counts = self.compare(params, grads, bf16_leaves=("h",), gamma3=0.9,
                                  reset_interval=0, total_steps=None)
    assert counts[25].tolist() == [1] and not second[25], (second, counts)
    assert counts[28].tolist() == [2] and second[28], (second, counts)

  def test_the_second_pass_stays_a_conditional(self):
    """Compiled, the second pass is a conditional (XLA would otherwise run both branches
    as a select), and the max's pass is the only reduction of the gradient outside it."""
    params = to_jnp(nested_params())
    fused = spam_optax.clip_by_running_max_and_grad_norm_history(**HYPER)
    text = jax.jit(fused.update).lower(params, fused.init(params)).compile().as_text()
    assert "conditional(" in text


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
