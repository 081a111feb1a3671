"""Compile for an H100 on a machine without one, and count what the GPU would run.

XLA can compile for a GPU it is only told about (a target description: compute capability,
multiprocessors, shared memory, cuDNN version) through ``jax.experimental.topologies``; it
needs the jax CUDA plugin installed (``pip install "jax[cuda12]"``), not a GPU. The optimized
HLO it returns is the one the GPU would run, with XLA:GPU's own fusion decisions, so before
any device time is spent it tells:

* how many kernels one optimizer update or one forward+backward launches, and the bytes they
  move (``hlo_stats.kernel_traffic``: each kernel reads its operands and writes its result
  once); for a memory-bound update, bytes over the bandwidth is the time to expect;
* whether attention compiles to cuDNN's fused kernel (``__cudnn$fmha...``);
* what the donated update aliases;
* where the host must wait for the device ("host waits": loops of unknown trip count, and
  conditionals whose branches launch a loop or a library call, which stay out of the CUDA
  graph: XLA:GPU copies their predicate to the host; see ``hlo_stats.summarize``).

  python -m experiments.benchmarks.aot_gpu --what optimizer --size 1b
  python -m experiments.benchmarks.aot_gpu --what model --model llama_350m --quant bf16,int4
  python -m experiments.benchmarks.aot_gpu --what optimizer --size 1b --dump /tmp/hlo

With ``XLA_FLAGS=--xla_dump_to=DIR`` XLA also writes each kernel's PTX there, and
``python -m experiments.benchmarks.ptx_check DIR`` lists the kernels that keep values on
the stack.

Compilation runs on the host CPU and can take minutes at 1b (the sparse optimizer longest).
Kernel counts and bytes are estimates from the HLO, not timings: launch latency, caches and
how well each kernel reaches the bandwidth are only seen on the device
(``experiments.benchmarks.accelerator``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# The host compiles; a GPU, if there is one, is not used.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import models  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import jax_settings, train_step  # noqa: E402
from experiments.benchmarks import bench_optimizer, bench_train, hlo_stats  # noqa: E402

# NVIDIA H100 80GB HBM3 (SXM) as XLA's GpuTargetConfig describes a device: the figures of the
# vendor's datasheet and the CUDA device properties of that part.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  # The CUDA version of the driver. Without it XLA assumes a driver older than 12.3 and
  # keeps cuBLAS, cuDNN and custom calls out of its CUDA graphs, which a device never does.
  driver_version: "12.9.0"
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 8
}
runtime_version {
  major: 12
  minor: 9
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# NVIDIA H200 (SXM): the H100's chip with HBM3e, 4.8 TB/s and 141 GB (the datasheet's).
# XLA:GPU's fusion cost model reads the bandwidth: compiled for an H200, the 350m trainer
# step stored SwiGLU's sigmoid in float32 and ran its backward as two kernels, as the H200
# ran it (the step's HLO from the device), where compiled for an H100 it is one.
H200_TARGET = (H100_TARGET.replace("memory_bandwidth: 3352320000000",
                                   "memory_bandwidth: 4800000000000")
               .replace("device_memory_size: 84929347584", "device_memory_size: 141000000000")
               .replace('device_description_str: "NVIDIA H100 80GB HBM3"',
                        'device_description_str: "NVIDIA H200"'))
TARGETS = {"h100": H100_TARGET, "h200": H200_TARGET}
H100_BANDWIDTH_GBPS = 3352.32  # the datasheet's HBM3 bandwidth, the default for estimates


def target_devices(target: str = "h100") -> list:
  """One device of ``target``, described, not present: compile for it, never run on it."""
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target],
                                            topology="1x1x1")
  except Exception as e:  # the plugin is missing or refuses: say what is needed
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise SystemExit(f"error: compiling for {target} needs the jax CUDA plugin "
                     f"(pip install \"jax[cuda12]\"; no GPU needed): {message}") from None
  return list(topology.devices)


def target_sharding(target: str = "h100") -> jax.sharding.NamedSharding:
  """A replicated sharding on one device of ``target``, for abstract arguments."""
  mesh = jax.sharding.Mesh(target_devices(target), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def lowering_on(device):
  """The lowering's default device: ``device``. jax ≥ 0.11 reads the GPU's kind for Pallas's
  Triton kernels from the default device, which on a host without a GPU is the CPU; only the
  lowering and the compilation run inside, as concrete arrays cannot live on ``device``."""
  return jax.default_device(device)


def _device(sharding):
  return next(iter(sharding.device_set))


def _on(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _split(traffic: dict) -> str:
  """GB moved by matrix products / attention / everything else (element-wise, reductions,
  copies), from ``hlo_stats.kernel_traffic``'s ``by_category``."""
  c = traffic["by_category"]
  matmul, attention = c.get("matmul", 0.0), c.get("attention", 0.0)
  rest = traffic["bytes"] - matmul - attention
  return f"{matmul / 1e9:.2f} / {attention / 1e9:.2f} / {rest / 1e9:.2f}"


