"""The run's configuration: command-line flags (named as in the official scripts) -> TrainConfig.

The trainer parses flags once, resolves the "auto" defaults that depend on the dataset, checks
everything that can be checked without compiling, and passes the frozen result down. A bad
flag or value is one ``error: ...`` line and exit status 2 (:class:`UsageError`); the checks
are tables that new flags and optimizers extend: :data:`RANGES` (every numeric flag's range)
and :data:`OPTIMIZER_FLAGS` (which optimizers read an optimizer-specific flag).

With no flags at all the defaults describe a small offline demo (a 9M-shape LLaMA with a byte
vocabulary on the standard library's source, a few hundred steps). The papers' runs set their
values explicitly; see docs/training.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import sys

OPTIMIZERS = ("adamw", "adam", "spam", "stable_spam", "adafactor", "lion", "sgd", "adam_mini",
              "galore", "muon", "skip_step")
SPIKE_GUARDS = ("none", "stable_spam", "spam_clip")
GUARDED = ("adam", "lion", "adam_mini", "muon", "adafactor")  # --spike_guard's bases
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("auto", "bfloat16", "mixed", "float32")
LOGITS_DTYPES = ("auto", "bfloat16", "float32")
ATTENTIONS = ("auto", "cudnn", "xla", "pallas")
NORMS = ("auto", "pallas", "xla")
# Element-wise update rules (global counters at most): the same with the layers stacked by
# --scan_layers. Stable-SPAM's AdaGN/AdaClip and Adafactor's factored moments take
# statistics per tensor, which a stacked tensor would pool over all layers.
SCAN_OPTIMIZERS = ("adamw", "adam", "spam", "stable_spam", "lion", "sgd", "adam_mini")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs, typed. Field names are the flag names."""

  # model
  model_config: str = "llama_9m"
  dtype: str = "auto"  # bfloat16 on accelerators, float32 on CPU (see for_backend)
  activation_checkpointing: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  logits_dtype: str = "auto"  # the compute dtype: bfloat16 unless --dtype float32
  attention: str = "auto"  # cuDNN's flash attention on a GPU where it applies, else XLA's
  norm: str = "auto"  # the residual add + RMSNorm kernels: Pallas on one GPU, else XLA's
  elementwise: str = "auto"  # RoPE, SwiGLU, the stacks, the loss: Pallas on one GPU
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
  DeltaT: int | None = None  # None: the default (500 SPAM, 1000 Stable-SPAM, 200 GaLore)
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
  gc_every: int = 100  # Python's garbage collection every N steps (experiments/gc_policy.py)
  # scale-out
  mesh: str | None = None
  distributed: bool = False
  # start from / only evaluate a Hugging Face checkpoint (see experiments/warm_start.py)
  init_from_hf: str | None = None
  eval_only: bool = False
  # debugging
  inject_nan_at_step: int | None = None
  inject_signal: str | None = None  # "STEP:TERM", "STEP:TERM,TERM", "STEP:KILL"
  inject_grad_spike: tuple = ()  # ((step, scale), ...) from --inject_grad_spike STEP:SCALE

  @property
  def accum_steps(self) -> int:
    return (self.total_batch_size or self.batch_size) // self.batch_size

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)


class UsageError(SystemExit):
  """A bad flag or value: one ``error: ...`` line, exit status 2 (argparse's convention)."""

  def __init__(self, message: str):
    super().__init__(message)
    self.code = 2


def run_cli(main, argv=None) -> int:
  """Runs an entry point's ``main``: a bad input prints its one ``error:`` line to stderr and
  returns status 2 (a bare ``SystemExit(2)`` would print nothing)."""
  try:
    main(argv)
  except UsageError as e:
    print(e, file=sys.stderr)
    return 2
  return 0


def fail(message: str):
  """Stops with a one-line error before anything is compiled or written."""
  raise UsageError(f"error: {message}")


