"""Trainer throughput: the real jitted train step (forward, backward, optimizer update) and the loader.

For each model and optimizer this builds the step exactly as ``experiments.pretrain`` does
(``optimizers.make_schedule`` / ``make_optimizer``, ``train_step.make_init_fn`` /
``make_train_step``, the same mesh, logical-axis rules, shardings and donated state) and times
it on a synthetic batch of random token ids (no padding): warm-up calls after compilation, then
``--steps`` calls as the trainer's loop makes them, one step in flight (``timing.in_flight_s``:
step n is dispatched before step n-1's metrics are fetched), the time every rate is from; and
the median of ``--steps`` calls each waited for (``step_s_synced``: the host's launch of the
step added to the device's time). With ``--density`` < 1 the sparse-momentum masks' redraw,
which the trainer's loop makes after every ``--DeltaT``-th step, is not in the timed step.
Model FLOPs per token come from
``models.flops_per_token`` (6·N + 12·L·d·T, PaLM's convention); MFU is achieved model FLOP/s
over the per-device peak (``--peak_tflops``, else ``metrics.PEAK_TFLOPS`` for known
chips, e.g. 989 for an H100; n/a on CPU).

It also times the host's part of each step that the loop does while the next step runs:
the metrics writer's fetch and records (``writer_s``, ``metrics_writer_s``). Each timed
interval in flight is kept too (``step_s_in_flight_each``), with its median and maximum
(``step_s_in_flight_median``, ``step_s_in_flight_max``) beside the mean
(``timing.in_flight_times``). While the steps are timed, ``nvidia-smi`` samples the GPU's
clocks, power and clock-event reasons (``gpu_clocks``: ``gpu_clocks_synced``,
``gpu_clocks_in_flight``, and under ``profile_in_flight`` its own), so that a timing and a
profile taken at different clocks are told apart. ``--two_executables`` compiles the step twice
and runs the two in turn (``alternating``), an experiment on the CUDA graphs' updates.

Separately it times the real input pipeline (``data.make_loaders`` on ``--dataset``, default
the offline standard-library corpus): ``next_batch()`` of the training loader, in batches/s
and tokens/s, and reports loader tokens/s ÷ step tokens/s. The loop prepares batch t+1 while
step t runs on the device, so a ratio well above 1 means the data is never the bottleneck.

  python -m experiments.benchmarks.bench_train                                  # GPU: 60m…1b, 3 optimizers
  python -m experiments.benchmarks.bench_train --models llama_9m --batch 8 --length 128   # a CPU
  python -m experiments.benchmarks.bench_train --models llama_1b --optimizers spam --activation_checkpointing
  python -m experiments.benchmarks.bench_train --models llama_350m --profile /tmp/prof --hlo /tmp/hlo

``--profile DIR`` traces ``--profile_calls`` more steps after the timed ones into
``DIR/<model>-<optimizer>/`` and keeps where their device time went (``profile_summary``)
in the result under ``profile``, then as many in flight (each step dispatched before the
previous one is waited for) into ``DIR/<model>-<optimizer>-in-flight/``, under
``profile_in_flight``: its ``between_ms_per_call`` is how long the device waited between
steps in the running loop; ``--hlo DIR`` writes the compiled step's optimized HLO to
``DIR/train-<model>-<optimizer>.hlo.txt`` and keeps its counts (``hlo_stats.summarize``) and
the donation warnings of its compilation under ``hlo``. The JSON is written after each
result, before and after its profile: a run stopped by its time limit keeps what it measured.

Reference: the PyTorch peer (HF LLaMA + the official SPAM optimizer) on one H100 at batch
64×256 runs 417k tokens/s (60m), 226k (130m), 95k (350m), 18k (1b). Target on one H100:
at least 2× the peer. The ours/peer column is printed on GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import models
from experiments import (config, data, gc_policy, jax_settings, metrics, optimizers, pretrain,
                         rundir, sharding, tokenizer)
from experiments import train_step as ts
from experiments.benchmarks import attention_fallback, gpu_clocks, profile_summary, timing

# HF LLaMA + official SPAM, one H100, batch 64×256, tokens/s.
PEER_TOKENS_PER_S = {"llama_60m": 417e3, "llama_130m": 226e3, "llama_350m": 95e3,
                     "llama_1b": 18e3}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="llama_60m,llama_130m,llama_350m,llama_1b",
                 help="comma-separated config names")
  p.add_argument("--optimizers", default="adamw,spam,stable_spam",
                 help=f"comma-separated, from {', '.join(config.OPTIMIZERS)}")
  p.add_argument("--batch", type=int, default=64, help="sequences per step")
  p.add_argument("--length", type=int, default=256, help="tokens per sequence")
  p.add_argument("--dtype", default="auto", choices=config.DTYPES,
                 help="as the trainer's --dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--activation_checkpointing", action="store_true")
  p.add_argument("--scan_layers", action="store_true", help="as the trainer's --scan_layers")
  p.add_argument("--logits_dtype", default="auto", choices=config.LOGITS_DTYPES,
                 help="as the trainer's --logits_dtype (auto: the compute dtype)")
  p.add_argument("--attention", default="auto", choices=config.ATTENTIONS,
                 help="as the trainer's --attention; with auto, a step whose cuDNN attention "
                      "fails to compile is measured again with xla (attention_fallback)")
  p.add_argument("--norm", default="auto", choices=config.NORMS,
                 help="as the trainer's --norm: the residual add + RMSNorm kernels")
  p.add_argument("--elementwise", default="auto", choices=config.NORMS,
                 help="as the trainer's --elementwise: RoPE's split, SwiGLU, "
                      "the projections' stack, the loss's passes")
  p.add_argument("--density", type=float, default=1.0, help="SPAM sparse-momentum density")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--gc_every", type=int, default=config.TrainConfig.gc_every,
                 help="as the trainer's --gc_every: Python's garbage collection every this "
                      "many steps, the heap frozen (0: automatic collection)")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="per-device peak for MFU; default: known chips (metrics.PEAK_TFLOPS)")
  p.add_argument("--dataset", default="stdlib", help="the loader's --dataset (default stdlib)")
  p.add_argument("--tokenizer", default="auto", help="the loader's --tokenizer")
  p.add_argument("--loader_batches", type=int, default=50, help="timed loader batches")
  p.add_argument("--no_loader", action="store_true", help="skip the loader measurement")
  p.add_argument("--json", default=None, help="also write the results to this JSON file")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="trace --profile_calls steps of each model and optimizer after the timed "
                      "ones into DIR/<model>-<optimizer>/ and summarise them")
  p.add_argument("--profile_calls", type=int, default=3, help="steps traced by --profile")
  p.add_argument("--two_executables", action="store_true",
                 help="compile the step twice and run the two in turn (see `alternating`)")
  p.add_argument("--hlo", default=None, metavar="DIR",
                 help="write each compiled step's optimized HLO text into DIR and summarise it")
  return p.parse_args(argv)


def trainer_config(args, model: str, optimizer: str, backend: str | None = None
                   ) -> config.TrainConfig:
  argv = ["--model_config", model, "--optimizer", optimizer, "--batch_size", str(args.batch),
          "--max_length", str(args.length), "--dtype", args.dtype]
  if optimizer in config.OPTIMIZER_FLAGS["density"]:  # the others refuse --density
    argv += ["--density", str(args.density)]
  if args.activation_checkpointing:
    argv.append("--activation_checkpointing")
  if args.scan_layers:
    argv.append("--scan_layers")
  argv += ["--logits_dtype", getattr(args, "logits_dtype", "auto"),
           "--attention", getattr(args, "attention", "auto"),
           "--norm", getattr(args, "norm", "auto"),
           "--elementwise", getattr(args, "elementwise", "auto")]
  return config.for_backend(config.parse_args(argv), backend or jax.default_backend())


@contextlib.contextmanager
def trainer_step(args, model_name: str, optimizer_name: str, target_devices=None):
  """The trainer's jitted init and step for one model and optimizer, with a batch.

  Yields ``(cfg, mcfg, init, step, batch)`` inside the trainer's mesh and logical-axis
  rules: ``init(key)`` makes the sharded train state, ``step(state, batch)`` donates it.
  ``target_devices``: compile for these devices of a GPU described, not present
  (``aot_gpu``): the mesh is theirs, attention asks for cuDNN, and the batch is abstract.
  """
  backend = "gpu" if target_devices is not None else None
  cfg = trainer_config(args, model_name, optimizer_name, backend)
  mcfg = pretrain.model_config(cfg)  # keeps the config's vocabulary (32000), as on C4
  if target_devices is not None and cfg.attention == "auto":
    mcfg = dataclasses.replace(mcfg, attention_implementation="cudnn")
  for flag in ("norm", "elementwise"):  # what one GPU picks
    if target_devices is not None and getattr(cfg, flag) == "auto":
      mcfg = dataclasses.replace(mcfg, **{f"{flag}_implementation":
                                          "pallas" if len(target_devices) == 1 else "xla"})
  schedule = optimizers.make_schedule(cfg)
  optimizer = optimizers.make_optimizer(cfg, schedule)
  model = models.Llama(mcfg)
  devices = jax.devices() if target_devices is None else list(target_devices)
  sizes = sharding.parse_mesh(None, len(devices))
  pretrain.check_devices(cfg, sizes)
  mesh = sharding.make_mesh(sizes, devices)
  rules = models.DEFAULT_LOGICAL_AXIS_RULES
  replicated = NamedSharding(mesh, P())
  example = jnp.zeros((1, cfg.max_length), jnp.int32)
  init_fn = ts.make_init_fn(model, optimizer, param_dtype=jnp.dtype(mcfg.param_dtype),
                            example_tokens=example)
  batch_sharding = sharding.train_batch_sharding(mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, mcfg.vocab_size, (1, cfg.batch_size, cfg.max_length), dtype=np.int32)
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    _, state_shardings, _ = sharding.train_state_shardings(model, init_fn, example, mesh, rules)
    init = jax.jit(init_fn, out_shardings=state_shardings)
    step = jax.jit(ts.make_train_step(model, optimizer, schedule, pad_id=0),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
    if target_devices is None:
      batch = sharding.to_global(tokens, batch_sharding, tokens.shape)
    else:
      batch = jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=batch_sharding)
    yield cfg, mcfg, init, step, batch


def _compile(args, lowered):
  """The compiled step and, with ``--hlo``, the donation warnings raised compiling it."""
  if not args.hlo:
    return lowered.compile(), None
  # hlo_stats imports this module: imported here, when asked for.
  from experiments.benchmarks import hlo_stats  # pylint: disable=import-outside-toplevel
  return hlo_stats._compile(lowered)  # pylint: disable=protected-access


def _hlo(args, text: str, donation: list, label: str) -> dict:
  """Writes the step's optimized HLO into ``--hlo`` and summarises it (``hlo_stats``)."""
  from experiments.benchmarks import hlo_stats  # pylint: disable=import-outside-toplevel
  os.makedirs(args.hlo, exist_ok=True)
  path = os.path.join(args.hlo, f"train-{label}.hlo.txt")
  rundir.write_atomically(path, text)
  return dict(hlo_stats.summarize(text), traffic=hlo_stats.kernel_traffic(text),
              donation_warnings=donation, file=path)


