"""``stacked_axes``: per-tensor statistics for leaves that stack tensors (scanned layers).

AdaClip, AdaGN and ``stable_spam`` on a stacked leaf must equal the same tensors given as
separate leaves, slice by slice, and the NumPy references of each block per slice.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spam_optax
from test_adaptive_clip import np_ada_clip
from test_grad_norm_history import np_ada_gn

LAYERS = 3


def _unstacked_params():
  """Three "layers" of two tensors each, plus tensors that are not stacked and a None."""
  rng = np.random.default_rng(0)
  layer = lambda: {"w": rng.normal(size=(4, 3)).astype(np.float32),
                   "s": rng.normal(size=(3,)).astype(np.float32)}
  return {"layers": [layer() for _ in range(LAYERS)],
          "embed": rng.normal(size=(5, 3)).astype(np.float32), "none": None}


def stack(tree):
  """The ``layers`` list becomes one subtree whose leaves have a leading layer axis."""
  out = dict(tree)
  out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *tree["layers"])
  return out


def unstack(tree):
  out = dict(tree)
  out["layers"] = [jax.tree.map(lambda x, i=i: x[i], tree["layers"]) for i in range(LAYERS)]
  return out


def layer_axes(tree):
  """1 for the leaves under ``layers``, 0 elsewhere (the form a scanned model needs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: int(path[0].key == "layers"), tree)


def gradients(steps, spikes=(3, 7, 9)):
  rng = np.random.default_rng(1)
  seq = []
  for t in range(1, steps + 1):
    def draw(p):
      g = rng.normal(size=p.shape).astype(np.float32)
      if t in spikes:
        g.reshape(-1)[int(rng.integers(g.size))] *= 500.0
      return g
    seq.append(jax.tree.map(draw, _unstacked_params()))
  return seq


def run(opt, params, seq, update=jax.jit):
  state = opt.init(params)
  step = update(opt.update)
  outs = []
  for g in seq:
    u, state = step(jax.tree.map(jnp.asarray, g), state, params)
    outs.append(u)
  return outs, state


FACTORIES = {
    "clip_by_running_max": lambda axes: spam_optax.clip_by_running_max(
        0.9, reset_interval=4, stacked_axes=axes),
    "scale_by_grad_norm_history": lambda axes: spam_optax.scale_by_grad_norm_history(
        gamma1=0.8, gamma2=0.95, total_steps=10, reset_interval=4, stacked_axes=axes),
    "stable_spam": lambda axes: spam_optax.stable_spam(
        1e-2, gamma1=0.8, gamma2=0.95, gamma3=0.9, reset_interval=4, total_steps=10,
        weight_decay=0.1, stacked_axes=axes),
}


class StackedEqualsSeparateTest(chex.TestCase):

  def _check(self, name, axes, update):
    seq = gradients(9)
    params = jax.tree.map(jnp.asarray, _unstacked_params())
    want, want_state = run(FACTORIES[name](None), params, seq)
    got, got_state = run(FACTORIES[name](axes), stack(params), [stack(g) for g in seq],
                         update)
    for t, (u_got, u_want) in enumerate(zip(got, want)):
      chex.assert_trees_all_close(unstack(u_got), u_want, rtol=2e-6, atol=1e-7,
                                  custom_message=f"step {t + 1}")
    stats_got, stats_want = spam_optax.spike_stats(got_state), spam_optax.spike_stats(
        want_state)
    if name != "scale_by_grad_norm_history":
      assert int(stats_got["spike/clipped_total"]) == int(stats_want["spike/clipped_total"])
      assert int(stats_got["spike/clipped_total"]) > 0  # the last step's spike was clipped

  @chex.variants(with_jit=True, without_jit=True)
  def test_clip_by_running_max(self):
    self._check("clip_by_running_max", layer_axes, self.variant)

  @chex.variants(with_jit=True, without_jit=True)
  def test_scale_by_grad_norm_history(self):
    self._check("scale_by_grad_norm_history", layer_axes, self.variant)

  @chex.variants(with_jit=True, without_jit=True)
  def test_stable_spam(self):
    self._check("stable_spam", layer_axes, self.variant)

  def test_tree_form_equals_callable(self):
    self._check("stable_spam", layer_axes(stack(_unstacked_params())), jax.jit)


def test_state_holds_one_statistic_per_slice():
  params = stack(jax.tree.map(jnp.asarray, _unstacked_params()))
  clip_state, norm_state = spam_optax.stable_spam(1e-3, stacked_axes=layer_axes).init(
      params)[0]
  assert clip_state.max_ema.tree()["layers"]["w"].shape == (LAYERS,)
  assert clip_state.max_ema.tree()["embed"].shape == ()
  assert clip_state.clipped.tree()["layers"]["w"].shape == ()  # all slices together
  assert norm_state.nu_norm.tree()["layers"]["s"].shape == (LAYERS,)
  assert norm_state.mu_norm.tree()["none"] is None


