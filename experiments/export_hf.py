"""Export a run's parameters as a Hugging Face LLaMA: ``python -m experiments.export_hf RUN OUT``.

Reads the run's ``config.json`` and the parameters (not the optimizer state) of its latest
checkpoint, or of ``--step N``, and writes ``OUT/config.json`` (``LlamaForCausalLM``) and
``OUT/model.safetensors`` in ``--dtype``: a directory that
``transformers.LlamaForCausalLM.from_pretrained(OUT)``, lm-evaluation-harness
(``--model hf --model_args pretrained=OUT,tokenizer=...``) and ``--init_from_hf OUT`` read as is.
See docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import models
from experiments import checkpointing, config, pretrain, tokenizer, warm_start


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m experiments.export_hf",
      description="Write a run's checkpoint as a Hugging Face LlamaForCausalLM directory.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("run_dir", help="the run's --save_dir (holds config.json and checkpoints/)")
  p.add_argument("out_dir", help="directory for config.json and model.safetensors")
  p.add_argument("--step", type=int, default=None, help="checkpoint step; None: the latest")
  p.add_argument("--dtype", default="float32", choices=models.hf.EXPORT_DTYPES,
                 help="dtype of the written weights")
  return p


def run_config(run_dir: str) -> config.TrainConfig:
  """The run's ``TrainConfig`` from its ``config.json`` (fields it lacks take the defaults)."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    config.fail(f"{run_dir}: no config.json there (expected a run directory, the --save_dir "
                "of python -m experiments.pretrain)")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  fields = {f.name for f in dataclasses.fields(config.TrainConfig)}
  return config.TrainConfig(**{k: v for k, v in saved.items() if k in fields})


def export(run_dir: str, out_dir: str, *, step: int | None = None,
           dtype: str = "float32") -> dict:
  """Writes ``out_dir``; returns its HF ``config.json`` content plus the exported step."""
  if not os.path.isdir(run_dir):
    config.fail(f"{run_dir}: no such run directory")
  cfg = run_config(run_dir)
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    config.fail(f"{run_dir} holds no checkpoint")
  ckpt = checkpointing.Checkpointer(run_dir, keep=cfg.keep_checkpoints)
  try:
    steps = ckpt.manager.all_steps()
    if not steps:
      config.fail(f"{run_dir} holds no checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      config.fail(f"{run_dir} has no checkpoint at step {step}; it has steps "
                  f"{', '.join(map(str, sorted(steps)))}")
    params = ckpt.restore_params(step)
  finally:
    ckpt.close()
  # The run's model; the vocabulary is the checkpoint's (the byte tokenizer resizes it).
  mcfg = pretrain.model_config(cfg)
  mcfg = dataclasses.replace(mcfg, vocab_size=params["embed_tokens"]["embedding"].shape[0])
  extra = {}
  if cfg.tokenizer in ("bytes", "byte"):
    tok = tokenizer.ByteTokenizer()
    extra = {"pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id, "bos_token_id": None}
  mismatch = warm_start.shape_mismatch(params, mcfg)
  if mismatch:
    config.fail(f"{run_dir}: the checkpoint does not fit the run's --model_config "
                f"{cfg.model_config}: {mismatch}")
  models.save_pretrained(out_dir, params, mcfg, dtype=dtype, **extra)
  return {"step": step, **models.hf.hf_config(mcfg, dtype, **extra)}


def main(argv=None) -> dict:
  args = build_parser().parse_args(argv)
  if args.step is not None and args.step < 0:
    config.fail(f"--step must be >= 0, got {args.step}")
  result = export(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype)
  print(f"wrote {args.out_dir} (step {result['step']}, {args.dtype}): "
        f"transformers.LlamaForCausalLM.from_pretrained({args.out_dir!r})")
  return result


if __name__ == "__main__":
  raise SystemExit(config.run_cli(main))
