"""experiments/benchmarks/profile_summary.py: a real CPU trace, and synthetic GPU traces."""
import json
import os

import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import hlo_stats
from experiments.benchmarks import profile_summary as ps

CALLS = 3


@jax.jit
def _f(a, b):
  def body(c, _):
    return jnp.tanh(c @ b), None
  c, _ = jax.lax.scan(body, a, None, length=2)
  return c.sum(axis=0) + jnp.transpose(a).mean()


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
  """A trace of CALLS calls of ``_f``, its log folder and the compiled HLO text."""
  a = jnp.ones((128, 128)) / 128
  b = jnp.eye(128)
  jax.block_until_ready(_f(a, b))
  log_dir = str(tmp_path_factory.mktemp("profile"))
  path = ps.capture(lambda: jax.block_until_ready(_f(a, b)), CALLS, log_dir)
  return path, log_dir, _f.lower(a, b).compile().as_text()


def test_capture_returns_the_written_trace(traced):
  path, log_dir, _ = traced
  assert os.path.isfile(path) and path.endswith(".xplane.pb")
  assert os.path.commonpath([path, log_dir]) == log_dir and "plugins" in path


def test_summary_of_a_cpu_trace(traced):
  path, _, hlo = traced
  s = ps.summarize(path, CALLS, top=50, hlo_text=hlo)
  json.dumps(s)  # the contract: JSON-ready
  assert s["source"] == "cpu" and s["calls"] == CALLS and s["devices"] == 1
  assert 0 < s["busy_ms_per_call"] <= s["span_ms_per_call"]
  assert s["kernels_per_call"] >= 3
  assert set(s["categories"]) == set(ps.CATEGORIES)
  assert s["categories"]["matmul"] > 0  # the dot of the scan's body, from the HLO
  ms = [t["ms_per_call"] for t in s["top"]]
  assert ms == sorted(ms, reverse=True)
  assert 0 < sum(t["share"] for t in s["top"]) <= 1 + 1e-3
  for t in s["top"]:  # every op is an instruction of _f's compiled module
    assert f"%{t['op']} = " in hlo or f" {t['op']} = " in hlo, t["op"]
  assert any(t["op"].startswith("while") for t in s["top"])  # the scan, its own time only
  assert sum(s["categories"].values()) == pytest.approx(s["kernel_ms_per_call"], abs=1e-3)
  # each op's bytes, from the HLO, and the rate its time gives them
  moved = hlo_stats.instruction_bytes(hlo)
  rated = [t for t in s["top"] if "GBps" in t]
  assert rated and all(t["op"] in moved for t in rated)
  for t in rated:
    assert t["GB_per_call"] == pytest.approx(moved[t["op"]] * t["count_per_call"] / 1e9,
                                             rel=1e-3, abs=1e-4)
    assert t["GBps"] == pytest.approx(t["GB_per_call"] / t["ms_per_call"] * 1e3, rel=1e-2)
  # each category's bytes over all its ops (listed in the top or not), and its rate
  top2 = ps.summarize(path, CALLS, top=2, hlo_text=hlo)
  assert top2["category_GB_per_call"] == s["category_GB_per_call"]  # not from the top alone
  by_category = {}
  for t in s["top"]:  # top=50: every op of this small module
    by_category[t["category"]] = (by_category.get(t["category"], 0.0)
                                  + moved.get(t["op"], 0) * t["count_per_call"] / 1e9)
  assert s["category_GB_per_call"] == pytest.approx(
      {c: v for c, v in by_category.items() if v}, rel=1e-3)
  for c, gbps in s["category_GBps"].items():
    assert gbps == pytest.approx(s["category_GB_per_call"][c] / s["categories"][c] * 1e3,
                                 rel=1e-2)


def test_rates_that_cannot_be_read_leave_the_summary(traced, monkeypatch):
  """An HLO whose bytes cannot be read: the summary without rates, and a note saying so."""
  path, _, hlo = traced
  def unreadable(text):
    raise ValueError("odd HLO")
  monkeypatch.setattr(hlo_stats, "instruction_bytes", unreadable)
  s = ps.summarize(path, CALLS, hlo_text=hlo)
  assert s["top"] and not any("GBps" in t for t in s["top"])
  assert "category_GBps" not in s
  assert "no rates: ValueError: odd HLO" in s["note"]