@contextlib.contextmanager
def one_line_errors():
  """Turns a helper's ``SystemExit("message")`` (data, tokenizer, mesh) into a UsageError."""
  try:
    yield
  except UsageError:
    raise
  except SystemExit as e:
    if not isinstance(e.code, str):
      raise
    raise UsageError(f"error: {e.code.removeprefix('error: ')}") from None


def did_you_mean(name: str, candidates) -> str:
  """`` (did you mean X?)`` for the closest candidate, or nothing."""
  close = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.5)
  return f" (did you mean {close[0]}?)" if close else ""


class _Parser(argparse.ArgumentParser):
  """argparse's own errors (unknown flag, bad choice, bad number) as one line, not the usage."""

  def error(self, message: str):
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown:
      flags = [a.split("=")[0] for a in unknown.group(1).split() if a.startswith("-")]
      names = [f"{f}{did_you_mean(f, self._option_string_actions)}" for f in flags]
      message = (f"unknown flag {', '.join(names)}" if names
                 else f"unexpected argument {unknown.group(1)} (flags start with --)")
    choice = re.match(r"argument (--\w+).*: invalid choice: '(.*?)'", message)
    if choice:
      flag, value = choice.groups()
      options = self._option_string_actions[flag].choices
      message = (f"{flag} {value!r} is not a choice{did_you_mean(value, options)}; "
                 f"choose one of {', '.join(options)}")
    fail(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends ``(default: X)`` unless the help already says what the default is."""

  def _get_help_string(self, action):
    if "default" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


def _bool_flag(p: argparse.ArgumentParser, name: str, help_: str) -> None:
  default = getattr(TrainConfig, name)
  if "default" not in help_ and isinstance(default, bool):
    help_ += f" (default: {'on' if default else 'off'})"
  p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_)


def build_parser() -> argparse.ArgumentParser:
  d = TrainConfig()
  p = _Parser(
      prog="python -m experiments.pretrain", formatter_class=_HelpFormatter,
      description="Pretrain LLaMA with SPAM / Stable-SPAM / baselines (JAX). "
                  "No flags: a small offline demo on CPU.")
  a = p.add_argument
  g = p.add_argument_group("model")
  g.add_argument("--model_config", default=None,
                 help="llama_9m ... llama_7b (or 60m, ...), a HF LlamaConfig JSON path or a HF "
                      f"model directory (default: {d.model_config}, or --init_from_hf's shape)")
  g.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                 help="bfloat16: params, grads and moments in bf16 (the official runs); "
                      "mixed: float32 params and moments, bf16 compute; float32: all float32; "
                      "auto: bfloat16 on GPU/TPU, float32 on CPU")
  _bool_flag(g, "activation_checkpointing", "rematerialise decoder blocks")
  g.add_argument("--remat_policy", default=d.remat_policy,
                 help="what --activation_checkpointing keeps: block_residuals (matrix-product "
                      "and attention outputs; recompute the element-wise rest) or a "
                      "jax.checkpoint_policies name (default: nothing_saveable, recompute all)")
  g.add_argument("--logits_dtype", default=d.logits_dtype, choices=LOGITS_DTYPES,
                 help="the output head's logits: bfloat16 as HF LLaMA in bf16 (the official "
                      "runs; half the head's traffic) or float32 (the head's float32 "
                      "accumulation kept); the loss is float32 either way. auto: bfloat16 "
                      "when the compute dtype is (--dtype bfloat16 or mixed), else float32")
  g.add_argument("--attention", default=d.attention, choices=ATTENTIONS,
                 help="the attention kernel: cudnn (cuDNN's fused flash attention, GPU only), "
                      "xla, pallas (jax's Pallas flash attention; one GPU only, --max_length "
                      "at most 128 or a multiple of 128), or auto: cudnn on a GPU where cuDNN "
                      "accepts the shapes and dtypes while tracing, xla otherwise; pass xla if "
                      "cuDNN fails when the step compiles")
  # The kernel switches' choices, alike for --norm and --elementwise.
  choices = ("pallas ({}, one GPU only), xla, or auto: pallas on one GPU of compute "
             "capability >= 8.0, xla otherwise")
  g.add_argument("--norm", default=d.norm, choices=NORMS,
                 help="the residual add + RMSNorm kernels: "
                      + choices.format("one Triton kernel each way"))
  g.add_argument("--elementwise", default=d.elementwise, choices=NORMS,
                 help="RoPE's split of the fused q/k/v product, SwiGLU forward and backward, "
                      "the stack of the projections' kernels and the loss's passes over the "
                      "vocabulary: " + choices.format("one Triton kernel each"))
  _bool_flag(g, "scan_layers", "one decoder block scanned over the layers (compiled once; "
             f"parameters stacked on a leading axis); with {', '.join(SCAN_OPTIMIZERS)}")
  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", default=d.optimizer, type=str.lower, choices=OPTIMIZERS,
                 help="the update rule")
  g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  g.add_argument("--beta1", type=float, default=d.beta1, help="first-moment decay")
  g.add_argument("--beta2", type=float, default=d.beta2, help="second-moment decay")
  g.add_argument("--eps", type=float, default=None,
                 help="default: the optimizer's own (1e-6 for SPAM and GaLore as officially, "
                      "1e-8 else)")
  g.add_argument("--weight_decay", type=float, default=d.weight_decay, help="weight decay")
  g.add_argument("--grad_clipping", type=float, default=d.grad_clipping,
                 help="global gradient-norm clip; 0 = off (the papers)")
  g.add_argument("--scheduler", default=d.scheduler, choices=SCHEDULERS,
                 help="learning-rate schedule after the linear warm-up")
  g.add_argument("--min_lr_ratio", type=float, default=d.min_lr_ratio,
                 help="final learning rate / peak")
  g.add_argument("--warmup_steps", type=int, default=d.warmup_steps,
                 help="linear warm-up from 0")
  g.add_argument("--num_training_steps", type=int, default=d.num_training_steps,
                 help="optimizer steps")
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
  g.add_argument("--gamma2", type=float, default=None, help="default: 0.9")
  g.add_argument("--gamma3", type=float, default=None, help="default: 0.999")
  g.add_argument("--total_T", type=int, default=d.total_T,
                 help="steps of Stable-SPAM's reset schedule (default: --num_training_steps)")
  g.add_argument("--eta_min", type=float, default=d.eta_min,
                 help="lowest LR factor of the warm-up after a reset")
  g = p.add_argument_group("4-bit training")
  _bool_flag(g, "weight_quant", "fake-quantize projection weights only")
  g.add_argument("--weight_bits", type=int, default=d.weight_bits, help="bits per weight")
  g.add_argument("--weight_group_size", type=int, default=d.weight_group_size,
                 help="weights sharing one scale")
  _bool_flag(g, "act_quant", "fake-quantize projection weights and inputs (W4A4 with "
             "--weight_bits 4, as the official --act_quant)")
  g.add_argument("--act_bits", type=int, default=None, help="default: --weight_bits")
  g.add_argument("--act_group_size", type=int, default=None,
                 help="default: --weight_group_size (what the official code effectively runs)")
  g.add_argument("--act_topk", type=int, default=d.act_topk,
                 help="outliers per activation group kept in full precision")
  _bool_flag(g, "act_stochastic", "stochastic rounding of activations")
  _bool_flag(g, "fp4", "FP4 weights and inputs (the official 9-level grid) instead of INT")
  g = p.add_argument_group("batch")
  g.add_argument("--batch_size", type=int, default=d.batch_size,
                 help="sequences per forward/backward pass, over all devices")
  g.add_argument("--total_batch_size", type=int, default=d.total_batch_size,
                 help="sequences per optimizer step (gradient accumulation; "
                      "default: --batch_size)")
  g.add_argument("--gradient_accumulation", type=int, default=None,
                 help="micro-batches per step, alternative to --total_batch_size (default: 1)")
  g.add_argument("--max_length", type=int, default=d.max_length, help="tokens per row")
  g = p.add_argument_group("data")
  g.add_argument("--dataset", default=d.dataset,
                 help="stdlib (offline demo), c4, or a .txt/.jsonl/.parquet file or directory")
  g.add_argument("--eval_dataset", default=None,
                 help="local validation data (default: a held-out slice of --dataset)")
  g.add_argument("--tokenizer", default=d.tokenizer,
                 help="auto (t5-base for c4, bytes otherwise), bytes, or a HF tokenizer")
  _bool_flag(g, "packing", "concatenate documents into full rows (default: on for stdlib only)")
  g.add_argument("--data_seed", type=int, default=d.data_seed, help="document shuffle")
  g.add_argument("--val_fraction", type=float, default=d.val_fraction,
                 help="held-out fraction of a local dataset")
  g.add_argument("--eval_tokens", type=int, default=None,
                 help="non-pad validation tokens (default: 10M for c4, 32K otherwise)")
  g.add_argument("--eval_batches", type=int, default=None, help="cap on validation batches (default: none)")
  _bool_flag(g, "eval_loss_n_plus_one", "divide the eval loss sum by n_batches + 1 "
             "like the official code (biased low)")
  g = p.add_argument_group("loop")
  g.add_argument("--seed", type=int, default=d.seed,
                 help="parameter init, sparse masks, quantization noise")
  g.add_argument("--eval_every", type=int, default=d.eval_every,
                 help="steps between evaluations")
  g.add_argument("--save_every", type=int, default=d.save_every,
                 help="steps between checkpoints")
  g.add_argument("--save_dir", default=None, help="default: runs/<name>")
  g.add_argument("--name", default=None, help="run name (default: model-optimizer-dtype)")
  _bool_flag(g, "resume", "resume from --save_dir (automatic when it holds a checkpoint)")
  g.add_argument("--keep_checkpoints", type=int, default=d.keep_checkpoints,
                 help="newest checkpoints kept")
  g.add_argument("--stop_after", type=int, default=None,
                 help="stop (with a checkpoint) after this many steps, as if interrupted "
                      "(default: none)")
  g.add_argument("--peak_tflops", type=float, default=None,
                 help="per-device peak for MFU (default: known accelerators only)")
  _bool_flag(g, "progress", "tqdm progress bar")
  g.add_argument("--gc_every", type=int, default=d.gc_every,
                 help="Python's garbage collection only every this many steps, between steps, "
                      "the heap built before the loop frozen (a full pass mid-step stalls "
                      "it); 0: Python's automatic collection")
  g = p.add_argument_group("scale-out")
  g.add_argument("--mesh", default=None, help="e.g. data=4,fsdp=2 (default: data=all devices)")
  _bool_flag(g, "distributed", "call jax.distributed.initialize() (auto on multi-host TPU)")
  g = p.add_argument_group("Hugging Face checkpoints (export: python -m experiments.export_hf)")
  g.add_argument("--init_from_hf", default=None, metavar="DIR",
                 help="start from a HF LLaMA directory (config.json + model.safetensors) with a "
                      "fresh optimizer state; a checkpoint in --save_dir still resumes first "
                       "(default: none)")
  _bool_flag(g, "eval_only", "print the validation loss/perplexity of --init_from_hf (or of "
             "--save_dir's latest checkpoint) without training or writing anything")
  a("--inject_nan_at_step", type=int, default=None, help=argparse.SUPPRESS)
  a("--inject_signal", default=None, help=argparse.SUPPRESS)
  a("--inject_grad_spike", action="append", default=[], metavar="STEP:SCALE",
    help="multiply the gradient of update STEP (1-based) by SCALE, after accumulation and "
         "before the optimizer (repeatable): a controlled gradient spike")
  return p


@dataclasses.dataclass(frozen=True)
class Range:
  """A numeric flag's valid values: finite, between ``lo`` and ``hi`` (None: unbounded)."""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False

  def __contains__(self, v) -> bool:
    return (math.isfinite(v)
            and (self.lo is None or v > self.lo or (v == self.lo and not self.lo_open))
            and (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)))

  def __str__(self) -> str:
    if self.hi is None:
      return f"{'>' if self.lo_open else '>='} {self.lo}"
    return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


