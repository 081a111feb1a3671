"""Time one jitted optimizer update on LLaMA-shaped parameters.

Compares ``optax.adamw``, ``spam``, ``stable_spam`` and ``spam(density=0.25)`` side
by side in one process: each update is jitted with donated params and state,
warmed up, then timed as the median of many calls. Also reports the optimizer
state's size (device-independent; computed with ``jax.eval_shape``).

  python -m experiments.bench_optimizer --size small
  python -m experiments.bench_optimizer --size 1b            # on a GPU
  python -m experiments.bench_optimizer --size 1b --no-time  # state sizes only
  python -m experiments.bench_optimizer --size small --blocks  # where the time goes

``--blocks`` times chains that add one block at a time, and hand-written
single-function versions of the same math (one function per leaf, no optax
chain), to tell the cost of the math on this backend from the cost of the
composable structure.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import resource
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax
from spam_optax._tree_util import tree_map_unzip


@dataclasses.dataclass(frozen=True)
class Shapes:
  """A LLaMA parameter layout: untied embedding and head, RMSNorm weights."""
  hidden: int
  mlp: int
  layers: int
  heads: int
  vocab: int


SIZES = {
    # LLaMA-60M of the SPAM paper's 60M run (58,073,600 params).
    "small": Shapes(hidden=512, mlp=1376, layers=8, heads=8, vocab=32000),
    # LLaMA-1B (1,339,082,752 params).
    "1b": Shapes(hidden=2048, mlp=5461, layers=24, heads=32, vocab=32000),
    # For the tests: the same layout, seconds to run.
    "tiny": Shapes(hidden=64, mlp=172, layers=2, heads=4, vocab=256),
}


def param_shapes(s: Shapes, dtype) -> dict:
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves."""
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  h, f = s.hidden, s.mlp
  params = {"embed_tokens": leaf(s.vocab, h), "norm": leaf(h),
            "lm_head": leaf(h, s.vocab)}
  for i in range(s.layers):
    params[f"layers_{i}"] = {
        "self_attn": {n: leaf(h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"gate_proj": leaf(h, f), "up_proj": leaf(h, f), "down_proj": leaf(f, h)},
        "input_layernorm": leaf(h),
        "post_attention_layernorm": leaf(h),
    }
  return params


def projection_mask(params) -> dict:
  """Sparse momentum on the attention and MLP projections, as in the official runs."""
  def is_projection(path, x):
    return any(getattr(k, "key", None) in ("self_attn", "mlp") for k in path) and x.ndim == 2
  return jax.tree_util.tree_map_with_path(is_projection, params)


def optimizers(density: float) -> dict:
  lr = 1e-3
  return {
      "adamw": optax.adamw(lr, eps=1e-6, weight_decay=0.0),
      "spam": spam_optax.spam(lr),
      "stable_spam": spam_optax.stable_spam(lr),
      f"spam d={density:g}": spam_optax.spam(
          lr, density=density, sparse_mask=projection_mask),
  }


class _FusedState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any
  clipped: Any = None


def _fused_init(params) -> _FusedState:
  zeros = lambda p: jnp.zeros_like(p)
  return _FusedState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                     jax.tree.map(zeros, params))


def _fused_spam(lr: float, count: str = "changed", b1=0.9, b2=0.999, eps=1e-6,
                threshold=5000.0, delay=20, interval=500, warmup=150):
  """SPAM's math written as one function per leaf (reference for ``--blocks``).

  Same arithmetic as ``spam_optax.spam`` (dense, no weight decay): reset select,
  spike clip against the old ``v``, Adam, warm-up scale and learning rate, all in
  one expression per leaf. ``count`` is how the per-leaf number of clipped
  entries (the only reduction) is taken: ``"changed"`` as the library does
  (float row sums of ``ceil(min(|clipped - g|, 1))``), ``"mask"`` as an int32
  sum of the spike mask ``g² > θv``, ``"none"`` not at all.
  """
  init = _fused_init

  def update(grads, state, params=None):
    del params
    t = state.count + 1
    reset = t % interval == 0
    active = (t >= delay) & (t % interval >= delay)
    since = jnp.where(t >= interval, t % interval, warmup + t)
    scale = 1 - jnp.where(since < warmup,
                          0.99 * (1 + jnp.cos(jnp.pi * since / (warmup + 1))) / 2, 0)
    correction = (jnp.sqrt(-jnp.expm1(t * math.log(b2)))
                  / -jnp.expm1(t * math.log(b1)))
    factor = (-lr * scale * correction).astype(jnp.float32)

    def leaf(g, m, v):
      m = jnp.where(reset, 0, m)
      v = jnp.where(reset, 0, v)
      bound_sq = threshold * v
      spike = active & (g * g > bound_sq)
      clipped = jnp.where(spike, jnp.sign(g) * jnp.sqrt(bound_sq), g)
      if count == "changed":
        rows = jnp.sum(jnp.ceil(jnp.minimum(jnp.abs(clipped - g), 1)), axis=-1)
        n = jnp.sum(jnp.where(jnp.isnan(rows), 0, rows).astype(jnp.int32))
      elif count == "mask":
        n = jnp.sum(spike, dtype=jnp.int32)
      else:
        n = None
      g = clipped
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      return m / (jnp.sqrt(v) + eps) * factor, m, v, n

    u, mu, nu, clipped = tree_map_unzip(leaf, 4, grads, state.mu, state.nu)
    return u, _FusedState(t, mu, nu, clipped)

  return optax.GradientTransformation(init, update)


