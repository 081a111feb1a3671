"""The papers' other baselines and the spike guards, trained through the trainer's own pieces."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
from experiments import config, optimizers
from experiments import train_step as ts
from models.config import LlamaConfig

TINY = LlamaConfig(name="tiny", hidden_size=16, intermediate_size=32, num_heads=2,
                   num_layers=1, vocab_size=32, max_seq_len=16, dtype="float32")
STEPS = 5


def _cfg(*flags):
  return config.parse_args(["--warmup_steps", "0", "--num_training_steps", "100", "--lr", "1e-2",
                            *flags])


def _train(cfg):
  """STEPS optimizer steps of the trainer's jitted step on one fixed batch; the losses."""
  schedule = optimizers.make_schedule(cfg)
  optimizer = optimizers.make_optimizer(cfg, schedule)
  model = models.Llama(TINY)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, TINY.vocab_size, (1, 4, 12)),
                       jnp.int32)
  init = ts.make_init_fn(model, optimizer, param_dtype=jnp.float32, example_tokens=tokens[0])
  step = jax.jit(ts.make_train_step(model, optimizer, schedule, pad_id=0))
  state = init(jax.random.key(0))
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, tokens)
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.mark.parametrize("flags", [
    ("--optimizer", "adam_mini", "--weight_decay", "0.1"),
    ("--optimizer", "galore", "--rank", "4", "--update_proj_gap", "2"),
    ("--optimizer", "muon", "--weight_decay", "0.1"),
], ids=lambda f: f[1])
def test_baseline_trains(flags):
  losses, state = _train(_cfg(*flags))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  # orbax (the trainer's checkpoints) cannot save zero-size arrays
  assert all(x.size for x in jax.tree.leaves(state["opt_state"]))


@pytest.mark.parametrize("base", config.GUARDED)
@pytest.mark.parametrize("guard", ["stable_spam", "spam_clip"])
def test_spike_guard_trains(guard, base):
  # A reset every 2 steps (stable_spam) or a clip active from step 1 (spam_clip), so the
  # guard acts within the 5 steps.
  acts = ("--DeltaT", "2") if guard == "stable_spam" else ("--grad_accu_steps", "1")
  losses, state = _train(_cfg("--optimizer", base, "--spike_guard", guard, *acts))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], losses
  assert int(state["step"]) == STEPS
  assert all(x.size for x in jax.tree.leaves(state["opt_state"]))


def _tiny_params():
  shapes = nn.meta.unbox(models.abstract_variables(TINY)["params"])
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32), shapes)


def test_stable_spam_guard_keeps_muon_working_after_a_restart():
  """The restart re-initialises Muon (momentum zero, coefficients intact), it still updates."""
  params = _tiny_params()
  opt = optimizers.make_optimizer(_cfg("--optimizer", "muon", "--spike_guard", "stable_spam",
                                       "--DeltaT", "1"))
  state = opt.init(params)
  rng = np.random.default_rng(1)
  for _ in range(3):  # Muon restarts before every update
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = jax.jit(opt.update)(grads, state, params)
  q = updates["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert float(jnp.linalg.norm(q)) > 1e-4
  muon_states = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, optax.contrib.MuonState))
                 if isinstance(s, optax.contrib.MuonState)]
  assert len(muon_states) == 1
  chex.assert_trees_all_close(muon_states[0].ns_coeffs,
                              jnp.asarray(optimizers.MUON_NS_COEFFS, jnp.float32))


@pytest.mark.parametrize("jit", [True, False])
def test_restart_every_starts_the_inner_optimizer_afresh(jit):
  """Restarted before updates 3 and 6, Adam's updates 3-5 are a fresh Adam's 1-3: moments and
  bias correction restart (zeroing the moments alone would make update 3 about 3x larger)."""
  rng = np.random.default_rng(2)
  grads = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(5)]
  params = jnp.zeros((4, 3))

  def run(opt, seq):
    state, out = opt.init(params), []
    update = jax.jit(opt.update) if jit else opt.update
    for g in seq:
      u, state = update(g, state, params)
      out.append(u)
    return out

  got = run(optimizers.restart_every(optax.adam(1e-2), 3), grads)
  chex.assert_trees_all_close(got[:2], run(optax.adam(1e-2), grads[:2]), rtol=1e-6)
  chex.assert_trees_all_close(got[2:], run(optax.adam(1e-2), grads[2:]), rtol=1e-6)
  never = run(optimizers.restart_every(optax.adam(1e-2), 0), grads)
  chex.assert_trees_all_close(never, run(optax.adam(1e-2), grads), rtol=1e-6)