_NON_NEGATIVE, _POSITIVE, _AT_LEAST_1 = Range(0), Range(0, lo_open=True), Range(1)
_DECAY, _UNIT = Range(0, 1, hi_open=True), Range(0, 1)

# Every numeric flag's range (checked by ``resolve``; a test asks that each numeric flag of the
# parser has an entry here, so a new flag comes with its range).
RANGES: dict[str, Range] = {
    "lr": _NON_NEGATIVE, "beta1": _DECAY, "beta2": _DECAY, "eps": _NON_NEGATIVE,
    "weight_decay": _NON_NEGATIVE, "grad_clipping": _NON_NEGATIVE, "min_lr_ratio": _UNIT,
    "warmup_steps": _NON_NEGATIVE, "num_training_steps": _AT_LEAST_1,
    "density": Range(0, 1, lo_open=True), "DeltaT": _AT_LEAST_1, "threshold": _NON_NEGATIVE,
    "warmup_epoch": _NON_NEGATIVE, "grad_accu_steps": _NON_NEGATIVE,
    "gamma1": _DECAY, "gamma2": _DECAY, "gamma3": _DECAY, "total_T": _AT_LEAST_1,
    "eta_min": _UNIT,
    "weight_bits": Range(2), "weight_group_size": _AT_LEAST_1, "act_bits": Range(2),
    "act_group_size": _AT_LEAST_1, "act_topk": _NON_NEGATIVE,
    "batch_size": _AT_LEAST_1, "total_batch_size": _AT_LEAST_1,
    "gradient_accumulation": _AT_LEAST_1, "max_length": Range(2),
    "data_seed": _NON_NEGATIVE, "val_fraction": Range(0, 1, lo_open=True, hi_open=True),
    "eval_tokens": _AT_LEAST_1, "eval_batches": _AT_LEAST_1,
    "seed": _NON_NEGATIVE, "eval_every": _AT_LEAST_1, "save_every": _AT_LEAST_1,
    "keep_checkpoints": _AT_LEAST_1, "stop_after": _AT_LEAST_1, "peak_tflops": _POSITIVE,
    "inject_nan_at_step": _AT_LEAST_1, "gc_every": _NON_NEGATIVE,
    "rank": _AT_LEAST_1, "galore_scale": _POSITIVE, "skip_threshold": _POSITIVE,
}

