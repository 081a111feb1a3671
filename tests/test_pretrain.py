"""The pretraining loop end to end on a tiny LLaMA: metrics, schedule, accumulation, errors, NaN."""
import importlib.util
import math
import types

import jax
import numpy as np
import pytest

from experiments import config, optimizers, pretrain

from _tiny_runs import read_metrics


def test_run_writes_metrics_eval_and_checkpoint(tiny_args, tmp_path, capsys):
  summary = pretrain.main(tiny_args(optimizer="spam", density=0.5, dtype="bfloat16",
                                    num_training_steps=6))
  records = read_metrics(tmp_path / "run")
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 7))
  for r in steps:
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(r)
    assert any(k.startswith("spike/") for k in r)  # spam_optax.spike_stats
  assert steps[0]["lr"] == 0.0  # the official schedule: the first update has lr 0
  evals = {r["step"]: r for r in records if "eval_loss" in r}
  assert sorted(evals) == [0, 3, 6]
  assert math.isclose(evals[6]["eval_perplexity"], math.exp(evals[6]["eval_loss"]), rel_tol=1e-6)
  assert evals[6]["eval_loss"] < evals[0]["eval_loss"]
  assert "loss" in evals[3]  # an eval step's line carries both
  assert summary["latest_checkpoint"] == 6
  out = capsys.readouterr().out
  assert "validation perplexity" in out and "metrics:" in out and "checkpoint:" in out


def test_sparse_masks_redrawn_by_the_loop_follow_the_in_update_redraw(tiny_args, tmp_path,
                                                                      monkeypatch):
  """With --density the loop redraws SPAM's masks itself (no lax.cond in the step); the run is
  the one the optimizer's own in-update redraw gives, redraws after steps 2 and 5 included."""
  flags = dict(optimizer="spam", density=0.5, DeltaT=3, warmup_epoch=1, threshold=2,
               grad_accu_steps=1, num_training_steps=7, eval_every=7, save_every=7)
  redrawn = []
  original = pretrain.Steps.after_step

  def after_step(self, step, state):
    new = original(self, step, state)
    if new is not state:
      redrawn.append(step)
    return new

  monkeypatch.setattr(pretrain.Steps, "after_step", after_step)
  by_loop = pretrain.main(tiny_args("by_loop", **flags))
  assert redrawn == [2, 5]
  monkeypatch.setattr(optimizers, "mask_redraw_interval", lambda cfg: 0)
  in_update = pretrain.main(tiny_args("in_update", **flags))
  assert redrawn == [2, 5]  # no loop redraw in the second run
  loop_metrics, update_metrics = (read_metrics(tmp_path / r) for r in ("by_loop", "in_update"))
  strip = lambda records: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
                           for r in records]
  assert strip(loop_metrics) == strip(update_metrics)
  assert by_loop["last"]["loss"] == in_update["last"]["loss"]


def test_schedule_is_the_official_one():
  f = lambda s: float(optimizers.lr_factor(s, scheduler="cosine", warmup_steps=10,
                                           num_training_steps=110, min_lr_ratio=0.1))
  assert f(0) == 0.0 and math.isclose(f(5), 0.5) and math.isclose(f(10), 1.0)
  assert math.isclose(f(60), 0.55, rel_tol=1e-6) and math.isclose(f(110), 0.1, rel_tol=1e-6)
  assert math.isclose(f(500), 0.1, rel_tol=1e-6)


def test_projection_mask_covers_attention_and_mlp_kernels_only():
  params = {"embed_tokens": {"embedding": 0}, "lm_head": {"kernel": 0}, "norm": {"scale": 0},
            "layers_0": {"self_attn": {"q_proj": {"kernel": 0}}, "mlp": {"up_proj": {"kernel": 0}},
                         "input_layernorm": {"scale": 0}}}
  mask = optimizers.projection_mask(params)
  assert mask["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert mask["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert not any([mask["embed_tokens"]["embedding"], mask["lm_head"]["kernel"],
                  mask["norm"]["scale"], mask["layers_0"]["input_layernorm"]["scale"]])


def test_gradient_accumulation_matches_one_big_batch(tiny_args, tmp_path):
  pretrain.main(tiny_args("big", batch_size=8, num_training_steps=3, eval_every=100,
                          save_every=100))
  pretrain.main(tiny_args("accum", batch_size=4, total_batch_size=8, num_training_steps=3,
                          eval_every=100, save_every=100))
  big = [r["loss"] for r in read_metrics(tmp_path / "big") if "loss" in r]
  accum = [r["loss"] for r in read_metrics(tmp_path / "accum") if "loss" in r]
  np.testing.assert_allclose(accum, big, rtol=2e-5)


@pytest.mark.parametrize("override, message", [
    (dict(model_config="llama_nope"), "unknown model"),
    (dict(optimizer="adamax"), "not a choice"),
    (dict(density=0.0), "density must be in"),
    (dict(density=1.5), "density must be in"),
    (dict(dataset="/does/not/exist.jsonl"), "no such file"),
    (dict(total_batch_size=6), "not a multiple"),
    (dict(mesh="data=64"), "needs 64 devices"),
    (dict(mesh="model=2"), "bad --mesh"),
])
def test_bad_input_fails_in_one_line_before_compiling(tiny_args, monkeypatch, override, message):
  def no_compile(*a, **k):
    raise AssertionError("compiled before validating the input")
  monkeypatch.setattr(jax, "jit", no_compile)
  with pytest.raises(SystemExit, match=message) as e:
    pretrain.main(tiny_args(**override))
  assert "\n" not in str(e.value)


def test_batch_must_divide_over_data_parallel_devices():
  cfg = config.parse_args(["--batch_size", "6"])
  with pytest.raises(SystemExit, match="not divisible by the 4 data-parallel"):
    pretrain.check_devices(cfg, {"data": 2, "fsdp": 2, "tensor": 1})


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_args, tmp_path):
  with pytest.raises(SystemExit, match=r"loss is .* at step 5; stopping; the last good "
                     r"checkpoint \(step 4\)") as e:
    pretrain.main(tiny_args(num_training_steps=8, save_every=2, eval_every=100,
                            inject_nan_at_step=5))
  assert isinstance(e.value, pretrain.NonFiniteLoss)
  from experiments import checkpointing
  assert checkpointing.Checkpointer(str(tmp_path / "run"), keep=2).latest_step() == 4
  # The run resumes from that checkpoint (here without the injected NaN) and finishes.
  summary = pretrain.main(tiny_args(num_training_steps=8, save_every=2, eval_every=100))
  assert summary["start_step"] == 4 and math.isfinite(summary["last"]["loss"])


