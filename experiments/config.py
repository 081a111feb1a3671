"""The run's configuration: command-line flags (named as in the official scripts) -> TrainConfig.

The trainer parses flags once, resolves the "auto" defaults that depend on the dataset, checks
everything that can be checked without compiling, and passes the frozen result down.

With no flags at all the defaults describe a small offline demo (a 9M-shape LLaMA with a byte
vocabulary on the standard library's source, a few hundred steps). The papers' runs set their
values explicitly; see docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

OPTIMIZERS = ("adamw", "adam", "spam", "stable_spam", "adafactor", "lion", "sgd", "adam_mini",
              "galore", "muon", "skip_step")
SPIKE_GUARDS = ("none", "stable_spam", "spam_clip")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "bfloat16", "mixed", "float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs, typed. Field names are the flag names."""

  # model
  model_config: str = "llama_9m"
  dtype: str = "auto"  # bfloat16 on accelerators, float32 on CPU (see for_backend)
  activation_checkpointing: bool = False
  # optimizer
  optimizer: str = "spam"
  lr: float = 3e-3
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float | None = None  # None: the optimizer's default (1e-6 SPAM, 1e-8 the others)
  weight_decay: float = 0.0
  grad_clipping: float = 0.0
  scheduler: str = "cosine"
  min_lr_ratio: float = 0.1
  warmup_steps: int = 30
  num_training_steps: int = 400
  # the papers' baselines (docs/training.md)
  rank: int | None = None  # GaLore; None: 128
  galore_scale: float | None = None  # GaLore; None: 0.25
  skip_threshold: float | None = None  # skip_step; None: the optimizer's default
  spike_guard: str = "none"
  # SPAM
  density: float = 1.0
  DeltaT: int | None = None  # None: the optimizer's default (500 SPAM, 1000 Stable-SPAM, 200 GaLore)
  threshold: float = 5000.0
  warmup_epoch: int = 150
  grad_accu_steps: int = 20  # the official SPAM name of the spike-clip delay
  # Stable-SPAM
  gamma1: float | None = None  # None: spam_optax's defaults (the official class defaults)
  gamma2: float | None = None
  gamma3: float | None = None
  total_T: int | None = None
  eta_min: float = 0.5
  # quantization (4-bit runs)
  weight_quant: bool = False
  weight_bits: int = 4
  weight_group_size: int = 256
  act_quant: bool = False
  act_bits: int | None = None  # None: same as the weights (what the official code runs)
  act_group_size: int | None = None
  act_topk: int = 2
  act_stochastic: bool = False
  fp4: bool = False
  # batch
  batch_size: int = 16
  total_batch_size: int | None = None
  max_length: int = 128
  # data
  dataset: str = "stdlib"
  eval_dataset: str | None = None
  tokenizer: str = "auto"
  packing: bool | None = None
  data_seed: int = 42
  val_fraction: float = 0.02
  eval_tokens: int | None = None
  eval_batches: int | None = None
  eval_loss_n_plus_one: bool = False
  # loop
  seed: int = 0
  eval_every: int = 50
  save_every: int = 100
  save_dir: str | None = None
  name: str | None = None
  resume: bool = False
  keep_checkpoints: int = 2
  stop_after: int | None = None
  peak_tflops: float | None = None
  progress: bool = True
  # scale-out
  mesh: str | None = None
  distributed: bool = False
  # debugging
  inject_nan_at_step: int | None = None
  inject_grad_spike: tuple = ()  # ((step, scale), ...) from --inject_grad_spike STEP:SCALE

  @property
  def accum_steps(self) -> int:
    return (self.total_batch_size or self.batch_size) // self.batch_size

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


def _bool_flag(p: argparse.ArgumentParser, name: str, help_: str) -> None:
  p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_)


