"""What the compiler made of the trainer's step or one optimizer update: a summary of the HLO.

Compiles (without running or allocating) the trainer's step (``bench_train.trainer_step``) or
one donated optimizer update (``bench_optimizer``'s layout) for this machine's backend and
counts what matters for speed in the optimized HLO: kernels (fusions, by kind), custom calls
(cuDNN attention shows as ``__cudnn$fmha...``), while loops (``lax.scan``: accumulation,
scanned layers), scatters and gathers (sparse moments), sorts, copies, collectives, and how
many outputs reuse a donated input buffer. Donation warnings raised while compiling are kept.

  python -m experiments.benchmarks.hlo_stats --what train --model llama_60m --optimizer spam
  python -m experiments.benchmarks.hlo_stats --what optimizer --size small --optimizer spam
  python -m experiments.benchmarks.hlo_stats --what train --dump /tmp/hlo   # also the HLO text
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import optax

from experiments import jax_settings
from experiments.benchmarks import bench_optimizer, bench_train, hlo_parse, profile_summary

_ALIAS = re.compile(r"input_output_alias=\{(.*?)\}(?:,\s*[a-z_]+=|\n|$)")


computations = hlo_parse.computations


def _bodies(comps: dict) -> set:
  """Computations that run inside another instruction's kernel, not as kernels themselves.

  Fusion bodies (``calls=`` of a ``fusion``, nested ones too) and the reducers, comparators
  and combiners of reduce, sort, scatter and all-reduce (``to_apply=`` of anything but a
  ``call``). While bodies and conditions, conditional branches, called and async-wrapped
  computations stay: their instructions are launched on their own.
  """
  inner = set()
  for comp in comps.values():
    for line in comp["lines"]:
      op = hlo_parse.opcode(line)
      if op == "fusion":
        inner.update(hlo_parse.CALLS.findall(line))
      if op != "call":
        inner.update(hlo_parse.TO_APPLY.findall(line))
  return inner


def _out_of_graph(line: str, comps: dict, inner: set) -> bool:
  """Whether a conditional's branches (and what they call on their own) launch a loop, a
  custom call or another conditional, which keep it out of XLA:GPU's CUDA graph."""
  listed = hlo_parse.BRANCH_LIST.search(line)
  todo = (re.findall(r"%?([\w.\-]+)", listed.group(1)) if listed
          else [n for n in hlo_parse.CALLEE.findall(line)])
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name in inner or name not in comps:
      continue
    seen.add(name)
    for body_line in comps[name]["lines"]:
      if hlo_parse.opcode(body_line) in ("while", "custom-call", "conditional"):
        return True
      todo.extend(hlo_parse.CALLEE.findall(body_line))
  return False


def summarize(hlo_text: str) -> dict:
  """Counts of the instructions of an optimized HLO module that matter for speed.

  Only instructions of computations that run on their own are counted (the entry, while
  bodies, branches): what a fusion or a reducer holds inside is part of that one kernel.
  ``host_waits`` counts the loops without a known trip count and the conditionals that
  XLA:GPU's CUDA graph cannot hold, those whose branches launch a loop, a library call
  (custom call) or another conditional (e.g. sparse SPAM's mask redraw, whose top-k is
  such a call): XLA:GPU runs each by copying its predicate to the host and waiting for the
  device to reach it (per iteration for a loop), so the host cannot queue work ahead of
  the device there. A conditional whose branches launch only kernels is a conditional node
  of the graph (in the dump's thunk sequence, jax 0.10.2 and 0.11.2), which the device
  decides: not a wait.
  """
  ops = collections.Counter()
  kinds = collections.Counter()
  targets = collections.Counter()
  host_waits = 0
  comps = computations(hlo_text)
  inner = _bodies(comps)
  for name, comp in comps.items():
    if name in inner:
      continue
    for line in comp["lines"]:
      op = hlo_parse.opcode(line)
      if not op:
        continue
      ops[op] += 1
      if ((op == "conditional" and _out_of_graph(line, comps, inner))
          or (op == "while" and not _TRIP_COUNT.search(line))):
        host_waits += 1
      if op == "fusion":
        k = hlo_parse.FUSION_KIND.search(line)
        kinds[k.group(1) if k else "?"] += 1
      if op == "custom-call":
        t = hlo_parse.TARGET.search(line)
        targets[t.group(1) if t else "?"] += 1
  header = hlo_text.splitlines()[0] if hlo_text else ""
  alias = _ALIAS.search(header)
  aliased = len(re.findall(r"may-alias|must-alias", alias.group(1))) if alias else 0
  keep = ("fusion", "while", "conditional", "scatter", "gather", "sort", "copy",
          "dynamic-update-slice", "dynamic-slice", "all-reduce", "all-gather",
          "reduce-scatter", "custom-call", "dot", "convolution", "reduce", "rng-bit-generator")
  return dict(ops={k: ops[k] for k in keep if ops[k]}, fusion_kinds=dict(kinds),
              custom_calls=dict(targets), aliased_outputs=aliased,
              cudnn_attention=any("fmha" in t for t in targets), host_waits=host_waits)


