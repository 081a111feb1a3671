"""Time one jitted optimizer update on LLaMA-shaped parameters.

Compares ``optax.adamw``, ``spam``, ``stable_spam`` and ``spam(density=0.25)`` side
by side in one process: each update is jitted with donated params and state,
warmed up, then timed as the median of many calls, each waited for (the host's launch of
the call included); with ``--sequential`` also as many calls with one in flight, as a
training loop makes them (``in_flight_ms``: the device's time when the host's launch is
shorter; ``timing.back_to_back_s``, as each update donates its outputs to the next).
Also reports the optimizer
state's size (device-independent; computed with ``jax.eval_shape``).

  python -m experiments.benchmarks.bench_optimizer --size small
  python -m experiments.benchmarks.bench_optimizer --size 1b            # on a GPU
  python -m experiments.benchmarks.bench_optimizer --size 1b --no-time  # state sizes only
  python -m experiments.benchmarks.bench_optimizer --size small --blocks  # where the time goes

``--blocks`` times chains that add one block at a time, and hand-written
single-function versions of the same math (one function per leaf, no optax
chain), to tell the cost of the math on this backend from the cost of the
composable structure.

``--profile DIR`` traces ``--profile_calls`` more updates of each optimizer after its timed
ones (interleaved: after all the timing) into ``DIR/<name>/`` and keeps where their device
time went (``profile_summary``) in its row under ``profile``. The JSON is written after each
optimizer (``--blocks``: each group) and again after each profile, so a run stopped by its
time limit keeps the rows it finished.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import re
import resource
import statistics
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import spam_optax
from experiments import jax_settings, rundir
from experiments import optimizers as train_optimizers
from experiments.benchmarks import profile_summary, timing
from spam_optax import _clip_and_norm_history
from spam_optax import _leaf_stats
from spam_optax import _periodic_reset
from spam_optax._tree_util import tree_map_unzip


SIZES = {
    # LLaMA-60M of the SPAM paper's 60M run (58,073,600 params).
    "small": models.get_config("llama_60m"),
    # LLaMA-350M, the trainer's deciding size (with --dtype bfloat16, its update as the
    # bf16 trainer runs it: parameters and moments in bf16).
    "350m": models.get_config("llama_350m"),
    # LLaMA-1B (1,339,082,752 params).
    "1b": models.get_config("llama_1b"),
    # For the tests: the same layout, seconds to run.
    "tiny": models.get_config("llama_9m", num_layers=2, vocab_size=256),
}


def param_shapes(config: models.LlamaConfig, dtype) -> dict:
  """The model's parameter tree as ``jax.ShapeDtypeStruct`` leaves of ``dtype``.

  ``models.abstract_variables``: the layout the trainer optimizes (untied embedding and
  head, RMSNorm scales, attention kernels shaped (embed, heads, kv)), nothing allocated.
  """
  params = nn.meta.unbox(models.abstract_variables(config)["params"])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params)


def optimizers(density: float, scan_layers: bool = False) -> dict:
  """The four optimizers timed; on the scanned layout Stable-SPAM keeps per-layer statistics."""
  lr = 1e-3
  stacked = train_optimizers.stacked_layer_axes if scan_layers else None
  return {
      "adamw": optax.adamw(lr, eps=1e-6, weight_decay=0.0),
      "spam": spam_optax.spam(lr),
      "stable_spam": spam_optax.stable_spam(lr, stacked_axes=stacked),
      f"spam d={density:g}": spam_optax.spam(
          lr, density=density, sparse_mask=train_optimizers.projection_mask),
  }


def loop_redraw_optimizer(density: float) -> dict:
  """Sparse SPAM as the trainer builds it: ``redraw_masks_in_update=False``, the masks
  redrawn by the loop every ``reset_interval`` steps (not timed here), so the update timed
  is the step's, with no ``lax.cond``. Selected by name with ``--optimizers``."""
  return {f"spam d={density:g} (loop redraw)": spam_optax.spam(
      1e-3, density=density, sparse_mask=train_optimizers.projection_mask,
      redraw_masks_in_update=False)}