def bench_step(args, model_name: str, optimizer_name: str,
               checkpoint: Callable[[dict], None] | None = None) -> dict:
  """Compiles and times the trainer's step for one model and optimizer.

  With ``--profile`` the result is handed to ``checkpoint`` (which saves it) before the
  profiled steps run, so a profiler that fails or hangs cannot lose the timing. A step
  whose cuDNN attention fails is measured again with XLA's (``attention_fallback``).
  """
  return attention_fallback.run(
      lambda a: _bench_step(a, model_name, optimizer_name, checkpoint), args)


def _bench_step(args, model_name: str, optimizer_name: str,
                checkpoint: Callable[[dict], None] | None) -> dict:
  label = f"{model_name}-{optimizer_name}"
  sizes = _sizes(args, model_name, optimizer_name)  # outside the mesh: unboxes the parameters
  with (trainer_step(args, model_name, optimizer_name) as (cfg, mcfg, init, step, batch),
        contextlib.ExitStack() as gc_scope):
    state = init(jax.random.PRNGKey(cfg.seed))
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    step, donation = _compile(args, lowered)
    compile_s = time.perf_counter() - t0  # tracing, lowering and XLA compilation
    text = step.as_text() if args.hlo or args.profile else None
    if args.two_executables:
      step = alternating(step, twin_executable(lowered))
    t0 = time.perf_counter()
    state, step_metrics = step(state, batch)
    jax.block_until_ready((state, step_metrics))
    first_step_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      state, step_metrics = step(state, batch)
    jax.block_until_ready((state, step_metrics))
    holder = [state]
    del state
    # What one full pass of Python's collector takes over this process's heap now: the pause
    # automatic collection puts into whichever step it lands on (the trainer's --gc_every
    # keeps it out of the steps, as below).
    gc_full_s = gc_policy.full_collection_s()
    calls = [0]

    def run_once():  # one step; its metrics (the state is the next step's input)
      calls[0] += 1
      holder[0], out = step(holder[0], batch)
      collect(calls[0])  # as the trainer's loop, after the dispatch
      return out

    # From here to the end of the model's measurement, the trainer's collection schedule.
    collect = gc_scope.enter_context(gc_policy.scheduled(args.gc_every))
    call = lambda: calls[0]
    with gpu_clocks.sampling() as clocks_synced, gc_policy.Pauses(call) as gc_synced:
      calls[0] = 0
      synced = timing.synced_times(run_once, args.steps)
    with gpu_clocks.sampling() as clocks_in_flight, gc_policy.Pauses(call) as gc_in_flight:
      calls[0] = 0
      intervals = timing.in_flight_times(run_once, args.steps)  # as the trainer's loop runs
    in_flight = sum(intervals) / len(intervals)
    writer_s = metrics_writer_s([run_once() for _ in range(args.steps)])
    loss = float(run_once()["loss"])
    gc_scheduled_s = gc_policy.full_collection_s() if args.gc_every else None
    r = _result(args, cfg, mcfg, optimizer_name, sizes, in_flight, synced, compile_s,
                first_step_s, loss)
    r["writer_s"] = writer_s
    r["two_executables"] = args.two_executables
    r["step_s_in_flight_median"] = statistics.median(intervals)
    r["step_s_in_flight_max"] = max(intervals)
    r["step_s_in_flight_each"] = [round(t, 6) for t in intervals]  # which step was slow
    # Python's collector: a full pass over the heap as automatic collection would run it, a
    # scheduled pass with the heap frozen, and each pass while the steps were timed with
    # the call it fell in (counted from 1; in flight the first two calls are untimed, and
    # a pause in call c shows in interval c − 3 or c − 2 of step_s_in_flight_each).
    r["gc"] = {"every": args.gc_every, "full_collection_s": round(gc_full_s, 6),
               "scheduled_collection_s": None if gc_scheduled_s is None
               else round(gc_scheduled_s, 6),
               "synced": gc_synced.summary(), "in_flight": gc_in_flight.summary()}
    # What the GPU ran at while each was timed: a profile's few steps can run at higher
    # clocks than the timed loop's many.
    r["gpu_clocks_synced"] = clocks_synced.summary()
    r["gpu_clocks_in_flight"] = clocks_in_flight.summary()
    print(f"{label} in flight: {gpu_clocks.one_line(r['gpu_clocks_in_flight'])}", flush=True)
    if args.hlo:
      r["hlo"] = _hlo(args, text, donation, label)
    if args.profile:
      if checkpoint:
        checkpoint(r)
      r["profile"] = profile_summary.profile(
          lambda: jax.block_until_ready((run_once(), holder[0])), args.profile_calls,
          os.path.join(args.profile, label), hlo_text=text)
      r["xplane"] = r["profile"].get("xplane")
      print(profile_summary.one_line(label, r["profile"]), flush=True)
      # The same number of steps in flight, as the loop runs them: how long the device
      # waits between one step and the next.
      with gpu_clocks.sampling() as clocks:
        r["profile_in_flight"] = profile_summary.profile(
            run_once, args.profile_calls, os.path.join(args.profile, label + "-in-flight"),
            hlo_text=text, in_flight=True)
      r["profile_in_flight"]["gpu_clocks"] = clocks.summary()
      print(in_flight_line(label, r["profile_in_flight"]), flush=True)
    holder.clear()  # frees the state before the next model is built
  return r


