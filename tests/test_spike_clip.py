"""Tests of the SPAM spike clip: `spam_clip` and the clip inside `scale_by_spam`."""
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax
from _piece_helpers import gradient_sequence
from _piece_helpers import nested_params
from _piece_helpers import to_jnp


def np_spam_clip(seq, theta, b2, delay, interval):
  """NumPy reference of `spam_clip` for one leaf sequence."""
  v = np.zeros_like(seq[0], dtype=np.float64)
  out, counts = [], []
  for t, g in enumerate(seq, 1):
    g = g.astype(np.float64)
    if interval and t % interval == 0:
      v = np.zeros_like(v)
    phase = t % interval if interval else t
    spike = np.zeros(g.shape, bool)
    if theta != 0 and t >= delay and phase >= delay:
      spike = g * g > theta * v
      g = np.where(spike, np.sign(g) * np.sqrt(theta * v), g)
    v = b2 * v + (1 - b2) * g * g
    out.append(g)
    counts.append(int(spike.sum()))
  return out, counts


def np_spam_adam(seq, b1, b2, eps, theta, delay, interval):
  """NumPy reference of `scale_by_spam` (no reset): updates and clip counts."""
  m = np.zeros_like(seq[0], dtype=np.float64)
  v = np.zeros_like(m)
  out, counts = [], []
  for t, g in enumerate(seq, 1):
    g = g.astype(np.float64)
    phase = t % interval if interval else t
    spike = np.zeros(g.shape, bool)
    if theta != 0 and t >= delay and phase >= delay:
      spike = g * g > theta * v
      g = np.where(spike, np.sign(g) * np.sqrt(theta * v), g)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append(np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps))
    counts.append(int(spike.sum()))
  return out, counts


def per_leaf(fn, seq):
  """Runs a per-leaf NumPy reference over a sequence of trees."""
  leaves = [jax.tree.leaves(tree) for tree in seq]
  treedef = jax.tree.structure(seq[0])
  results = [fn([step[i] for step in leaves]) for i in range(len(leaves[0]))]
  return results, treedef


class SpamClipTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    theta, b2, delay, interval = 50.0, 0.9, 3, 7
    seq = gradient_sequence(12)
    opt = spam_optax.spam_clip(theta, b2=b2, clip_delay=delay,
                                 reset_interval=interval)
    params = to_jnp(nested_params())
    state = opt.init(params)
    update = self.variant(opt.update)
    got = []
    for g in seq:
      u, state = update(to_jnp(g), state)
      got.append(u)
    results, treedef = per_leaf(
        lambda s: np_spam_clip(s, theta, b2, delay, interval), seq
    )
    for t in range(len(seq)):
      want = treedef.unflatten([r[0][t] for r in results])
      chex.assert_trees_all_close(got[t], want, rtol=2e-5, atol=1e-6)
    # The last step's clip counts, per leaf.
    want_counts = treedef.unflatten([r[1][-1] for r in results])
    chex.assert_trees_all_equal(state.clipped.tree(), want_counts)
    assert sum(r[1][3] for r in results) > 0  # the spike at step 4 was clipped

  def test_lion_recipe_runs_and_clips(self):
    opt = optax.chain(spam_optax.spam_clip(5000.0, clip_delay=2),
                      optax.lion(1e-3))
    params = {"w": jnp.ones((3, 3))}
    state = opt.init(params)
    step = jax.jit(opt.update)
    for t in range(5):
      g = jnp.full((3, 3), 1.0).at[0, 0].set(1e6 if t == 4 else 1.0)
      _, state = step({"w": g}, state, params)
    stats = spam_optax.spike_stats(state)
    assert int(stats["spike/clipped_total"]) == 1

  @parameterized.parameters(False, True)
  def test_lines_up_with_periodic_reset(self, after_update):
    # The recipe of the docstring: the same reset_interval on the clip and on
    # the reset. The clip's v is zeroed and its hold-off restarts on the reset
    # step, whichever timing the reset has.
    theta, b2, delay, interval = 5000.0, 0.9, 2, 5
    opt = optax.chain(
        spam_optax.spam_clip(theta, b2=b2, clip_delay=delay,
                             reset_interval=interval),
        spam_optax.periodic_reset(optax.scale_by_adam(), interval,
                                  after_update=after_update),
    )
    # Spikes before, on and after the reset steps 5 and 10, each on its own
    # entry (a spike, clipped or not, inflates its entry's v).
    rng = np.random.default_rng(0)
    seq = []
    for t in range(1, 13):
      g = rng.normal(size=(4, 3)).astype(np.float32)
      if t in (4, 5, 6, 7, 9, 11, 12):
        g.reshape(-1)[t % 12] *= 1000.0
      seq.append({"w": g})
    params = {"w": jnp.zeros((4, 3))}
    state = opt.init(params)
    update = jax.jit(opt.update)
    counts, since = [], []
    for g in seq:
      _, state = update(to_jnp(g), state, params)
      counts.append(int(state[0].clipped.tree()["w"]))
      since.append(int(state[1].steps_since_reset))
      if since[-1] == 0:  # a reset step: the clip's v restarted with it
        np.testing.assert_allclose(state[0].nu["w"],
                                   (1 - b2) * np.square(g["w"]), rtol=1e-6)
    want = np_spam_clip([g["w"] for g in seq], theta, b2, delay, interval)
    assert counts == want[1]
    # The hold-off after each reset: no clip on steps 5, 6 and 10, 11, though
    # steps 5, 6 and 11 carry spikes; the spikes at 4, 7, 9 and 12 are clipped.
    assert since == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    assert [t for t, c in enumerate(counts, 1) if c] == [4, 7, 9, 12]

  @parameterized.parameters(
      dict(kwargs=dict(spike_threshold=-1.0), name="spike_threshold"),
      dict(kwargs=dict(b2=1.0), name="b2"),
      dict(kwargs=dict(clip_delay=-1), name="clip_delay"),
      dict(kwargs=dict(reset_interval=-5), name="reset_interval"),
      dict(kwargs=dict(reset_interval=2.5), name="reset_interval"),
      dict(kwargs=dict(clip_delay=1.5), name="clip_delay"),
  )
  def test_rejects_bad_hyperparameters(self, kwargs, name):
    with pytest.raises(ValueError, match=name):
      spam_optax.spam_clip(**kwargs)


class ScaleBySpamTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference(self):
    hp = dict(b1=0.8, b2=0.95, eps=1e-6, spike_threshold=20.0, clip_delay=2,
              reset_interval=0)
    seq = gradient_sequence(10)
    opt = spam_optax.scale_by_spam(**hp)
    params = to_jnp(nested_params())
    state = opt.init(params)
    update = self.variant(opt.update)
    got, clipped = [], []
    for g in seq:
      u, state = update(to_jnp(g), state)
      got.append(u)
      clipped.append(state.clipped.tree())
    results, treedef = per_leaf(
        lambda s: np_spam_adam(s, hp["b1"], hp["b2"], hp["eps"],
                               hp["spike_threshold"], hp["clip_delay"], 0),
        seq,
    )
    for t in range(len(seq)):
      chex.assert_trees_all_close(
          got[t], treedef.unflatten([r[0][t] for r in results]), rtol=1e-4, atol=1e-6)
      # The clipped-entry count of every step, per leaf.
      want = treedef.unflatten([r[1][t] for r in results])
      chex.assert_trees_all_equal(
          jax.tree.map(int, clipped[t]), jax.tree.map(int, want))
    assert sum(r[1][3] for r in results) > 0  # the spike at step 4 was clipped

  def test_only_mu_and_nu_are_full_size(self):
    params = {"w": jnp.ones((5, 7)), "b": jnp.ones(7)}
    state = spam_optax.scale_by_spam().init(params)
    full = [x for x in jax.tree.leaves(state) if x.size > 2]
    assert len(full) == 2 * len(jax.tree.leaves(params))
    # The clipped counts: one int32 per leaf, in one vector.
    assert state.clipped.values.shape == (2,)
    assert jax.tree.map(jnp.shape, state.clipped.tree()) == {"w": (), "b": ()}

  def test_zero_second_moment_freezes_entries_quirk(self):
    # With no hold-off the clip is active at step 1 with v == 0: every nonzero
    # entry is clipped to 0 (official strict comparison, no eps).
    opt = spam_optax.scale_by_spam(clip_delay=0, reset_interval=0)
    params = jnp.zeros(4)
    u, state = opt.update(jnp.arange(1.0, 5.0), opt.init(params))
    np.testing.assert_array_equal(u, np.zeros(4))
    assert int(state.clipped.tree()) == 4

  def test_equals_spam_clip_in_front_of_adam_without_eps(self):
    # The stand-alone clip keeps its own EMA; with the same b2 it sees the same
    # second moment as the clip inside scale_by_spam.
    interval, delay = 5, 2
    a = spam_optax.periodic_reset(
        spam_optax.scale_by_spam(eps=0.0, spike_threshold=10.0,
                                 clip_delay=delay, reset_interval=interval),
        interval)
    b = optax.chain(
        spam_optax.spam_clip(10.0, b2=0.999, clip_delay=delay,
                               reset_interval=interval),
        spam_optax.periodic_reset(optax.scale_by_adam(eps=0.0), interval),
    )
    params = {"w": jnp.zeros((4, 3))}
    sa, sb = a.init(params), b.init(params)
    for g in gradient_sequence(12, seed=3):
      g = {"w": jnp.asarray(g["dense"]["w"])}
      ua, sa = a.update(g, sa)
      ub, sb = b.update(g, sb)
      # optax computes 1 - 0.999**t directly in float32 (about 1e-5 off).
      np.testing.assert_allclose(ua["w"], ub["w"], rtol=1e-4)

  def test_mu_dtype(self):
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    opt = spam_optax.scale_by_spam(mu_dtype=jnp.float32)
    state = opt.init(params)
    assert state.mu["w"].dtype == jnp.float32
    u, state = opt.update({"w": jnp.ones(3, jnp.bfloat16)}, state)
    assert u["w"].dtype == jnp.bfloat16
    assert state.nu["w"].dtype == jnp.float32
    default = spam_optax.scale_by_spam().init(params)
    assert default.mu["w"].dtype == jnp.bfloat16

  @parameterized.parameters("b1", "b2")
  def test_rejects_betas_outside_unit_interval(self, name):
    with pytest.raises(ValueError, match=name):
      spam_optax.scale_by_spam(**{name: 1.5})

  def test_rejects_negative_eps(self):
    with pytest.raises(ValueError, match="eps"):
      spam_optax.scale_by_spam(eps=-1e-8)


def test_clip_unseen_false_leaves_unseen_entries_alone():
  opt = spam_optax.scale_by_spam(clip_delay=0, reset_interval=0,
                                 clip_unseen=False)
  u, state = opt.update(jnp.arange(1.0, 5.0), opt.init(jnp.zeros(4)))
  assert np.all(np.asarray(u) > 0)
  assert int(state.clipped.tree()) == 0
  clip = spam_optax.spam_clip(clip_delay=0, clip_unseen=False)
  g, _ = clip.update(jnp.ones(3), clip.init(jnp.zeros(3)))
  np.testing.assert_array_equal(g, np.ones(3))