def _fused_adam_reset_after(lr: float, b1=0.9, b2=0.999, eps=1e-8, interval=1000):
  """Stable-SPAM's Adam with the after-update reset, one function per leaf."""
  init = _fused_init

  def update(grads, state, params=None):
    del params
    t = state.count + 1
    reset = t % interval == 0
    k = jnp.where(t >= interval, t % interval + 1, t)
    bc1 = -jnp.expm1(k * math.log(b1))
    sqrt_bc2 = jnp.sqrt(-jnp.expm1(k * math.log(b2)))

    def leaf(g, m, v):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      u = -lr * (m / bc1) / (jnp.sqrt(v) / sqrt_bc2 + eps)
      return u, jnp.where(reset, 0, m), jnp.where(reset, 0, v)

    u, mu, nu = tree_map_unzip(leaf, 3, grads, state.mu, state.nu)
    return u, _FusedState(t, mu, nu)

  return optax.GradientTransformation(init, update)


def block_optimizers() -> dict:
  """Chains adding one block at a time, and hand-fused references."""
  lr = 1e-3
  scale_lr = optax.scale_by_learning_rate(lr)
  sbs = spam_optax.scale_by_spam
  ssa = lambda: spam_optax.scale_by_stable_spam_adam(reset_interval=1000)
  return {
      "adamw": optax.adamw(lr, eps=1e-6, weight_decay=0.0),
      "scale_by_spam (no clip)": optax.chain(sbs(spike_threshold=0.0), scale_lr),
      "scale_by_spam": optax.chain(sbs(), scale_lr),
      "periodic_reset(scale_by_spam)": optax.chain(
          spam_optax.periodic_reset(sbs(), 500), scale_lr),
      "spam": spam_optax.spam(lr),
      "hand-fused spam": _fused_spam(lr),
      "hand-fused spam, mask count": _fused_spam(lr, count="mask"),
      "hand-fused spam, no clip count": _fused_spam(lr, count="none"),
      "scale_by_stable_spam_adam": optax.chain(ssa(), scale_lr),
      "periodic_reset(.., after_update=False)": optax.chain(
          spam_optax.periodic_reset(ssa(), 1000), scale_lr),
      "periodic_reset(.., after_update=True)": optax.chain(
          spam_optax.periodic_reset(ssa(), 1000, after_update=True), scale_lr),
      "hand-fused adam + after-update reset": _fused_adam_reset_after(lr),
      "clip_by_running_max + adam": optax.chain(
          spam_optax.clip_by_running_max(0.999, reset_interval=1000),
          optax.scale_by_adam(), scale_lr),
      "scale_by_grad_norm_history + adam": optax.chain(
          spam_optax.scale_by_grad_norm_history(reset_interval=1000),
          optax.scale_by_adam(), scale_lr),
      "stable_spam": spam_optax.stable_spam(lr),
  }


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def random_trees(shapes, n: int, seed: int = 0) -> tuple:
  """``n`` trees of small Gaussian values with the given shapes, made on device."""
  leaves, treedef = jax.tree.flatten(shapes)

  @jax.jit
  def make(key):
    keys = jax.random.split(key, n * len(leaves))
    fill = lambda k, s: (0.02 * jax.random.normal(k, s.shape)).astype(s.dtype)
    return tuple(
        treedef.unflatten([fill(keys[j * len(leaves) + i], s)
                           for i, s in enumerate(leaves)])
        for j in range(n))

  return make(jax.random.key(seed))