@pytest.mark.parametrize("stacked", [1, 2, 3])
def test_every_stacked_count_matches_numpy_per_slice(stacked):
  """An int applies to every leaf; 3 on a rank-3 leaf makes every entry its own tensor."""
  rng = np.random.default_rng(2)
  seq = [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(7)]
  seq[4].reshape(-1)[5] *= 300.0
  clip = spam_optax.clip_by_running_max(0.9, reset_interval=3, stacked_axes=stacked)
  norm = spam_optax.scale_by_grad_norm_history(gamma1=0.8, gamma2=0.95, eps=1e-8,
                                               reset_interval=3, stacked_axes=stacked)
  clipped, _ = run(clip, jnp.zeros((2, 3, 4)), seq)
  scaled, _ = run(norm, jnp.zeros((2, 3, 4)), seq)
  for idx in np.ndindex(*seq[0].shape[:stacked]):
    slices = [g[idx].astype(np.float64) for g in seq]
    want_clip = np_ada_clip(slices, 0.9, 3)
    want_factor = np_ada_gn(slices, 0.8, 0.95, 1e-8, None, 0.5, 3,
                            lambda g: float(np.linalg.norm(g)))
    for t in range(len(seq)):
      np.testing.assert_allclose(np.asarray(clipped[t])[idx], want_clip[t], rtol=1e-5)
      np.testing.assert_allclose(np.asarray(scaled[t])[idx], slices[t] * want_factor[t],
                                 rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_with_stacked_axes():
  """A tree of ints is static as it is; an int or a callable must be named in
  ``static_args`` (optax would inject an int, and call a callable as a schedule)."""
  params = stack(jax.tree.map(jnp.asarray, _unstacked_params()))
  grads = stack(jax.tree.map(jnp.asarray, gradients(1)[0]))
  plain = spam_optax.stable_spam(1e-2, stacked_axes=layer_axes)
  want, _ = plain.update(grads, plain.init(params), params)
  for injected in (
      optax.inject_hyperparams(spam_optax.stable_spam)(
          1e-2, stacked_axes=layer_axes(params)),
      optax.inject_hyperparams(spam_optax.stable_spam, static_args=("stacked_axes",))(
          1e-2, stacked_axes=layer_axes)):
    got, _ = jax.jit(injected.update)(grads, injected.init(params), params)
    chex.assert_trees_all_close(got, want, rtol=1e-6)

  clip = optax.inject_hyperparams(spam_optax.clip_by_running_max,
                                  static_args=("stacked_axes",))(0.9, stacked_axes=1)
  layers = params["layers"]
  u, state = jax.jit(clip.update)(grads["layers"], clip.init(layers), layers)
  assert state.inner_state.max_ema.tree()["w"].shape == (LAYERS,)
  with pytest.raises(ValueError, match="static_args"):
    bad = optax.inject_hyperparams(spam_optax.clip_by_running_max)(0.9, stacked_axes=1)
    jax.jit(bad.update)(grads["layers"], bad.init(layers), layers)


@pytest.mark.parametrize("value, message", [
    (-1, "integer >= 0"), (1.5, "integer >= 0"), (True, "integer >= 0"),
])
def test_bad_stacked_axes_fail_at_construction(value, message):
  for make in FACTORIES.values():
    with pytest.raises(ValueError, match=message):
      make(value)


def test_too_many_stacked_axes_fail_at_init():
  with pytest.raises(ValueError, match=r"`stacked_axes` is 2 for a leaf of shape \(3,\)"):
    spam_optax.stable_spam(1e-3, stacked_axes=2).init({"w": jnp.zeros((2, 3)),
                                                        "b": jnp.zeros(3)})
  with pytest.raises(ValueError, match="integer >= 0"):
    spam_optax.clip_by_running_max(stacked_axes={"w": -1}).init({"w": jnp.zeros(3)})


def test_global_norm_refuses_stacked_axes():
  with pytest.raises(ValueError, match="global_norm"):
    spam_optax.scale_by_grad_norm_history(global_norm=True, stacked_axes=1)
  spam_optax.scale_by_grad_norm_history(global_norm=True, stacked_axes=0)  # nothing stacked


def test_no_stacked_axes_keeps_scalar_state():
  """Without stacked axes each leaf has one statistic (one entry of the vector)."""
  state = spam_optax.clip_by_running_max(stacked_axes=0).init({"w": jnp.zeros((2, 3))})
  assert state.max_ema.tree()["w"].shape == ()
  assert math.isclose(float(state.max_ema.tree()["w"]), 0.0)