def test_nan_message_promises_no_checkpoint_before_the_first_save():
  no_checkpoint = types.SimpleNamespace(latest_step=lambda: None, directory="d")
  with pytest.raises(pretrain.NonFiniteLoss, match="no checkpoint had been written yet"):
    pretrain._stop_if_nonfinite({"step": 1, "loss": None}, no_checkpoint)
  pretrain._stop_if_nonfinite({"step": 1, "loss": 2.5}, no_checkpoint)  # finite: goes on


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("datasets", "transformers")),
                    reason="the C4 packages are installed (the run would go to the network)")
def test_c4_without_its_packages_is_a_one_line_error(tiny_args, monkeypatch):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled"))
  with pytest.raises(SystemExit, match="needs the optional") as e:
    pretrain.main(tiny_args(dataset="c4", tokenizer="bytes", packing=None))
  assert "\n" not in str(e.value)
  with pytest.raises(SystemExit, match="needs the optional"):
    pretrain.main(tiny_args(dataset="c4", packing=None))  # the t5-base tokenizer



def _read_tensorboard_scalars(log_dir):
  """{tag: [values]} from the TFRecord-framed event files under ``log_dir``."""
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  scalars = {}
  for path in sorted(log_dir.rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):  # record: u64 length, u32 crc, payload, u32 crc
      n = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append(v.simple_value)
  return scalars


def test_tensorboard_events_mirror_the_metrics(tiny_args, tmp_path):
  pytest.importorskip("tensorboardX")
  pretrain.main(tiny_args(optimizer="stable_spam", num_training_steps=3))
  scalars = _read_tensorboard_scalars(tmp_path / "run" / "tensorboard")
  assert {"loss", "grad_norm", "eval_loss"} <= set(scalars)
  losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
  np.testing.assert_allclose(scalars["loss"], losses, rtol=1e-6)


def test_lm_loss_is_the_shifted_token_mean_over_unpadded_targets(tiny_model_config):
  """The loss over whole logits with a padded last target equals the sliced formulation."""
  import jax.numpy as jnp

  import models
  from experiments import train_step

  config = models.get_config(tiny_model_config)
  model = models.Llama(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (3, 12)),
                       jnp.int32)
  tokens = tokens.at[2, 8:].set(0)  # a padded row
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # compiled: op by op is slower
  loss = jax.jit(lambda p: train_step.lm_loss(model, p, tokens, 0, jax.random.key(1)))(params)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens), np.float64)[:, :-1]
  targets = np.asarray(tokens)[:, 1:]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  mask = targets != 0
  np.testing.assert_allclose(float(loss), nll[mask].mean(), rtol=1e-5)


def test_bf16_logits_flag_reaches_the_model_and_trains(tiny_args, tmp_path):
  argv = tiny_args(logits_dtype="bfloat16", dtype="bfloat16", num_training_steps=4)
  assert pretrain.model_config(config.parse_args(argv)).logits_dtype == "bfloat16"
  assert pretrain.model_config(config.parse_args(tiny_args())).logits_dtype == "float32"
  # auto (the default) follows the compute dtype, as HF LLaMA's head in bf16 or autocast;
  # for_backend writes the resolved value into the run's config.
  for dtype, backend, want in (("bfloat16", "cpu", "bfloat16"), ("mixed", "cpu", "bfloat16"),
                               ("float32", "gpu", "float32"), ("auto", "gpu", "bfloat16"),
                               ("auto", "cpu", "float32")):
    cfg = config.for_backend(config.parse_args(tiny_args(dtype=dtype)), backend)
    assert cfg.logits_dtype == want and pretrain.model_config(cfg).logits_dtype == want, dtype
  cfg = config.parse_args(tiny_args(dtype="bfloat16", logits_dtype="float32"))
  assert config.for_backend(cfg, "gpu").logits_dtype == "float32"
  remat = pretrain.model_config(config.parse_args(tiny_args(
      activation_checkpointing=True, remat_policy="block_residuals")))
  assert remat.remat and remat.remat_policy == "block_residuals"
  pretrain.main(argv)
  losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0]
  with pytest.raises(SystemExit):
    config.parse_args(tiny_args(logits_dtype="float16"))