def twin_executable(lowered):
  """A second executable of the same step: ``lowered`` compiled again, with an XLA option
  set to its default value so that jax's compilation cache does not hand back the first."""
  return lowered.compile(compiler_options={"xla_embed_ir_in_executable": False})


def alternating(first, second):
  """A step that calls ``first`` and ``second`` in turn (``--two_executables``).

  On a GPU each executable keeps its own CUDA graphs, which XLA re-records where a buffer's
  address changed since that graph's last launch. With one step in flight, a step's
  temporary buffers are allocated while the previous step's are still held, so from one
  step to the next they lie elsewhere and the graph is updated every step (on an H200,
  3.2 ms of the host's time a 350m step in flight against 0.17 ms with each step waited
  for). In turn, each executable's step finds its buffers where its last one had them.
  """
  calls = [0]

  def step(*args):
    executable = (first, second)[calls[0] % 2]
    calls[0] += 1
    return executable(*args)

  return step


def in_flight_line(label: str, summary: dict) -> str:
  """``in flight <label>: 78.80 ms a step, busy 74.02, idle between steps 3.80``."""
  if summary.get("error") or not summary.get("source"):
    return f"in flight {label}: no profile ({summary.get('error', 'no summary')})"
  return (f"in flight {label}: {summary['period_ms_per_call']:.2f} ms a step (trace), busy "
          f"{summary['busy_ms_per_call']:.2f}, idle between steps "
          f"{summary['between_ms_per_call']:.2f}")