def test_top_and_module_filter(traced):
  path, _, hlo = traced
  s = ps.summarize(path, CALLS, top=2, module=ps.module_name(hlo))
  assert ps.module_name(hlo) == "jit__f" and len(s["top"]) == 2 and "note" not in s
  assert len(ps.summarize(path, CALLS)["top"]) <= 12
  other = ps.summarize(path, CALLS, module="no_such_module")
  assert "no_such_module" in other["note"] and other["busy_ms_per_call"] > 0


def test_a_trace_without_hlo_events_gives_the_error_dict(tmp_path):
  empty = tmp_path / "empty.xplane.pb"
  empty.write_bytes(b"")
  s = ps.summarize(str(empty), CALLS)
  assert s["source"] is None and "hlo_op" in s["error"] and "top" not in s
  junk = tmp_path / "junk.xplane.pb"
  junk.write_bytes(b"\xff\x00 not a trace")
  assert ps.summarize(str(junk), CALLS)["source"] is None
  assert "no profile" in ps.markdown(s, "x")[0] and "failed" in ps.one_line("x", s)


def test_profile_catches_a_failing_call(tmp_path):
  def boom():
    raise RuntimeError("device lost")
  s = ps.profile(boom, 2, str(tmp_path / "p"))
  assert s == {"error": "RuntimeError: device lost", "xplane": None}


def _space(planes) -> bytes:
  """A serialized XSpace: ``planes`` is [(plane, [(line, [(kernel, hlo_op, module,
  start_us, duration_us)])])]."""
  text = []
  for p, (plane, lines) in enumerate(planes):
    names = sorted({n for _, events in lines for e in events for n in (e[0],)})
    meta = {n: i + 1 for i, n in enumerate(names)}
    body = [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
            for n, i in meta.items()]
    body += ['stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }',
             'stat_metadata { key: 2 value { id: 2 name: "hlo_module" } }']
    for k, (line, events) in enumerate(lines):
      evs = []
      for kernel, op, module, start, duration in events:
        stats = f'stats {{ metadata_id: 2 str_value: "{module}" }}'
        if op:
          stats += f' stats {{ metadata_id: 1 str_value: "{op}" }}'
        evs.append(f"events {{ metadata_id: {meta[kernel]} offset_ps: {int(start * 1e6)} "
                   f"duration_ps: {int(duration * 1e6)} {stats} }}")
      body.append(f'lines {{ id: {k} name: "{line}" timestamp_ns: 5000 {" ".join(evs)} }}')
    text.append(f'planes {{ id: {p} name: "{plane}" {" ".join(body)} }}')
  return jax.profiler.ProfileData.text_proto_to_serialized_xspace("\n".join(text))


def test_a_gpu_trace_counts_overlapping_streams_once(tmp_path):
  path = tmp_path / "gpu.xplane.pb"
  path.write_bytes(_space([
      ("/host:CPU", [("python", [("launch", "fusion.9", "jit_step", 0, 900)])]),
      ("/device:GPU:0", [
          ("Stream #7(Compute)", [
              ("nvjet_tst_128x256_64x4", "cublas-gemm.1", "jit_step", 0, 100),
              ("loop_add_fusion", "add_fusion.3", "jit_step", 300, 100),
              ("memcpy", "", "jit_step", 450, 10),  # no hlo_op: not a kernel of ours
              ("sm90_xmma_gemm_bf16", "cublas-gemm.1", "jit_step", 500, 100)]),
          ("Stream #9(Compute)", [
              ("ncclDevKernel_AllReduce", "all-reduce-start.2", "jit_step", 50, 100)]),
          ("XLA Ops", [("cublas-gemm.1", "cublas-gemm.1", "jit_step", 0, 600)]),  # derived
      ]),
  ]))
  s = ps.summarize(str(path), 2)
  assert s["source"] == "gpu" and s["devices"] == 1
  assert s["busy_ms_per_call"] == pytest.approx((150 + 100 + 100) / 1e3 / 2)
  # Two calls, told apart by the longest gap (150 → 300): spans 150 and 300.
  assert s["span_ms_per_call"] == pytest.approx((150 + 300) / 1e3 / 2)
  assert s["kernel_ms_per_call"] == pytest.approx(400 / 1e3 / 2)
  assert s["kernels_per_call"] == 2
  gemm = s["top"][0]
  assert gemm["op"] == "cublas-gemm.1" and gemm["count_per_call"] == 1
  assert gemm["share"] == pytest.approx(0.5) and gemm["category"] == "matmul"
  assert gemm["name"] in ("nvjet_tst_128x256_64x4", "sm90_xmma_gemm_bf16")
  assert s["categories"]["collective"] == pytest.approx(0.05)
  assert s["categories"]["other elementwise/fusion"] == pytest.approx(0.05)



