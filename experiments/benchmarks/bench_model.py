"""Forward+backward throughput and MFU of the LLaMA models, in bf16 and fake-quantized int4.

Times one jitted `value_and_grad` of the token cross-entropy (no optimizer update),
warmed up: `--steps` calls with one in flight, as a training loop makes them
(`timing.in_flight_s`), the time every rate is from; and the median of `--steps` calls each
waited for (`step_s_synced`). Model FLOPs per token are
6·N + 12·L·d·T (N: parameters without the input embedding; PaLM's convention,
no causal halving); MFU is achieved model FLOP/s over `--peak_tflops` per device.

  python -m experiments.benchmarks.bench_model                                  # GPU: 60m…1b, batch 64×256
  python -m experiments.benchmarks.bench_model --models llama_60m --batch 8     # small, e.g. on a CPU
  python -m experiments.benchmarks.bench_model --models llama_350m --quant bf16,int4,fp4 --remat

Targets on one H100 (dense bf16 peak 989 TFLOP/s): bf16 MFU ≥ 40% at 350m, and an
int4 step no slower than 1.3× the bf16 one.

The parameters are initialised once per model and shared by its ``--quant`` variants (the
fake quantization has no parameters of its own). ``--profile DIR`` traces
``--profile_calls`` more calls of each model and quantization after the timed ones into
``DIR/<model>-<quant>/`` and keeps where their device time went (``profile_summary``) in the
result under ``profile``; the JSON is written before and after each profile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax

import models
from experiments import config as config_lib
from experiments import jax_settings, metrics, rundir, train_step
from experiments.benchmarks import attention_fallback, profile_summary, timing


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="llama_60m,llama_130m,llama_350m,llama_1b",
                 help="comma-separated config names")
  p.add_argument("--quant", default="bf16,int4",
                 help="comma-separated: bf16, int4, int8, fp4, fp4_e2m1")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed calls (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
  p.add_argument("--remat", action="store_true", help="rematerialise every block")
  p.add_argument("--compile_only", action="store_true",
                 help="compile on abstract parameters (nothing allocated) and report the time")
  p.add_argument("--scan_layers", action="store_true",
                 help="one decoder block scanned over the layers (LlamaConfig.scan_layers)")
  p.add_argument("--logits_dtype", default="auto", choices=config_lib.LOGITS_DTYPES,
                 help="LlamaConfig.logits_dtype: the head's output dtype (auto: as the "
                      "trainer, the compute dtype)")
  p.add_argument("--attention", default="auto", choices=config_lib.ATTENTIONS,
                 help="as the trainer's --attention; with auto, a model whose cuDNN attention "
                      "fails to compile is measured again with xla (attention_fallback)")
  p.add_argument("--norm", default="auto", choices=config_lib.NORMS,
                 help="as the trainer's --norm: the residual add + RMSNorm kernels")
  p.add_argument("--elementwise", default="auto", choices=config_lib.NORMS,
                 help="as the trainer's --elementwise: RoPE's split, SwiGLU, "
                      "the projections' stack, the loss's passes")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="per-device peak for MFU; default: known chips (metrics.PEAK_TFLOPS)")
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace --profile_calls calls of each model and quantization after the "
                      "timed ones into DIR/<model>-<quant>/ and summarise them")
  p.add_argument("--profile_calls", type=int, default=3, help="calls traced by --profile")
  return p.parse_args(argv)


def model_inputs(name: str, args):
  """The model's config, a batch of tokens and its parameters (shapes only with
  ``--compile_only``), made once and shared by every quantization variant."""
  config = models.get_config(name, remat=args.remat, scan_layers=args.scan_layers)
  config = config.replace(
      logits_dtype=config_lib.resolve_logits_dtype(args.logits_dtype, config.dtype))
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq_len), 0, config.vocab_size)
  # The quantized variants have the same parameters, and so has any attention kernel: XLA's
  # here, so that a cuDNN failure is met (and retried) where the step compiles.
  model = models.Llama(config.replace(attention_implementation="xla", norm_implementation="xla",
                                      elementwise_implementation="xla"))
  if args.compile_only:  # shapes only: nothing allocated
    variables = jax.eval_shape(model.init, jax.random.key(1), tokens)
  else:
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
  return config, tokens, nn.meta.unbox(variables["params"])


def bench_one(inputs, quant_name: str, args,
              checkpoint: Callable[[dict], None] | None = None) -> dict:
  """Compiles and times forward+backward of one model (``model_inputs``) and quantization.

  With ``--profile`` the result is handed to ``checkpoint`` (which saves it) before the
  profiled calls run.
  """
  config, tokens, params = inputs
  config = config.replace(  # the parameters do not depend on them
      attention_implementation=config_lib.attention_implementation(args.attention),
      norm_implementation=config_lib.kernel_implementation(getattr(args, "norm", "auto")),
      elementwise_implementation=config_lib.kernel_implementation(
          getattr(args, "elementwise", "auto")))
  model = models.Llama(config, quant=models.get_quant_config(quant_name))

  def loss_fn(params, tokens, key):
    return train_step.lm_loss(model, params, tokens, -1, key)  # as the trainer; no padding

  key = jax.random.key(2)
  t0 = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens, key).compile()
  compile_s = time.perf_counter() - t0  # tracing, lowering and XLA compilation
  if args.compile_only:
    return dict(model=config.name, quant=quant_name, batch=args.batch, seq_len=args.seq_len,
                scan_layers=config.scan_layers, remat=config.remat,
                logits_dtype=config.logits_dtype, compile_s=compile_s)
  t0 = time.perf_counter()
  loss = jax.block_until_ready(step(params, tokens, key))[0]  # the same at every call
  first_step_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    jax.block_until_ready(step(params, tokens, key))
  synced = timing.synced_times(lambda: step(params, tokens, key), args.steps)
  # As a training loop runs (one step in flight): the time the figures below are from.
  step_s = timing.in_flight_s(lambda: step(params, tokens, key)[0], args.steps)
  n_tokens = args.batch * args.seq_len
  flops = models.flops_per_token(config, args.seq_len) * n_tokens
  peak = metrics.peak_flops_per_device(args.peak_tflops)
  mfu = flops / step_s / (peak) if peak else None
  r = dict(model=config.name, quant=quant_name, batch=args.batch, seq_len=args.seq_len,
           scan_layers=config.scan_layers, remat=config.remat, logits_dtype=config.logits_dtype,
           attention=args.attention,
           norm=config.norm_implementation or models.normalization.default_implementation(),
           elementwise=(config.elementwise_implementation
                        or models.pallas_platform.default_implementation()),
           params=models.count_params(config), step_s=step_s,
           step_s_synced=statistics.median(synced),
           compile_s=compile_s, first_step_s=first_step_s,
           tokens_per_s=n_tokens / step_s, model_tflops_per_s=flops / step_s / 1e12,
           mfu=mfu, loss=float(loss))
  if args.profile:
    if checkpoint:
      checkpoint(r)
    label = f"{config.name}-{quant_name}"
    r["profile"] = profile_summary.profile(
        lambda: jax.block_until_ready(step(params, tokens, key)), args.profile_calls,
        os.path.join(args.profile, label), hlo_text=step.as_text())
    print(profile_summary.one_line(label, r["profile"]), flush=True)
  return r


def main(argv=None):
  args = parse_args(argv)
  jax_settings.apply()
  device = jax.devices()[0]
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{jax.default_backend()} ({device.device_kind}), {platform.processor() or platform.machine()}")
  print("| model | quant | batch×len | step (ms) | tokens/s | model TFLOP/s | MFU | vs bf16 |")
  print("|---|---|---|---|---|---|---|---|")
  results = []
  for name in args.models.split(","):
    base = None
    inputs = model_inputs(name.strip(), args)
    for quant_name in args.quant.split(","):
      r = attention_fallback.run(lambda a, q=quant_name.strip(): bench_one(
          inputs, q, a, checkpoint=lambda r: _write_json(args.json, results + [r])), args)
      results.append(r)
      _write_json(args.json, results)  # after each result: a part stopped later keeps it
      if args.compile_only:
        print(f"| {r['model']} | {r['quant']} | {r['batch']}×{r['seq_len']} | compile only "
              f"| | | | |", flush=True)
        continue
      if quant_name.strip() == "bf16":
        base = r["step_s"]
      ratio = f"{r['step_s'] / base:.2f}×" if base else "–"
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
      print(f"| {r['model']} | {r['quant']} | {r['batch']}×{r['seq_len']} | {1e3 * r['step_s']:.1f} "
            f"| {r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.3f} | {mfu} | {ratio} |",
            flush=True)
  if results:
    print("compile (s, step excluded): " + ", ".join(
        f"{r['model']}/{r['quant']} {r['compile_s']:.1f}" for r in results), flush=True)
  for r in results:
    if "profile" in r:
      print("\n" + "\n".join(profile_summary.markdown(
          r["profile"], f"{r['model']} / {r['quant']} forward+backward")), flush=True)


def _write_json(path: str | None, results: list) -> None:
  if path:
    rundir.write_atomically(path, json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