def _sizes(args, model_name: str, optimizer_name: str) -> tuple[int, float]:
  """The model's parameters and model FLOPs per step."""
  cfg = trainer_config(args, model_name, optimizer_name)
  mcfg = pretrain.model_config(cfg)
  n_tokens = cfg.batch_size * cfg.max_length
  return models.count_params(mcfg), models.flops_per_token(mcfg, cfg.max_length) * n_tokens


def metrics_writer_s(outputs: list) -> float:
  """Host seconds per step that the trainer's ``metrics.MetricsWriter`` takes for these step
  metrics, already computed: the fetch, the record, its ``metrics.jsonl`` line and, when
  tensorboardX (or PyTorch's writer) is installed, its TensorBoard scalars. The loop does this
  while the next step runs, so it must stay under the step time."""
  jax.block_until_ready(outputs)
  with tempfile.TemporaryDirectory() as folder:
    writer = metrics.MetricsWriter(folder, tokens_per_step=1, flops_per_step=1.0,
                                   peak_flops=None)
    t0 = time.perf_counter()
    for step, out in enumerate(outputs, start=1):
      writer.push(step, out)
    writer.flush()
    elapsed = time.perf_counter() - t0
    writer.close()
  return elapsed / len(outputs)


def _result(args, cfg, mcfg, optimizer_name, sizes, step_s, synced, compile_s, first_step_s,
            loss) -> dict:
  """``step_s``: seconds per step as the trainer runs (one in flight), the figure every rate
  is from; ``synced``: each step's seconds, waited for."""
  n_params, flops = sizes
  n_tokens = cfg.batch_size * cfg.max_length
  peak = metrics.peak_flops_per_device(args.peak_tflops)
  mfu = flops / step_s / (peak * jax.device_count()) if peak else None
  return dict(model=mcfg.name, optimizer=optimizer_name, dtype=cfg.dtype,
              scan_layers=mcfg.scan_layers, remat=mcfg.remat, logits_dtype=mcfg.logits_dtype,
              attention=cfg.attention, batch=cfg.batch_size, length=cfg.max_length, params=n_params,
              norm=mcfg.norm_implementation or models.normalization.default_implementation(),
              elementwise=(mcfg.elementwise_implementation
                           or models.pallas_platform.default_implementation()),
              step_s=step_s, step_s_synced=statistics.median(synced),
              step_s_synced_min=min(synced), compile_s=compile_s,
              first_step_s=first_step_s,
              tokens_per_s=n_tokens / step_s, model_tflops_per_s=flops / step_s / 1e12,
              mfu=mfu, loss=loss)