def test_host_events_say_where_the_host_time_of_a_call_goes(tmp_path):
  """Two calls: the host's events by name, inclusive, per call, longest first, on every
  host line; the device's events and the CPU thunks' end markers are not among them."""
  path = tmp_path / "gpu.xplane.pb"
  path.write_bytes(_space([
      ("/host:CPU", [
          ("pjrt", [("Execute", "", "jit_step", 0, 900),
                    ("command_buffer::update", "", "jit_step", 10, 500),
                    ("command_buffer::execute", "", "jit_step", 600, 200),
                    ("Execute", "", "jit_step", 2000, 300),
                    ("command_buffer::execute", "", "jit_step", 2100, 100),
                    ("end: fusion.1", "fusion.1", "jit_step", 2500, 1)]),
          ("cuda api", [("cuGraphLaunch", "", "jit_step", 650, 120)])]),
      ("/device:GPU:0", [("Stream #7(Compute)", [
          ("loop_add_fusion", "add_fusion.3", "jit_step", 700, 400),
          ("loop_add_fusion", "add_fusion.3", "jit_step", 2200, 400)])]),
  ]))
  s = ps.summarize(str(path), 2)
  assert s["source"] == "gpu"
  assert s["host_top"] == [
      dict(name="Execute", ms_per_call=pytest.approx(0.6), count_per_call=1),
      dict(name="command_buffer::update", ms_per_call=pytest.approx(0.25), count_per_call=0.5),
      dict(name="command_buffer::execute", ms_per_call=pytest.approx(0.15), count_per_call=1),
      dict(name="cuGraphLaunch", ms_per_call=pytest.approx(0.06), count_per_call=0.5)]
  assert ps.summarize(str(path), 2, top=1)["host_top"][0]["name"] == "Execute"

def test_a_gpu_plane_without_hlo_ops_falls_back_to_the_host(tmp_path):
  path = tmp_path / "host.xplane.pb"
  path.write_bytes(_space([
      ("/device:GPU:0", [("Stream #7(Compute)", [("k", "", "jit_step", 0, 10)])]),
      ("/host:CPU", [("t", [("fusion.1", "fusion.1", "jit_step", 0, 40),
                            ("end: fusion.1", "fusion.1", "jit_step", 40, 1)])]),
  ]))
  s = ps.summarize(str(path), 1)
  assert s["source"] == "cpu" and s["busy_ms_per_call"] == pytest.approx(0.04)
  assert [t["op"] for t in s["top"]] == ["fusion.1"]


def test_calls_in_flight_period_and_time_between(tmp_path):
  """A trace of calls in flight: each dispatched before the previous is waited for."""
  a = jnp.ones((128, 128)) / 128
  b = jnp.eye(128)
  dispatched = []

  def dispatch():  # no wait: the capture waits for each call after the next is dispatched
    dispatched.append(_f(a, b))
    return dispatched[-1]

  s = ps.profile(dispatch, CALLS, str(tmp_path / "p"), in_flight=True)
  assert s["source"] == "cpu" and s["calls"] == CALLS and len(dispatched) == CALLS
  assert 0 < s["busy_ms_per_call"] <= s["span_ms_per_call"] <= s["period_ms_per_call"]
  assert s["between_ms_per_call"] == pytest.approx(
      s["period_ms_per_call"] - s["span_ms_per_call"], abs=1e-3)