# Optimizer-specific flags -> the optimizers that read them. Such a flag given on the command
# line with another --optimizer is an error (it would be ignored silently). A new optimizer
# adds itself to the rows of the flags it reads; a new optimizer-specific flag adds a row.
# The spike guards read some of these flags too, whatever the base optimizer.
SPAM_CLIP, STABLE_GUARD = "--spike_guard spam_clip", "--spike_guard stable_spam"
OPTIMIZER_FLAGS: dict[str, tuple[str, ...]] = {
    "density": ("spam",), "warmup_epoch": ("spam",),
    "threshold": ("spam", SPAM_CLIP), "grad_accu_steps": ("spam", SPAM_CLIP),
    "DeltaT": ("spam", "stable_spam", "galore", STABLE_GUARD),
    "gamma1": ("stable_spam", STABLE_GUARD), "gamma2": ("stable_spam", STABLE_GUARD),
    "gamma3": ("stable_spam", STABLE_GUARD), "total_T": ("stable_spam", STABLE_GUARD),
    "eta_min": ("stable_spam", STABLE_GUARD),
    # adafactor, lion, sgd have none
    "eps": ("adamw", "adam", "spam", "stable_spam", "adam_mini", "galore", "muon", "skip_step",
            STABLE_GUARD),
    "rank": ("galore",), "galore_scale": ("galore",), "skip_threshold": ("skip_step",),
}


