"""Every speed target, measured in one run on the machine it finds: JSON and a markdown table.

First a probe records the device and the library versions and measures the two ceilings
(device-memory bandwidth, bf16 matrix-product rate), then times a few pieces alone (random
draws both ways, the Pallas and XLA norms, the loss's one-pass reduction beside
``jax.nn.logsumexp`` and as the Pallas kernel with four tiles, each of the models' other
element-wise Pallas kernels beside the XLA form it replaces, causal attention at the 350m
step's shapes as cuDNN's, XLA's and jax's Pallas flash-attention kernel; ``--skip_probe``
leaves sections out). Then, each part in its own subprocess
with its own time limit (so a slow or out-of-memory part loses only itself), in this order,
skipping what no longer fits in ``--budget_s``:

1. ``bench_optimizer --size 1b``: adamw, spam, stable_spam and spam d=0.25 as the trainer
   runs it (masks redrawn by the loop, no ``lax.cond``), one resident at a time, each
   profiled; then adamw, spam and SPAM's moments without its clip at 350m in bf16, as the
   bf16 trainer updates;
2. ``bench_model`` bf16 and int4 (W4A4) at 350m and 60m, 64×256, profiled; then the 60m
   bf16 step with XLA's residual add + RMSNorm (``--norm xla``, beside the Pallas kernels)
   and the 350m bf16 step with jax's Pallas flash attention (``--attention pallas``,
   beside cuDNN's);
3. the PyTorch peer (``--torch_peer``: HF ``LlamaForCausalLM`` in bf16 + fused AdamW) at
   60m, 130m, 350m and 1b, batch 64×256;
4. ``bench_train``: the trainer's whole step, spam, bf16, 64×256, at 60m, 130m, 350m, 1b,
   each profiled (1b again with activation checkpointing if it runs out of memory); at 350m
   also the compiled step's HLO (kernels, cuDNN attention or not, loops, donated buffers);
   then the 350m step again with XLA's element-wise forms, without CUDA graphs
   (``XLA_FLAGS=--xla_gpu_enable_command_buffer=``)
   and with its graph never updated (``--xla_gpu_command_buffer_update_mode=NEVER_UPDATE``;
   where XLA rejects that name, its later modes ``SKIP_PROFILED``, ``SKIP_TEMP`` and
   ``VMM_PERSISTENT_TEMP`` in turn), both profiled, and the 60m step
   with ``--logits_dtype float32`` (the default, as HF LLaMA in bf16, is bf16 logits); the
   rows of these variants are labeled and decide no target;
5. ``bench_optimizer --size 1b --scan_layers``: spam and stable_spam beside adamw on the
   scanned-layers layout (each weight of all layers in one leaf, Stable-SPAM with per-layer
   statistics), profiled;
6. the 130m step with float32 logits, the 350m step with XLA's norm (both variants);
7. ``hlo_stats`` of the spam update at 1b;
8. ``bench_optimizer --size 1b --blocks`` (where the optimizer time goes);
9. ``bench_model`` at 1b (with ``--remat`` if it runs out of memory).

and checks the targets: SPAM ≤ 1.05× optax.adamw and Stable-SPAM ≤ 1.35× per update at 1b
(on both layouts);
MFU ≥ 40% at 350m in bf16; the int4 step ≤ 1.3× the bf16 step; the trainer ≥ 2× the peer's
tokens/s at every size (ratios only between measurements of this run). Compilation is timed
apart from the steps. Each profile (``experiments.benchmarks.profile_summary``) says how long
the device was busy per call, how much it waited between kernels, and which ops took the
time: what a missed target needs to be explained without another run. While each part runs,
``nvidia-smi`` samples the GPU's clocks, power and clock-event reasons (``gpu_clocks``; the
trainer parts also while their steps are timed and traced): a step timed at a lower clock
than its profile ran at is told apart from a slower step.

``--out`` (default ``$OUT``) receives three files, rewritten after every part so that a run
stopped from outside keeps what it finished: ``accelerator.json`` (everything),
``accelerator.md`` (the tables) and ``accelerator-parts.tar.gz`` (each part's JSON and log,
the HLO text, the profile summaries and, while small, the raw traces). The parts work in
``--work`` (default: a new temporary folder).

  mkdir -p .peer && cp <path to>/torch_peer.py .peer/
  PYTHONPATH=. python -m experiments.benchmarks.accelerator --torch_peer .peer/torch_peer.py --out $OUT
  PYTHONPATH=. python -m experiments.benchmarks.accelerator --tiny --out /tmp/acc   # CPU, tiny sizes

The peer script is not part of this project; without it (or without torch, transformers or
a CUDA GPU) the peer is recorded as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable

from experiments import rundir
from experiments.benchmarks import gpu_clocks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = ("60m", "130m", "350m", "1b")
ARCHIVE = "accelerator-parts.tar.gz"
TARGETS = dict(spam_x_adamw=1.05, stable_spam_x_adamw=1.35, mfu_350m_bf16=0.40,
               int4_x_bf16=1.3, ours_x_peer=2.0)
# Print the device, the backend and the library versions, and measure the two ceilings every
# figure is read against: device-memory bandwidth (an element-wise pass over a large array,
# bytes read plus written) and the bf16 matrix-product rate (random operands), each the median
# of 10 calls. The parent never imports jax, so that it holds no accelerator memory while the
# parts run.
_PROBE = """
import json, platform, statistics, sys, time
from importlib import metadata
import jax
import jax.numpy as jnp
d = jax.devices()[0]
info = dict(backend=jax.default_backend(), device_kind=d.device_kind, devices=jax.device_count(),
            python=platform.python_version(), host=platform.node())
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "torch", "transformers"):
  try:
    info[name] = metadata.version(name)
  except metadata.PackageNotFoundError:
    info[name] = None
print("PROBE " + json.dumps(info), flush=True)

def median_s(f, *a):
  jax.block_until_ready(f(*a))
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)

def queued_s(f, *a, n=20):
  # Seconds per call of n calls dispatched back to back, only the last waited for (median
  # of 5 such runs): the device's time for calls of well under a millisecond, whose
  # waited-for time is mostly the launch and the wait.
  jax.block_until_ready(f(*a))
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(n):
      out = f(*a)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)

tiny = sys.argv[1] == "tiny"
skip = set(sys.argv[2].split(",")) if len(sys.argv) > 2 and sys.argv[2] else set()
n = 2**22 if tiny else 2**29  # float32 elements: 16 MiB or 2 GiB
x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
s = median_s(jax.jit(lambda x: x * 1.5 + 0.5), x)
info["copy_GBps"] = 2 * 4 * n / s / 1e9
del x
k = 512 if tiny else 8192
a, b = (jax.random.normal(key, (k, k), jnp.bfloat16)
        for key in jax.random.split(jax.random.key(1)))
s = median_s(jax.jit(lambda a, b: a @ b), a, b)
info["matmul_bf16_TFLOPs"] = 2 * k**3 / s / 1e12
print("PROBE " + json.dumps(info), flush=True)

# Random draws, one per parameter as an initialisation makes them, lowered both ways: XLA's
# expansion of threefry, then jax's GPU kernel (what experiments.jax_settings asks for).
shape = (64, 128) if tiny else (1024, 1024)
draws = {}
for kernel in (False, True):
  try:
    jax.config.update("jax_threefry_gpu_kernel_lowering", kernel)
  except AttributeError:  # a jax without the option: nothing to compare
    break
  f = jax.jit(lambda key: [jax.random.normal(k, shape) for k in jax.random.split(key, 16)])
  t0 = time.perf_counter()
  compiled = f.lower(jax.random.key(0)).compile()
  info["threefry_compile_s_" + ("kernel" if kernel else "xla")] = time.perf_counter() - t0
  draws[kernel] = [jax.device_get(x) for x in compiled(jax.random.key(0))]
if len(draws) == 2:
  info["threefry_kernel_same_bits"] = all(
      (a == b).all() for a, b in zip(draws[False], draws[True]))
  print("PROBE " + json.dumps(info), flush=True)