def test_period_of_a_synthetic_gpu_trace(tmp_path):
  path = tmp_path / "gpu.xplane.pb"
  kernels = [("loop_add_fusion", "add_fusion.3", "jit_step", t, 10)
             for t0 in (0, 40, 80) for t in (t0, t0 + 15)]  # 3 calls of 25 µs, 15 µs apart
  path.write_bytes(_space([("/device:GPU:0", [("Stream #7(Compute)", kernels)])]))
  s = ps.summarize(str(path), 3)
  assert s["span_ms_per_call"] == pytest.approx(0.025)
  assert s["period_ms_per_call"] == pytest.approx(0.035)
  assert s["between_ms_per_call"] == pytest.approx(0.010)


def test_call_spans_leave_out_the_host_time_between_calls():
  k = lambda start, end: ps._Kernel("op", "op", "m", start, end)  # pylint: disable=protected-access
  # Three calls of three kernels (a 5 ns gap inside, 1000+ between); one kernel overlaps.
  kernels = [k(t, t + 10) for t0 in (0, 2000, 5000) for t in (t0, t0 + 15, t0 + 30)]
  kernels.append(k(2001, 2050))  # on another stream, past the call's last start
  assert ps._call_spans(kernels, 3) == 40 + 50 + 40  # pylint: disable=protected-access
  assert ps._call_spans(kernels, 1) == 5040  # pylint: disable=protected-access
  assert ps._call_spans(kernels, 2) == 2050 + 40  # pylint: disable=protected-access


def test_nested_events_count_their_own_time():
  k = lambda start, end: ps._Kernel("op", "op", "m", start, end)  # pylint: disable=protected-access
  kernels = [k(0, 100), k(10, 30), k(40, 90), k(50, 60), k(200, 210)]
  assert ps._self_times(kernels) == [30, 20, 40, 10, 10]  # pylint: disable=protected-access
  assert ps._union([(0, 10), (5, 20), (30, 40), (35, 36)]) == 30  # pylint: disable=protected-access