# Bytes per element of the HLO element types (sub-byte types packed).
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
                "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
                "f8e5m2fnuz": 1, "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "f4e2m1fn": 0.5}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# Instructions that launch nothing: they name, split or join buffers, or hold a computation
# whose own instructions are counted.
_FREE = frozenset({"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "while",
                   "conditional", "call", "after-all", "partition-id", "replica-id",
                   "opt-barrier", "add-dependency", "domain", "async-done", "copy-done",
                   "all-reduce-done", "all-gather-done", "collective-permute-done"})


def type_bytes(hlo_type: str) -> float:
  """Bytes of an HLO type, tuples summed: ``(f32[2,3]{1,0}, bf16[4])`` → 32."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(hlo_type):
    if dtype in _DTYPE_BYTES:
      n = 1
      for d in dims.split(","):
        n *= int(d) if d else 1
      total += n * _DTYPE_BYTES[dtype]
  return total


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LOOP_PARTS = re.compile(r"\b(body|condition)=%?([\w.\-]+)")


def _sliced_io(fused: dict) -> tuple:
  """What a fusion really reads of each operand and writes, where it slices a buffer.

  Returns ``(reads, written)``: ``reads[i]`` is the bytes read of operand ``i`` when the
  fused computation only takes slices of that parameter, static or dynamic, through
  bitcasts or not (one of q, k, v out of their stacked product; a scanned layer's weights
  out of the stacked array), or when it only updates a slice of it in place (the stacked
  gradient); ``written`` is the bytes of those in-place updates, None when the root is not
  one. Operands not listed are read whole.
  """
  defs = hlo_parse.instructions(fused)
  types = {name: typ for name, typ, *_ in defs}
  params = {}
  for name, _, op, _, line in defs:
    if op == "parameter":
      params[name] = int(re.search(r"parameter\((\d+)\)", line).group(1))
  users = collections.defaultdict(list)
  for name, _, op, operands, _ in defs:
    for i, o in enumerate(operands):
      users[o].append((name, op, i, operands))
  root = next((d for d in defs if d[4].lstrip().startswith("ROOT")), None)
  roots = [root] if root else []
  if root and root[2] == "tuple":
    roots = [d for d in defs if d[0] in root[3]]
  def through_bitcasts(name):
    """The uses of ``name``, looking through bitcasts (free views of the same buffer)."""
    found = []
    for use in users.get(name, []):
      found.extend(through_bitcasts(use[0]) if use[1] == "bitcast" else [use])
    return found

  reads, written = {}, None
  in_place = {d[0]: d for d in roots if d[2] == "dynamic-update-slice"}
  for name, index in params.items():
    uses = through_bitcasts(name)
    if uses and all(op in ("slice", "dynamic-slice") and i == 0 for _, op, i, _ in uses):
      reads[index] = min(sum(type_bytes(types[user]) for user, *_ in uses),
                         type_bytes(types[name]))
    elif uses and all(user in in_place and i == 0 for user, _, i, _ in uses):
      reads[index] = 0.0
  if in_place and len(in_place) == len(roots):
    written = sum(type_bytes(hlo_parse.operand_type(types, d[3][1])) for d in in_place.values())
  return reads, written


def _kernels_of(comp: dict, comps: dict | None = None):
  """``(name, kind, bytes)`` of each kernel one computation's own instructions launch (see
  ``kernel_traffic``)."""
  defs = hlo_parse.instructions(comp)
  types = {name: typ for name, typ, *_ in defs}
  for name, typ, op, operands, line in defs:
    if op in _FREE:
      continue
    reads, written = {}, None
    if op == "fusion":
      k = hlo_parse.FUSION_KIND.search(line)
      fused = hlo_parse.CALLS.search(line)
      if comps and fused and fused.group(1) in comps:
        reads, written = _sliced_io(comps[fused.group(1)])
      op = f"fusion:{k.group(1) if k else '?'}"
    elif op == "dynamic-slice":  # reads the slice it returns
      reads = {0: type_bytes(typ)}
    elif op == "dynamic-update-slice":  # in place: reads and writes the update
      reads, written = {0: 0.0}, (type_bytes(hlo_parse.operand_type(types, operands[1]))
                                  if len(operands) > 1 else None)
    moved = (type_bytes(typ) if written is None else written) + sum(
        reads.get(i, type_bytes(hlo_parse.operand_type(types, o))) for i, o in enumerate(operands))
    yield name, op, moved


def _traffic_of(comp: dict, comps: dict | None = None, categories: dict | None = None) -> tuple:
  """Kernels and bytes of one computation's own instructions, by kind, and the bytes by
  category (``profile_summary.CATEGORIES``, from ``categories``: instruction → category)."""
  kernels, total, by_category = (collections.Counter() for _ in range(3))
  for name, op, moved in _kernels_of(comp, comps):
    kernels[op] += 1
    total[op] += moved
    by_category[(categories or {}).get(name, profile_summary.OTHER)] += moved
  return kernels, total, by_category


@functools.lru_cache(maxsize=2)
def instruction_bytes(hlo_text: str) -> dict:
  """The bytes each kernel moves per launch, as ``kernel_traffic`` counts them, by the name
  of its instruction (what a profile's ``hlo_op`` names): with a profile's time of that
  op, the rate it reached. Kept for the last texts read (a trainer step is profiled twice,
  with the same HLO); the dict is shared, for reading."""
  comps = computations(hlo_text)
  inner = _bodies(comps)
  return {name: moved for cname, comp in comps.items() if cname not in inner
          for name, _, moved in _kernels_of(comp, comps)}


def _callees(comp: dict, inner: set) -> tuple:
  """The computations ``comp`` runs on their own, with how many times per run of ``comp``:
  ``(always: {name: times}, branches: [[names of one conditional's branches], ...])``.
  A while loop's body and condition run its known trip count (1 when XLA does not know it)."""
  always, branches = collections.Counter(), []
  for line in comp["lines"]:
    names = {n for n in hlo_parse.CALLEE.findall(line) if n not in inner}
    listed = hlo_parse.BRANCH_LIST.search(line)
    if listed:
      names |= set(re.findall(r"%?([\w.\-]+)", listed.group(1)))
    if " conditional(" in line:
      branches.append(sorted(names))
      continue
    trips = _TRIP_COUNT.search(line) if " while(" in line else None
    loop = {n for _, n in _LOOP_PARTS.findall(line)} if trips else set()
    for name in names:
      always[name] += int(trips.group(1)) if name in loop else 1
  return always, branches


def kernel_traffic(hlo_text: str) -> dict:
  """Kernels launched by one run of the module and the bytes they move, an estimate.

  Every instruction of a computation that runs on its own (see ``summarize``) other than
  bookkeeping (parameters, tuples, bitcasts, loops) is one kernel that reads each operand
  and writes its result once: ``bytes`` is the sum over kernels of operand and result
  sizes, except that a kernel which only takes slices (static or dynamic) of an operand
  reads those slices, and one that updates a slice of a buffer in place writes (and reads)
  the update. That is the device-memory traffic of an update when nothing stays in cache
  between kernels. A loop body counts as many times as its known trip count (a scan over
  layers runs its body once per layer). The branches of a conditional are not in the
  totals (one of them runs); ``branches`` lists each branch's own kernels and bytes, per
  run of the branch. ``by_category`` splits ``bytes`` by what each kernel computes
  (``profile_summary.hlo_categories``: matrix products, attention, reductions, data
  movement, other element-wise work). For a memory-bound step (an optimizer update) bytes
  over the device's bandwidth is the time to expect, and two optimizers' bytes compare
  their passes over memory without running them.
  """
  comps = computations(hlo_text)
  categories = profile_summary.hlo_categories(hlo_text)
  inner = _bodies(comps)
  graph = {name: _callees(comp, inner) for name, comp in comps.items() if name not in inner}

  def runs(roots) -> collections.Counter:
    """How many times each computation reachable from ``roots`` runs per run of the roots."""
    times = collections.Counter()

    def visit(name, n):
      if name not in graph:
        return
      times[name] += n
      for child, k in graph[name][0].items():
        visit(child, n * k)

    for root in roots:
      visit(root, 1)
    return times

  entries = [n for n, c in comps.items() if c["entry"]] or list(graph)
  always = runs(entries)

  def tally(times) -> tuple:
    kernels, total, by_category = (collections.Counter() for _ in range(3))
    for name, n in times.items():
      k, b, c = _traffic_of(comps[name], comps, categories)
      kernels.update({key: v * n for key, v in k.items()})
      total.update({key: v * n for key, v in b.items()})
      by_category.update({key: v * n for key, v in c.items()})
    return kernels, total, by_category

  kernels, total, by_category = tally(always)
  branches = []
  for name in sorted(always):
    for group in graph[name][1]:
      for root in group:
        k, b, _ = tally(runs([root]))
        branches.append(dict(computation=root, kernels=sum(k.values()),
                             bytes=sum(b.values())))
  return dict(kernels=sum(kernels.values()), bytes=sum(total.values()),
              by_kind={k: dict(kernels=kernels[k], bytes=total[k]) for k in sorted(kernels)},
              by_category={c: by_category[c] for c in profile_summary.CATEGORIES
                           if by_category[c]},
              branches=branches)


def _compile(lowered):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compiled = lowered.compile()
  donation = [str(w.message).splitlines()[0] for w in caught if "donat" in str(w.message)]
  return compiled, donation


def train_hlo(args) -> tuple[str, dict]:
  ns = bench_train.parse_args(["--models", args.model, "--optimizers", args.optimizer,
                               "--batch", str(args.batch), "--length", str(args.length),
                               "--dtype", args.dtype, "--density", str(args.density)]
                              + (["--scan_layers"] if args.scan_layers else [])
                              + (["--activation_checkpointing"] if args.remat else []))
  with bench_train.trainer_step(ns, args.model, args.optimizer) as (cfg, _, init, step, batch):
    state = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
    compiled, donation = _compile(step.lower(state, batch))
    n_state = len(jax.tree.leaves(state))
  return compiled.as_text(), dict(state_leaves=n_state, donation_warnings=donation)


def optimizer_hlo(args) -> tuple[str, dict]:
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES[args.size], jnp.float32)
  opts = bench_optimizer.optimizers(0.25)
  opt = opts["spam d=0.25" if args.optimizer == "spam_sparse" else args.optimizer]

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(opt.init, shapes)
  compiled, donation = _compile(jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes))
  n = len(jax.tree.leaves(shapes)) + len(jax.tree.leaves(state))
  return compiled.as_text(), dict(donated_leaves=n, param_leaves=len(jax.tree.leaves(shapes)),
                                  donation_warnings=donation)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--what", choices=("train", "optimizer"), default="train")
  p.add_argument("--model", default="llama_60m", help="--what train: the model config")
  p.add_argument("--optimizer", default="spam",
                 help="train: a trainer --optimizer; optimizer: adamw, spam, stable_spam, "
                      "spam_sparse")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--dtype", default="auto")
  p.add_argument("--density", type=float, default=1.0)
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--size", default="small", choices=sorted(bench_optimizer.SIZES),
                 help="--what optimizer: the parameter layout")
  p.add_argument("--dump", default=None, help="folder to write the optimized HLO text into")
  p.add_argument("--json", default=None, help="also write the summary to this JSON file")
  args = p.parse_args(argv)
  jax_settings.apply()
  text, extra = train_hlo(args) if args.what == "train" else optimizer_hlo(args)
  label = (f"train-{args.model}-{args.optimizer}{'-scan' if args.scan_layers else ''}"
           if args.what == "train" else f"optimizer-{args.size}-{args.optimizer}")
  summary = dict(what=label, backend=jax.default_backend(),
                 device=jax.devices()[0].device_kind, **summarize(text),
                 traffic=kernel_traffic(text), **extra)
  print(json.dumps(summary, indent=1), flush=True)
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
    with open(os.path.join(args.dump, label + ".hlo.txt"), "w", encoding="utf-8") as f:
      f.write(text)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return summary


if __name__ == "__main__":
  main()
