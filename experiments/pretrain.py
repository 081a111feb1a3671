"""Pretrain LLaMA: ``python -m experiments.pretrain [flags]`` (no flags: a small offline demo).

The loop, top to bottom: flags -> devices and mesh -> model, tokenizer, data -> optimizer ->
sharded, jitted init / train / eval functions -> restore or initialise -> train with per-step
metrics, periodic evaluation and checkpoints -> summary. See docs/training.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from experiments import checkpointing, config, data, metrics, optimizers, sharding, tokenizer
from experiments import summary as run_summary
from experiments import train_step as ts


class NonFiniteLoss(SystemExit):
  """Training produced a NaN/inf loss; the run stops, the last good checkpoint is kept."""


def model_config(cfg: config.TrainConfig) -> models.LlamaConfig:
  try:
    mcfg = models.get_config(cfg.model_config)
  except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    config.fail(f"--model_config {cfg.model_config}: {e}")
  dtypes = {"bfloat16": ("bfloat16", "bfloat16"), "mixed": ("bfloat16", "float32"),
            "float32": ("float32", "float32")}[cfg.dtype]
  changes = dict(dtype=dtypes[0], param_dtype=dtypes[1], remat=cfg.activation_checkpointing,
                 max_seq_len=max(mcfg.max_seq_len, cfg.max_length))
  return dataclasses.replace(mcfg, **changes)


def quant_config(cfg: config.TrainConfig) -> models.QuantConfig | None:
  """``--act_quant`` / ``--fp4``: weights and inputs (W4A4); ``--weight_quant``: weights only."""
  if not (cfg.weight_quant or cfg.act_quant or cfg.fp4):
    return None
  try:
    return models.QuantConfig(
        weight_bits=cfg.weight_bits, weight_group=cfg.weight_group_size,
        act_bits=cfg.act_bits, act_group=cfg.act_group_size, act_topk=cfg.act_topk,
        stochastic=cfg.act_stochastic, fp4=cfg.fp4,
        quantize_weights=True, quantize_acts=cfg.act_quant or cfg.fp4)
  except ValueError as e:
    config.fail(f"quantization flags: {e}")


def check_devices(cfg: config.TrainConfig, sizes: dict[str, int]) -> None:
  dp, hosts = sharding.batch_parallelism(sizes), jax.process_count()
  if cfg.batch_size % dp:
    config.fail(f"--batch_size {cfg.batch_size} is not divisible by the {dp} data-parallel "
                f"devices of the mesh {sizes}")
  if cfg.batch_size % hosts:
    config.fail(f"--batch_size {cfg.batch_size} is not divisible by the {hosts} hosts")


def log(*args) -> None:
  if jax.process_index() == 0:
    print(*args, flush=True)


def evaluate(eval_fn, params, batches, mesh, cfg) -> dict:
  """Mean of per-batch mean losses over the fixed validation batches; perplexity = exp."""
  loss_sum = jnp.zeros((), jnp.float32)
  ev_sharding = sharding.eval_batch_sharding(mesh)
  for b in batches:
    tokens = sharding.to_global(b, ev_sharding, (cfg.batch_size, cfg.max_length))
    loss_sum = eval_fn(params, tokens, loss_sum)
  n = len(batches) + (1 if cfg.eval_loss_n_plus_one else 0)
  loss = float(jax.device_get(loss_sum)) / n
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def main(argv=None) -> dict:
  # ---- flags and devices (every input error is raised here, before any compilation)
  cfg = config.parse_args(argv)
  sharding.maybe_initialize_distributed(cfg.distributed)
  cfg = config.for_backend(cfg, jax.default_backend())
  sizes = sharding.parse_mesh(cfg.mesh, jax.device_count())
  check_devices(cfg, sizes)
  host, num_hosts = jax.process_index(), jax.process_count()
  mcfg = model_config(cfg)
  quant = quant_config(cfg)
  tok = tokenizer.get_tokenizer(cfg.tokenizer, vocab_limit=mcfg.vocab_size)
  if cfg.tokenizer == "bytes":  # the T5 tokenizer keeps the papers' 32000
    mcfg = dataclasses.replace(mcfg, vocab_size=tok.vocab_size)
  schedule = optimizers.make_schedule(cfg)
  optimizer = optimizers.make_optimizer(cfg, schedule)

  # ---- output directories, checkpoints, data
  # Checkpoints go to --save_dir, which may be a bucket (gs://...) every host sees; the
  # metrics, config and plot are small local files written by process 0.
  log_dir = f"runs/{cfg.name}" if "://" in cfg.save_dir else cfg.save_dir
  os.makedirs(log_dir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(cfg.save_dir, keep=cfg.keep_checkpoints)
  resume_step = ckpt.latest_step()
  if cfg.resume and resume_step is None:
    log(f"--resume: no checkpoint in {cfg.save_dir}; starting from scratch")
  train_loader, val_batches = data.make_loaders(cfg, tok, host=host, num_hosts=num_hosts)
  if num_hosts > 1:  # every host must run the same number of evaluation batches
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    n_val = int(np.min(multihost_utils.process_allgather(np.int32(len(val_batches)))))
    val_batches = val_batches[:n_val]
  if host == 0:
    with open(os.path.join(log_dir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json())

  # ---- model, shardings, jitted functions
  mesh = sharding.make_mesh(sizes)
  rules = models.DEFAULT_LOGICAL_AXIS_RULES
  model = models.Llama(mcfg, quant=quant)
  replicated = NamedSharding(mesh, P())
  example = jnp.zeros((1, cfg.max_length), jnp.int32)
  init_fn = ts.make_init_fn(model, optimizer, param_dtype=jnp.dtype(mcfg.param_dtype),
                            example_tokens=example)
  batch_sharding = sharding.train_batch_sharding(mesh)
  batch_shape = (cfg.accum_steps, cfg.batch_size, cfg.max_length)
  n_params = models.count_params(mcfg)
  tokens_per_step = cfg.total_batch_size * cfg.max_length
  flops_per_step = mcfg.flops_per_token(
      cfg.max_length, models.count_params(mcfg, exclude_embedding=True)) * tokens_per_step
  peak = metrics.peak_flops_per_device(cfg.peak_tflops)
  writer = metrics.MetricsWriter(
      log_dir, tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
      peak_flops=peak * jax.device_count() if peak else None, enabled=host == 0)

  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(rules))
  with stack:
    param_shardings, state_shardings, abstract = sharding.train_state_shardings(
        model, init_fn, example, mesh, rules)
    init = jax.jit(init_fn, out_shardings=state_shardings)
    train_step = jax.jit(ts.make_train_step(model, optimizer, schedule, pad_id=tok.pad_id,
                                            grad_spikes=cfg.inject_grad_spike),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(ts.make_eval_step(model, pad_id=tok.pad_id),
                        in_shardings=(param_shardings, sharding.eval_batch_sharding(mesh),
                                      replicated), out_shardings=replicated)
    finite = jax.jit(ts.all_finite, out_shardings=replicated)

    # ---- restore or initialise
    if resume_step is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_shardings)
      start, state, data_state = ckpt.restore(target, resume_step)
      train_loader.load_state_dict(data_state)
      log(f"resumed from {ckpt.directory} at step {start}")
    else:
      start, state = 0, init(jax.random.PRNGKey(cfg.seed))
    log(f"model {mcfg.name}: {n_params / 1e6:.2f}M params (vocab {mcfg.vocab_size}), "
        f"optimizer {cfg.optimizer}, dtype {cfg.dtype}, mesh {sizes}, "
        f"{tokens_per_step} tokens/step, {len(val_batches)} validation batches")

    # ---- train
    end = cfg.num_training_steps if cfg.stop_after is None else min(
        cfg.num_training_steps, cfg.stop_after)
    summary = {"save_dir": cfg.save_dir, "log_dir": log_dir, "metrics": writer.path,
               "start_step": start}
    writer.truncate_after(start)
    summ = run_summary.RunSummary(log_dir, dataclasses.asdict(cfg), start_step=start,
                                  enabled=host == 0)
    first_eval = None
    if start >= end:
      log(f"{cfg.save_dir} already holds step {start} (>= {end}): nothing to train; "
          "raise --num_training_steps or pick another --save_dir")
    if start == 0 and start < end:
      first_eval = evaluate(eval_step, state["params"], val_batches, mesh, cfg)
      writer.write({"step": 0, **first_eval})
      log(f"step 0: val loss {first_eval['eval_loss']:.4f}, "
          f"perplexity {first_eval['eval_perplexity']:.2f}")
    bar = _progress(cfg, start, end)
    last_record, last_eval, t0 = None, first_eval, time.perf_counter()
    writer.reset_clock()
    try:
      for step in range(start + 1, end + 1):
        batch = sharding.to_global(train_loader.next_batch(), batch_sharding, batch_shape)
        if cfg.inject_nan_at_step == step:  # debugging: poison the parameters
          state["params"] = jax.tree.map(lambda p: p * jnp.nan, state["params"])
        state, step_metrics = train_step(state, batch)
        # Fetch step-1's metrics while this step runs (see metrics.py).
        last_record = _check(writer.push(step, step_metrics), last_record, bar)
        due_eval = step % cfg.eval_every == 0 or step == cfg.num_training_steps
        due_save = step % cfg.save_every == 0 or step == end
        if due_eval or due_save:
          last_record = _check(writer.flush(hold=True), last_record, bar)
        if due_eval:
          last_eval = evaluate(eval_step, state["params"], val_batches, mesh, cfg)
          writer.annotate(last_eval)
          summ.update(latest=last_record)
          log(f"\nstep {step}: val loss {last_eval['eval_loss']:.4f}, "
              f"perplexity {last_eval['eval_perplexity']:.2f}")
        if due_save:
          if not bool(jax.device_get(finite(state["params"]))):
            raise NonFiniteLoss(f"error: non-finite parameters after step {step}; not saved, "
                                f"the last good checkpoint in {ckpt.directory} is kept")
          ckpt.save(step, state, train_loader.state_dict())
        if due_eval or due_save:
          writer.reset_clock()
      last_record = _check(writer.flush(), last_record, bar)
    except NonFiniteLoss as e:
      writer.close()
      summ.update(finished=True, error=str(e), diverged=True)
      raise
    finally:
      bar.close()
      ckpt.close()
      writer.close()
  summ.update(finished=end == cfg.num_training_steps)
  summary.update(
      end_step=end, wall_s=time.perf_counter() - t0, last=last_record, first_eval=first_eval,
      last_eval=last_eval, checkpoint=ckpt.directory, latest_checkpoint=ckpt.latest_step(),
      data_state=train_loader.state_dict())
  if host == 0:
    _print_summary(summary)
  return summary


def _progress(cfg, start, end):
  if cfg.progress and jax.process_index() == 0:
    try:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      return tqdm(total=end, initial=start, desc="train", dynamic_ncols=True, file=sys.stdout)
    except ImportError:
      pass
  return _NoBar()


class _NoBar:
  def update(self, n=1):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _check(record, previous, bar):
  """Stops on a non-finite loss; otherwise advances the progress bar."""
  if record is None:
    return previous
  loss = record.get("loss")
  if loss is None or not math.isfinite(loss):
    shown = "NaN" if loss is None else loss
    raise NonFiniteLoss(f"error: loss is {shown} at step {record['step']}; stopping. The last "
                        "good checkpoint is kept (lower --lr or enable --grad_clipping)")
  bar.update(record["step"] - bar.n if hasattr(bar, "n") else 1)
  tps = record.get("tokens_per_s")
  bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}" if tps else "-")
  return record


def _print_summary(s: dict) -> None:
  print(f"\ntrained steps {s['start_step']}..{s['end_step']} in {s['wall_s']:.0f}s")
  if s["first_eval"] and s["last_eval"]:
    print(f"validation perplexity {s['first_eval']['eval_perplexity']:.2f} -> "
          f"{s['last_eval']['eval_perplexity']:.2f}")
  print(f"metrics:    {s['metrics']}")
  print(f"plot:       python -m experiments.plot {s['log_dir']}  "
        f"(writes {os.path.join(s['log_dir'], 'metrics.png')})")
  print(f"checkpoint: {s['checkpoint']} (latest step {s['latest_checkpoint']})")


if __name__ == "__main__":
  main()