@pytest.mark.parametrize("op, kernel, category", [
    ("cublas-gemm.1", "nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "matmul"),
    ("fusion.12", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", "matmul"),
    ("gemm_fusion_dot.4", "gemm_fusion_dot_4", "matmul"),
    ("custom-call.3", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("all-reduce-start.1", "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "collective"),
    ("input_reduce_fusion.2", "input_reduce_fusion_2", "reduction"),
    ("loop_transpose_fusion", "", "copy/transpose"),
    ("copy.4", "", "copy/transpose"),
    ("loop_convert_fusion.7", "", "other elementwise/fusion"),
    ("loop_add_fusion", "loop_add_fusion", "other elementwise/fusion"),
])
def test_classify_by_name(op, kernel, category):
  assert ps.classify(op, kernel) == category


def test_categories_from_the_hlo():
  hlo = """HloModule jit_step, entry_computation_layout={(f32[8,8]{1,0})->f32[8]{0}}

%fused_dot (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_transpose (p0.1: f32[8,8]) -> bf16[8,8] {
  %p0.1 = f32[8,8]{1,0} parameter(0)
  %t = f32[8,8]{0,1} transpose(%p0.1), dimensions={1,0}
  ROOT %c = bf16[8,8]{1,0} convert(%t)
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused_reduce (p0.2: f32[8,8]) -> f32[8] {
  %p0.2 = f32[8,8]{1,0} parameter(0)
  %z = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%p0.2, %z), dimensions={1}, to_apply=%add
}

ENTRY %main (a: f32[8,8]) -> f32[8] {
  %a = f32[8,8]{1,0} parameter(0)
  %fusion.1 = f32[8,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_dot
  %cublas-gemm.2 = (f32[8,8]{1,0}, s8[0]{0}) custom-call(%a, %a), custom_call_target="__cublas$gemm"
  %fmha = (f32[8,8]{1,0}) custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax"
  %loop_fusion.3 = bf16[8,8]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_transpose
  %all-reduce.1 = f32[8,8]{1,0} all-reduce(%a), to_apply=%add
  %multiply.1 = f32[8,8]{1,0} multiply(%a, %a)
  ROOT %input_fusion = f32[8]{0} fusion(%multiply.1), kind=kInput, calls=%fused_reduce
}
"""
  cats = ps.hlo_categories(hlo)
  assert cats["fusion.1"] == "matmul" and cats["cublas-gemm.2"] == "matmul"
  assert cats["fmha"] == "attention" and cats["all-reduce.1"] == "collective"
  assert cats["loop_fusion.3"] == "copy/transpose" and cats["input_fusion"] == "reduction"
  assert cats["multiply.1"] == "other elementwise/fusion"
  assert ps.module_name(hlo) == "jit_step"


def test_markdown_and_one_line(traced):
  path, _, hlo = traced
  s = ps.summarize(path, CALLS, hlo_text=hlo)
  lines = ps.markdown(s, "f", rows=2)
  assert lines[0].startswith("**f** (cpu, 3 calls): busy ")
  assert sum(line.startswith("| ") for line in lines) == 1 + 2  # header and two ops
  line = ps.one_line("f", s)
  assert line.startswith("profile f: cpu busy ") and "top " in line


def test_profile_says_when_a_gpu_run_traced_no_kernels(tmp_path, monkeypatch):
  a = jnp.ones((64, 64))
  jax.block_until_ready(_f(a, a))
  monkeypatch.setattr(ps.jax, "default_backend", lambda: "gpu")  # the CPU thunks stand in
  s = ps.profile(lambda: jax.block_until_ready(_f(a, a)), 1, str(tmp_path / "p"))
  assert s["source"] == "cpu" and "no gpu kernel in the trace" in s["note"]
  assert os.path.isfile(s["xplane"])


def test_kernels_of_a_cuda_graph_count_under_their_own_instructions(tmp_path):
  """XLA:GPU replays most of a step as one command buffer: every kernel then carries the
  buffer's name as its hlo_op, and is counted under its own instruction instead."""
  path = tmp_path / "graph.xplane.pb"
  path.write_bytes(_space([
      ("/device:GPU:0", [("Stream #7(Compute)", [
          ("input_reduce_fusion_64", "command_buffer_1", "jit_step", 0, 100),
          ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT", "command_buffer_1", "jit_step", 100, 300),
          ("loop_add_fusion", "command_buffer_1", "jit_step", 400, 50),
          ("Memset 0", "command_buffer_1", "jit_step", 450, 10),
          ("loop_multiply_fusion_2", "loop_multiply_fusion.2", "jit_step", 500, 40)])]),
  ]))
  hlo = """HloModule jit_step

%fused_reduce (p: f32[8,8]) -> f32[8] {
  %p = f32[8,8]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%p, %c), dimensions={1}, to_apply=%add
}

ENTRY %main (a: f32[8,8]) -> f32[8] {
  %a = f32[8,8]{1,0} parameter(0)
  ROOT %input_reduce_fusion.64 = f32[8]{0} fusion(%a), kind=kInput, calls=%fused_reduce
}
"""
  s = ps.summarize(str(path), 1, hlo_text=hlo)
  ops = {t["op"]: t for t in s["top"]}
  assert set(ops) == {"input_reduce_fusion.64", "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT",
                      "loop_add_fusion", "Memset 0", "loop_multiply_fusion.2"}
  assert ops["input_reduce_fusion.64"]["category"] == "reduction"  # from the HLO
  assert ops["nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT"]["category"] == "matmul"  # by name
  assert ops["Memset 0"]["category"] == "copy/transpose"
  assert s["categories"]["matmul"] == pytest.approx(0.3)
  assert s["categories"]["other elementwise/fusion"] == pytest.approx(0.09)
  # Without the HLO the kernel's own name stands for the instruction.
  assert "input_reduce_fusion_64" in {t["op"] for t in ps.summarize(str(path), 1)["top"]}


def test_unwrap_leaves_other_kernels_alone():
  k = ps._Kernel  # pylint: disable=protected-access
  kernels = [k("command_buffer", "loop_add_fusion_3", "m", 0, 1),
             k("fusion.2", "loop_add_fusion_3", "m", 1, 2)]
  out = ps.unwrap_command_buffers(kernels, ps.kernel_names(["loop_add_fusion.3", "fusion.2"]))
  assert [x.op for x in out] == ["loop_add_fusion.3", "fusion.2"]
  assert ps.is_command_buffer("command_buffer_12") and not ps.is_command_buffer("fusion.1")