def bench_loader(args) -> dict:
  """Times ``next_batch()`` of the trainer's own training loader."""
  cfg = config.parse_args(["--dataset", args.dataset, "--tokenizer", args.tokenizer,
                           "--batch_size", str(args.batch), "--max_length", str(args.length),
                           "--eval_batches", "1"])
  tok = tokenizer.get_tokenizer(cfg.tokenizer)
  t0 = time.perf_counter()
  train, _ = data.make_loaders(cfg, tok, host=0, num_hosts=1)
  setup_s = time.perf_counter() - t0
  for _ in range(2):
    train.next_batch()
  t0 = time.perf_counter()
  pad = 0
  for _ in range(args.loader_batches):
    pad += int((train.next_batch() == tok.pad_id).sum())
  elapsed = time.perf_counter() - t0
  n_tokens = args.loader_batches * cfg.batch_size * cfg.max_length
  return dict(dataset=cfg.dataset, tokenizer=cfg.tokenizer, packing=cfg.packing,
              batch=cfg.batch_size, length=cfg.max_length, setup_s=setup_s,
              batches_per_s=args.loader_batches / elapsed, tokens_per_s=n_tokens / elapsed,
              pad_fraction=pad / n_tokens)


def _k(x: float) -> str:
  return f"{x / 1e3:,.1f}k" if x >= 1e3 else f"{x:,.0f}"