# The residual add + RMSNorm, forward and backward, as the Pallas kernels the models run on
# one GPU and as XLA compiles it: time of each, and how far apart their results.
if "norm" not in skip:
  try:
    from models.normalization import RMSNorm
    rows, width = (256, 96) if tiny else (16384, 1024)
    x, h, ds, dy = (jax.random.normal(k, (rows, width), jnp.bfloat16)
                    for k in jax.random.split(jax.random.key(2), 4))
    params = {"params": {"scale": jnp.ones((width,), jnp.float32)}}
    outs = {}
    for name in ("xla", "pallas"):
      norm = RMSNorm(1e-6, jnp.bfloat16, jnp.float32, implementation=name)
      f = lambda x, h, p, norm=norm: norm.apply(p, x, h)
      step = jax.jit(lambda x, h, p, f=f: (lambda o, vjp: (o, vjp((ds, dy))))(*jax.vjp(f, x, h, p)))
      info[f"norm_{name}_ms"] = 1e3 * queued_s(step, x, h, params)
      outs[name] = jax.device_get(step(x, h, params))
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                                           / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) or 1.0)),
                        outs["pallas"], outs["xla"])
    info["norm_pallas_max_rel_diff"] = max(jax.tree.leaves(diff))
  except Exception as e:  # recorded, not fatal: the parts say whether the models still run
    info["norm_pallas_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
print("PROBE " + json.dumps(info), flush=True)

# The loss over the vocabulary at the trainer's 64×256 tokens and 32000 entries, bf16 logits:
# the models' one-pass reduction (the running maximum, the sum of exponentials and the
# target's logit in one read) forward, and forward with backward, as XLA's lax.reduce; beside
# it the forward of jax.nn.logsumexp, which reads the logits twice (the maximum, then the
# sum). Then the same forward as the Pallas kernel (models.loss_kernels; an H200 ran XLA's
# at 1.27 TB/s inside the 350m step) with its tile (tokens a program, columns a block,
# warps), and three other tiles, each with its largest difference from XLA's loss.
if "loss" not in skip:
  try:
    from models import loss_kernels
    from models import loss
    from models.loss import token_nll
    tokens, vocab = (256, 512) if tiny else (16384, 32000)
    logits = jax.random.normal(jax.random.key(3), (tokens, vocab), jnp.bfloat16) * 4
    targets = jax.random.randint(jax.random.key(4), (tokens,), 0, vocab)
    def two_pass(x, t):
      x = x.astype(jnp.float32)
      return jax.nn.logsumexp(x, axis=-1) - jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]
    one_pass = lambda x, t: token_nll(x, t, "xla")
    for name, f in (("one_pass", one_pass), ("two_pass", two_pass)):
      info[f"loss_{name}_ms"] = 1e3 * queued_s(jax.jit(lambda x, t, f=f: jnp.sum(f(x, t))),
                                               logits, targets)
    info["loss_one_pass_grad_ms"] = 1e3 * queued_s(
        jax.jit(jax.grad(lambda x, t: jnp.sum(one_pass(x, t)))), logits, targets)
    info["loss_logits_GB"] = tokens * vocab * 2 / 1e9
    reference = jax.jit(one_pass)(logits, targets)
    info["loss_pallas_tile"] = list(loss_kernels.TILE)
    def pallas_nll(x, t, tile):
      m, s, picked = loss_kernels.softmax_stats(x, t, tile)
      return m + jnp.log(s) - picked
    for tile in dict.fromkeys((tuple(loss_kernels.TILE), (2, 2048, 8), (4, 2048, 8),
                               (1, 4096, 8), (2, 2048, 4))):
      if tile != loss_kernels.TILE and tiny:
        continue
      key = "" if tile == loss_kernels.TILE else "_{}x{}w{}".format(*tile)
      try:
        got = jax.jit(pallas_nll, static_argnums=2)(logits, targets, tile)
        info[f"loss_pallas{key}_max_rel_diff"] = float(
            jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
        info[f"loss_pallas{key}_ms"] = 1e3 * queued_s(
            jax.jit(lambda x, t, tile=tile: jnp.sum(pallas_nll(x, t, tile))), logits, targets)
      except Exception as e:
        info[f"loss_pallas{key}_error"] = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
  except Exception as e:
    info["loss_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
print("PROBE " + json.dumps(info), flush=True)

# The models' element-wise Pallas kernels each alone at the 350m trainer step's shapes (a
# layer's: 64×256 tokens, width 1024, MLP 2736, 16 heads of 64; the projections' float32
# kernels stacked into bf16), beside the XLA form each replaces, both jitted, and the
# largest difference of their results: each kernel's own decision, whatever the whole
# step's timing says of the set.
if "elementwise" not in skip:
  try:
    from models import attention as model_attention, elementwise_kernels, linears
    tokens, mlp, heads = (256, 96, 2) if tiny else (16384, 2736, 16)
    embed = heads * 64
    keys = jax.random.split(jax.random.key(5), 6)
    bf16 = lambda k, shape, scale=1.0: (scale * jax.random.normal(k, shape)).astype(jnp.bfloat16)
    gate_up, dh = bf16(keys[0], (tokens, 2, mlp), 3.0), bf16(keys[1], (tokens, mlp))
    batch = 64 if not tiny else 2
    qkv = bf16(keys[2], (batch, tokens // batch, 3, heads, 64))
    positions = jnp.broadcast_to(jnp.arange(tokens // batch), (batch, tokens // batch))
    cos, sin = model_attention.rope_frequencies(positions, 64)
    mlp_kernels = [jax.random.normal(k, (embed, mlp)) for k in jax.random.split(keys[3], 2)]
    qkv_kernels = [jax.random.normal(k, (embed, heads, 64)) for k in jax.random.split(keys[4], 3)]
    size = lambda *arrays: sum(a.size * a.dtype.itemsize for a in arrays)
    cases = {  # name: (XLA's form, the Pallas kernel, arguments, GB read + written)
        "swiglu": (lambda x: linears.swiglu(x, "xla"), elementwise_kernels.swiglu, (gate_up,),
                   size(gate_up) * 1.5),
        "swiglu_grad": (lambda x, g: linears._swiglu_grad_xla(x, g)[0],
                        elementwise_kernels.swiglu_grad, (gate_up, dh),
                        2 * size(gate_up) + size(dh)),
        "rope_split": (lambda x, c, s: model_attention.rope_qkv(x, c, s, "xla"),
                       elementwise_kernels.rope_split, (qkv, cos, sin),
                       2 * size(qkv) + size(cos, sin)),
        "rope_grad": (lambda dq, dk, dv, c, s: model_attention._rope_qkv_bwd(
                          "xla", (c, s), (dq, dk, dv))[0],
                      elementwise_kernels.rope_grad, tuple(qkv[:, :, i] for i in range(3)) + (
                          cos, sin), 2 * size(qkv) + size(cos, sin)),
        "stack_gate_up": (lambda *k: jnp.stack([x.astype(jnp.bfloat16) for x in k], axis=1),
                          lambda *k: elementwise_kernels.stack(k, jnp.bfloat16), mlp_kernels,
                          1.5 * size(*mlp_kernels)),
        "stack_qkv": (lambda *k: jnp.stack([x.astype(jnp.bfloat16) for x in k], axis=1),
                      lambda *k: elementwise_kernels.stack(k, jnp.bfloat16), qkv_kernels,
                      1.5 * size(*qkv_kernels)),
    }
    # RoPE's kernels with other tiles (elements of an array's tile, warps): the defaults hold
    # 216–220 registers a thread at 8192 elements and 4 warps, 56 at 2048 (compiled, H100).
    for name in ("rope_split", "rope_grad"):
      xla_form, kernel, args, nbytes = cases[name]
      default = (elementwise_kernels.ROPE_TILE if name == "rope_split"
                 else elementwise_kernels.ROPE_GRAD_TILE)
      for tile in ((8192, 4), (2048, 4), (4096, 8)):
        if tile != tuple(default):
          cases[f"{name}@{tile[0]}w{tile[1]}"] = (
              xla_form, lambda *a, kernel=kernel, tile=tile: kernel(*a, tile=tile), args, nbytes)
    # The loss's backward over the loss's logits above, g · (softmax − one_hot), if it made them.
    if "logits" in globals() and "loss" in globals():
      m, s, _ = loss._reduce(logits, targets)
      g = jnp.full(targets.shape, 1.0 / targets.size, jnp.float32)
      cases["softmax_grad"] = (lambda *a: loss._token_nll_bwd("xla", a[:4], a[4])[0],
                               loss_kernels.softmax_grad, (logits, targets, m, s, g),
                               2 * size(logits) + size(targets, m, s, g))
    if tiny:  # interpreted, each kernel's compile takes seconds: three, one of them a tile's
      cases = {k: v for k, v in cases.items() if k in ("swiglu", "rope_grad@8192w4",
                                                       "softmax_grad")}
    kernels = info["elementwise_kernels"] = {}
    xla_timed = {}  # XLA's form of each kernel, timed once for all of its tiles
    for name, (xla_form, kernel, args, nbytes) in cases.items():
      row = kernels[name] = {"GB": nbytes / 1e9}
      try:
        base = name.split("@")[0]
        if base not in xla_timed:
          f = jax.jit(xla_form)
          xla_timed[base] = (1e3 * queued_s(f, *args, n=1 if tiny else 20),  # interpreted: few
                             [x.astype(jnp.float32) for x in jax.tree.leaves(f(*args))])
        row["xla_ms"], want = xla_timed[base]
        f = jax.jit(kernel)
        row["pallas_ms"] = 1e3 * queued_s(f, *args, n=1 if tiny else 20)
        got = [x.astype(jnp.float32) for x in jax.tree.leaves(f(*args))]
        row["max_rel_diff"] = max(float(jnp.max(jnp.abs(a - r)) / (jnp.max(jnp.abs(r)) or 1.0))
                                  for a, r in zip(got, want))
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
  except Exception as e:
    info["elementwise_kernels_error"] = (
        f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
print("PROBE " + json.dumps(info), flush=True)

# Causal attention at the 350m step's shapes (64×256 tokens, 16 heads of 64, bf16), forward
# with backward, each as one jit: cuDNN's fused kernel (the models' choice on a GPU), XLA's,
# and the Pallas (Triton) flash attention jax ships in jax.experimental.pallas.ops.gpu as
# the models run it (models.attention.pallas_attention, interpreted on a CPU), with the
# models' blocks and three other choices of them. Each one's largest difference from XLA's,
# relative to XLA's largest value; the bytes fused kernels move at least: q, k, v read and o
# written forward, q, k, v, o, dO read and dq, dk, dv written backward.
if "attention" not in skip:
  try:
    b, l, h, hd = (2, 16, 2, 16) if tiny else (64, 256, 16, 64)
    q, k, v, do = (jax.random.normal(key, (b, l, h, hd), jnp.bfloat16)
                   for key in jax.random.split(jax.random.key(7), 4))
    gpu = jax.default_backend() == "gpu"
    from models import attention as model_attention
    default = model_attention.PALLAS_BLOCKS  # the model's; then other blocks of the same kernel
    backward = lambda n: dict(default, block_q_dkv=n, block_kv_dkv=n, block_q_dq=n, block_kv_dq=n)
    impls = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                 implementation="xla")}
    for name, blocks in (("pallas", default), ("pallas_bwd64", backward(64)),
                         ("pallas_bwd128", backward(128)),
                         ("pallas_all64", {n: 64 for n in default})):
      impls[name] = lambda q, k, v, blocks=blocks: model_attention.pallas_attention(q, k, v, blocks)
    if gpu:
      impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                    implementation="cudnn")
    outs = {}
    for name, f in impls.items():
      try:
        step = jax.jit(lambda q, k, v, do, f=f: (lambda o, vjp: (o, vjp(do)))(*jax.vjp(f, q, k, v)))
        info[f"attention_{name}_ms"] = 1e3 * queued_s(step, q, k, v, do)
        outs[name] = [x.astype(jnp.float32) for x in jax.tree.leaves(step(q, k, v, do))]
      except Exception as e:
        info[f"attention_{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    for name, leaves in outs.items():
      if name != "xla" and "xla" in outs:
        info[f"attention_{name}_max_rel_diff"] = max(
            float(jnp.max(jnp.abs(a - r)) / (jnp.max(jnp.abs(r)) or 1.0))
            for a, r in zip(leaves, outs["xla"]))
    info["attention_shape"] = [b, l, h, hd]
    info["attention_min_GB"] = 12 * b * l * h * hd * 2 / 1e9
  except Exception as e:
    info["attention_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
print("PROBE " + json.dumps(info), flush=True)
"""
# The probe's sections that --skip_probe may leave out.
PROBE_SECTIONS = ("norm", "loss", "elementwise", "attention")
# Bytes one update must move per float32 parameter at least: read p, g, m, v and write p, m, v
# (Adam, and SPAM, whose clip reads the v that Adam reads anyway); Stable-SPAM reads g twice
# more before its element-wise pass: for max |g| (AdaClip), then for the norm of the clipped
# leaf (AdaGN), which needs that max first.
FLOOR_BYTES_PER_PARAM = {"adamw": 28, "spam": 28, "stable_spam": 36}


@dataclasses.dataclass
class Part:
  """One subprocess: ``argv`` after the interpreter; at most ``cap_s``; needs ``min_s`` left."""
  name: str
  argv: list
  cap_s: float
  min_s: float
  json_file: str | None = None
  env: dict = dataclasses.field(default_factory=dict)
  retry_argv: list | None = None  # run once more with these arguments after running out of memory
  # environments to run with in turn, while XLA rejects a flag of the last one tried
  retry_envs: list = dataclasses.field(default_factory=list)
  result: dict = dataclasses.field(default_factory=dict)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT"),
                 help="output folder (default: $OUT)")
  p.add_argument("--work", default=None,
                 help="folder for the parts' JSON, logs, HLO and profiles (default: a new "
                      "temporary folder); all of it is also archived into --out")
  p.add_argument("--budget_s", type=float, default=420.0,
                 help="wall-clock budget of the whole run; parts that no longer fit are skipped")
  p.add_argument("--torch_peer", default=None,
                 help="path to the PyTorch peer script (torch_peer.py); none: peer skipped")
  p.add_argument("--tiny", action="store_true",
                 help="tiny sizes on whatever backend (a CPU test of the whole script)")
  p.add_argument("--sizes", default=",".join(SIZES),
                 help="bench_train / peer sizes (default: 60m,130m,350m,1b)")
  p.add_argument("--scan_layers", action="store_true",
                 help="the trainer and model parts with LlamaConfig.scan_layers (faster compile)")
  p.add_argument("--attention", default="auto", choices=("auto", "cudnn", "xla", "pallas"),
                 help="the trainer and model parts with this --attention (auto: the trainer's "
                      "default); the rows of another kernel than the default say which")
  p.add_argument("--parts", default=None,
                 help="run only the parts whose name starts with one of these (comma-separated: "
                      "peer, train, optimizer, model, hlo, blocks); the others are recorded as skipped")
  p.add_argument("--skip_parts", default=None,
                 help="leave out the parts whose name starts with one of these (comma-separated, "
                      "e.g. train_350m_xla_norm), recorded as skipped: what --parts selects, "
                      "less these")
  p.add_argument("--skip_probe", default="",
                 help="leave out these sections of the probe (comma-separated: "
                      f"{', '.join(PROBE_SECTIONS)}), e.g. in a second call whose first "
                      "measured them; the device and the ceilings are always probed")
  args = p.parse_args(argv)
  if not args.out:
    p.error("give --out DIR (or set $OUT)")
  unknown = sorted(set(filter(None, args.skip_probe.split(","))) - set(PROBE_SECTIONS))
  if unknown:
    p.error(f"--skip_probe: unknown sections {', '.join(unknown)} "
            f"(of {', '.join(PROBE_SECTIONS)})")
  if args.budget_s <= 0:
    p.error(f"--budget_s must be > 0, got {args.budget_s}")
  if args.torch_peer and not os.path.isfile(args.torch_peer):
    p.error(f"--torch_peer {args.torch_peer}: no such file")
  return args


def _module(name: str) -> list:
  return ["-m", f"experiments.benchmarks.{name}"]


def plan(args, work: str) -> list:
  """The parts in the order they run; each writes its JSON, profiles and HLO under ``work``."""
  js = lambda name: os.path.join(work, "parts", name + ".json")
  prof = lambda name: ["--profile", os.path.join(work, "profiles", name)]
  sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
  if args.tiny:
    train_sizes, model_sizes, model_late = ["9m"], ["9m"], []
    batch, length, steps, warmup = 2, 16, 2, 1
    train_steps = steps
    opt_size, opt_iters, block_iters = "tiny", ["--warmup", "1", "--iters", "2"], [
        "--warmup", "0", "--iters", "1"]
    dtype = "bfloat16"  # as on the device: bf16 logits by default, float32 in one part
    profiled_models, hlo_size = {"9m"}, "9m"
  else:
    train_sizes, model_sizes, model_late = sizes, ["350m", "60m"], ["1b"]
    batch, length, steps, warmup = 64, 256, 10, 2
    # The trainer's steps: 20, so that one slow step (one of 10 steps at 130m took 226 ms
    # on the third H200 run, the others 25.7) moves the median, which the target compares
    # with the peer's, not at all, and the mean beside it by half as much.
    train_steps = 20
    opt_size, opt_iters, block_iters = "1b", ["--warmup", "3", "--iters", "20"], [
        "--warmup", "2", "--iters", "10"]
    dtype = "bfloat16"
    profiled_models, hlo_size = {"350m", "60m"}, "350m"
  train_caps = {"60m": (60, 20), "130m": (60, 20), "350m": (90, 30), "1b": (150, 45)}
  # What every model and trainer part is run with; a variant's own flags come after it.
  layout = (["--scan_layers"] if args.scan_layers else []) + (
      ["--attention", args.attention] if args.attention != "auto" else [])
  model_caps = {"60m": (60, 20), "350m": (90, 30), "1b": (120, 50)}

  def model_part(size):
    argv = _module("bench_model") + [
        "--models", f"llama_{size}", "--quant", "bf16,int4", "--batch", str(batch),
        "--seq_len", str(length), "--steps", str(steps), "--warmup", str(warmup),
        "--json", js(f"model_{size}")] + layout + (
            prof(f"model_{size}") if size in profiled_models else [])
    cap, need = model_caps.get(size, (60, 10))
    return Part(f"model_{size}", argv, cap, need, js(f"model_{size}"),
                retry_argv=argv + ["--remat"] if size == "1b" else None)

  # The parts that decide the optimizer and MFU targets first, then the trainer beside its
  # peer, then the breakdowns; what the budget no longer fits is recorded as skipped.
  parts = []
  # The sparse SPAM as the trainer runs it (masks redrawn by the loop), and Stable-SPAM's
  # variants (bench_optimizer.stable_spam_variants): its statistics in two passes every step
  # (the library's before its norm and count were read off the max's pass; 3.38 ms of 13.16
  # at 3.17 TB/s on the fourth H200 run), the library in a step where no row is settled
  # (the second pass runs), and its passes reading each leaf in rows of 512. Reading only
  # the clipped rows again (13.94 ms) and the hand-fused reference (2.14× adamw) were
  # slower on an H200, and the in-update redraw (3.19×) made the host wait on its
  # conditional; they stay out of this part. SPAM's float32 count in the rows before the
  # rows of 128 was settled on the fourth H200 run (9.73 ms against the library's 9.43):
  # only the bf16 part below times it.
  parts.append(Part("optimizer", _module("bench_optimizer") + [
      "--size", opt_size, "--sequential", "--optimizers",
      "spam,stable_spam,stable_spam (two statistics passes),"
      "stable_spam (every row read again),stable_spam (statistics in rows of 512),"
      "spam d=0.25 (loop redraw)",
      "--json", js("optimizer")]
      + opt_iters + prof("optimizer"), 150, 40, js("optimizer")))
  # The update as the bf16 trainer runs it, at its deciding size: parameters and moments in
  # bf16, which XLA:GPU loads 4 at a time (8 bytes, where float32 loads 16), writing them
  # in place. In the third H200 run the 350m step's reductions, SPAM's update most of
  # them, moved ≈ 6.4 GB in ≈ 4 ms (≈ 1.6 TB/s): this part times adamw's and spam's bf16
  # updates alone, with each kernel category's rate in their profiles, and SPAM's moments
  # without its clip (statically off: no clip count, so no reduction in the update's
  # kernels) to tell the count's reduction from bf16's loads, and SPAM with its count in
  # the rows before the rows of 128: compiled for an H100, those gave the update's kernels
  # 8-byte loads and 16 entries a thread on a quarter to a half of the threads.
  parts.append(Part("optimizer_bf16", _module("bench_optimizer") + [
      "--size", "tiny" if args.tiny else "350m", "--dtype", "bfloat16", "--sequential",
      "--optimizers", "spam,spam (count rows as before),scale_by_spam (no clip)",
      "--json", js("optimizer_bf16")]
      + opt_iters + prof("optimizer_bf16"), 90, 30, js("optimizer_bf16")))
  parts += [model_part(s) for s in model_sizes]
  def model_variant(size, suffix, flags):
    """The bf16 model step at ``size`` again with ``flags`` (no profile): its own part."""
    name = f"model_{size}_{suffix}"
    return Part(name, _module("bench_model") + [
        "--models", f"llama_{size}", "--quant", "bf16"] + layout + flags + [
        "--batch", str(batch), "--seq_len", str(length), "--steps", str(steps), "--warmup",
        str(warmup), "--json", js(name)],
        *model_caps.get(size, (60, 10)), js(name))

  # The smaller model's bf16 step again with XLA's residual add + RMSNorm: what the Pallas
  # norm kernels (the default on one GPU) gain, measured beside them in the same run.
  parts.append(model_variant(model_sizes[-1], "xla_norm", ["--norm", "xla"]))
  # The larger model's bf16 step with XLA's RoPE split, SwiGLU, projections' stacks
  # and loss reduction instead of the Pallas kernels (the default on one GPU): what they gain, beside them.
  # (Compiled for an H100, they load and store 16 bytes at a time where XLA's kernels loaded
  # part of their operands two or four bytes at a time; SwiGLU's backward ran at 2.66 TB/s
  # on an H200, the loss's reduction at 1.27.)
  parts.append(model_variant(model_sizes[0], "xla_elementwise", ["--elementwise", "xla"]))
  # The larger model's bf16 step with jax's Pallas flash attention instead of cuDNN's: at
  # 256 tokens and head_dim 64, cuDNN's forward and backward moved 1.45 TB/s on an H200 (6.7
  # of the 350m step's 74 ms). (XLA's attention moves 9× the bytes, compiled for an H100;
  # the probe times it alone.)
  parts.append(model_variant(model_sizes[0], "pallas_attention", ["--attention", "pallas"]))
  peer_sizes = "9m" if args.tiny else ",".join(train_sizes)
  peer = [os.path.abspath(args.torch_peer or "torch_peer.py"), "--sizes", peer_sizes,
          "--batch", str(batch), "--length", str(length)] + (
              ["--warmup", "1", "--iters", "2"] if args.tiny else [])
  parts.append(Part("peer", peer, 150, 30, env={"OUT": os.path.join(work, "parts", "peer")}))
  # XLA_FLAGS with ``flags`` added to the environment's. Every profiled trainer step keeps
  # its CUDA graphs while traced (GRAPHS_WHEN_PROFILED), so that its profile is of the step
  # as timed.
  with_flags = lambda *flags: {"XLA_FLAGS": " ".join(filter(None, [
      os.environ.get("XLA_FLAGS"), GRAPHS_WHEN_PROFILED, *flags]))}
  for size in train_sizes:
    name = f"llama_{size}"
    argv = _module("bench_train") + [
        "--models", name, "--optimizers", "spam", "--dtype", dtype, "--batch", str(batch),
        "--length", str(length), "--steps", str(train_steps), "--warmup", str(warmup),
        "--no_loader", "--json", js(f"train_{size}")] + layout + prof(f"train_{size}")
    if size == hlo_size:  # the compiled step's HLO: kernels, cuDNN attention, donation
      argv += ["--hlo", os.path.join(work, "hlo")]
    cap, need = train_caps.get(size, (60, 10))
    parts.append(Part(f"train_{size}", argv, cap, need, js(f"train_{size}"), env=with_flags(),
                      retry_argv=argv + ["--activation_checkpointing"] if size == "1b" else None))

  def train_variant(size, suffix, flags, env=None, profiled=False):
    """The trainer step at ``size`` again with ``flags`` (and ``env``): its own part and
    row, profiled if asked."""
    name = f"train_{size}_{suffix}"
    return Part(name, _module("bench_train") + [
        "--models", f"llama_{size}", "--optimizers", "spam", "--dtype", dtype, "--batch",
        str(batch), "--length", str(length), "--steps", str(train_steps), "--warmup",
        str(warmup), "--no_loader"] + layout + flags + ["--json", js(name)] + (prof(name) if profiled else []),
        *train_caps.get(size, (60, 10)), js(name), env=env or {})

  f32_logits_part = lambda size: train_variant(size, "f32_logits", ["--logits_dtype", "float32"])
  deciding = "350m" if "350m" in train_sizes else train_sizes[-1]
  # The size that decides the trainer target again with XLA's RoPE split, SwiGLU backward,
  # projections' stacks and loss reduction: whether the Pallas kernels (the default on one GPU) make the step
  # faster, measured first among the variants, as it decides that default.
  parts.append(train_variant(deciding, "xla_elementwise", ["--elementwise", "xla"]))
  # The size that decides the trainer target again with its CUDA graph never updated,
  # profiled in flight. On the H200 its step in flight took 79.6 ms, the waited-for step's
  # best (79.5), while its 3-step trace in flight ran one every 76.3 ms; the host spent 3.2
  # ms a step updating the graph (0.17 ms with each step waited for) and 5.2 ms in
  # cuGraphLaunch. XLA:GPU re-records the graph's nodes whose buffer addresses changed since
  # its last launch, which with one step in flight (its temporary buffers still held) may be
  # most of them every step. NEVER_UPDATE ("the VA remapping update strategy for command
  # buffer thunks", XLA's help text) keeps the graph as recorded and places the buffers at
  # its addresses, with XLA's CUDA virtual-memory allocator.
  never_updated = train_variant(deciding, "graphs_never_updated", [],
                                env=with_flags(GRAPHS_NEVER_UPDATED), profiled=True)
  never_updated.retry_envs = [with_flags(flag) for flag in GRAPHS_REMAPPED]
  parts.append(never_updated)
  # ... and as two executables of the step run in turn (`bench_train.alternating`): each
  # finds its temporary buffers where its own last step had them, so its graph needs no
  # update, with no flag of XLA's.
  parts.append(train_variant(deciding, "two_executables", ["--two_executables"],
                             env=with_flags(), profiled=True))
  # ... and without CUDA graphs (XLA:GPU launching each kernel): on the H200 78.4 ms in
  # flight, the device busy 77.0 ms of it.
  parts.append(train_variant(deciding, "no_cuda_graphs", [], env=with_flags(NO_CUDA_GRAPHS),
                             profiled=True))

  # The smallest trainer step again with float32 logits (--logits_dtype float32; the default
  # follows the compute dtype, bf16 as HF LLaMA in bf16 computes them): at 60m the head's
  # float32 logits and their gradient add a fifth to the step's bytes, so the two rows say
  # what the head's traffic costs. The next size follows the scanned optimizer below.
  parts.append(f32_logits_part(train_sizes[0]))
  parts.append(Part("optimizer_scan", _module("bench_optimizer") + [
      "--size", opt_size, "--scan_layers", "--optimizers", "spam,stable_spam", "--sequential",
      "--json", js("optimizer_scan")] + opt_iters + prof("optimizer_scan"), 100, 30,
      js("optimizer_scan")))
  # 130m: with 350m the size whose compiled step leaves the least margin under half the
  # peer's reference time, and the one where the logits' dtype weighs most after 60m.
  parts += [f32_logits_part(size) for size in train_sizes[1:2]]
  # The deciding size with XLA's residual add + RMSNorm: on an H200 the Pallas kernels made
  # its step 3.9% faster (78.8 against 82.0 ms), so it runs only where the budget is left.
  parts.append(train_variant(deciding, "xla_norm", ["--norm", "xla"]))
  parts.append(Part("hlo_optimizer", _module("hlo_stats") + [
      "--what", "optimizer", "--size", opt_size, "--optimizer", "spam",
      "--json", js("hlo_optimizer"), "--dump", os.path.join(work, "hlo")], 60, 20,
      js("hlo_optimizer")))
  parts.append(Part("blocks", _module("bench_optimizer") + [
      "--size", opt_size, "--sequential", "--blocks", "--json", js("blocks")] + block_iters,
      150, 60, js("blocks")))
  parts += [model_part(s) for s in model_late]
  if args.tiny:  # a loaded CPU: only the budget limits the parts
    for part in parts:
      part.cap_s, part.min_s = args.budget_s, 1
  return parts


def _peer_skip_reason(args, probe: dict) -> str | None:
  if not args.torch_peer:
    return "no --torch_peer given (the peer script is not part of the project)"
  for module in ("torch", "transformers"):
    if importlib.util.find_spec(module) is None:
      return f"{module} is not installed"
  if probe.get("backend") != "gpu":
    return f"no CUDA GPU (jax backend: {probe.get('backend', 'unknown')})"
  return None


# How often the GPU's clocks are sampled while a part runs (``gpu_clocks``; the trainer
# samples its own timed steps more often).
PART_CLOCKS_MS = 200


def run_part(part: Part, timeout_s: float, logs_dir: str, env: dict) -> dict:
  """Runs one part; returns its status, wall time, the GPU's clocks meanwhile
  (``gpu_clocks``: the whole part, compilation included), the ``XLA_FLAGS`` it ran with
  and, on failure, the log's last line."""
  cmd = [sys.executable] + part.argv
  log_path = os.path.join(logs_dir, part.name + ".log")
  t0 = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    log.write("$ " + shlex.join(cmd) + "\n")
    log.flush()
    with gpu_clocks.sampling(interval_ms=PART_CLOCKS_MS) as clocks:
      proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **part.env}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
      try:
        rc = proc.wait(timeout=timeout_s)
        status = "ok" if rc == 0 else "failed"
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the part's own process group (start_new_session)
        proc.wait()
        rc, status = None, "timeout"
  wall_s = time.perf_counter() - t0
  with open(log_path, encoding="utf-8", errors="replace") as f:
    text = f.read()
  result = dict(status=status, rc=rc, wall_s=round(wall_s, 1), limit_s=round(timeout_s, 1),
                cmd=shlex.join(cmd), log=os.path.relpath(log_path, os.path.dirname(logs_dir)),
                gpu_clocks=clocks.summary())
  flags = {**env, **part.env}.get("XLA_FLAGS")
  if flags:
    result["xla_flags"] = flags
  if status != "ok":
    lines = [l for l in text.splitlines() if l.strip()]
    if _oom(text):
      result["reason"] = "out of memory"
    elif REJECTED_FLAG in text:  # XLA prints its whole list of flags after this line
      result["reason"] = f"{REJECTED_FLAG} in XLA_FLAGS={part.env.get('XLA_FLAGS', '')!r}"
    else:
      result["reason"] = lines[-1][:300] if lines else ""
  result["stdout"] = text
  return result


def run_with_retry(part: Part, left: Callable[[], float], logs_dir: str, env: dict) -> dict:
  """Runs ``part`` within what is ``left()`` of the budget, and again where it failed for a
  reason it has a retry for: out of memory (``retry_argv``, once), or a flag XLA rejected
  (``retry_envs``, each in turn until XLA accepts one); ``retried_after`` then says why."""
  result = run_part(part, min(part.cap_s, left()), logs_dir, env)
  reason = result.get("reason", "") if result["status"] == "failed" else None
  if reason == "out of memory" and part.retry_argv and left() >= part.min_s:
    first, part.argv = result, part.retry_argv
    result = run_part(part, min(part.cap_s, left()), logs_dir, env)
    result["retried_after"] = "out of memory: " + first["cmd"]
    return result
  rejected = []
  for retry_env in part.retry_envs:
    if not (reason and reason.startswith(REJECTED_FLAG)) or left() < part.min_s:
      break
    rejected.append(reason)
    part.env = retry_env
    result = run_part(part, min(part.cap_s, left()), logs_dir, env)
    result["retried_after"] = "; ".join(rejected)
    reason = result.get("reason", "") if result["status"] == "failed" else None
  return result


def _oom(text: str) -> bool:
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OutOfMemoryError"))


def _read_json(path: str | None):
  if not path or not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _peer_rows(part: Part) -> list:
  """The peer's JSON lines from its output (kept even when it was stopped part-way)."""
  rows = []
  for line in part.result.get("stdout", "").splitlines():
    line = line.strip()
    if line.startswith("{") and '"size"' in line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def collect(parts: dict) -> dict:
  """Results of every part and the targets they decide."""
  res = {"optimizer": None, "optimizer_scan": None, "optimizer_bf16": None, "blocks": None,
         "model": [], "train": [], "peer": [], "hlo": []}
  for name in ("optimizer", "optimizer_scan", "optimizer_bf16"):
    if name in parts:
      res[name] = _read_json(parts[name].json_file)
  if "blocks" in parts:
    res["blocks"] = _read_json(parts["blocks"].json_file)
  for name, part in parts.items():
    data = _read_json(part.json_file)
    # A part that measures a step again another way (XLA's norm beside the Pallas kernels,
    # ...): its rows are tagged, so that no target takes them for the default step.
    variant = variant_of(name)
    tag = {"variant": variant} if variant else {}
    if name.startswith("model_") and data:
      res["model"] += [{**r, **tag} for r in data]
    if name.startswith("train_") and data:
      res["train"] += [{**r, **tag} for r in data["steps"]]
      res["hlo"] += [{**r["hlo"], "what": f"train-{r['model']}-{r['optimizer']}"}
                     for r in data["steps"] if r.get("hlo")]
    if name.startswith("hlo_") and data:
      res["hlo"].append(data)
  if "peer" in parts:
    res["peer"] = _peer_rows(parts["peer"])
  res["targets"] = targets(res)
  return res


def _status(value, limit, at_most: bool) -> str:
  if value is None:
    return "not measured"
  return "met" if (value <= limit if at_most else value >= limit) else "missed"


def device_ms(row: dict) -> float | None:
  """An update's device time: its profile's busy ms per call, where it was profiled."""
  profile = row.get("profile") or {}
  return profile.get("busy_ms_per_call") if profile.get("source") == "gpu" else None


def update_ratio(row: dict, adamw: dict) -> tuple[float | None, str]:
  """An update's time over optax.adamw's, and a note on what was compared.

  On the device's profile where both updates have one: the kernels' busy time. Timed from
  the host, an update of a per-layer tree (~900 arrays in and out) can be bound by its
  dispatch rather than by the device (on the H200, adamw's 1B update: 14.8 ms a call in
  flight for 9.3 ms of kernels), which a training step, whose one dispatch launches the
  model and the update, does not pay per update. Otherwise one update in flight, as a
  training loop runs, and last each update waited for (which adds the same host launch to
  both and so flatters the slower update).
  """
  mine, theirs = device_ms(row), device_ms(adamw)
  if mine and theirs:
    return mine / theirs, "device time"
  if row.get("x_adamw_in_flight"):
    return row["x_adamw_in_flight"], ""
  return row.get("x_adamw"), "waited-for updates" if row else ""


def targets(res: dict) -> list:
  """One row per target and size: value, limit, met / missed / not measured."""
  rows = []

  def add(name, value, limit, at_most, note=""):
    rows.append(dict(target=name, value=value, limit=limit, at_most=at_most,
                     status=_status(value, limit, at_most), note=note))

  for part, layout in (("optimizer", ""), ("optimizer_scan", ", scanned layers")):
    if part == "optimizer_scan" and not res.get(part):
      continue  # a supplement: no row unless it ran
    opt = {r["name"]: r for r in (res[part] or {}).get("optimizers", [])}
    size = (res[part] or {}).get("size", "1b")
    for key, name in (("spam", "spam_x_adamw"), ("stable_spam", "stable_spam_x_adamw")):
      row = opt.get(key, {})
      value, note = update_ratio(row, opt.get("adamw", {}))
      add(f"{key} update ÷ optax.adamw ({size}{layout})", value, TARGETS[name], True, note)
  bf16 = {r["model"]: r for r in res["model"] if r["quant"] == "bf16" and not r.get("variant")}
  add("MFU, llama_350m bf16", bf16.get("llama_350m", {}).get("mfu"), TARGETS["mfu_350m_bf16"],
      False)
  for r in res["model"]:
    if r["quant"] == "int4" and r["model"] in bf16:
      add(f"int4 step ÷ bf16 step, {r['model']}", r["step_s"] / bf16[r["model"]]["step_s"],
          TARGETS["int4_x_bf16"], True)
  peer = {"llama_" + p["size"]: p for p in res["peer"] if "tokens_per_s" in p}
  for r in res["train"]:
    p = peer.get(r["model"])
    add(f"trainer tokens/s ÷ PyTorch peer, {train_label(r)}",
        peer_ratio(r, p) if p else None, TARGETS["ours_x_peer"], False,
        "" if p else "no peer measurement in this run")
  return rows


def peer_ratio(ours: dict, peer: dict) -> float:
  """Our tokens/s over the peer's, each from its median step: ours in flight (as the
  trainer runs), the peer's waited for (as it times its steps). Without a median (an older
  record), from our mean step."""
  median = ours.get("step_s_in_flight_median")
  if median:
    return peer["step_ms"] / (1e3 * median)
  return ours["tokens_per_s"] / peer["tokens_per_s"]


# Parts that measure a step again another way, by the suffix of their name: their rows are
# tagged with the label and never decide a target.
VARIANTS = {
    "_xla_norm": "XLA norm",            # XLA's residual add + RMSNorm beside the Pallas kernels
    "_xla_elementwise": "XLA element-wise",  # XLA's RoPE split, SwiGLU backward, stacks, loss
    "_pallas_attention": "Pallas attention",  # jax's Pallas flash attention beside cuDNN's
    "_no_cuda_graphs": "no CUDA graphs",  # XLA:GPU launching each kernel itself
    "_graphs_never_updated": "CUDA graphs never updated",  # buffers remapped instead
    "_two_executables": "two executables in turn",  # each keeps its buffers' addresses
}
NO_CUDA_GRAPHS = "--xla_gpu_enable_command_buffer="
GRAPHS_NEVER_UPDATED = "--xla_gpu_command_buffer_update_mode=NEVER_UPDATE"
# The same in later XLAs, which removed NEVER_UPDATE and reject it (jax 0.11.2 on the third
# H200 run). Their modes give chosen allocations of the graph one reserved address each (CUDA
# virtual-memory remapping), so the nodes reading them are never updated: SKIP_PROFILED
# every allocation whose address the first executions saw change, parameters and outputs
# included; SKIP_TEMP the temporaries (both in jax 0.11.2's XLA); VMM_PERSISTENT_TEMP the
# temporaries, in the XLAs between. Tried in this order until one is accepted.
GRAPHS_REMAPPED = tuple(f"--xla_gpu_command_buffer_update_mode={mode}"
                        for mode in ("SKIP_PROFILED", "SKIP_TEMP", "VMM_PERSISTENT_TEMP"))
# What an XLA that does not know a flag (or its value) in XLA_FLAGS prints before exiting.
REJECTED_FLAG = "Flag parsing failed"
# XLA:GPU runs a command buffer's kernels one by one while a profiler is active, unless told
# otherwise (`xla_enable_command_buffers_during_profiling`, false by default in XLA's flags).
GRAPHS_WHEN_PROFILED = "--xla_enable_command_buffers_during_profiling=true"


def variant_of(part_name: str) -> str | None:
  """The label of a variant part (``VARIANTS``), or None for a part measuring the default."""
  return next((label for suffix, label in VARIANTS.items() if part_name.endswith(suffix)), None)


def train_label(row: dict) -> str:
  """The model of a trainer row and what sets it apart: remat, scanned layers, float32 logits
  in a bf16 run (the default logits follow the compute dtype), XLA's attention (asked for,
  or after cuDNN's failed: ``attention_fallback``), the variant of a part that measures the
  step again another way (``VARIANTS``)."""
  f32_logits = row.get("logits_dtype") == "float32" and row.get("dtype") != "float32"
  return row["model"] + _tags(row, ("float32 logits", f32_logits))


def _tags(row: dict, *extra) -> str:
  """`` (remat) (scan)``, the ``extra`` (tag, on) pairs, `` (XLA attention)`` or
  `` (Pallas attention)`` and the variant's label, for those that apply to a trainer or model
  row."""
  variant = row.get("variant")
  return "".join(f" ({tag})" for tag, on in (
      ("remat", row.get("remat")), ("scan", row.get("scan_layers")), *extra,
      ("XLA attention", row.get("attention") == "xla"),
      ("Pallas attention", row.get("attention") == "pallas" and variant != "Pallas attention"),
      (variant, variant is not None)) if on)


def floor_ms(name: str, params: int, dtype: str | None, copy_gbps: float | None):
  """The update's memory-bandwidth floor in ms, where it is defined (float32, dense)."""
  per_param = FLOOR_BYTES_PER_PARAM.get(name)
  if not per_param or not copy_gbps or dtype not in (None, "float32"):
    return None
  return 1e3 * params * per_param / (copy_gbps * 1e9)


def profile_lines(res: dict) -> list:
  """The table of where the device time goes, from every profiled measurement."""
  rows = []
  for r in (res["optimizer"] or {}).get("optimizers", []):
    rows.append((f"update {r['name']}", r.get("profile")))
  for r in (res.get("optimizer_scan") or {}).get("optimizers", []):
    rows.append((f"update {r['name']}, scanned layers", r.get("profile")))
  bf16_opt = res.get("optimizer_bf16") or {}
  for r in bf16_opt.get("optimizers", []):
    rows.append((f"update {r['name']}, {bf16_opt.get('size')} bf16", r.get("profile")))
  for r in res["model"]:
    rows.append((f"fwd+bwd {r['model']} {r['quant']}", r.get("profile")))
  for r in res["train"]:
    rows.append((f"train step {train_label(r)} {r['optimizer']}", r.get("profile")))
  rows = [(n, p) for n, p in rows if p]
  if not rows:
    return []
  lines = ["", "## Where the device time goes (jax.profiler trace of a few calls)", "",
           "Busy: the union of the kernels' intervals per call; busy ÷ span below 1 is time "
           "the device waited between kernels (launches, host work).", "",
           "| measured | kernels/call | busy ms | busy ÷ span | by category (ms; the rate at "
           "which its kernels together moved the HLO's bytes) | largest ops "
           "(ms, share of kernel time, the rate at which it moved the HLO's bytes) |",
           "|---|---:|---:|---:|---|---|"]
  for name, p in rows:
    if p.get("error") or not p.get("source"):
      lines.append(f"| {name} | | | | profile failed: {_cell(p.get('error', '?'))} | |")
      continue
    span = p.get("span_ms_per_call")
    rates = p.get("category_GBps") or {}
    cats = ", ".join(f"{k} {v:.2f}" + (f" ({rates[k]:,.0f} GB/s)" if rates.get(k) else "")
                     for k, v in sorted(p.get("categories", {}).items(),
                                        key=lambda kv: -kv[1])[:4])
    top = ", ".join(f"{_cell(t['op'])} {t['ms_per_call']:.2f} ({t['share']:.0%}"
                    + (f", {t['GBps']:,.0f} GB/s" if t.get("GBps") else "") + ")"
                    for t in p.get("top", [])[:4])
    lines.append(f"| {name} | {_f(p.get('kernels_per_call'), '{:.0f}')} | "
                 f"{_f(p.get('busy_ms_per_call'), '{:.2f}')} | "
                 f"{_f(p['busy_ms_per_call'] / span if span else None, '{:.2f}')} | "
                 f"{cats} | {top} |")
  return lines


def in_flight_lines(res: dict) -> list:
  """The table of the trainer steps traced in flight: how long the device waits between two
  steps of the running loop (the host's launch of a step that the previous one did not
  hide), beside the timed step."""
  rows = [r for r in res["train"]
          if (r.get("profile_in_flight") or {}).get("source")]
  if not rows:
    return []
  lines = ["", "## Trainer steps in flight (jax.profiler trace, one step in flight)", "",
           "Period: the trace's first kernel start to its last kernel end, per step; idle "
           "between steps: the period less each step's own span.", "",
           "Timed: the mean of the timed steps in flight, then their median and longest "
           "(a mean above the median comes from a few slow steps).", "",
           "SM MHz: the GPU's median SM clock while the steps were timed in flight, then "
           "while they were traced (`nvidia-smi`; a step timed at a lower clock than it was "
           "traced at takes longer than the trace's period).", "",
           "| step | timed ms | median / longest ms | period ms | busy ms | span ms | "
           "idle between steps ms | SM MHz timed / traced |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    p = r["profile_in_flight"]
    spread = (f"{1e3 * r['step_s_in_flight_median']:.2f} / "
              f"{1e3 * r['step_s_in_flight_max']:.2f}"
              if r.get("step_s_in_flight_median") is not None else "–")
    lines.append(f"| {train_label(r)} {r['optimizer']} | {1e3 * r['step_s']:.2f} | {spread} | "
                 f"{p['period_ms_per_call']:.2f} | {p['busy_ms_per_call']:.2f} | "
                 f"{p['span_ms_per_call']:.2f} | {p['between_ms_per_call']:.2f} | "
                 f"{_mhz(r.get('gpu_clocks_in_flight'))} / {_mhz(p.get('gpu_clocks'))} |")
  hosts = [(r, r["profile_in_flight"].get("host_top")) for r in rows]
  if any(top for _, top in hosts):
    lines += ["", "The host's longest events per step in flight (inclusive ms, × count):", ""]
    for r, top in hosts:
      if top:
        lines.append(f"- {train_label(r)} {r['optimizer']}: " + "; ".join(
            f"`{_cell(e['name'])[:60]}` {e['ms_per_call']:.2f} (×{e['count_per_call']:g})"
            for e in top[:HOST_EVENTS_LISTED]))
  return lines


HOST_EVENTS_LISTED = 16  # per trainer row of the in-flight table


def gc_lines(res: dict) -> list:
  """The table of Python's collector beside each trainer step: a full pass over the heap
  (the pause automatic collection puts into a step), the trainer's scheduled pass with the
  heap frozen, and the passes that ran while the steps were timed."""
  rows = [r for r in res["train"] if r.get("gc")]
  if not rows:
    return []
  lines = ["", "## Python's garbage collector beside the trainer steps", "",
           "Full pass: one `gc.collect()` over the process's heap after compilation, what "
           "automatic collection stalls a step for when it reaches the oldest generation; "
           "scheduled: the trainer's pass every `--gc_every` steps with the heap frozen "
           "(`experiments/gc_policy.py`); while timed: the passes during the timed steps in "
           "flight (generations 0 / 1 / 2) and the longest, with its call.", "",
           "| step | --gc_every | full pass ms | scheduled pass ms | passes while timed | "
           "longest ms (call) |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    g = r["gc"]
    timed = g.get("in_flight") or {}
    passes = " / ".join(str(timed.get("passes", {}).get(k, 0)) for k in ("0", "1", "2"))
    longest = timed.get("longest")
    longest = "–" if not longest else f"{1e3 * longest['s']:.1f} ({longest['step']})"
    scheduled = g.get("scheduled_collection_s")
    lines.append(f"| {train_label(r)} {r['optimizer']} | {g['every']} | "
                 f"{1e3 * g['full_collection_s']:.1f} | "
                 f"{'–' if scheduled is None else f'{1e3 * scheduled:.1f}'} | {passes} | "
                 f"{longest} |")
  return lines


def _mhz(clocks: dict | None) -> str:
  """A sampled median SM clock, or – where none was sampled."""
  mhz = (clocks or {}).get("sm_mhz_median")
  return "–" if mhz is None else f"{mhz:.0f}"


def _cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")[:120]


def _f(x, fmt="{:.1f}", none="–"):
  return none if x is None else fmt.format(x)


def loss_line(env: dict, tiny: bool) -> str | None:
  """The probe's loss timings as one line of the report (None if it timed none)."""
  if env.get("loss_one_pass_ms") is None:
    return (f"**The loss failed in the probe:** {_cell(env['loss_error'])}"
            if env.get("loss_error") else None)
  gb = env["loss_logits_GB"]
  rate = lambda ms: f"{ms:.3f} ms ({gb / ms * 1e3:,.0f} GB/s of logits read)"
  line = (f"**Loss over the vocabulary** ({'256×512' if tiny else '16384×32000'} bf16 "
          f"logits, {gb:.2f} GB): forward, one pass {rate(env['loss_one_pass_ms'])}, "
          f"`jax.nn.logsumexp` (two reads) {rate(env['loss_two_pass_ms'])}; forward and "
          f"backward {env['loss_one_pass_grad_ms']:.3f} ms.")
  pallas = []
  keys = [k for k in env if k.startswith("loss_pallas") and k.endswith(("_ms", "_error"))]
  for key in sorted(keys, key=lambda k: (k not in ("loss_pallas_ms", "loss_pallas_error"), k)):
    name = key[len("loss_pallas"):].rsplit("_", 1)[0].lstrip("_")
    if name == "" and env.get("loss_pallas_tile"):
      name = "{}x{}w{}".format(*env["loss_pallas_tile"])
    label = f"tile {name} (tokens × columns, warps)"
    if key.endswith("_error"):
      pallas.append(f"{label} failed: {_cell(env[key])}")
    else:
      diff = env.get(key[:-len("_ms")] + "_max_rel_diff")
      pallas.append(f"{label} {rate(env[key])}"
                    + (f", max rel. diff from XLA's {diff:.1e}" if diff is not None else ""))
  if pallas:
    line += " Forward as the Pallas kernel: " + "; ".join(pallas) + "."
  return line


def elementwise_line(env: dict) -> str | None:
  """The probe's element-wise kernels, each alone beside XLA's form, as one line of the report
  (None if it timed none)."""
  kernels = env.get("elementwise_kernels")
  if not kernels:
    return (f"**The element-wise kernels failed in the probe:** "
            f"{_cell(env['elementwise_kernels_error'])}"
            if env.get("elementwise_kernels_error") else None)

  def one(name, row):
    if row.get("error"):
      return f"`{name}` failed: {_cell(row['error'])}"
    rate = lambda ms: f"{ms:.3f} ms ({row['GB'] / ms * 1e3:,.0f} GB/s)"
    return (f"`{name}` ({row['GB']:.3f} GB) Pallas {rate(row['pallas_ms'])}, XLA "
            f"{rate(row['xla_ms'])}, Pallas ÷ XLA {row['pallas_ms'] / row['xla_ms']:.2f}, "
            f"largest difference {row['max_rel_diff']:.1e}")

  return ("**The models' element-wise kernels, each alone** (one layer of the 350m step; "
          "bytes read + written): " + "; ".join(one(n, r) for n, r in kernels.items()) + ".")


_ATTENTION_LABELS = {"cudnn": "cuDNN", "pallas": "Pallas (Triton; the model's blocks)",
                     "pallas_bwd64": "Pallas (backward blocks of 64)",
                     "pallas_bwd128": "Pallas (backward blocks of 128)",
                     "pallas_all64": "Pallas (all blocks of 64)", "xla": "XLA"}


def attention_line(env: dict) -> str | None:
  """The probe's attention timings as one line of the report (None if it timed none)."""
  timed = [n for n in _ATTENTION_LABELS if env.get(f"attention_{n}_ms") is not None]
  if not timed:
    return (f"**Attention failed in the probe:** {_cell(env['attention_error'])}"
            if env.get("attention_error") else None)
  b, l, h, hd = env["attention_shape"]
  gb = env["attention_min_GB"]

  def one(n):
    ms, diff = env[f"attention_{n}_ms"], env.get(f"attention_{n}_max_rel_diff")
    return (f"{_ATTENTION_LABELS[n]} {ms:.3f} ms ({gb / ms * 1e3:,.0f} GB/s"
            + (f", largest difference {diff:.1e}" if diff is not None else "") + ")")

  failed = "".join(f"; {_ATTENTION_LABELS[n]} failed: {_cell(env[f'attention_{n}_error'])}"
                   for n in _ATTENTION_LABELS if env.get(f"attention_{n}_error"))
  return (f"**Causal attention, forward and backward** ({b}×{l} tokens, {h} heads of {hd}, "
          f"bf16; one layer, the least fused kernels move is {gb:.3f} GB): "
          f"{', '.join(one(n) for n in timed)}{failed}.")


def trainer_lines(res: dict) -> list:
  """The table of our trainer steps beside the peer's, one row per size or variant."""
  if not (res.get("train") or res.get("peer")):
    return []
  lines = ["", "## Trainer step (spam) and the PyTorch peer (HF LLaMA bf16 + fused AdamW)",
           "", "Ours as the trainer runs (one step in flight): the mean step and the "
           "median; \"waited for\": each step waited for before the next, as the peer "
           "times its steps (its median). Ours ÷ peer: the medians' tokens/s (the target), "
           "then the mean's.", "",
           "| model | batch×len | ours step ms | ours median ms | ours waited for ms "
           "| ours tokens/s | ours MFU | compile s | peer step ms | peer tokens/s "
           "| peer MFU | ours ÷ peer | mean's ÷ peer |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  peer = {"llama_" + p["size"]: p for p in res["peer"]}
  ours = {r["model"] for r in res["train"]}
  pairs = [(r, peer.get(r["model"], {})) for r in res["train"]] + [
      ({"model": m}, p) for m, p in peer.items() if m not in ours]
  for o, p in pairs:
    both = o.get("tokens_per_s") and p.get("tokens_per_s")
    ratio = peer_ratio(o, p) if both else None
    mean_ratio = o["tokens_per_s"] / p["tokens_per_s"] if both else None
    median = o.get("step_s_in_flight_median")
    shape = f"{o.get('batch', p.get('batch'))}×{o.get('length', p.get('length'))}"
    lines.append(
        f"| {train_label(o)} | {shape} | {_f(o.get('step_s') and 1e3 * o['step_s'])} | "
        f"{_f(median and 1e3 * median)} | "
        f"{_f(o.get('step_s_synced') and 1e3 * o['step_s_synced'])} | "
        f"{_f(o.get('tokens_per_s'), '{:,.0f}')} | {_f(o.get('mfu'), '{:.1%}')} | "
        f"{_f(o.get('compile_s'))} | {_f(p.get('step_ms'))} | "
        f"{_f(p.get('tokens_per_s'), '{:,.0f}')} | {_f(p.get('mfu'), '{:.1%}')} | "
        f"{_f(ratio, '{:.2f}×')}{' — ' + p['error'] if p.get('error') else ''} | "
        f"{_f(mean_ratio, '{:.2f}×')} |")
  return lines


def markdown(report: dict) -> str:
  env, res = report["environment"], report["results"]
  lines = [f"# Accelerator benchmarks, {report['date']}", "",
           f"**Device:** {env.get('device_kind', '?')} × {env.get('devices', '?')} "
           f"({env.get('backend', '?')}), host {env.get('host', '?')}; jax {env.get('jax')}, "
           f"flax {env.get('flax')}, optax {env.get('optax')}, orbax-checkpoint "
           f"{env.get('orbax-checkpoint')}, torch {env.get('torch')}, "
           f"transformers {env.get('transformers')}.",
           f"**Command:** `{report['command']}` (budget {report['budget_s']:.0f} s, "
           f"used {report['wall_s']:.0f} s)."]
  if env.get("copy_GBps"):
    lines.append(f"**Ceilings measured in this run:** device memory "
                 f"{env['copy_GBps']:,.0f} GB/s (an element-wise pass, bytes read + written), "
                 f"bf16 matrix product {_f(env.get('matmul_bf16_TFLOPs'), '{:,.3g}')} TFLOP/s.")
  if env.get("threefry_kernel_same_bits") is not None:
    same = env.get("threefry_kernel_same_bits")
    lines.append(f"**Random draws (16 Gaussian arrays, one jit):** compile "
                 f"{env['threefry_compile_s_xla']:.1f} s with XLA's threefry, "
                 f"{_f(env.get('threefry_compile_s_kernel'), '{:.1f}')} s with jax's kernel "
                 f"(the trainer's setting); the same bits: {'yes' if same else 'NO'}.")
  if env.get("norm_pallas_ms") is not None:
    lines.append(f"**Residual add + RMSNorm, forward and backward** ("
                 f"{'256×96' if report['tiny'] else '16384×1024'} bf16): Pallas kernels "
                 f"{env['norm_pallas_ms']:.3f} ms, XLA {_f(env.get('norm_xla_ms'), '{:.3f}')} ms; "
                 f"largest difference {_f(env.get('norm_pallas_max_rel_diff'), '{:.1e}')} "
                 "of the largest value.")
  elif env.get("norm_pallas_error"):
    lines.append(f"**Pallas norm kernels failed in the probe:** {_cell(env['norm_pallas_error'])}")
  for line in (loss_line(env, report["tiny"]), elementwise_line(env), attention_line(env)):
    if line:
      lines.append(line)
  if any(env.get(k) is not None for k in ("norm_pallas_ms", "loss_one_pass_ms",
                                          "elementwise_kernels", "attention_xla_ms")):
    lines.append("(The norm, loss, element-wise and attention times: ms a call of 20 calls "
                 "queued back to back, the last waited for; the device's time, not the "
                 "launch's.)")
  if report["tiny"]:
    lines.append("**Tiny sizes (`--tiny`):** a test of the script, not a measurement of "
                 "the targets.")
  lines += ["", "## Targets", "", "| target | measured | limit | status |", "|---|---:|---:|---|"]
  for t in res["targets"]:
    pct = "MFU" in t["target"]
    value = _f(t["value"], "{:.1%}" if pct else "{:.2f}×")
    limit = ("≤ " if t["at_most"] else "≥ ") + (
        f"{t['limit']:.0%}" if pct else f"{t['limit']:.2f}×")
    note = f" ({t['note']})" if t["note"] else ""
    lines.append(f"| {t['target']} | {value} | {limit} | {t['status']}{note} |")
  for opt in (res["optimizer"], res.get("optimizer_scan"), res.get("optimizer_bf16")):
    if not opt:
      continue
    layout = ", scanned layers" if opt.get("scan_layers") else ""
    lines += ["", f"## Optimizer update, {opt['size']}{layout} ({opt['params']:,} params, "
              f"{opt['dtype']}, median of {opt['iters']})", "",
              "| optimizer | device ms | × adamw | in flight ms | × adamw | waited for ms | "
              "× adamw | memory floor ms | × floor | compile s | state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    adamw = {r["name"]: r for r in opt["optimizers"]}.get("adamw", {})
    for r in opt["optimizers"]:
      floor = floor_ms(r["name"], opt["params"], opt.get("dtype"), env.get("copy_GBps"))
      ms = device_ms(r) or r.get("in_flight_ms") or r.get("update_ms")
      over = ms / floor if floor and ms else None
      busy, base = device_ms(r), device_ms(adamw)
      lines.append(f"| {r['name']} | {_f(busy, '{:.2f}')} | "
                   f"{_f(busy / base if busy and base else None, '{:.2f}')} | "
                   f"{_f(r.get('in_flight_ms'), '{:.2f}')} | "
                   f"{_f(r.get('x_adamw_in_flight'), '{:.2f}')} | "
                   f"{_f(r['update_ms'], '{:.2f}')} | "
                   f"{_f(r['x_adamw'], '{:.2f}')} | {_f(floor, '{:.2f}')} | "
                   f"{_f(over, '{:.2f}')} | {_f(r['compile_s'])} | "
                   f"{r['state_bytes'] / 2**20:,.1f} |")
  if res["optimizer"] or res.get("optimizer_scan") or res.get("optimizer_bf16"):
    lines += ["", "The memory floor: the bytes an update must move at least (float32: "
              "p, g, m, v read and p, m, v written, 28 B per parameter; Stable-SPAM 36 B, as "
              "its max |g| and then the norm of the clipped g read g twice more) over the "
              "measured bandwidth; × floor is of the device time where profiled, else of "
              "the in-flight time. Device: the profile's busy time of an update's kernels "
              "(what the targets compare, where both updates were profiled). In flight: "
              "updates made back to back with one in flight, as a training loop makes "
              "them; waited for: each update waited for (its host launch included)."]
  lines += trainer_lines(res)
  if res["model"]:
    lines += ["", "## Model forward+backward", "",
              "| model | quant | batch×len | step ms | waited for ms | tokens/s | MFU | vs bf16 "
              "| compile s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    bf16 = {r["model"]: r["step_s"] for r in res["model"]
            if r["quant"] == "bf16" and not r.get("variant")}
    for r in res["model"]:
      vs = r["step_s"] / bf16[r["model"]] if r["model"] in bf16 else None
      lines.append(f"| {r['model']}{_tags(r)} | {r['quant']} | {r['batch']}×{r['seq_len']} | "
                   f"{1e3 * r['step_s']:.1f} | "
                   f"{_f(r.get('step_s_synced') and 1e3 * r['step_s_synced'])} | "
                   f"{r['tokens_per_s']:,.0f} | "
                   f"{_f(r['mfu'], '{:.1%}')} | {_f(vs, '{:.2f}×')} | {r['compile_s']:.1f} |")
  for key, what in (("attention_fallback", "cuDNN attention"),
                    ("elementwise_fallback", "The Pallas element-wise kernels"),
                    ("norm_fallback", "The Pallas norm kernels")):
    fallbacks = [r for r in res["train"] + res["model"] if r.get(key)]
    if fallbacks:
      lines += ["", f"**{what} failed, measured again with XLA's:** " + "; ".join(
          f"{r['model']} {r.get('quant') or r.get('optimizer')}: {_cell(r[key])}"
          for r in fallbacks)]
  if res["hlo"]:
    lines += ["", "## Compiled HLO (hlo_stats)", "",
              "| step | kernels | GB moved | fusions | while loops | host waits | scatters "
              "| copies | custom calls | cuDNN attention | outputs in donated buffers "
              "| donation warnings |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|"]
    for h in res["hlo"]:
      calls = ", ".join(f"{k} ×{v}" for k, v in h["custom_calls"].items()) or "–"
      ops, traffic = h["ops"], h.get("traffic") or {}
      moved = traffic.get("bytes")
      lines.append(f"| {h['what']} | {_f(traffic.get('kernels'), '{:.0f}')} | "
                   f"{_f(moved and moved / 1e9, '{:.2f}')} | {ops.get('fusion', 0)} | "
                   f"{ops.get('while', 0)} | {_f(h.get('host_waits'), '{:.0f}')} | "
                   f"{ops.get('scatter', 0)} | {ops.get('copy', 0)} | {calls} | "
                   f"{'yes' if h['cudnn_attention'] else 'no'} | {h['aliased_outputs']} | "
                   f"{len(h['donation_warnings']) or 'none'} |")
  blocks = res["blocks"]
  if blocks:
    lines += ["", f"## Where the optimizer time goes (`--blocks`, {blocks['size']})", "",
              "| chain | update ms | × adamw (same group) | compile s |", "|---|---:|---:|---:|"]
    for r in blocks["blocks"]:
      lines.append(f"| {r['name']} | {r['update_ms']:.2f} | {r['x_adamw']:.2f} | "
                   f"{r['compile_s']:.1f} |")
  lines += profile_lines(res)
  lines += in_flight_lines(res)
  lines += gc_lines(res)
  lines += ["", "## Parts", "",
            "GPU clocks: `nvidia-smi` sampled while the part ran, compilation included.", "",
            "| part | status | wall s | limit s | GPU clocks | note |",
            "|---|---|---:|---:|---|---|"]
  for p in report["parts"]:
    note = p.get("reason") or ""
    if p.get("retried_after"):  # which flags it ran with in the end, and why
      note = "; ".join(x for x in (note, f"run again after: {p['retried_after']}",
                                   f"XLA_FLAGS={p.get('xla_flags', '')!r}") if x)
    note = note.replace("|", "\\|")
    clocks = p.get("gpu_clocks")
    clocks = "–" if not clocks or clocks.get("error") else gpu_clocks.one_line(clocks)[
        len("clocks: "):]
    lines.append(f"| {p['name']} | {p['status']} | {_f(p.get('wall_s'))} | "
                 f"{_f(p.get('limit_s'))} | {clocks} | {note} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  start = time.perf_counter()
  out = os.path.abspath(args.out)
  work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="accelerator-")
  logs_dir = os.path.join(work, "logs")
  for d in (out, logs_dir, os.path.join(work, "parts", "peer")):
    os.makedirs(d, exist_ok=True)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if args.tiny:
    env.setdefault("JAX_PLATFORMS", "cpu")

  def left() -> float:
    return args.budget_s - (time.perf_counter() - start)

  print(f"# accelerator benchmarks: budget {args.budget_s:.0f} s, out {out}, work {work}",
        flush=True)
  probe_part = Part("probe", ["-c", _PROBE, "tiny" if args.tiny else "full", args.skip_probe],
                    90, 5)
  probe_part.result = run_part(probe_part, min(90.0, max(left(), 1.0)), logs_dir, env)
  probe = {}
  for line in probe_part.result["stdout"].splitlines():
    if line.startswith("PROBE "):
      probe = json.loads(line[len("PROBE "):])  # the last line holds the most
  print(f"device: {probe or probe_part.result.get('reason')}", flush=True)

  parts = plan(args, work)
  peer_skip = _peer_skip_reason(args, probe)
  done = {"probe": probe_part}
  write_report(args, argv, out, work, time.perf_counter() - start, probe, done)
  names = lambda flag: [p.strip() for p in (flag or "").split(",") if p.strip()]
  selected, left_out = names(args.parts), names(args.skip_parts)
  for part in parts:
    if selected and not any(part.name.startswith(p) for p in selected):
      part.result = dict(status="skipped", reason="not in --parts")
    elif any(part.name.startswith(p) for p in left_out):
      part.result = dict(status="skipped", reason="in --skip_parts")
    elif part.name == "peer" and peer_skip:
      part.result = dict(status="skipped", reason=peer_skip)
    elif left() < part.min_s:
      part.result = dict(status="skipped",
                         reason=f"budget: {max(left(), 0):.0f} s left, needs ≥ {part.min_s:.0f} s")
    else:
      part.result = run_with_retry(part, left, logs_dir, env)
    done[part.name] = part
    print(f"{part.name}: {part.result['status']} "
          f"({part.result.get('wall_s', 0):.0f} s) {part.result.get('reason', '')}", flush=True)
    if part.name == "peer" and part.result["status"] not in ("ok", "skipped"):
      rows = _peer_rows(part)
      if rows:
        part.result["reason"] = f"{part.result.get('reason', '')}; kept {len(rows)} size(s)"
    # A run stopped from outside keeps what is done.
    report = write_report(args, argv, out, work, time.perf_counter() - start, probe, done)
  print(markdown(report), flush=True)
  return report


def write_report(args, argv, out: str, work: str, wall_s: float, probe: dict,
                 done: dict) -> dict:
  """Writes ``accelerator.json``, ``accelerator.md`` and the parts' archive into ``out``.

  Three files, each written whole or not at all: the report of what is done so far, its
  table, and ``accelerator-parts.tar.gz`` (every part's JSON and log, the compiled HLO
  text and the profile summaries; the raw traces too while they stay small).
  """
  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command=shlex.join(["python", "-m", "experiments.benchmarks.accelerator"]
                         + (sys.argv[1:] if argv is None else list(argv))),
      budget_s=args.budget_s, wall_s=wall_s, tiny=args.tiny,
      environment={**probe, "platform": platform.platform(), "commit": _commit()},
      parts=[dict(name=n, **{k: v for k, v in p.result.items() if k != "stdout"})
             for n, p in done.items()],
      archive=ARCHIVE, results=collect(done))
  rundir.write_atomically(os.path.join(out, "accelerator.json"), json.dumps(report, indent=1))
  rundir.write_atomically(os.path.join(out, "accelerator.md"), markdown(report))
  _bundle(work, os.path.join(out, ARCHIVE))
  return report


def _bundle(work: str, path: str, max_trace_bytes: int = 10 * 2**20,
            max_bytes: int = 15 * 2**20) -> None:
  """``work`` as a gzipped tar at ``path``, under ``max_bytes`` (what a device call returns).

  Raw traces go in only while they sum to ``max_trace_bytes``; an archive still too large is
  made again without them, then without the HLO text too.
  """
  raw = lambda name: name.endswith((".xplane.pb", ".trace.json.gz"))
  traces = []
  for folder, _, files in os.walk(work):
    traces += [os.path.join(folder, f) for f in files if raw(f)]
  keep_traces = sum(os.path.getsize(t) for t in traces) <= max_trace_bytes
  drops = [raw, lambda name: raw(name) or name.endswith(".hlo.txt")]
  if keep_traces:
    drops.insert(0, lambda name: False)
  tmp = path + ".tmp"
  for drop in drops:
    with tarfile.open(tmp, "w:gz") as tar:
      tar.add(work, arcname="accelerator-parts",
              filter=lambda info, drop=drop: None if drop(info.name) else info)
    if os.path.getsize(tmp) <= max_bytes:
      break
  os.replace(tmp, path)


def _commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


if __name__ == "__main__":
  main()
