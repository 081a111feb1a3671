"""Where the device time of a benchmarked call goes: a profiler trace of a few calls, summarised.

A benchmark that misses its target (SPAM's update against ``optax.adamw``, MFU, the trainer
against its PyTorch peer) has to say why without another run on the accelerator. So the
benches capture a ``jax.profiler`` trace of a few calls right after their timed ones
(``capture``) and reduce it to a small JSON-ready dict (``summarize``) kept next to the
timing, the trace file itself kept for a closer look (TensorBoard / XProf / Perfetto).

What is counted: the events of the trace that carry an ``hlo_op`` stat, i.e. the work of
one XLA instruction. On a GPU these are the kernels, on the ``/device:GPU:n`` planes (lines
``Stream #...``); without such events (a CPU run) the XLA CPU runtime's thunk events on the
``/host:CPU`` plane. Nested events (a CPU ``while`` thunk around its body's thunks) count
their own time only, so nothing is counted twice.

How to read it (all times in ms per call, averaged over the device planes):

* ``busy_ms_per_call``: the union of the kernel intervals (overlapping kernels on several
  streams count once): how long the device computed.
* ``span_ms_per_call``: each call's first kernel start to its last kernel end (the calls
  told apart by the longest gaps, ``_call_spans``). busy ÷ span well below 1 means the
  device waited between the kernels of a call: launch latency, host work, synchronisation.
  Compare both with the timed call: a call much longer than the span waits on the host
  before its first kernel or after its last one. Kernels XLA replays as one CUDA graph
  (a command buffer) are counted under their own instructions
  (``unwrap_command_buffers``), not under the graph's.
* ``period_ms_per_call``: the whole trace's first kernel start to its last kernel end, over
  the calls. Of calls each waited for, it adds the host's time between them; of calls
  traced in flight (``capture(..., in_flight=True)``: call i dispatched before call i-1
  is waited for, as a training loop runs), it is the time a call takes in a running loop,
  and ``between_ms_per_call`` (the period less the span) is how long the device waited
  between one call's last kernel and the next one's first: the part of the host's launch
  that the previous call did not hide.
* ``categories``: the kernel time by kind of work, a heuristic: from what each instruction
  computes when the compiled HLO text is given (``hlo_categories``), else from the op's and
  kernel's names (``classify``). Many ms in "copy/transpose" or "other elementwise/fusion"
  next to few in "matmul" is memory-bound work that a better fusion might remove.
* ``top``: the instructions that took the most time, with their share of the summed kernel
  time (equal to their share of busy when no kernels overlap), launches per call and the
  name of one kernel (on a GPU the cuBLAS / Triton / fusion kernel's own name).
* ``host_top``: what the host's threads spent a call on, by event name (``host_events``):
  on a GPU XLA's launch of the executable, its CUDA graph's update and launch
  (``command_buffer::update``, ``command_buffer::execute``), the driver calls. Times are
  inclusive (an event's nested events count in it too), so they say where the host's
  launch goes, not a sum.

  path = capture(lambda: jax.block_until_ready(f(x)), calls=3, log_dir="/tmp/prof/f")
  summary = summarize(path, calls=3, hlo_text=f.lower(x).compile().as_text())
  print("\\n".join(markdown(summary, "f")))
"""
from __future__ import annotations

import collections
import glob
import os
import re
from typing import Callable, NamedTuple

import jax

from experiments.benchmarks import hlo_parse

CATEGORIES = ("matmul", "attention", "reduction", "copy/transpose", "collective",
              "other elementwise/fusion")
OTHER = CATEGORIES[-1]

# Checked in this order: the first category with a matching fragment wins (an all-reduce
# is a collective before it is a reduction, a cuDNN attention kernel holds GEMMs).
_NAME_FRAGMENTS = (
    ("collective", ("all-reduce", "all_reduce", "allreduce", "all-gather", "all_gather",
                    "reduce-scatter", "reduce_scatter", "all-to-all", "all_to_all",
                    "collective-permute", "collective_permute", "nccl")),
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "dot", "cublas", "cutlass", "nvjet", "xmma", "matmul",
                "convolution")),
    ("reduction", ("reduce", "reduction")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "concatenate",
                        "dynamic-update-slice", "dynamic_update_slice")),
)