def _check_range(flag: str, value) -> None:
  if value is not None and not isinstance(value, bool) and value not in RANGES[flag]:
    fail(f"--{flag} must be {RANGES[flag]}, got {value}")


def given_flags(argv=None) -> frozenset[str]:
  """The destinations of the flags given on the command line (whatever their value)."""
  p = build_parser()
  for action in p._actions:  # pylint: disable=protected-access
    action.default = argparse.SUPPRESS  # absent from the namespace unless given
  return frozenset(vars(p.parse_args(argv)))


def parse_args(argv=None) -> TrainConfig:
  ns = vars(build_parser().parse_args(argv))
  given = set(given_flags(argv))
  accum = ns.pop("gradient_accumulation")
  if accum is not None:
    if ns["total_batch_size"] is not None:
      fail("give --total_batch_size or --gradient_accumulation, not both")
    _check_range("gradient_accumulation", accum)
    ns["total_batch_size"] = ns["batch_size"] * accum
    given.add("total_batch_size")
  hf_dir = ns["init_from_hf"]
  if hf_dir is not None and not os.path.isfile(os.path.join(hf_dir, "config.json")):
    fail(f"--init_from_hf {hf_dir}: no config.json there (expected a Hugging Face model "
         "directory)")
  if ns["model_config"] is None:  # --init_from_hf DIR brings its own shape
    ns["model_config"] = hf_dir or TrainConfig.model_config
  defaults = dataclasses.asdict(TrainConfig())
  ns = {k: (defaults[k] if v is None and isinstance(defaults[k], bool) else v)
        for k, v in ns.items()}
  return resolve(TrainConfig(**ns), given=frozenset(given))