def build_parser() -> argparse.ArgumentParser:
  d = TrainConfig()
  p = argparse.ArgumentParser(
      prog="python -m experiments.pretrain",
      description="Pretrain LLaMA with SPAM / Stable-SPAM / baselines (JAX). "
                  "No flags: a small offline demo on CPU.")
  a = p.add_argument
  g = p.add_argument_group("model")
  g.add_argument("--model_config", default=d.model_config,
                 help="llama_9m ... llama_7b (or 60m, ...), or a HF LlamaConfig JSON path")
  g.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                 help="bfloat16: params, grads and moments in bf16 (the official runs); "
                      "mixed: float32 params and moments, bf16 compute; float32: all float32; "
                      "auto: bfloat16 on GPU/TPU, float32 on CPU")
  _bool_flag(g, "activation_checkpointing", "rematerialise decoder blocks")
  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", default=d.optimizer, type=str.lower,
                 help=f"one of {', '.join(OPTIMIZERS)}")
  g.add_argument("--lr", type=float, default=d.lr)
  g.add_argument("--beta1", type=float, default=d.beta1)
  g.add_argument("--beta2", type=float, default=d.beta2)
  g.add_argument("--eps", type=float, default=None,
                 help="default: the optimizer's own (1e-6 for SPAM as officially, 1e-8 else)")
  g.add_argument("--weight_decay", type=float, default=d.weight_decay)
  g.add_argument("--grad_clipping", type=float, default=d.grad_clipping,
                 help="global gradient-norm clip; 0 = off (the papers)")
  g.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULERS)
  g.add_argument("--min_lr_ratio", type=float, default=d.min_lr_ratio)
  g.add_argument("--warmup_steps", type=int, default=d.warmup_steps)
  g.add_argument("--num_training_steps", type=int, default=d.num_training_steps)
  g = p.add_argument_group("baselines (adam_mini, galore, muon, skip_step) and spike guards")
  g.add_argument("--rank", type=int, default=None,
                 help="galore: rank of the gradient projection (default 128, GaLore's 60M run)")
  g.add_argument("--galore_scale", type=float, default=None,
                 help="galore: scale of the projected-back update (default 0.25, GaLore's)")
  g.add_argument("--skip_threshold", type=float, default=None,
                 help="skip_step: skip the update when the gradient norm exceeds this factor "
                      "times its running statistic (default: the optimizer's own, 6.0 as "
                      "MaxText's skip_step_scaling_factor)")
  g.add_argument("--spike_guard", default=d.spike_guard, choices=SPIKE_GUARDS,
                 help="Stable-SPAM's composability: stable_spam puts AdaClip + AdaGN in front "
                      "of the base and resets its moments periodically; spam_clip puts SPAM's "
                      "spike clip in front; bases: adam, lion, adam_mini, muon, adafactor")
  g = p.add_argument_group("SPAM")
  g.add_argument("--density", type=float, default=d.density,
                 help="sparse-momentum density for attention/MLP projection weights, in (0, 1]")
  g.add_argument("--DeltaT", "--update_proj_gap", dest="DeltaT", type=int, default=d.DeltaT,
                 help="momentum reset interval (default 500 SPAM, 1000 Stable-SPAM); for "
                      "--optimizer galore the projection update gap (default 200, GaLore's)")
  g.add_argument("--threshold", type=float, default=d.threshold, help="spike threshold theta")
  g.add_argument("--warmup_epoch", type=int, default=d.warmup_epoch,
                 help="steps of the LR warm-up after each momentum reset (N)")
  g.add_argument("--grad_accu_steps", type=int, default=d.grad_accu_steps,
                 help="spike clipping starts this many steps after the start and after each "
                      "reset (the official SPAM flag of that name; not gradient accumulation)")
  g = p.add_argument_group("Stable-SPAM")
  g.add_argument("--gamma1", type=float, default=None,
                 help="AdaGN/AdaClip EMA factors (default: spam_optax's 0.7, 0.9, 0.999)")
  g.add_argument("--gamma2", type=float, default=None)
  g.add_argument("--gamma3", type=float, default=None)
  g.add_argument("--total_T", type=int, default=d.total_T,
                 help="steps of Stable-SPAM's reset schedule (default: --num_training_steps)")
  g.add_argument("--eta_min", type=float, default=d.eta_min)
  g = p.add_argument_group("4-bit training")
  _bool_flag(g, "weight_quant", "fake-quantize projection weights only")
  g.add_argument("--weight_bits", type=int, default=d.weight_bits)
  g.add_argument("--weight_group_size", type=int, default=d.weight_group_size)
  _bool_flag(g, "act_quant", "fake-quantize projection weights and inputs (W4A4 with "
             "--weight_bits 4, as the official --act_quant)")
  g.add_argument("--act_bits", type=int, default=None, help="default: --weight_bits")
  g.add_argument("--act_group_size", type=int, default=None,
                 help="default: --weight_group_size (what the official code effectively runs)")
  g.add_argument("--act_topk", type=int, default=d.act_topk)
  _bool_flag(g, "act_stochastic", "stochastic rounding of activations")
  _bool_flag(g, "fp4", "FP4 weights and inputs (the official 9-level grid) instead of INT")
  g = p.add_argument_group("batch")
  g.add_argument("--batch_size", type=int, default=d.batch_size,
                 help="sequences per forward/backward pass, over all devices")
  g.add_argument("--total_batch_size", type=int, default=d.total_batch_size,
                 help="sequences per optimizer step (gradient accumulation)")
  g.add_argument("--gradient_accumulation", type=int, default=None,
                 help="micro-batches per step, alternative to --total_batch_size")
  g.add_argument("--max_length", type=int, default=d.max_length)
  g = p.add_argument_group("data")
  g.add_argument("--dataset", default=d.dataset,
                 help="stdlib (offline demo), c4, or a .txt/.jsonl/.parquet file or directory")
  g.add_argument("--eval_dataset", default=None,
                 help="local validation data (default: a held-out slice of --dataset)")
  g.add_argument("--tokenizer", default=d.tokenizer,
                 help="auto (t5-base for c4, bytes otherwise), bytes, or a HF tokenizer")
  _bool_flag(g, "packing", "concatenate documents into full rows (default: on for stdlib only)")
  g.add_argument("--data_seed", type=int, default=d.data_seed)
  g.add_argument("--val_fraction", type=float, default=d.val_fraction)
  g.add_argument("--eval_tokens", type=int, default=None,
                 help="non-pad validation tokens (default: 10M for c4, 32K otherwise)")
  g.add_argument("--eval_batches", type=int, default=None, help="cap on validation batches")
  _bool_flag(g, "eval_loss_n_plus_one", "divide the eval loss sum by n_batches + 1 "
             "like the official code (biased low)")
  g = p.add_argument_group("loop")
  g.add_argument("--seed", type=int, default=d.seed)
  g.add_argument("--eval_every", type=int, default=d.eval_every)
  g.add_argument("--save_every", type=int, default=d.save_every)
  g.add_argument("--save_dir", default=None, help="default: runs/<name>")
  g.add_argument("--name", default=None, help="run name (default: model-optimizer-dtype)")
  _bool_flag(g, "resume", "resume from --save_dir (automatic when it holds a checkpoint)")
  g.add_argument("--keep_checkpoints", type=int, default=d.keep_checkpoints)
  g.add_argument("--stop_after", type=int, default=None,
                 help="stop (with a checkpoint) after this many steps, as if interrupted")
  g.add_argument("--peak_tflops", type=float, default=None,
                 help="per-device peak for MFU (default: known accelerators only)")
  _bool_flag(g, "progress", "tqdm progress bar")
  g = p.add_argument_group("scale-out")
  g.add_argument("--mesh", default=None, help="e.g. data=4,fsdp=2 (default: data=all devices)")
  _bool_flag(g, "distributed", "call jax.distributed.initialize() (auto on multi-host TPU)")
  a("--inject_nan_at_step", type=int, default=None, help=argparse.SUPPRESS)
  a("--inject_grad_spike", action="append", default=[], metavar="STEP:SCALE",
    help="multiply the gradient of update STEP (1-based) by SCALE, after accumulation and "
         "before the optimizer (repeatable): a controlled gradient spike")
  return p