def main(argv=None):
  args = parse_args(argv)
  jax_settings.apply()
  device = jax.devices()[0]
  backend = jax.default_backend()
  print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{backend} ({device.device_kind}) x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}", flush=True)
  loader = None
  if not args.no_loader:
    loader = bench_loader(args)
    print(f"loader: --dataset {loader['dataset']} (tokenizer {loader['tokenizer']}, packing "
          f"{'on' if loader['packing'] else 'off'}), {loader['batch']}×{loader['length']}: "
          f"{loader['batches_per_s']:,.1f} batches/s, {_k(loader['tokens_per_s'])} tokens/s "
          f"(setup {loader['setup_s']:.1f}s, padding {100 * loader['pad_fraction']:.1f}%)",
          flush=True)
  print("| model | optimizer | dtype | batch×len | step (ms) | waited for (ms) | tokens/s "
        "| model TFLOP/s | MFU | loader ÷ step | PyTorch peer (H100) | ours ÷ peer |")
  print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
  results = []
  save = lambda extra=(): _write_json(args.json, loader, results + list(extra))
  save()
  for name in [m.strip() for m in args.models.split(",") if m.strip()]:
    for opt in [o.strip() for o in args.optimizers.split(",") if o.strip()]:
      r = bench_step(args, name, opt, checkpoint=lambda r: save([r]))
      results.append(r)
      save()
      mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
      ratio = f"{loader['tokens_per_s'] / r['tokens_per_s']:,.1f}×" if loader else "–"
      peer = PEER_TOKENS_PER_S.get(r["model"])
      vs_peer = (f"{r['tokens_per_s'] / peer:.2f}×" if peer and backend == "gpu" else "–")
      print(f"| {r['model']} | {r['optimizer']} | {r['dtype']} | {r['batch']}×{r['length']} "
            f"| {1e3 * r['step_s']:.1f} | {1e3 * r['step_s_synced']:.1f} "
            f"| {_k(r['tokens_per_s'])} | {r['model_tflops_per_s']:.3f} "
            f"| {mfu} | {ratio} | {_k(peer) if peer else '–'} | {vs_peer} |", flush=True)
  if results:
    compiled = ", ".join(f"{r['model']}/{r['optimizer']} {r['compile_s']:.0f}" for r in results)
    print(f"compile (s, step excluded): {compiled}", flush=True)
    written = ", ".join(f"{r['model']}/{r['optimizer']} {1e3 * r['writer_s']:.2f}"
                        for r in results)
    print(f"metrics writer, host ms per step (while the next step runs): {written}", flush=True)
  if backend == "gpu" and (args.batch, args.length) != (64, 256):
    print("note: the PyTorch peer numbers are for batch 64×256")
  for r in results:
    if "profile" in r:
      print("\n" + "\n".join(profile_summary.markdown(
          r["profile"], f"{r['model']} / {r['optimizer']} step")), flush=True)


def _write_json(path: str | None, loader: dict | None, results: list) -> None:
  if path:
    rundir.write_atomically(path, json.dumps({"loader": loader, "steps": results}, indent=1))


if __name__ == "__main__":
  raise SystemExit(config.run_cli(main))  # a bad flag: its one error line, status 2