_COLLECTIVE_OPS = frozenset({
    "all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter",
    "all-to-all", "collective-permute", "collective-permute-start", "ragged-all-to-all"})
_MOVEMENT_OPS = frozenset({
    "copy", "copy-start", "copy-done", "transpose", "concatenate", "slice", "dynamic-slice",
    "dynamic-update-slice", "pad", "reverse"})
_TRIVIAL_OPS = frozenset({
    "parameter", "constant", "bitcast", "reshape", "get-tuple-element", "tuple", "broadcast",
    "iota", "convert"})
# Lines XProf derives from the kernels; skipped on a device plane without "Stream" lines.
_DERIVED_LINES = frozenset({
    "XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Ops", "Framework Name Scope",
    "TensorFlow Ops", "TensorFlow Name Scope", "Source code", "Launch Stats"})



class _Kernel(NamedTuple):
  op: str  # the hlo_op stat: the XLA instruction
  name: str  # the event's name: the kernel on a GPU, the instruction on a CPU
  module: str  # the hlo_module stat
  start: float  # ns
  end: float  # ns


def capture(run_once: Callable[[], object], calls: int, log_dir: str, *,
            in_flight: bool = False) -> str:
  """Runs ``run_once()`` ``calls`` times inside ``jax.profiler.trace(log_dir)``.

  ``run_once`` dispatches one call and waits for it (``jax.block_until_ready``), so the
  trace holds exactly ``calls`` calls. With ``in_flight``, ``run_once`` only dispatches
  and returns the call's outputs; each is waited for after the next call is dispatched,
  as a training loop waits for the previous step's metrics, and the last at the end.
  Python calls are not traced: tracing them slows the host side of every call and would
  widen the gaps between kernels. Returns the path of the trace written
  (``log_dir/plugins/profile/<time>/<host>.xplane.pb``, the newest one).
  """
  os.makedirs(log_dir, exist_ok=True)
  options = jax.profiler.ProfileOptions()
  # No Python tracer; and say why the start failed rather than trace nothing. Options this
  # jax does not have are left at their defaults.
  for name, value in (("python_tracer_level", 0), ("raise_error_on_start_failure", True)):
    try:
      setattr(options, name, value)
    except AttributeError:
      pass
  with jax.profiler.trace(log_dir, profiler_options=options):
    if in_flight:
      previous = run_once()
      for _ in range(calls - 1):
        current = run_once()
        jax.block_until_ready(previous)
        previous = current
      jax.block_until_ready(previous)
    else:
      for _ in range(calls):
        run_once()
  paths = glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb"))
  if not paths:
    raise FileNotFoundError(f"the profiler wrote no *.xplane.pb under {log_dir}")
  return max(paths, key=os.path.getmtime)


def module_name(hlo_text: str) -> str | None:
  """The module's name (``jit_step``...) from the first line of its HLO text."""
  m = hlo_parse.MODULE.match(hlo_text or "")
  return m.group(1) if m else None


def classify(op: str, kernel: str = "") -> str:
  """A category of ``CATEGORIES`` from an instruction's and a kernel's names.

  A heuristic on names: cuBLAS / CUTLASS / nvjet / xmma kernels, ``dot``, ``gemm`` and
  ``convolution`` in a name are "matmul"; cuDNN, fmha, flash and sdpa "attention";
  ``reduce`` a "reduction"; ``copy``, ``transpose``, ``concatenate``, memcpy
  "copy/transpose"; NCCL and the collective ops "collective"; anything else (XLA's
  elementwise loop fusions, named ``fusion.N`` or ``loop_<op>_fusion``) is
  "other elementwise/fusion". ``hlo_categories`` is more exact where the HLO is at hand.
  """
  text = f"{op} {kernel}".lower()
  for category, fragments in _NAME_FRAGMENTS:
    if any(f in text for f in fragments):
      return category
  return OTHER