TWO_PASSES = "stable_spam (two statistics passes)"
UNSETTLED = "stable_spam (every row read again)"
STATS_ROWS = "stable_spam (statistics in rows of 512)"


def _tracing_with(inner: optax.GradientTransformation, module, flag: str, value,
                  prepare: Callable | None = None) -> optax.GradientTransformation:
  """``inner`` with ``module.flag`` set to ``value`` while its update is traced (and
  restored after), the state passed through ``prepare`` first if given."""
  def update(updates, state, params=None):
    if prepare is not None:
      state = prepare(state)
    saved = getattr(module, flag)
    setattr(module, flag, value)  # read while the update is traced
    try:
      return inner.update(updates, state, params)
    finally:
      setattr(module, flag, saved)
  return optax.GradientTransformation(inner.init, update)


def stable_spam_variants(scan_layers: bool = False) -> dict:
  """Stable-SPAM's statistics read otherwise than the library reads them, to time beside
  it. The library reads the norm and the clip count off the max's pass where every row is
  settled there (``spam_optax._clip_and_norm_history._ONE_PASS``), the second statistics
  pass a conditional run only in a step where some row is not; on the benchmark's fixed
  gradient, whose running max reaches its max, every row is settled after the first
  update (as in training between spikes). The variants:

  * ``TWO_PASSES``: the second pass in every step (``_ONE_PASS`` off), the library's
    statistics before;
  * ``UNSETTLED``: the library with the running max set to 0 before each update, so that
    most rows hold both kept and clipped entries and the second pass runs (the most a
    step reads);
  * ``STATS_ROWS``: the library's passes reading each leaf in rows of 512 across its axes
    (``spam_optax._leaf_stats._STATS_ROW``), four to sixteen times the rows of its layout
    (a 2048×2048 leaf: 2048 rows of 2048), so more of the GPU reads at once.

  Selected by name with ``--optimizers``."""
  inner = optimizers(0.25, scan_layers)["stable_spam"]

  def zero_running_max(state):
    clip, scale = state[0]
    ema = _leaf_stats.LeafStats(jnp.zeros_like(clip.max_ema.values), clip.max_ema.layout)
    return ((clip._replace(max_ema=ema), scale),) + tuple(state[1:])

  return {TWO_PASSES: _tracing_with(inner, _clip_and_norm_history, "_ONE_PASS", False),
          UNSETTLED: _tracing_with(inner, _clip_and_norm_history, "_ONE_PASS", True,
                                   prepare=zero_running_max),
          STATS_ROWS: _tracing_with(inner, _leaf_stats, "_STATS_ROW", 512)}


COUNT_ROWS_BEFORE = "spam (count rows as before)"


def count_rows_variants() -> dict:
  """SPAM with its clipped entries counted in the rows it used before the rows of 128
  (``spam_optax._leaf_stats._SHORT_ROWS`` off: each leaf's own rows, a matrix whose rows are
  not a power of two long in rows of 2048), to time beside the library's. Selected by
  name with ``--optimizers``."""
  return {COUNT_ROWS_BEFORE: _tracing_with(spam_optax.spam(1e-3), _leaf_stats, "_SHORT_ROWS",
                                           False)}


def known_optimizers(density: float, scan_layers: bool = False) -> dict:
  """Every optimizer ``--optimizers`` may name: the four timed by default, the
  ``--blocks`` chains and the variants above."""
  return {**block_optimizers(), **loop_redraw_optimizer(density),
          **stable_spam_variants(scan_layers), **count_rows_variants(),
          **optimizers(density, scan_layers)}


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

  def init(params) -> _FusedState:
    # The per-leaf counts from the start: the state keeps one structure across updates
    # (a compiled, donated step accepts no other).
    zero = None if count == "none" else jnp.zeros([], jnp.int32)
    return _fused_init(params)._replace(clipped=jax.tree.map(lambda _: zero, params))

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


class _VectorStatsState(NamedTuple):
  count: jax.Array
  mu: Any
  nu: Any
  max_ema: jax.Array  # one entry per leaf
  mu_norm: jax.Array
  nu_norm: jax.Array
  clipped: jax.Array