def fail(message: str):
  """Stops with a one-line error before anything is compiled."""
  raise SystemExit(f"error: {message}")


def parse_args(argv=None) -> TrainConfig:
  ns = vars(build_parser().parse_args(argv))
  accum = ns.pop("gradient_accumulation")
  if accum is not None:
    if ns["total_batch_size"] is not None:
      fail("give --total_batch_size or --gradient_accumulation, not both")
    if accum < 1:
      fail(f"--gradient_accumulation must be >= 1, got {accum}")
    ns["total_batch_size"] = ns["batch_size"] * accum
  defaults = dataclasses.asdict(TrainConfig())
  ns = {k: (defaults[k] if v is None and isinstance(defaults[k], bool) else v)
        for k, v in ns.items()}
  return resolve(TrainConfig(**ns))


def resolve(cfg: TrainConfig) -> TrainConfig:
  """Fills the dataset-dependent defaults and checks values; errors are one line."""
  if cfg.optimizer not in OPTIMIZERS:
    fail(f"unknown --optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
  if not 0.0 < cfg.density <= 1.0:
    fail(f"--density must be in (0, 1], got {cfg.density}")
  for flag in ("batch_size", "max_length", "num_training_steps", "eval_every", "save_every",
               "keep_checkpoints"):
    if getattr(cfg, flag) < 1:
      fail(f"--{flag} must be >= 1, got {getattr(cfg, flag)}")
  for flag in ("warmup_steps", "warmup_epoch", "grad_accu_steps", "weight_decay",
               "grad_clipping"):
    if getattr(cfg, flag) < 0:
      fail(f"--{flag} must be >= 0, got {getattr(cfg, flag)}")
  if cfg.DeltaT is not None and cfg.DeltaT < 1:
    fail(f"--DeltaT must be >= 1, got {cfg.DeltaT}")
  if not math.isfinite(cfg.lr) or cfg.lr < 0:
    fail(f"--lr must be a finite number >= 0, got {cfg.lr}")
  if cfg.max_length < 2:
    fail("--max_length must be >= 2 (inputs predict the next token)")
  total = cfg.total_batch_size or cfg.batch_size
  if total % cfg.batch_size:
    fail(f"--total_batch_size {total} is not a multiple of --batch_size {cfg.batch_size}")
  if not 0.0 < cfg.val_fraction < 1.0:
    fail(f"--val_fraction must be in (0, 1), got {cfg.val_fraction}")
  if cfg.stop_after is not None and cfg.stop_after < 1:
    fail(f"--stop_after must be >= 1, got {cfg.stop_after}")
  if cfg.skip_threshold is not None and not cfg.skip_threshold > 0:
    fail(f"--skip_threshold must be > 0, got {cfg.skip_threshold}")
  cfg = dataclasses.replace(cfg, inject_grad_spike=parse_grad_spikes(cfg.inject_grad_spike))
  is_c4 = cfg.dataset == "c4"
  if not is_c4 and cfg.dataset != "stdlib":
    from experiments import data  # pylint: disable=import-outside-toplevel
    data.local_files(cfg.dataset)  # a missing path is a one-line error now, not later
    if cfg.eval_dataset:
      data.local_files(cfg.eval_dataset)
  return dataclasses.replace(
      cfg,
      total_batch_size=total,
      tokenizer=("t5-base" if is_c4 else "bytes") if cfg.tokenizer == "auto" else cfg.tokenizer,
      packing=(cfg.dataset == "stdlib") if cfg.packing is None else cfg.packing,
      eval_tokens=(10_000_000 if is_c4 else 32_768) if cfg.eval_tokens is None
      else cfg.eval_tokens,
      total_T=cfg.total_T or cfg.num_training_steps,
  )


def parse_grad_spikes(values) -> tuple[tuple[int, float], ...]:
  """``["STEP:SCALE", ...]`` (or already-parsed pairs) -> ``((step, scale), ...)``."""
  spikes = []
  for v in values:
    if isinstance(v, str):
      try:
        step_s, scale_s = v.split(":")
        v = (int(step_s), float(scale_s))
      except ValueError:
        fail(f"--inject_grad_spike {v!r}: expected STEP:SCALE, e.g. 100:1000")
    step, scale = int(v[0]), float(v[1])
    if step < 1 or not math.isfinite(scale):
      fail(f"--inject_grad_spike {step}:{scale}: STEP must be >= 1 and SCALE finite")
    spikes.append((step, scale))
  return tuple(spikes)


def for_backend(cfg: TrainConfig, backend: str) -> TrainConfig:
  """Resolves ``--dtype auto`` and the run name once the JAX backend is known.

  On CPU, XLA emulates bf16 matrix products at about half the float32 speed, so the CPU demo
  trains in float32; on GPU/TPU ``auto`` means the official pure-bf16 setting.
  """
  dtype = cfg.dtype
  if dtype == "auto":
    dtype = "float32" if backend == "cpu" else "bfloat16"
  name = cfg.name or (
      f"{cfg.model_config.split('/')[-1].removesuffix('.json')}-{cfg.optimizer}-{dtype}")
  return dataclasses.replace(cfg, dtype=dtype, name=name,
                             save_dir=cfg.save_dir or f"runs/{name}")