def test_stable_spam_guard_follows_the_schedule_across_restarts():
  """The base runs at learning rate 1 inside the restarts; the schedule scales it outside
  and keeps counting (lr 0 at the first update, as the trainer's schedule)."""
  cfg = _cfg("--optimizer", "adam", "--spike_guard", "stable_spam", "--DeltaT", "2",
             "--warmup_steps", "4")
  opt = optimizers.make_optimizer(cfg)
  params = _tiny_params()
  state = opt.init(params)
  norms = []
  for _ in range(4):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    norms.append(float(optax.tree.norm(updates)))
  assert norms[0] == 0.0  # lr factor 0 at the first update
  assert 0.0 < norms[1] < norms[2] < norms[3]  # the warm-up keeps rising across the restart


def test_projection_matrix_axes():
  params = _tiny_params()
  axes = {jax.tree_util.keystr(p): optimizers.matrix_axes(p, x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  layer = "['layers_0']"
  assert axes[f"{layer}['self_attn']['q_proj']['kernel']"] == ((0,), (1, 2))
  assert axes[f"{layer}['self_attn']['o_proj']['kernel']"] == ((0, 1), (2,))
  assert axes[f"{layer}['mlp']['down_proj']['kernel']"] == ((0,), (1,))
  assert axes["['lm_head']['kernel']"] is None
  assert axes["['embed_tokens']['embedding']"] is None
  assert axes[f"{layer}['input_layernorm']['scale']"] is None
  scanned = {"layers": {"self_attn": {"o_proj": {"kernel": jnp.zeros((2, 2, 8, 16))}}}}
  (path, leaf), = jax.tree_util.tree_flatten_with_path(scanned)[0]
  assert optimizers.matrix_axes(path, leaf) == ((1, 2), (3,))  # axis 0: the layer


@pytest.mark.parametrize("optimizer", ["spam", "stable_spam", "adamw", "sgd", "galore",
                                       "skip_step"])
@pytest.mark.parametrize("guard", ["stable_spam", "spam_clip"])
def test_spike_guard_on_other_optimizers_is_a_one_line_error(guard, optimizer):
  with pytest.raises(SystemExit, match=r"^error: --spike_guard") as e:
    config.parse_args(["--optimizer", optimizer, "--spike_guard", guard])
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags, message", [
    (("--optimizer", "galore", "--rank", "0"), "--rank must be >= 1"),
    (("--optimizer", "galore", "--galore_scale", "0"), "--galore_scale must be > 0"),
])
def test_bad_galore_flags(flags, message):
  with pytest.raises(SystemExit, match=message):
    config.parse_args(list(flags))


def test_old_optax_is_a_one_line_error(monkeypatch):
  monkeypatch.delattr(optax.contrib, "galore")
  with pytest.raises(SystemExit, match=r"error: --optimizer galore needs optax>=0\.2\.7"):
    optimizers.make_optimizer(_cfg("--optimizer", "galore"))
  monkeypatch.setattr(optax.contrib, "muon", lambda learning_rate, beta=0.95: None)
  with pytest.raises(SystemExit, match=r"error: --optimizer muon needs optax>=0\.2\.7"):
    optimizers.make_optimizer(_cfg("--optimizer", "muon"))


def test_step_logs_the_norm_of_the_gradient_the_optimizer_receives():
  """``grad_norm`` is the float32 L2 norm of the mean gradient, in the parameter dtype (bf16
  here, as in the official runs), computed as NumPy does in float64."""
  schedule = optimizers.make_schedule(_cfg())
  received = []

  def spy(grads, state, params=None):
    received.append(grads)
    return grads, state

  model = models.Llama(TINY)
  tokens = jnp.asarray(np.random.default_rng(3).integers(1, TINY.vocab_size, (2, 2, 12)),
                       jnp.int32)
  optimizer = optax.GradientTransformation(lambda p: optax.EmptyState(), spy)
  init = ts.make_init_fn(model, optimizer, param_dtype=jnp.bfloat16, example_tokens=tokens[0])
  _, metrics = ts.make_train_step(model, optimizer, schedule, pad_id=0)(
      init(jax.random.key(0)), tokens)
  (grads,) = received
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
  every = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(grads)])
  assert metrics["grad_norm"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["grad_norm"], np.sqrt(np.sum(every ** 2)), rtol=1e-6)