def _fused_stable_spam_vector(lr: float, b1=0.9, b2=0.999, eps=1e-8, gamma1=0.7, gamma2=0.9,
                              gamma3=0.999, interval=1000, count=True):
  """Stable-SPAM (no decay, no cosine) with its per-leaf statistics held as vectors.

  Reference for ``--blocks``: the same arithmetic as ``spam_optax.stable_spam``, but AdaClip's
  running max, AdaGN's two EMAs and the clipped counts are one vector each, one entry per
  leaf, instead of one scalar per leaf. The per-leaf reductions are stacked and the scalar
  statistics of every leaf computed together, so no small kernel per leaf remains between the
  reductions and the update pass: what the library would gain from that state layout.
  """
  def init(params) -> _VectorStatsState:
    n = len(jax.tree.leaves(params))
    zeros = jnp.zeros([n], jnp.float32)
    base = _fused_init(params)
    return _VectorStatsState(base.count, base.mu, base.nu, zeros, zeros, zeros,
                             jnp.zeros([n], jnp.int32))

  def update(grads, state, params=None):
    del params
    t = state.count + 1
    k_stat = _periodic_reset.restarted_count_before_reset(t, interval)
    k = _periodic_reset.restarted_count(t, interval)
    leaves, treedef = jax.tree.flatten(grads)
    gmax = jnp.stack([jnp.max(jnp.abs(g)) for g in leaves])
    max_ema = gamma3 * state.max_ema + (1 - gamma3) * gmax
    m_hat = max_ema / -jnp.expm1(k_stat * math.log(gamma3))
    ratio = m_hat / jnp.where(gmax > 0, gmax, 1)
    clipped = [jnp.where(jnp.abs(g) > m_hat[i], g * ratio[i], g) for i, g in enumerate(leaves)]
    # The clipped count as a float sum beside the norm's (one reduction pass over the leaf).
    over = [jnp.where(jnp.abs(g) > m_hat[i], 1.0, 0.0) for i, g in enumerate(leaves)]
    n_clipped = (jnp.stack([jnp.sum(o) for o in over]).astype(jnp.int32) if count
                 else jnp.zeros([len(leaves)], jnp.int32))
    norm = jnp.sqrt(jnp.stack([jnp.sum(c * c) for c in clipped]))
    mu_norm = gamma1 * state.mu_norm + (1 - gamma1) * norm
    nu_norm = gamma2 * state.nu_norm + (1 - gamma2) * norm * norm
    target = (mu_norm / -jnp.expm1(k_stat * math.log(gamma1))) / (
        jnp.sqrt(nu_norm / -jnp.expm1(k_stat * math.log(gamma2))) + eps)
    factor = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1), 1)
    reset = (t % interval) == 0
    bc1 = -jnp.expm1(k * math.log(b1))
    sqrt_bc2 = jnp.sqrt(-jnp.expm1(k * math.log(b2)))
    out = []
    for i, (g, m, v) in enumerate(zip(clipped, treedef.flatten_up_to(state.mu),
                                      treedef.flatten_up_to(state.nu))):
      g = g * factor[i]
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      u = -lr * (m / bc1) / (jnp.sqrt(v) / sqrt_bc2 + eps)
      out.append((u, jnp.where(reset, 0, m), jnp.where(reset, 0, v)))
    u, mu, nu = (treedef.unflatten([o[j] for o in out]) for j in range(3))
    return u, _VectorStatsState(t, mu, nu, max_ema, mu_norm, nu_norm, n_clipped)

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
      "hand-fused stable_spam (vector statistics)": _fused_stable_spam_vector(lr),
      "hand-fused stable_spam (vector statistics; no count)": _fused_stable_spam_vector(
          lr, count=False),
  }


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def random_trees(shapes, n: int, seed: int = 0) -> tuple:
  """``n`` trees of small Gaussian values with the given shapes, made on device (one
  compilation per layout and ``n``, whatever the seed)."""
  leaves, treedef = jax.tree.flatten(shapes)
  specs = tuple((tuple(s.shape), jnp.dtype(s.dtype)) for s in leaves)
  return _tree_maker(treedef, specs, n)(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _tree_maker(treedef, specs: tuple, n: int):
  @jax.jit
  def make(key):
    keys = jax.random.split(key, n * len(specs))
    fill = lambda k, shape, dtype: (0.02 * jax.random.normal(k, shape)).astype(dtype)
    return tuple(
        treedef.unflatten([fill(keys[j * len(specs) + i], shape, dtype)
                           for i, (shape, dtype) in enumerate(specs)])
        for j in range(n))
  return make


class Runner:
  """One optimizer's params, state and jitted, donated update step."""

  def __init__(self, opt, shapes, grads):
    (self.params,) = random_trees(shapes, 1, seed=1)
    self.state = jax.jit(opt.init)(self.params)
    self.grads = grads

    def step(params, state, grads):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    start = time.perf_counter()
    self.step = jax.jit(step, donate_argnums=(0, 1)).lower(
        self.params, self.state, grads).compile()
    self.compile_s = time.perf_counter() - start
    self.times = []
    self.faults = []

  def dispatch(self):
    """One update, not waited for; returns its outputs (the next update's inputs)."""
    self.params, self.state = self.step(self.params, self.state, self.grads)
    return self.params, self.state

  def run(self, record: bool) -> None:
    faults = _minor_page_faults()
    start = time.perf_counter()
    jax.block_until_ready(self.dispatch())
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


class Timing(NamedTuple):
  ms: float  # median update time, each update waited for
  faults: float  # median host page faults per update
  compile_s: float  # tracing, lowering and XLA compilation
  in_flight_ms: float | None = None  # per update, one in flight (sequential runs only)


def time_updates(opts: dict, shapes, *, warmup: int, iters: int, interleave: bool,
                 after: Callable[[str, Timing, Runner], None] | None = None) -> dict:
  """A ``Timing`` per optimizer: median ms and host page faults per update.

  Each step is compiled ahead (timed apart), then ``warmup`` calls warm up. Interleaved,
  every optimizer stays resident and the calls rotate through them, so load from other
  processes hits all alike; sequential holds one at a time. Page faults count the host memory an update
  touches for the first time: on CPU, XLA allocates each call's full-size temporaries
  afresh, and the kernel faults in and zeroes every 4 KiB page of them.

  ``after(name, timing, runner)`` runs once an optimizer's timing is final, while its
  runner is still resident (sequential: right after its calls; interleaved: after all of
  them), in the order of ``opts``: to save the result, then profile more calls.
  """
  (grads,) = random_trees(shapes, 1, seed=0)
  after = after or (lambda name, timing, runner: None)
  if not interleave:
    result = {}
    for name, opt in opts.items():
      runner = Runner(opt, shapes, grads)
      for i in range(warmup + iters):
        runner.run(record=i >= warmup)
      in_flight = 1e3 * timing.back_to_back_s(runner.dispatch, iters)  # each donates the last
      result[name] = Timing(runner.median_ms(), runner.median_faults(), runner.compile_s,
                            in_flight)
      after(name, result[name], runner)
      del runner
    return result
  runners = {name: Runner(opt, shapes, grads) for name, opt in opts.items()}
  names = list(runners)
  for i in range(warmup + iters):
    shift = i % len(names)
    for name in names[shift:] + names[:shift]:
      runners[name].run(record=i >= warmup)
  result = {name: Timing(r.median_ms(), r.median_faults(), r.compile_s)
            for name, r in runners.items()}
  for name, runner in runners.items():
    after(name, result[name], runner)
  return result


def profile_runner(runner: Runner, calls: int, log_dir: str, label: str) -> dict:
  """``profile_summary.profile`` of ``calls`` more updates of ``runner``; prints one line."""
  summary = profile_summary.profile(lambda: runner.run(record=False), calls, log_dir,
                                    hlo_text=runner.step.as_text())
  print(profile_summary.one_line(label, summary), flush=True)
  return summary


def sanitize(name: str) -> str:
  """A folder name for an optimizer's label: ``spam d=0.25`` → ``spam_d=0.25``."""
  return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("_") or "optimizer"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(SIZES), default=None,
                      help="parameter layout (default: small on CPU, 1b otherwise)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--scan_layers", action="store_true",
                      help="the scan_layers layout: each weight of all layers in one leaf "
                      "(Stable-SPAM with per-layer statistics)")
  parser.add_argument("--optimizers", default=None,
                      help="comma-separated names, timed in this order after adamw (always "
                      "run, the baseline): adamw, spam, stable_spam, spam d=<density>, or a "
                      "--blocks chain (default: the first four)")
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
  parser.add_argument("--json", default=None, help="also write the results to this JSON file")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="trace --profile_calls more updates of each optimizer into "
                      "DIR/<name>/ and summarise where their device time went")
  parser.add_argument("--profile_calls", type=int, default=3,
                      help="updates traced by --profile")
  args = parser.parse_args(argv)
  jax_settings.apply()

  device = jax.devices()[0]
  size = args.size or ("small" if device.platform == "cpu" else "1b")
  shapes = param_shapes(SIZES[size].replace(scan_layers=args.scan_layers),
                        jnp.dtype(args.dtype))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  print(f"# {datetime.date.today()}  device: {device.device_kind} ({device.platform}, "
        f"{jax.device_count()} device(s))  jax {jax.__version__}  optax {optax.__version__}")
  print(f"# size {size}: {n_params:,} params, {args.dtype}; "
        f"warm-up {args.warmup}, median of {args.iters}, "
        f"{'sequential' if args.sequential else 'interleaved'}"
        f"{'; scan_layers layout' if args.scan_layers else ''}")

  header = dict(date=str(datetime.date.today()), device=device.device_kind,
                platform=device.platform, jax=jax.__version__, optax=optax.__version__,
                size=size, params=n_params, dtype=args.dtype, warmup=args.warmup,
                iters=args.iters, sequential=args.sequential, scan_layers=args.scan_layers)
  if args.blocks:
    _main_blocks(args, shapes, header)
  else:
    _main_optimizers(args, shapes, header)