def resolve(cfg: TrainConfig, given: frozenset[str] | None = None) -> TrainConfig:
  """Checks values and combinations, fills the dataset-dependent defaults; errors are one line.

  ``given``: the flags set on the command line (default: the fields that differ from
  TrainConfig's defaults), for the optimizer-specific flags of :data:`OPTIMIZER_FLAGS`.
  """
  if cfg.optimizer not in OPTIMIZERS:
    fail(f"--optimizer {cfg.optimizer!r} is not a choice{did_you_mean(cfg.optimizer, OPTIMIZERS)}"
         f"; choose one of {', '.join(OPTIMIZERS)}")
  for flag in RANGES:
    if hasattr(cfg, flag):
      _check_range(flag, getattr(cfg, flag))
  if given is None:
    default = TrainConfig()
    given = frozenset(f.name for f in dataclasses.fields(cfg)
                      if getattr(cfg, f.name) != getattr(default, f.name))
  if cfg.spike_guard != "none" and cfg.optimizer not in GUARDED:
    fail(f"--spike_guard {cfg.spike_guard} goes in front of --optimizer "
         f"{'|'.join(GUARDED)}, not {cfg.optimizer}")
  readers = {cfg.optimizer, f"--spike_guard {cfg.spike_guard}"}
  ignored = sorted(f for f in given & OPTIMIZER_FLAGS.keys()
                   if not readers & set(OPTIMIZER_FLAGS[f]))
  if ignored:
    fail(f"--optimizer {cfg.optimizer} does not use "
         + ", ".join(f"--{f} (only {', '.join(OPTIMIZER_FLAGS[f])})" for f in ignored))
  if cfg.scan_layers and cfg.optimizer not in SCAN_OPTIMIZERS:
    fail(f"--scan_layers stacks each weight of all layers into one tensor, and --optimizer "
         f"{cfg.optimizer} takes statistics per tensor; use it with {', '.join(SCAN_OPTIMIZERS)}")
  total = cfg.total_batch_size or cfg.batch_size
  if total % cfg.batch_size:
    fail(f"--total_batch_size {total} is not a multiple of --batch_size {cfg.batch_size}")
  if "remat_policy" in given and not cfg.activation_checkpointing:
    fail("--remat_policy says what --activation_checkpointing keeps; give both")
  from models import remat  # pylint: disable=import-outside-toplevel
  try:
    remat.policy(cfg.remat_policy)
  except ValueError as e:
    fail(f"--{e}")
  if cfg.inject_signal is not None and not re.fullmatch(r"\d+:(TERM|INT|KILL)(,(TERM|INT))?",
                                                         cfg.inject_signal):
    fail(f"--inject_signal {cfg.inject_signal!r}: expected STEP:TERM, STEP:TERM,TERM or STEP:KILL")
  cfg = dataclasses.replace(cfg, inject_grad_spike=parse_grad_spikes(cfg.inject_grad_spike))
  is_c4 = cfg.dataset == "c4"
  if not is_c4 and cfg.dataset != "stdlib":
    from experiments import data  # pylint: disable=import-outside-toplevel
    with one_line_errors():  # a missing path is a one-line error now, not later
      data.local_files(cfg.dataset)
      if cfg.eval_dataset:
        data.local_files(cfg.eval_dataset)
  return dataclasses.replace(
      cfg,
      total_batch_size=total,
      tokenizer=("t5-base" if is_c4 else "bytes") if cfg.tokenizer == "auto" else cfg.tokenizer,
      packing=(cfg.dataset == "stdlib") if cfg.packing is None else cfg.packing,
      eval_tokens=(10_000_000 if is_c4 else 32_768) if cfg.eval_tokens is None
      else cfg.eval_tokens,
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


def attention_implementation(attention: str) -> str | None:
  """``--attention`` as ``LlamaConfig.attention_implementation`` (auto: None, the model's
  own choice)."""
  return None if attention == "auto" else attention


def kernel_implementation(flag: str) -> str | None:
  """``--norm`` or ``--elementwise`` as ``LlamaConfig.norm_implementation`` or
  ``elementwise_implementation`` (auto: None, the model's own choice)."""
  return None if flag == "auto" else flag


def resolve_logits_dtype(logits_dtype: str, dtype: str) -> str:
  """``--logits_dtype auto``: the compute dtype's, float32 for ``--dtype float32`` only."""
  if logits_dtype != "auto":
    return logits_dtype
  return "float32" if dtype == "float32" else "bfloat16"


def for_backend(cfg: TrainConfig, backend: str) -> TrainConfig:
  """Resolves ``--dtype auto``, ``--logits_dtype auto`` and the run name once the JAX backend
  is known.

  On CPU, XLA emulates bf16 matrix products at about half the float32 speed, so the CPU demo
  trains in float32; on GPU/TPU ``auto`` means the official pure-bf16 setting. The logits
  follow the compute dtype, as HF LLaMA's head returns them in bf16 (weights in bf16 or under
  autocast) before its float32 loss.
  """
  dtype = cfg.dtype
  if dtype == "auto":
    dtype = "float32" if backend == "cpu" else "bfloat16"
  logits_dtype = resolve_logits_dtype(cfg.logits_dtype, dtype)
  if cfg.attention in ("cudnn", "pallas") and backend != "gpu":
    fail(f"--attention {cfg.attention} needs a GPU (this JAX backend: {backend}); "
         "use auto or xla")
  if cfg.attention == "pallas" and cfg.max_length > 128 and cfg.max_length % 128:
    fail(f"--attention pallas takes --max_length at most 128 or a multiple of 128, "
         f"got {cfg.max_length}")
  for flag, value in (("--norm", cfg.norm), ("--elementwise", cfg.elementwise)):
    if value == "pallas" and backend != "gpu":
      fail(f"{flag} pallas needs a GPU (this JAX backend: {backend}); use auto or xla")
  pallas = [flag for flag, value in (("--attention", cfg.attention), ("--norm", cfg.norm),
                                     ("--elementwise", cfg.elementwise)) if value == "pallas"]
  if pallas:  # every Pallas kernel the models run on a GPU is written for Triton
    import jax  # pylint: disable=import-outside-toplevel
    from models import pallas_platform  # pylint: disable=import-outside-toplevel
    if not pallas_platform.triton_available():
      fail(f"{pallas[0]} pallas needs Pallas's Triton backend, which this jax "
           f"({jax.__version__}) does not have; use auto or xla")
  name = cfg.name or (
      f"{os.path.basename(os.path.normpath(cfg.model_config)).removesuffix('.json')}-"
      f"{cfg.optimizer}-{dtype}")
  return dataclasses.replace(cfg, dtype=dtype, logits_dtype=logits_dtype, name=name,
                             save_dir=cfg.save_dir or f"runs/{name}")
