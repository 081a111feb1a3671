"""Pretrain LLaMA: ``python -m experiments.pretrain [flags]`` (no flags: a small offline demo).

``main`` runs four stages, each its own function, top to bottom:

* :func:`check_inputs`: flags -> devices and mesh -> model, tokenizer, optimizer -> the
  run-directory guard (experiments/rundir.py). Every bad input stops here with one
  ``error: ...`` line (exit status 2): nothing is written and nothing compiled.
* :func:`open_run`: data, then (the first write) config.json, the checkpointer, the metrics.
* :func:`build_steps`: the sharded, jitted init / train / eval functions.
* :func:`restore_or_init`, then :func:`train`: per-step metrics, periodic evaluation and
  checkpoints, a clean stop on SIGINT / SIGTERM (experiments/preemption.py) -> summary.

See docs/training.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import models
import spam_optax
from experiments import (checkpointing, config, data, gc_policy, jax_settings, metrics,
                         optimizers, plot, preemption, rundir, sharding, tokenizer, warm_start)
from experiments import summary as run_summary
from experiments import train_step as ts


class NonFiniteLoss(SystemExit):
  """Training produced a NaN/inf loss or parameters; the run stops without saving them."""


def model_config(cfg: config.TrainConfig) -> models.LlamaConfig:
  try:
    mcfg = models.get_config(cfg.model_config)
  except (ValueError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
    config.fail(f"--model_config {cfg.model_config}: {e}")
  dtypes = {"bfloat16": ("bfloat16", "bfloat16"), "mixed": ("bfloat16", "float32"),
            "float32": ("float32", "float32")}[cfg.dtype]
  changes = dict(dtype=dtypes[0], param_dtype=dtypes[1], remat=cfg.activation_checkpointing,
                 remat_policy=cfg.remat_policy,
                 scan_layers=cfg.scan_layers,
                 logits_dtype=config.resolve_logits_dtype(cfg.logits_dtype, cfg.dtype),
                 attention_implementation=config.attention_implementation(cfg.attention),
                 norm_implementation=config.kernel_implementation(cfg.norm),
                 elementwise_implementation=config.kernel_implementation(cfg.elementwise),
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
  devices = math.prod(sizes.values())
  for flag, value in (("--norm", cfg.norm), ("--elementwise", cfg.elementwise),
                      ("--attention", cfg.attention)):
    if value == "pallas" and devices > 1:
      config.fail(f"{flag} pallas runs on one device (this mesh: {devices}); XLA cannot "
                  "partition its kernels: use auto or xla")


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


# ----------------------------------------------------------------------------- stage 1: inputs
class Inputs(NamedTuple):
  """The checked run: nothing has been written or compiled yet."""
  cfg: config.TrainConfig
  sizes: dict[str, int]
  mcfg: models.LlamaConfig
  quant: models.QuantConfig | None
  tok: Any
  schedule: Callable
  optimizer: Any
  changes: dict | None  # rundir.check: allowed changes of a resumed run, None for a new one
  init_params: dict | None  # --init_from_hf's parameters (host arrays), None otherwise


def check_inputs(argv=None) -> Inputs:
  """Parses and checks everything that can be checked without compiling or writing."""
  cfg = config.parse_args(argv)
  sharding.maybe_initialize_distributed(cfg.distributed)
  cfg = config.for_backend(cfg, jax.default_backend())
  with config.one_line_errors():
    sizes = sharding.parse_mesh(cfg.mesh, jax.device_count())
    check_devices(cfg, sizes)
    mcfg = model_config(cfg)
    quant = quant_config(cfg)
    tok = tokenizer.get_tokenizer(cfg.tokenizer, vocab_limit=mcfg.vocab_size)
  if cfg.tokenizer == "bytes":  # the T5 tokenizer keeps the papers' 32000
    mcfg = dataclasses.replace(mcfg, vocab_size=tok.vocab_size)
  # --init_from_hf's parameters (None without it), read now so that a bad directory fails
  # before anything is written or compiled; not on a resume, where the checkpoint wins.
  init_params = None if rundir.holds_checkpoints(cfg.save_dir) and not cfg.eval_only \
      else warm_start.read_init_params(cfg, mcfg)
  schedule = optimizers.make_schedule(cfg)
  try:
    optimizer = optimizers.make_optimizer(cfg, schedule)
  except ValueError as e:
    config.fail(f"--optimizer {cfg.optimizer}: {e}")
  if cfg.eval_only:  # writes nothing: no run-directory check
    return Inputs(cfg, sizes, mcfg, quant, tok, schedule, optimizer, None, init_params)
  return Inputs(cfg, sizes, mcfg, quant, tok, schedule, optimizer, _check_run_dir(cfg),
                init_params)


def _check_run_dir(cfg: config.TrainConfig) -> dict | None:
  """rundir.check on every host; one refusal stops them all (no host waits for the others)."""
  if jax.process_count() == 1:
    return rundir.check(cfg)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  refusal, changes = None, None
  try:
    changes = rundir.check(cfg)
  except config.UsageError as e:
    refusal = e
  if int(np.min(multihost_utils.process_allgather(np.int32(refusal is None)))) == 0:
    raise refusal or config.UsageError("error: another process refused the run directory")
  return changes


# ----------------------------------------------------------------------------- stage 2: the run
@dataclasses.dataclass
class Run:
  """An opened run: its data, run directory, checkpointer and metrics writer."""
  inputs: Inputs
  log_dir: str
  train_loader: Any
  val_batches: list
  ckpt: checkpointing.Checkpointer
  resume_step: int | None
  writer: metrics.MetricsWriter
  mesh: Any
  n_params: int

  @property
  def cfg(self) -> config.TrainConfig:
    return self.inputs.cfg

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical-axis rules every sharded function is built and run under."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(models.DEFAULT_LOGICAL_AXIS_RULES):
      yield


def make_loaders(cfg: config.TrainConfig, tok):
  """This host's training loader and validation batches (``data.make_loaders``), the
  validation batches cut to the fewest any host has: every host runs the same evaluation."""
  train_loader, val_batches = data.make_loaders(cfg, tok, host=jax.process_index(),
                                                num_hosts=jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    n_val = int(np.min(multihost_utils.process_allgather(np.int32(len(val_batches)))))
    val_batches = val_batches[:n_val]
  return train_loader, val_batches


def open_run(inputs: Inputs) -> Run:
  """Reads the data, then writes the run directory (config.json, resumes.jsonl), and opens the
  checkpointer (``<save_dir>/checkpoints``, possibly a gs:// bucket every host sees) and the
  metrics (process 0, local)."""
  cfg, mcfg = inputs.cfg, inputs.mcfg
  host = jax.process_index()
  with config.one_line_errors():  # an empty or unreadable dataset writes nothing
    train_loader, val_batches = make_loaders(cfg, inputs.tok)
  # ---- the first writes into the run directory
  ckpt = checkpointing.Checkpointer(cfg.save_dir, keep=cfg.keep_checkpoints)
  resume_step = ckpt.latest_step()
  if cfg.resume and resume_step is None:
    log(f"--resume: no checkpoint in {cfg.save_dir}; starting from scratch")
  if host == 0:
    rundir.record(cfg, inputs.changes, resume_step)
  log_dir = rundir.log_dir_of(cfg)
  tokens_per_step = cfg.total_batch_size * cfg.max_length
  flops_per_step = mcfg.flops_per_token(
      cfg.max_length, models.count_params(mcfg, exclude_embedding=True)) * tokens_per_step
  peak = metrics.peak_flops_per_device(cfg.peak_tflops)
  writer = metrics.MetricsWriter(
      log_dir, tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
      peak_flops=peak * jax.device_count() if peak else None, enabled=host == 0)
  return Run(inputs, log_dir, train_loader, val_batches, ckpt, resume_step, writer,
             sharding.make_mesh(inputs.sizes), models.count_params(mcfg))


# ----------------------------------------------------------------------------- stage 3: steps
class Steps(NamedTuple):
  """The jitted functions of the run (call under ``Run.context()``)."""
  init: Callable  # key -> train state
  train: Callable  # (state, batch) -> (state, metrics); donates the state
  eval: Callable  # (params, batch, loss_sum) -> loss_sum
  finite: Callable  # params -> bool
  restore_target: Any  # the train state's ShapeDtypeStructs with their shardings
  param_shardings: Any
  batch_sharding: NamedSharding
  batch_shape: tuple[int, int, int]
  # SPAM's sparse-momentum masks, redrawn by the loop after the steps spam_optax.redraw_due
  # names (optimizers.mask_redraw_interval; 0 and None without sparse momentum).
  redraw_interval: int = 0
  redraw: Callable | None = None  # state -> state with new masks; donates the state

  def after_step(self, step: int, state):
    """The state to carry into step ``step + 1``: the masks redrawn when they are due."""
    if self.redraw is not None and spam_optax.redraw_due(step, self.redraw_interval):
      return self.redraw(state)
    return state


def build_steps(run: Run) -> Steps:
  """Shardings of the train state from its abstract shape, then the jitted functions."""
  inputs, cfg, mesh = run.inputs, run.cfg, run.mesh
  model = models.Llama(inputs.mcfg, quant=inputs.quant)
  replicated = NamedSharding(mesh, P())
  example = jnp.zeros((1, cfg.max_length), jnp.int32)
  init_fn = ts.make_init_fn(model, inputs.optimizer,
                            param_dtype=jnp.dtype(inputs.mcfg.param_dtype),
                            example_tokens=example)
  batch_sharding = sharding.train_batch_sharding(mesh)
  param_shardings, state_shardings, abstract = sharding.train_state_shardings(
      model, init_fn, example, mesh, models.DEFAULT_LOGICAL_AXIS_RULES)
  pad_id = inputs.tok.pad_id
  restore_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, state_shardings)
  redraw_interval = optimizers.mask_redraw_interval(cfg)
  redraw = None
  if redraw_interval:  # compiled now: a failure shows before training, not at the first redraw
    redraw = jax.jit(ts.redraw_masks, in_shardings=(state_shardings,),
                     out_shardings=state_shardings, donate_argnums=0).lower(
                         restore_target).compile()
  return Steps(
      init=jax.jit(init_fn, out_shardings=state_shardings),
      train=jax.jit(ts.make_train_step(model, inputs.optimizer, inputs.schedule, pad_id=pad_id,
                                       grad_spikes=cfg.inject_grad_spike),
                    in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=0),
      eval=jax.jit(ts.make_eval_step(model, pad_id=pad_id),
                   in_shardings=(param_shardings, sharding.eval_batch_sharding(mesh),
                                 replicated), out_shardings=replicated),
      finite=jax.jit(ts.all_finite, out_shardings=replicated),
      restore_target=restore_target,
      param_shardings=param_shardings,
      batch_sharding=batch_sharding,
      batch_shape=(cfg.accum_steps, cfg.batch_size, cfg.max_length),
      redraw_interval=redraw_interval, redraw=redraw)


# ----------------------------------------------------------------------------- stage 4: train
def restore_or_init(run: Run, steps: Steps):
  """(start step, train state): the run directory's latest checkpoint, or step 0 (with
  --init_from_hf's parameters and a fresh optimizer state when given)."""
  if run.resume_step is None:
    key = jax.random.PRNGKey(run.cfg.seed)  # raw uint32: checkpointed (see sharding.py)
    init_params = run.inputs.init_params
    if init_params is None and run.cfg.init_from_hf:  # not read at the start (a gs:// dir)
      init_params = warm_start.read_init_params(run.cfg, run.inputs.mcfg)
    if init_params is None:
      return 0, steps.init(key)
    log(f"parameters from {run.cfg.init_from_hf}")
    return 0, steps.init(key, warm_start.place(init_params, steps.param_shardings))
  start, state, data_state = run.ckpt.restore(steps.restore_target, run.resume_step)
  run.train_loader.load_state_dict(data_state)
  log(f"resumed from {run.ckpt.directory} at step {start}")
  return start, state


def train(run: Run, steps: Steps, start: int, state, stop: preemption.Preemption) -> dict:
  """Steps ``start + 1 .. end``; raises NonFiniteLoss or preemption.Interrupted to stop."""
  cfg, writer, ckpt = run.cfg, run.writer, run.ckpt
  end = cfg.num_training_steps if cfg.stop_after is None else min(
      cfg.num_training_steps, cfg.stop_after)
  _log_header(run, start, end)
  writer.truncate_after(start)
  summ = run_summary.RunSummary(run.log_dir, dataclasses.asdict(cfg), start_step=start,
                                enabled=jax.process_index() == 0)
  stop.arm()
  first_eval = last_eval = None
  if start == 0 and start < end:
    first_eval = last_eval = evaluate(steps.eval, state["params"], run.val_batches, run.mesh, cfg)
    writer.write({"step": 0, **first_eval})
    log(f"step 0: val loss {first_eval['eval_loss']:.4f}, "
        f"perplexity {first_eval['eval_perplexity']:.2f}")
  bar = _progress(cfg, start, end)
  last_record, interrupted_at = None, None

  def fetched(record):
    """A step's record came back from the device: stop on a non-finite loss, show it."""
    nonlocal last_record
    if record is not None:
      _stop_if_nonfinite(record, ckpt)
      bar.show(record)
      last_record = record

  t0 = time.perf_counter()
  writer.reset_clock()
  try:
    with gc_policy.scheduled(cfg.gc_every) as collect:  # not in the middle of a step
      for step in range(start + 1, end + 1):
        batch = sharding.to_global(run.train_loader.next_batch(), steps.batch_sharding,
                                   steps.batch_shape)
        if cfg.inject_nan_at_step == step:  # debugging: poison the parameters
          state["params"] = jax.tree.map(lambda p: p * jnp.nan, state["params"])
        state, step_metrics = steps.train(state, batch)
        state = steps.after_step(step, state)
        fetched(writer.push(step, step_metrics))  # step - 1's, fetched while this step runs
        collect(step)  # Python's garbage, at a step boundary while the device runs this step
        interrupted = stop.reached(step)  # on every host at the same step
        due_eval = step % cfg.eval_every == 0 or step == cfg.num_training_steps
        due_save = step % cfg.save_every == 0 or step == end or interrupted
        if due_eval or due_save:
          fetched(writer.flush(hold=True))
        if due_eval:
          last_eval = evaluate(steps.eval, state["params"], run.val_batches, run.mesh, cfg)
          writer.annotate(last_eval)
          summ.update(latest=last_record)
          log(f"\nstep {step}: val loss {last_eval['eval_loss']:.4f}, "
              f"perplexity {last_eval['eval_perplexity']:.2f}")
        if due_save:
          _save(run, steps, step, state)
        _inject_signal(cfg, step)
        if interrupted:
          interrupted_at = step
          break
        if due_eval or due_save:
          writer.reset_clock()
    fetched(writer.flush())
  except NonFiniteLoss as e:
    writer.close()  # metrics.jsonl complete before the summary reads it
    summ.update(finished=True, error=str(e), diverged=True)
    raise
  finally:
    bar.close()
    ckpt.close()  # waits for the last asynchronous save
    writer.close()
  summ.update(finished=interrupted_at is None and end == cfg.num_training_steps)
  if interrupted_at is not None:
    log(f"interrupted at step {interrupted_at}; checkpoint saved; "
        "rerun the same command to resume")
    raise preemption.Interrupted(stop.signum)
  summary = {
      "save_dir": cfg.save_dir, "log_dir": run.log_dir, "metrics": writer.path,
      "start_step": start, "end_step": end, "wall_s": time.perf_counter() - t0,
      "last": last_record, "first_eval": first_eval or _logged_first_eval(writer),
      "last_eval": last_eval, "checkpoint": ckpt.directory,
      "latest_checkpoint": ckpt.latest_step(), "data_state": run.train_loader.state_dict()}
  if jax.process_index() == 0:
    _print_summary(summary)
  return summary


def main(argv=None) -> dict:
  jax_settings.apply()  # before anything is compiled
  inputs = check_inputs(argv)  # (initializes jax.distributed, which the handlers ask about)
  with preemption.Preemption() as stop:
    if inputs.cfg.eval_only:
      return warm_start.eval_only(inputs.cfg, inputs.mcfg, inputs.quant, inputs.tok,
                                  inputs.sizes, inputs.init_params)
    try:
      run = open_run(inputs)
      with run.context():
        steps = build_steps(run)
        start, state = restore_or_init(run, steps)
        return train(run, steps, start, state, stop)
    except Exception as error:  # pylint: disable=broad-except
      if inputs.cfg.attention == "auto" and models.is_cudnn_attention_failure(error):
        first = models.attention.failure_line(error, 200)
        config.fail(f"cuDNN attention failed on this GPU ({first}); "
                    "rerun with --attention xla")
      blamed = [name for name in ("elementwise", "norm")
                if getattr(inputs.cfg, name) == "auto" and models.is_pallas_failure(error, name)]
      if blamed:
        first = models.attention.failure_line(error, 200)
        what = ({"elementwise": "element-wise ", "norm": "norm "}[blamed[0]]
                if len(blamed) == 1 else "")
        config.fail(f"the Pallas {what}kernels failed on this GPU ({first}); "
                    f"rerun with {' '.join(f'--{name} xla' for name in blamed)}")
      raise


def cli(argv=None) -> int:
  """``python -m experiments.pretrain``: a bad input is one ``error:`` line and status 2."""
  return config.run_cli(main, argv)


# ----------------------------------------------------------------------------- loop helpers
def _log_header(run: Run, start: int, end: int) -> None:
  cfg, mcfg = run.cfg, run.inputs.mcfg
  log(f"model {mcfg.name}: {run.n_params / 1e6:.2f}M params "
      f"(vocab {mcfg.vocab_size}), optimizer {cfg.optimizer}, dtype {cfg.dtype}, "
      f"mesh {run.inputs.sizes}, {cfg.total_batch_size * cfg.max_length} tokens/step, "
      f"{len(run.val_batches)} validation batches")
  if start >= end:
    log(f"{cfg.save_dir} already holds step {start} (>= {end}): nothing to train; "
        "raise --num_training_steps or pick another --save_dir")


def _kept(ckpt: checkpointing.Checkpointer) -> str:
  latest = ckpt.latest_step()
  if latest is None:
    return "no checkpoint had been written yet"
  return f"the last good checkpoint (step {latest}) in {ckpt.directory} is kept"


def _stop_if_nonfinite(record: dict, ckpt: checkpointing.Checkpointer) -> None:
  loss = record.get("loss")
  if loss is None or not math.isfinite(loss):
    shown = "NaN" if loss is None else loss
    raise NonFiniteLoss(f"error: loss is {shown} at step {record['step']}; stopping; "
                        f"{_kept(ckpt)} (lower --lr or enable --grad_clipping)")


def _save(run: Run, steps: Steps, step: int, state) -> None:
  """An asynchronous checkpoint of ``state``, after checking its parameters are finite."""
  if not bool(jax.device_get(steps.finite(state["params"]))):
    raise NonFiniteLoss(f"error: non-finite parameters after step {step}; not saved; "
                        f"{_kept(run.ckpt)}")
  run.ckpt.save(step, state, run.train_loader.state_dict())


def _inject_signal(cfg: config.TrainConfig, step: int) -> None:
  """Debugging (``--inject_signal STEP:TERM[,TERM]`` or ``STEP:KILL``): signals this process
  after the step's checkpoint was started, as a preemption or a kill would."""
  if cfg.inject_signal is None:
    return
  at, names = cfg.inject_signal.split(":")
  if int(at) == step:
    for name in names.split(","):
      os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


def _logged_first_eval(writer: metrics.MetricsWriter) -> dict | None:
  """The step-0 evaluation of a resumed run, from its metrics.jsonl (process 0)."""
  if not writer.enabled:
    return None
  records = plot.load_metrics(writer.path)
  if records and records[0]["step"] == 0 and "eval_perplexity" in records[0]:
    return {k: records[0][k] for k in ("eval_loss", "eval_perplexity")}
  return None


def _progress(cfg, start, end):
  if cfg.progress and jax.process_index() == 0:
    try:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      return _Bar(tqdm(total=end, initial=start, desc="train", dynamic_ncols=True,
                       file=sys.stdout))
    except ImportError:
      pass
  return _Bar(None)


class _Bar:
  """A tqdm bar showing each fetched step's loss and throughput (or nothing)."""

  def __init__(self, bar):
    self.bar = bar

  def show(self, record: dict) -> None:
    if self.bar is None:
      return
    self.bar.update(record["step"] - self.bar.n)
    tps = record.get("tokens_per_s")
    self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}" if tps else "-")

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


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
  sys.exit(cli())
