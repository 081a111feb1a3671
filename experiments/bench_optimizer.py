"""Time one jitted optimizer update on LLaMA-shaped parameters.

Compares ``optax.adamw``, ``spam``, ``stable_spam`` and ``spam(density=0.25)`` side
by side in one process: each update is jitted with donated params and state,
warmed up, then timed as the median of many calls. Also reports the optimizer
state's size (device-independent; computed with ``jax.eval_shape``).

  python -m experiments.bench_optimizer --size small
  python -m experiments.bench_optimizer --size 1b            # on a GPU
  python -m experiments.bench_optimizer --size 1b --no-time  # state sizes only
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax


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

  def run(self, record: bool) -> None:
    start = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    if record:
      self.times.append(time.perf_counter() - start)

  def median_ms(self) -> float:
    return 1e3 * statistics.median(self.times)


def time_updates(opts: dict, shapes, *, warmup: int, iters: int,
                 interleave: bool) -> dict:
  """Median ms per update of each optimizer (first ``warmup`` calls compile/warm up).

  Interleaved, every optimizer stays resident and the calls rotate through them, so
  load from other processes hits all alike; sequential holds one at a time.
  """
  (grads,) = random_trees(shapes, 1, seed=0)
  if not interleave:
    result = {}
    for name, opt in opts.items():
      runner = Runner(opt, shapes, grads)
      for i in range(warmup + iters):
        runner.run(record=i >= warmup)
      result[name] = runner.median_ms()
      del runner
    return result
  runners = {name: Runner(opt, shapes, grads) for name, opt in opts.items()}
  names = list(runners)
  for i in range(warmup + iters):
    shift = i % len(names)
    for name in names[shift:] + names[:shift]:
      runners[name].run(record=i >= warmup)
  return {name: r.median_ms() for name, r in runners.items()}


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

  opts = optimizers(args.density)
  times = {} if args.no_time else time_updates(
      opts, shapes, warmup=args.warmup, iters=args.iters,
      interleave=not args.sequential)
  rows = [(name, times.get(name), tree_bytes(jax.eval_shape(opt.init, shapes)))
          for name, opt in opts.items()]

  base_ms, base_bytes = rows[0][1], rows[0][2]
  dense_spam_bytes = rows[1][2]
  print()
  print("| optimizer | update ms | × adamw | state MiB | state × adamw | state × dense spam |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, ms, nbytes in rows:
    t = "—" if ms is None else f"{ms:.1f}"
    r = "—" if ms is None else f"{ms / base_ms:.2f}"
    print(f"| {name} | {t} | {r} | {nbytes / 2**20:,.1f} | {nbytes / base_bytes:.3f} "
          f"| {nbytes / dense_spam_bytes:.3f} |")


if __name__ == "__main__":
  main()