def _summary(label: str, compiled, compile_s: float, dump: str | None) -> dict:
  text = compiled.as_text()
  if dump:
    os.makedirs(dump, exist_ok=True)
    with open(os.path.join(dump, label + ".hlo.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  memory = compiled.memory_analysis()
  peak = getattr(memory, "peak_memory_in_bytes", None) if memory is not None else None
  return dict(what=label, compile_s=compile_s, **hlo_stats.summarize(text),
              traffic=hlo_stats.kernel_traffic(text), peak_memory_bytes=peak)


def _gib(row: dict) -> str:
  """The compiled program's peak device memory (XLA's buffer assignment), GiB."""
  peak = row.get("peak_memory_bytes")
  return "–" if peak is None else f"{peak / 2**30:.1f}"


def optimizer_updates(size: str, names: list, sharding, dump=None,
                      scan_layers: bool = False) -> list:
  """The donated update of each optimizer of ``bench_optimizer`` on the ``size`` layout."""
  config = bench_optimizer.SIZES[size].replace(scan_layers=scan_layers)
  shapes = _on(bench_optimizer.param_shapes(config, jnp.float32), sharding)
  opts = bench_optimizer.known_optimizers(0.25, scan_layers)
  rows = []
  for name in names:
    if name not in opts:
      raise SystemExit(f"error: unknown optimizer {name!r}; known: {', '.join(opts)}")
    opt = opts[name]

    def step(params, state, grads, opt=opt):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = _on(jax.eval_shape(opt.init, shapes), sharding)
    t0 = time.perf_counter()
    with lowering_on(_device(sharding)):
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes).compile()
    label = f"optimizer-{size}{'-scan' if scan_layers else ''}-{name.replace(' ', '_')}"
    rows.append(dict(name=name, params=bench_optimizer.tree_bytes(shapes) // 4,
                     **_summary(label, compiled, time.perf_counter() - t0, dump)))
  return rows


def model_steps(model_name: str, quants: list, batch: int, length: int, sharding,
                dump=None, logits_dtype: str = "auto", scan_layers: bool = False,
                remat_policy: str | None = None, norm_implementation: str = "pallas",
                attention: str = "cudnn", elementwise_implementation: str = "pallas") -> list:
  """Forward+backward of the token cross-entropy, as ``bench_model`` times it."""
  rows = []
  for quant_name in quants:
    config = models.get_config(model_name, attention_implementation=attention,
                               norm_implementation=norm_implementation,
                               elementwise_implementation=elementwise_implementation,
                               scan_layers=scan_layers, remat=remat_policy is not None,
                               **({"remat_policy": remat_policy} if remat_policy else {}))
    config = config.replace(
        logits_dtype=config_lib.resolve_logits_dtype(logits_dtype, config.dtype))
    model = models.Llama(config, quant=models.get_quant_config(quant_name))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
    params = _on(nn.meta.unbox(models.abstract_variables(config)["params"]), sharding)

    def loss_fn(params, tokens, key, model=model):
      return train_step.lm_loss(model, params, tokens, -1, key)  # as the trainer; no padding

    key = _on(jax.eval_shape(lambda: jax.random.key(0)), sharding)
    t0 = time.perf_counter()
    with lowering_on(_device(sharding)):
      compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(params, tokens, key).compile()
    label = (f"model-{config.name}-{quant_name}-{batch}x{length}"
             f"{'-scan' if scan_layers else ''}{f'-remat_{remat_policy}' if remat_policy else ''}"
             f"{'-f32logits' if config.logits_dtype == 'float32' else ''}")
    row = _summary(label, compiled, time.perf_counter() - t0, dump)
    row.update(model=config.name, quant=quant_name, batch=batch, length=length,
               logits_dtype=config.logits_dtype,
               flops=models.flops_per_token(config, length) * batch * length)
    rows.append(row)
  return rows


def trainer_step(model_name: str, optimizer_name: str, batch: int, length: int, devices,
                 dump=None, scan_layers: bool = False, logits_dtype: str = "auto",
                 norm: str = "auto", attention: str = "cudnn", elementwise: str = "auto") -> dict:
  """The trainer's whole step (``bench_train.trainer_step``: mesh, shardings, donation), bf16."""
  ns = bench_train.parse_args(["--models", model_name, "--optimizers", optimizer_name,
                               "--batch", str(batch), "--length", str(length),
                               "--dtype", "bfloat16", "--logits_dtype", logits_dtype,
                               "--norm", norm, "--attention", attention,
                               "--elementwise", elementwise]
                              + (["--scan_layers"] if scan_layers else []))
  with bench_train.trainer_step(ns, model_name, optimizer_name,
                                target_devices=devices) as (cfg, mcfg, init, step, tokens):
    state = jax.eval_shape(init, jax.eval_shape(lambda: jax.random.PRNGKey(cfg.seed)))
    t0 = time.perf_counter()
    with lowering_on(devices[0]):
      compiled, donation = hlo_stats._compile(step.lower(state, tokens))  # pylint: disable=protected-access
    label = (f"train-{mcfg.name}-{optimizer_name}-{batch}x{length}"
             f"{'-scan' if scan_layers else ''}"
             f"{'-f32logits' if mcfg.logits_dtype == 'float32' else ''}")
    row = _summary(label, compiled, time.perf_counter() - t0, dump)
  row.update(model=mcfg.name, optimizer=optimizer_name, batch=batch, length=length,
             logits_dtype=mcfg.logits_dtype,
             donation_warnings=donation, state_leaves=len(jax.tree.leaves(state)),
             flops=models.flops_per_token(mcfg, length) * batch * length)
  return row


def main(argv=None) -> list:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--what", choices=("optimizer", "model", "train"), default="optimizer")
  p.add_argument("--target", choices=sorted(TARGETS), default="h100")
  p.add_argument("--size", default="1b", choices=sorted(bench_optimizer.SIZES),
                 help="--what optimizer: the parameter layout")
  p.add_argument("--optimizers", default="adamw,spam,stable_spam",
                 help="--what optimizer: comma-separated names of bench_optimizer's "
                      "optimizers or --blocks chains")
  p.add_argument("--model", default="llama_350m", help="--what model / train: the config")
  p.add_argument("--optimizer", default="spam", help="--what train: the trainer's --optimizer")
  p.add_argument("--scan_layers", action="store_true",
                 help="the scanned-layers layout (all three --what)")
  p.add_argument("--remat_policy", default=None,
                 help="--what model: rematerialise each block with this jax.checkpoint_policies "
                      "entry (default: no remat)")
  p.add_argument("--quant", default="bf16,int4", help="--what model: comma-separated")
  p.add_argument("--logits_dtype", default="auto", choices=config_lib.LOGITS_DTYPES,
                 help="--what model / train: LlamaConfig.logits_dtype (auto: as the trainer, "
                      "the compute dtype's: bfloat16)")
  p.add_argument("--norm", default="pallas", choices=("pallas", "xla"),
                 help="--what model / train: the residual add + RMSNorm kernels (pallas: what "
                      "one GPU runs by default)")
  p.add_argument("--elementwise", default="pallas", choices=("pallas", "xla"),
                 help="--what model / train: RoPE's split, SwiGLU, the projections' "
                      "stack and the loss's passes (pallas: what one GPU runs by default)")
  p.add_argument("--attention", default="cudnn", choices=("cudnn", "pallas", "xla"),
                 help="--what model / train: the attention kernel (cudnn: what a GPU runs by "
                      "default; pallas: jax's Pallas flash attention)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--bandwidth_GBps", type=float, default=H100_BANDWIDTH_GBPS,
                 help="device-memory bandwidth for the time estimates (default: the H100 "
                      "datasheet's 3352 GB/s; a measured copy rate is lower)")
  p.add_argument("--dump", default=None, help="folder for the optimized HLO text")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  jax_settings.apply()  # compile what the benchmarks run
  sharding = target_sharding(args.target)
  if args.what == "optimizer":
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    rows = optimizer_updates(args.size, names, sharding, args.dump, args.scan_layers)
    base = rows[0]["traffic"]
    layout = f"{args.size}{' scanned' if args.scan_layers else ''}"
    print(f"| {layout} update ({args.target}) | kernels | GB moved | B per param | "
          f"× {rows[0]['name']} bytes | ms at {args.bandwidth_GBps:,.0f} GB/s | host waits "
          "| compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
      t = r["traffic"]
      print(f"| {r['name']} | {t['kernels']} | {t['bytes'] / 1e9:.2f} | "
            f"{t['bytes'] / r['params']:.1f} | {t['bytes'] / base['bytes']:.3f} | "
            f"{1e3 * t['bytes'] / (args.bandwidth_GBps * 1e9):.2f} | {r['host_waits']} | "
            f"{r['compile_s']:.0f} |", flush=True)
    for r in rows:  # one branch of each conditional runs, besides the totals above
      for b in r["traffic"]["branches"]:
        print(f"{r['name']}: conditional branch {b['computation']}: {b['kernels']} kernels, "
              f"{b['bytes'] / 1e9:.2f} GB", flush=True)
  elif args.what == "train":
    r = trainer_step(args.model, args.optimizer, args.batch, args.length,
                     target_devices(args.target), args.dump, args.scan_layers,
                     args.logits_dtype, args.norm, args.attention, args.elementwise)
    rows = [r]
    calls = ", ".join(f"{k} ×{v}" for k, v in r["custom_calls"].items()) or "–"
    print(f"| train step ({args.target}) | kernels | GB moved | GB matmul / attention / rest "
          "| peak GiB | cuDNN attention | outputs in donated buffers / state leaves "
          "| donation warnings | host waits | compile s |")
    print("|---|---:|---:|---|---:|---|---|---|---:|---:|")
    print(f"| {r['model']} {r['optimizer']} {r['batch']}×{r['length']}, "
          f"{'bf16' if r['logits_dtype'] == 'bfloat16' else 'float32'} logits | "
          f"{r['traffic']['kernels']} | {r['traffic']['bytes'] / 1e9:.2f} | "
          f"{_split(r['traffic'])} | {_gib(r)} | "
          f"{'yes' if r['cudnn_attention'] else 'no'} ({calls}) | "
          f"{r['aliased_outputs']} / {r['state_leaves']} | {len(r['donation_warnings'])} | "
          f"{r['host_waits']} | {r['compile_s']:.0f} |", flush=True)
  else:
    rows = model_steps(args.model, [q.strip() for q in args.quant.split(",") if q.strip()],
                       args.batch, args.length, sharding, args.dump, args.logits_dtype,
                       args.scan_layers, args.remat_policy, args.norm, args.attention,
                       args.elementwise)
    print(f"| fwd+bwd ({args.target}) | kernels | GB moved | GB matmul / attention / rest "
          "| peak GiB | cuDNN attention | custom calls | compile s |")
    print("|---|---:|---:|---|---:|---|---|---:|")
    for r in rows:
      calls = ", ".join(f"{k} ×{v}" for k, v in r["custom_calls"].items()) or "–"
      print(f"| {r['model']} {r['quant']} {r['batch']}×{r['length']}, "
            f"{'bf16' if r['logits_dtype'] == 'bfloat16' else 'float32'} logits | "
            f"{r['traffic']['kernels']} | {r['traffic']['bytes'] / 1e9:.2f} | "
            f"{_split(r['traffic'])} | {_gib(r)} | "
            f"{'yes' if r['cudnn_attention'] else 'no'} | {calls} | {r['compile_s']:.0f} |",
            flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() is not None else 1)