def hlo_categories(hlo_text: str) -> dict[str, str]:
  """Instruction name → category, from what each instruction (and its fusion) computes.

  A fusion is classified by the operations of its fused computation: a ``dot`` or
  ``convolution`` (or a cuBLAS / GEMM custom call) makes it "matmul", a cuDNN fmha / flash
  custom call "attention", a collective "collective", a ``reduce`` "reduction", only data
  movement (copy, transpose, slices, concatenate, pad; reshapes, broadcasts and converts
  aside) "copy/transpose"; anything else is "other elementwise/fusion".
  """
  computations: dict[str, list[tuple[str, str, str | None, list[str]]]] = {}
  for name, comp in hlo_parse.computations(hlo_text).items():
    rows = computations.setdefault(name, [])
    for inst, _, op, _, line in hlo_parse.instructions(comp):
      target = hlo_parse.TARGET.search(line)
      rows.append((inst, op, target.group(1) if target else None, hlo_parse.CALLS.findall(line)))

  def ops_of(calls: list[str], seen: set) -> set:
    found = set()
    for comp in calls:
      if comp in seen:
        continue
      seen.add(comp)
      for _, opcode, target, inner in computations.get(comp, ()):
        found.add((opcode, target))
        found |= ops_of(inner, seen)
    return found

  result = {}
  for instructions in computations.values():
    for name, opcode, target, calls in instructions:
      result[name] = _category_of_ops({(opcode, target)} | ops_of(calls, set()))
  return result


def _category_of_ops(ops: set) -> str:
  opcodes = {opcode for opcode, _ in ops}
  targets = " ".join(t.lower() for _, t in ops if t)
  if opcodes & _COLLECTIVE_OPS:
    return "collective"
  if any(f in targets for f in ("fmha", "flash", "sdpa")):
    return "attention"
  if opcodes & {"dot", "convolution"} or any(f in targets for f in ("gemm", "cublas",
                                                                     "matmul")):
    return "matmul"
  if opcodes & {"reduce", "reduce-window"}:
    return "reduction"
  work = opcodes - _TRIVIAL_OPS - {"fusion"}
  if work and work <= _MOVEMENT_OPS:
    return "copy/transpose"
  return OTHER


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  return "" if value is None else str(value)


def _stats(event) -> dict:
  try:
    return {_text(k): v for k, v in event.stats}
  except Exception:  # pylint: disable=broad-except
    return {}


def _line_kernels(line, host: bool) -> list[_Kernel]:
  kernels = []
  for event in line.events:
    name = _text(event.name)
    if host and name.startswith("end:"):
      continue
    stats = _stats(event)
    op = _text(stats.get("hlo_op"))
    if not op:
      continue
    start = float(event.start_ns)
    kernels.append(_Kernel(op, name, _text(stats.get("hlo_module")), start,
                           start + max(float(event.duration_ns), 0.0)))
  return kernels


def _plane_lines(plane, host: bool) -> list[list[_Kernel]]:
  """The kernels of each line of a plane (device: the "Stream" lines when they have any)."""
  lines = [(_text(line.name), _line_kernels(line, host)) for line in plane.lines]
  lines = [(name, kernels) for name, kernels in lines if kernels]
  if not host:
    streams = [(n, k) for n, k in lines if n.startswith("Stream")]
    lines = streams or [(n, k) for n, k in lines if n not in _DERIVED_LINES]
  return [kernels for _, kernels in lines]


def _self_times(kernels: list[_Kernel]) -> list[float]:
  """Each kernel's time less that of the kernels nested in it (one line, ns)."""
  order = sorted(range(len(kernels)), key=lambda i: (kernels[i].start, -kernels[i].end))
  own = [k.end - k.start for k in kernels]
  stack: list[int] = []
  for i in order:
    k = kernels[i]
    while stack and kernels[stack[-1]].end <= k.start:
      stack.pop()
    if stack and k.end <= kernels[stack[-1]].end:
      own[stack[-1]] -= k.end - k.start
    stack.append(i)
  return [max(t, 0.0) for t in own]


def _call_spans(kernels: list[_Kernel], calls: int) -> float:
  """The summed spans of the ``calls`` calls, first kernel start to last kernel end each.

  The calls are told apart by the ``calls − 1`` longest gaps between kernels: between two
  traced calls the device waits for the host to see the first finish and launch the next,
  far longer than any gap inside one call. So the host's time between calls is not counted
  as the device waiting within a call.
  """
  ordered = sorted((k.start, k.end) for k in kernels)
  gaps, end = [], ordered[0][1]
  for i, (start, stop) in enumerate(ordered[1:], 1):
    if start > end:
      gaps.append((start - end, i))
    end = max(end, stop)
  cuts = sorted(i for _, i in sorted(gaps, reverse=True)[:max(calls - 1, 0)])
  total = 0.0
  for lo, hi in zip([0] + cuts, cuts + [len(ordered)]):
    total += max(e for _, e in ordered[lo:hi]) - ordered[lo][0]
  return total


