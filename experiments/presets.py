"""The sweeps that ``python -m experiments.sweep PRESET`` knows: the papers' tables and two
small ones for a 2-core machine (docs/training.md, *Sweeps*).

A preset is a list of grids; a grid is the product optimizers × learning rates × precisions ×
seeds × extra flags on top of common flags. Each point is one trainer run. Labels name the
runs and the rows of ``results.md``; ``paper`` maps ``(group, optimizer, precision, extra)`` to the
validation perplexity the paper reports for that row, shown beside ours.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Arm:
  """One value of a grid axis: a label and the trainer flags it adds.

  ``lrs`` (optimizer arms only) replaces the grid's learning rates for this optimizer.
  """
  label: str
  flags: tuple[str, ...] = ()
  lrs: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Grid:
  optimizers: tuple[Arm, ...]
  lrs: tuple[float, ...]
  precisions: tuple[Arm, ...]
  base: tuple[str, ...] = ()
  seeds: tuple[int, ...] = (0,)
  extras: tuple[Arm, ...] = (Arm(""),)
  group: str = ""  # e.g. the model size


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  description: str
  grids: tuple[Grid, ...]
  # (group, optimizer, precision, extra) -> the perplexity the paper reports for that row
  paper: dict = dataclasses.field(default_factory=dict)
  paper_source: str = ""


def _f(*flags) -> tuple[str, ...]:
  return tuple(str(f) for f in flags)


# ---- optimizers, as the papers name their rows
ADAM = Arm("adam", _f("--optimizer", "adam"))
ADAM_CLIP = Arm("adam+clip", _f("--optimizer", "adam", "--grad_clipping", 1.0))
ADAFACTOR = Arm("adafactor", _f("--optimizer", "adafactor"))
SPAM = Arm("spam", _f("--optimizer", "spam", "--threshold", 5000, "--DeltaT", 500,
                      "--warmup_epoch", 150))
SKIP_STEP = Arm("skip_step", _f("--optimizer", "skip_step"))
STABLE_SPAM_DEMO = Arm("stable_spam", _f("--optimizer", "stable_spam"))
SPAM_DEMO = Arm("spam", _f("--optimizer", "spam"))

# ---- precisions
FLOAT32 = Arm("float32", _f("--dtype", "float32"))
BF16 = Arm("bf16", _f("--dtype", "bfloat16"))
INT4 = Arm("int4", _f("--dtype", "bfloat16", "--act_quant", "--weight_bits", 4))
FP4 = Arm("fp4", _f("--dtype", "bfloat16", "--fp4"))
INT4_FLOAT32 = Arm("int4", _f("--dtype", "float32", "--act_quant", "--weight_bits", 4))

# ---- the papers' C4 setting (global batch 512 x 256 tokens, warm-up from 0, cosine to 0.1x)
C4 = _f("--dataset", "c4", "--max_length", 256, "--total_batch_size", 512, "--eval_every", 1000,
        "--save_every", 1000, "--scheduler", "cosine", "--min_lr_ratio", 0.1)


def _c4(size: str, steps: int, warmup: int, batch: int) -> tuple[str, ...]:
  return C4 + _f("--model_config", f"llama_{size}", "--num_training_steps", steps,
                 "--warmup_steps", warmup, "--batch_size", batch)


# SPAM (arXiv:2501.06842) Table 1: LLaMA on C4 in bf16, validation perplexity.
_SPAM_SIZES = {  # size: (steps, lr, micro-batch, GaLore rank)
    "60m": (10_000, 1e-3, 128, 128), "130m": (20_000, 8e-4, 128, 256),
    "350m": (60_000, 4e-4, 128, 256), "1b": (100_000, 4e-4, 64, 512)}
_SPAM_TABLE1 = {
    "adam": (34.09, 25.08, 18.80, 15.56), "adam+clip": (33.33, 24.88, 18.51, 15.22),
    "adafactor": (32.57, 23.98, 17.74, 15.19), "adam_mini": (34.10, 24.85, 19.05, 16.07),
    "spam": (30.46, 23.36, 17.42, 14.66)}


def _spam_table1() -> Preset:
  grids = []
  for size, (steps, lr, batch, rank) in _SPAM_SIZES.items():
    galore = Arm("galore", _f("--optimizer", "galore", "--rank", rank, "--DeltaT", 200,
                              "--galore_scale", 0.25), lrs=(1e-2,))
    adam_mini = Arm("adam_mini", _f("--optimizer", "adam_mini"))
    grids.append(Grid(
        group=size, base=_c4(size, steps, 1000, batch), lrs=(lr,), precisions=(BF16,),
        optimizers=(ADAM, ADAM_CLIP, ADAFACTOR, adam_mini, galore, SPAM)))
  paper = {(size, opt, "bf16", ""): ppl[i] for opt, ppl in _SPAM_TABLE1.items()
           for i, size in enumerate(_SPAM_SIZES)}
  return Preset("spam_table1", "SPAM Table 1: LLaMA 60M-1B on C4, pure bf16", tuple(grids),
                paper, "SPAM (arXiv:2501.06842), Table 1")


# Stable-SPAM (arXiv:2502.17055): 4-bit tables (INT4 W4A4 and FP4), 20K steps (2.2B tokens).
_STABLE_SIZES = {"60m": (1e-3, 128), "130m": (8e-4, 128), "350m": (4e-4, 128)}
_STABLE_4BIT = {  # (optimizer, precision): (130m, 350m)
    ("adam", "int4"): (26.40, 24.14), ("adam+clip", "int4"): (26.30, 21.64),
    ("adafactor", "int4"): (25.11, 20.45), ("spam", "int4"): (25.03, 20.19),
    ("stable_spam", "int4"): (24.33, 17.76),
    ("adam", "fp4"): (28.90, 24.59), ("adam+clip", "fp4"): (28.27, 20.84),
    ("adafactor", "fp4"): (26.89, 20.53), ("spam", "fp4"): (26.78, 20.35),
    ("stable_spam", "fp4"): (26.31, 19.49), ("adam", "bf16"): (24.53, 21.38)}
STABLE_SPAM_4BIT = Arm("stable_spam", _f(
    "--optimizer", "stable_spam", "--gamma1", 0.7, "--gamma2", 0.9, "--gamma3", 0.999,
    "--DeltaT", 500, "--eta_min", 0.5))


def _stable_spam_4bit() -> Preset:
  grids = []
  for size, (lr, batch) in _STABLE_SIZES.items():
    base = _c4(size, 20_000, 2000, batch)
    grids.append(Grid(group=size, base=base, lrs=(lr,), precisions=(INT4, FP4),
                      optimizers=(ADAM, ADAM_CLIP, ADAFACTOR, SPAM, STABLE_SPAM_4BIT)))
    grids.append(Grid(group=size, base=base, lrs=(lr,), precisions=(BF16,), optimizers=(ADAM,)))
  paper = {(size, opt, prec, ""): ppl[i] for (opt, prec), ppl in _STABLE_4BIT.items()
           for i, size in enumerate(("130m", "350m"))}
  return Preset("stable_spam_4bit", "Stable-SPAM's 4-bit tables: LLaMA 60M-350M on C4, INT4 "
                "(W4A4) and FP4, 20K steps, with the bf16 Adam reference", tuple(grids), paper,
                "Stable-SPAM (arXiv:2502.17055), 4-bit tables")


# Stable-SPAM's composability table: Lion and Adam-mini with AdaClip + AdaGN in front, INT4,
# 1.1B tokens (10K steps). Lion's learning rate is Adam's / 10 (the Lion paper's advice of a
# 3-10x smaller rate; the table does not give it).
_COMPOSABILITY = {  # (optimizer, guard): (60m, 130m)
    ("lion", "none"): (39.36, 35.28), ("lion", "stable_spam"): (38.49, 29.40),
    ("adam_mini", "none"): (34.84, 29.79), ("adam_mini", "stable_spam"): (34.61, 29.65)}


def _composability() -> Preset:
  grids = []
  for size in ("60m", "130m"):
    lr, batch = _STABLE_SIZES[size]
    grids.append(Grid(
        group=size, base=_c4(size, 10_000, 1000, batch), lrs=(lr,), precisions=(INT4,),
        optimizers=(Arm("lion", _f("--optimizer", "lion"), lrs=(lr / 10,)),
                    Arm("adam_mini", _f("--optimizer", "adam_mini"))),
        extras=tuple(Arm(g, _f("--spike_guard", g))
                     for g in ("none", "stable_spam", "spam_clip"))))
  paper = {(size, opt, "int4", guard): ppl[i]
           for (opt, guard), ppl in _COMPOSABILITY.items()
           for i, size in enumerate(("60m", "130m"))}
  return Preset("stable_spam_composability", "Stable-SPAM's composability table: Lion and "
                "Adam-mini with and without the spike guards, INT4, 60M and 130M on C4",
                tuple(grids), paper, "Stable-SPAM (arXiv:2502.17055), composability table")


# ---- this machine: the offline demo's model and data (the trainer's defaults)
TINY = _f("--batch_size", 8, "--num_training_steps", 100, "--warmup_steps", 10,
          "--eval_every", 50, "--save_every", 100, "--eval_tokens", 16384)
TINY_OPTIMIZERS = (ADAM, ADAM_CLIP, SKIP_STEP, SPAM_DEMO, STABLE_SPAM_DEMO)
# Spikes of growing size, after skip_step's 64-step history has filled.
TINY_SPIKES = ((70, 10), (100, 100), (130, 1000), (160, 10000))


def _tiny_lr_sensitivity() -> Preset:
  return Preset(
      "tiny_lr_sensitivity",
      "the offline demo's model and data, 100 steps of batch 8: learning rates 1e-3 (comfortable) "
      "to 6.4e-2 (too large for Adam), float32 and INT4 W4A4",
      (Grid(optimizers=TINY_OPTIMIZERS, lrs=(1e-3, 4e-3, 1.6e-2, 6.4e-2),
            precisions=(FLOAT32, INT4_FLOAT32), base=TINY),))


def _tiny_spike_injection() -> Preset:
  spikes = sum((("--inject_grad_spike", f"{s}:{c}") for s, c in TINY_SPIKES), ())
  base = _f("--batch_size", 8, "--num_training_steps", 200, "--warmup_steps", 10,
            "--eval_every", 50, "--save_every", 200, "--eval_tokens", 16384)
  return Preset(
      "tiny_spike_injection",
      "the offline demo's model and data, 200 steps of batch 8 at lr 3e-3, float32, without and "
      "with gradients multiplied by 10, 100, 1000, 10000 at steps 70, 100, 130, 160",
      (Grid(optimizers=TINY_OPTIMIZERS, lrs=(3e-3,), precisions=(FLOAT32,), base=base,
            extras=(Arm("none"), Arm("spikes", spikes))),))


PRESETS = {p.name: p for p in (_spam_table1(), _stable_spam_4bit(), _composability(),
                               _tiny_lr_sensitivity(), _tiny_spike_injection())}