def _save_then_profile(args, save: Callable[[], None], rows: dict, prefix: str = ""):
  """The ``after`` of ``time_updates`` for ``--profile``: save, profile, save again."""
  def after(name: str, timing: Timing, runner: Runner) -> None:
    del timing
    save()
    if args.profile:
      label = prefix + sanitize(name)
      rows[name]["profile"] = profile_runner(
          runner, args.profile_calls, os.path.join(args.profile, label), label)
      save()
  return after


def _main_blocks(args, shapes, header: dict) -> None:
  # Two groups, so that at most ~8 states are resident at once.
  blocks = block_optimizers()
  names = list(blocks)
  groups = [names[:7], ["adamw"] + names[7:]]
  print()
  print("| chain | update ms | × adamw (same group) | page faults | compile s |")
  print("|---|---:|---:|---:|---:|")
  results = []
  for group_index, group in enumerate(groups):
    rows = _time_group(args, shapes, {n: blocks[n] for n in group}, group_index, header,
                       results)
    for name in group:
      r = rows[name]
      results.append(r)
      print(f"| {name} | {r['update_ms']:.1f} | {r['x_adamw']:.2f} | {r['page_faults']:,.0f} "
            f"| {r['compile_s']:.1f} |", flush=True)
    _write_json(args.json, dict(header, blocks=results))
  _print_profiles(results)