class Runner:
  """One optimizer's params, state and jitted, donated update step."""

  def __init__(self, opt, shapes, grads):
    (self.params,) = random_trees(shapes, 1, seed=1)
    self.state = jax.jit(opt.init)(self.params)
    self.grads = grads

    def step(params, state, grads):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.times = []
    self.faults = []

  def run(self, record: bool) -> None:
    faults = _minor_page_faults()
    start = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    if record:
      self.times.append(time.perf_counter() - start)
      self.faults.append(_minor_page_faults() - faults)

  def median_ms(self) -> float:
    return 1e3 * statistics.median(self.times)

  def median_faults(self) -> float:
    return statistics.median(self.faults)


def _minor_page_faults() -> int:
  """This process's minor page faults so far (first touches of fresh memory)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_updates(opts: dict, shapes, *, warmup: int, iters: int,
                 interleave: bool) -> dict:
  """Median (ms, host page faults) per update of each optimizer.

  The first ``warmup`` calls compile and warm up. Interleaved, every optimizer stays
  resident and the calls rotate through them, so load from other processes hits all
  alike; sequential holds one at a time. Page faults count the host memory an update
  touches for the first time: on CPU, XLA allocates each call's full-size temporaries
  afresh, and the kernel faults in and zeroes every 4 KiB page of them.
  """
  (grads,) = random_trees(shapes, 1, seed=0)
  if not interleave:
    result = {}
    for name, opt in opts.items():
      runner = Runner(opt, shapes, grads)
      for i in range(warmup + iters):
        runner.run(record=i >= warmup)
      result[name] = runner.median_ms(), runner.median_faults()
      del runner
    return result
  runners = {name: Runner(opt, shapes, grads) for name, opt in opts.items()}
  names = list(runners)
  for i in range(warmup + iters):
    shift = i % len(names)
    for name in names[shift:] + names[:shift]:
      runners[name].run(record=i >= warmup)
  return {name: (r.median_ms(), r.median_faults()) for name, r in runners.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default=None,
                      help="parameter layout (default: small on CPU, 1b otherwise)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--density", type=float, default=0.25)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--sequential", action="store_true",
                      help="hold one optimizer at a time (less memory, more exposed to "
                      "load changes) instead of interleaving the calls")
  parser.add_argument("--blocks", action="store_true",
                      help="time chains adding one block at a time and hand-fused "
                      "single-function references instead of the four optimizers")
  parser.add_argument("--no-time", action="store_true",
                      help="report state sizes only (no allocation)")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  size = args.size or ("small" if device.platform == "cpu" else "1b")
  shapes = param_shapes(SIZES[size], jnp.dtype(args.dtype))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  print(f"# {datetime.date.today()}  device: {device.device_kind} ({device.platform}, "
        f"{jax.device_count()} device(s))  jax {jax.__version__}  optax {optax.__version__}")
  print(f"# size {size}: {n_params:,} params, {args.dtype}; "
        f"warm-up {args.warmup}, median of {args.iters}, "
        f"{'sequential' if args.sequential else 'interleaved'}")

  if args.blocks:
    # Two groups, so that at most ~8 states are resident at once.
    blocks = block_optimizers()
    names = list(blocks)
    groups = [names[:7], ["adamw"] + names[7:]]
    print()
    print("| chain | update ms | × adamw (same group) | page faults |")
    print("|---|---:|---:|---:|")
    for group in groups:
      times = time_updates({n: blocks[n] for n in group}, shapes, warmup=args.warmup,
                           iters=args.iters, interleave=not args.sequential)
      base_ms = times["adamw"][0]
      for name in group:
        ms, faults = times[name]
        print(f"| {name} | {ms:.1f} | {ms / base_ms:.2f} | {faults:,.0f} |")
    return

  opts = optimizers(args.density)
  times = {} if args.no_time else time_updates(
      opts, shapes, warmup=args.warmup, iters=args.iters,
      interleave=not args.sequential)
  rows = [(name, *times.get(name, (None, None)),
           tree_bytes(jax.eval_shape(opt.init, shapes)))
          for name, opt in opts.items()]

  base_ms, base_bytes = rows[0][1], rows[0][3]
  dense_spam_bytes = rows[1][3]
  print()
  print("| optimizer | update ms | × adamw | page faults | state MiB | state × adamw "
        "| state × dense spam |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, ms, faults, nbytes in rows:
    t = "—" if ms is None else f"{ms:.1f}"
    r = "—" if ms is None else f"{ms / base_ms:.2f}"
    f = "—" if faults is None else f"{faults:,.0f}"
    print(f"| {name} | {t} | {r} | {f} | {nbytes / 2**20:,.1f} | "
          f"{nbytes / base_bytes:.3f} | {nbytes / dense_spam_bytes:.3f} |")


if __name__ == "__main__":
  main()