def _union(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def _error(message: str, calls: int) -> dict:
  return dict(source=None, calls=calls, error=message)


def summarize(xplane_path: str, calls: int, *, top: int = 12, module: str | None = None,
              hlo_text: str | None = None) -> dict:
  """Where the device time of ``calls`` traced calls went (see the module docstring).

  Args:
    xplane_path: a trace written by ``capture`` (or any ``*.xplane.pb``).
    calls: how many calls the trace holds; every number is per call.
    top: how many instructions to list.
    module: keep only the events whose ``hlo_module`` contains this (e.g. ``jit_step``);
      when none does, all are kept and ``note`` says so.
    hlo_text: the compiled module's HLO text (``compiled.as_text()``): categories from what
      each instruction computes (``hlo_categories``) instead of from names alone.

  Returns a JSON-ready dict: ``source`` ("gpu": kernels of the device planes, "cpu": the
  host's XLA thunks), ``calls``, ``devices``, ``busy_ms_per_call``, ``span_ms_per_call``,
  ``kernel_ms_per_call`` (summed kernel time), ``kernels_per_call``, ``categories``
  (category → ms per call) and ``top`` (dicts of ``op``, ``ms_per_call``, ``share``,
  ``count_per_call``, ``category``, ``name``), longest first; ``note`` when something was
  off. Never raises on an odd trace: without any ``hlo_op`` event it returns
  ``{"source": None, "calls": calls, "error": ...}``.
  """
  try:
    data = jax.profiler.ProfileData.from_file(xplane_path)
    planes = list(data.planes)
  except Exception as e:  # pylint: disable=broad-except
    return _error(f"unreadable trace {xplane_path}: {type(e).__name__}: {e}", calls)
  calls = max(int(calls), 1)
  source, per_plane = None, []
  for name, prefix, host in (("gpu", "/device:GPU", False), ("cpu", "/host:CPU", True)):
    per_plane = [lines for lines in (_plane_lines(p, host) for p in planes
                                     if _text(p.name).startswith(prefix)) if lines]
    if per_plane:
      source = name
      break
  if not per_plane:
    return _error("no event with an hlo_op stat in the trace", calls)
  notes = []
  if module:
    kept = [[[k for k in line if module in k.module] for line in lines] for lines in per_plane]
    kept = [[line for line in lines if line] for lines in kept]
    kept = [lines for lines in kept if lines]
    if kept:
      per_plane = kept
    else:
      notes.append(f"no event of module {module!r}: all modules kept")
  categories = hlo_categories(hlo_text) if hlo_text else {}
  by_kernel = kernel_names(categories)
  per_plane = [[unwrap_command_buffers(line, by_kernel) for line in lines]
               for lines in per_plane]
  summary, counts = _summary(per_plane, calls, top, categories, source, notes)
  if hlo_text:
    try:
      _add_rates(summary, hlo_text, counts)
    except Exception as e:  # pylint: disable=broad-except
      notes = [summary.get("note"), f"no rates: {type(e).__name__}: {e}".splitlines()[0]]
      summary["note"] = "; ".join(filter(None, notes))
  # more host events than instructions: waits on the device (the loop's fetch of a step's
  # outputs) and the launch's outer events come first
  summary["host_top"] = host_events(planes, calls, top=min(2 * top, 24))
  return summary


def _add_rates(summary: dict, hlo_text: str, counts: dict | None = None) -> None:
  """Each top op's bytes per call (``GB_per_call``: the HLO's bytes of one launch times its
  launches) and the rate its kernels moved them at (``GBps``), where the HLO names it; with
  ``counts`` (op → launches per call, category) the same for each category over all its
  ops (``category_GB_per_call``, ``category_GBps``): the rate of, say, every reduction
  kernel together, hundreds of small ones that no top list shows."""
  from experiments.benchmarks import hlo_stats  # pylint: disable=import-outside-toplevel
  moved = hlo_stats.instruction_bytes(hlo_text)
  for t in summary.get("top", []):
    per_launch = moved.get(t["op"])
    if per_launch and t["ms_per_call"] > 0:
      gb = per_launch * t["count_per_call"] / 1e9
      t["GB_per_call"] = float(f"{gb:.4g}")
      t["GBps"] = float(f"{gb / t['ms_per_call'] * 1e3:.4g}")
  if counts:
    gb = collections.Counter()
    for op, (count, category) in counts.items():
      gb[category] += moved.get(op, 0) * count / 1e9
    summary["category_GB_per_call"] = {c: float(f"{v:.4g}") for c, v in gb.items() if v}
    summary["category_GBps"] = {
        c: float(f"{v / summary['categories'][c] * 1e3:.4g}") for c, v in gb.items()
        if v and summary["categories"].get(c)}


def host_events(planes, calls: int, *, top: int = 12) -> list[dict]:
  """The host events that took the most time, by name, over every line of the
  ``/host:CPU`` planes: ``name``, ``ms_per_call`` (inclusive: nested events count in their
  parents too) and ``count_per_call``, longest first. The ``end:`` markers of CPU thunks
  are left out."""
  ns, count = collections.Counter(), collections.Counter()
  for plane in planes:
    if not _text(plane.name).startswith("/host:CPU"):
      continue
    for line in plane.lines:
      for event in line.events:
        name = _text(event.name)
        if not name or name.startswith("end:"):
          continue
        ns[name] += max(float(event.duration_ns), 0.0)
        count[name] += 1
  calls = max(int(calls), 1)
  ranked = sorted(ns, key=lambda name: (-ns[name], name))[:max(top, 0)]
  return [dict(name=name[:120], ms_per_call=round(ns[name] / calls / 1e6, 4),
               count_per_call=round(count[name] / calls, 2)) for name in ranked]


def is_command_buffer(op: str) -> bool:
  """Whether ``op`` is a command buffer: XLA:GPU's CUDA graph of many instructions."""
  return op.startswith("command_buffer")


def kernel_names(instructions) -> dict[str, str]:
  """Kernel name → instruction name: XLA names a fusion's kernel after the instruction,
  with ``_`` for ``.`` and ``-`` (``input_reduce_fusion.64`` → ``input_reduce_fusion_64``)."""
  return {re.sub(r"[.-]", "_", name): name for name in instructions}


def unwrap_command_buffers(kernels: list[_Kernel], by_kernel: dict[str, str]) -> list[_Kernel]:
  """The kernels of a CUDA graph, each under its own instruction rather than the graph's.

  Kernels replayed from a command buffer all carry the buffer's name as their ``hlo_op``.
  Where ``by_kernel`` (``kernel_names`` of the compiled HLO) knows the kernel, it is counted
  under that instruction; otherwise (a cuBLAS, cuDNN or memset kernel) under its own name.
  """
  return [k._replace(op=by_kernel.get(k.name, k.name)) if is_command_buffer(k.op) else k
          for k in kernels]


def _summary(per_plane, calls, top, categories, source, notes) -> dict:
  n = len(per_plane) * calls  # per call and device
  busy = span = period = 0.0
  op_ns = collections.Counter()
  op_count = collections.Counter()
  op_names: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for lines in per_plane:
    kernels = [k for line in lines for k in line]
    busy += _union([(k.start, k.end) for k in kernels])
    span += _call_spans(kernels, calls)
    period += max(k.end for k in kernels) - min(k.start for k in kernels)
    for line in lines:
      for k, own in zip(line, _self_times(line)):
        op_ns[k.op] += own
        op_count[k.op] += 1
        op_names[k.op][k.name] += own
  total_ns = sum(op_ns.values())
  by_category = dict.fromkeys(CATEGORIES, 0.0)
  category_of = {}
  for op, ns in op_ns.items():
    example = op_names[op].most_common(1)[0][0]
    category_of[op] = categories.get(op) or classify(op, example if example != op else "")
    by_category[category_of[op]] += ns
  ranked = sorted(op_ns, key=lambda op: (-op_ns[op], op))[:max(top, 0)]
  ms = lambda ns: round(ns / n / 1e6, 4)
  summary = dict(
      source=source, calls=calls, devices=len(per_plane),
      busy_ms_per_call=ms(busy), span_ms_per_call=ms(span), period_ms_per_call=ms(period),
      between_ms_per_call=ms(period - span), kernel_ms_per_call=ms(total_ns),
      kernels_per_call=round(sum(op_count.values()) / n, 2),
      categories={c: ms(ns) for c, ns in sorted(by_category.items(), key=lambda x: -x[1])},
      top=[dict(op=op, ms_per_call=ms(op_ns[op]),
                share=round(op_ns[op] / total_ns, 4) if total_ns else 0.0,
                count_per_call=round(op_count[op] / n, 2), category=category_of[op],
                name=op_names[op].most_common(1)[0][0])
           for op in ranked])
  if notes:
    summary["note"] = "; ".join(notes)
  counts = {op: (op_count[op] / n, category_of[op]) for op in op_ns}
  return summary, counts


def profile(run_once: Callable[[], object], calls: int, log_dir: str, *,
            hlo_text: str | None = None, top: int = 40, in_flight: bool = False) -> dict:
  """``capture`` then ``summarize`` (module and categories from ``hlo_text``), never raising.

  The summary gets the trace's path under ``xplane``; any failure (the profiler refusing
  to start, an unreadable trace) comes back as ``{"error": "...", "xplane": path or None}``
  so that a benchmark keeps its timing whatever the profiler does.
  """
  path = None
  try:
    path = capture(run_once, calls, log_dir, in_flight=in_flight)
    summary = summarize(path, calls, top=top, module=module_name(hlo_text or ""),
                        hlo_text=hlo_text)
  except Exception as e:  # pylint: disable=broad-except
    return dict(error=f"{type(e).__name__}: {e}".splitlines()[0], xplane=path)
  if summary.get("source") == "cpu" and jax.default_backend() != "cpu":
    summary["note"] = "; ".join(filter(None, [
        summary.get("note"), f"no {jax.default_backend()} kernel in the trace (device tracer "
        "unavailable?): these are the host's launches, not device time"]))
  return dict(summary, xplane=path)


def _top_category(summary: dict) -> tuple[str, float]:
  name, ms = max(summary["categories"].items(), key=lambda x: x[1])
  return name, ms


def one_line(label: str, summary: dict) -> str:
  """``profile <label>: busy 12.30 ms/call, busy/span 0.91, top matmul 7.10 ms (58%)``."""
  if summary.get("error") or not summary.get("source"):
    return f"profile {label}: failed ({summary.get('error', 'no summary')})"
  busy, span = summary["busy_ms_per_call"], summary["span_ms_per_call"]
  category, ms = _top_category(summary)
  total = summary["kernel_ms_per_call"]
  share = f" ({100 * ms / total:.0f}%)" if total else ""
  return (f"profile {label}: {summary['source']} busy {busy:.2f} ms/call, busy/span "
          f"{busy / span if span else 0:.2f}, {summary['kernels_per_call']:g} kernels/call, "
          f"top {category} {ms:.2f} ms{share}")


def markdown(summary: dict, title: str, rows: int = 5) -> list[str]:
  """A few markdown lines: the totals, the categories and the ``rows`` longest ops."""
  if summary.get("error") or not summary.get("source"):
    return [f"**{title}**: no profile ({summary.get('error', 'no summary')})"]
  busy, span = summary["busy_ms_per_call"], summary["span_ms_per_call"]
  total = summary["kernel_ms_per_call"] or 1.0
  cats = ", ".join(f"{c} {ms:.2f} ms ({100 * ms / total:.0f}%)"
                   for c, ms in summary["categories"].items() if ms > 0)
  lines = [f"**{title}** ({summary['source']}, {summary['calls']} calls): busy {busy:.2f} "
           f"ms/call of a {span:.2f} ms span ({100 * busy / span if span else 0:.0f}%), "
           f"{summary['kernels_per_call']:g} kernels/call",
           f"- by kind: {cats}", "",
           "| op | kind | ms/call | share | per call | kernel |", "|---|---|---:|---:|---:|---|"]
  for t in summary["top"][:rows]:
    lines.append(f"| {t['op']} | {t['category']} | {t['ms_per_call']:.3f} "
                 f"| {100 * t['share']:.1f}% | {t['count_per_call']:g} | {t['name'][:60]} |")
  return lines