def _time_group(args, shapes, opts: dict, group_index: int, header: dict,
                earlier: list) -> dict:
  """The rows of one ``--blocks`` group (its first chain is adamw), saved as they come."""
  rows = {}
  save = lambda: _write_json(args.json, dict(header, blocks=earlier + list(rows.values())))
  profile = _save_then_profile(args, save, rows, prefix=f"{group_index}-")

  def record(name: str, t: Timing, runner: Runner) -> None:
    base_ms = rows["adamw"]["update_ms"] if "adamw" in rows else t.ms  # adamw comes first
    rows[name] = dict(name=name, group=group_index, update_ms=t.ms, x_adamw=t.ms / base_ms,
                      page_faults=t.faults, compile_s=t.compile_s)
    profile(name, t, runner)

  time_updates(opts, shapes, warmup=args.warmup, iters=args.iters,
               interleave=not args.sequential, after=record)
  return rows


def _main_optimizers(args, shapes, header: dict) -> None:
  opts = optimizers(args.density, args.scan_layers)
  if args.optimizers:
    known = known_optimizers(args.density, args.scan_layers)
    wanted = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
      raise SystemExit(f"error: unknown --optimizers {', '.join(unknown)}; "
                       f"known: {', '.join(known)}")
    opts = {"adamw": opts["adamw"], **{n: known[n] for n in wanted if n != "adamw"}}
  state_bytes = {name: tree_bytes(jax.eval_shape(opt.init, shapes))
                 for name, opt in opts.items()}
  rows = {name: dict(name=name, update_ms=None, page_faults=None, compile_s=None,
                     state_bytes=nbytes) for name, nbytes in state_bytes.items()}
  base_bytes, dense_spam_bytes = state_bytes["adamw"], state_bytes.get("spam")

  def finished() -> list:
    """The rows measured so far (all of them with --no-time), with their ratios."""
    base_ms = rows["adamw"]["update_ms"]
    done = []
    for r in rows.values():
      if r["update_ms"] is None and not args.no_time:
        continue
      ms = r["update_ms"]
      r["x_adamw"] = None if ms is None or base_ms is None else ms / base_ms
      flight, base_flight = r.get("in_flight_ms"), rows["adamw"].get("in_flight_ms")
      r["x_adamw_in_flight"] = flight / base_flight if flight and base_flight else None
      r["state_x_adamw"] = r["state_bytes"] / base_bytes
      r["state_x_dense_spam"] = (r["state_bytes"] / dense_spam_bytes if dense_spam_bytes
                                 else None)
      done.append(r)
    return done

  save = lambda: _write_json(args.json, dict(header, optimizers=finished()))
  profile = _save_then_profile(args, save, rows)

  def record(name, t, runner):
    rows[name].update(update_ms=t.ms, page_faults=t.faults, compile_s=t.compile_s,
                      in_flight_ms=t.in_flight_ms)
    profile(name, t, runner)

  if not args.no_time:
    time_updates(opts, shapes, warmup=args.warmup, iters=args.iters,
                 interleave=not args.sequential, after=record)
  results = finished()
  print()
  print("| optimizer | update ms | × adamw | in flight ms | × adamw in flight | page faults "
        "| state MiB | state × adamw | state × dense spam |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    ms, faults, nbytes = r["update_ms"], r["page_faults"], r["state_bytes"]
    dense_x = r["state_x_dense_spam"]
    t = "—" if ms is None else f"{ms:.1f}"
    x = "—" if ms is None else f"{r['x_adamw']:.2f}"
    flight, x_flight = r.get("in_flight_ms"), r.get("x_adamw_in_flight")
    t_flight = "—" if flight is None else f"{flight:.1f}"
    x_flight = "—" if x_flight is None else f"{x_flight:.2f}"
    f = "—" if faults is None else f"{faults:,.0f}"
    print(f"| {r['name']} | {t} | {x} | {t_flight} | {x_flight} | {f} | {nbytes / 2**20:,.1f} | "
          f"{r['state_x_adamw']:.3f} | "
          f"{'—' if dense_x is None else f'{dense_x:.3f}'} |")
  if not args.no_time:
    print("compile (s): " + ", ".join(f"{r['name']} {r['compile_s']:.1f}" for r in results))
  _write_json(args.json, dict(header, optimizers=results))
  _print_profiles(results)


def _print_profiles(results: list) -> None:
  for r in results:
    if "profile" in r:
      print("\n" + "\n".join(profile_summary.markdown(r["profile"], f"{r['name']} update")),
            flush=True)


def _write_json(path: str | None, result: dict) -> None:
  if path:
    rundir.write_atomically(path, json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
