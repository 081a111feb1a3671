"""experiments/benchmarks/hlo_stats.py: kernels are counted once, not with what they hold."""
import jax
import jax.numpy as jnp

from experiments.benchmarks import hlo_stats

_HLO = """HloModule m, input_output_alias={ {0}: (0, {}, may-alias) }, entry_computation_layout={(f32[8]{0})->(f32[8]{0}, f32[])}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_computation (p: f32[8]) -> f32[] {
  %p = f32[8]{0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[] reduce(%p, %c), dimensions={0}, to_apply=%add
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[8]{0} get-tuple-element(%t), index=1
  %w = f32[8]{0} copy(%v)
  ROOT %o = (s32[], f32[8]{0}) tuple(%i, %w)
}

%cond (t.1: (s32[], f32[8])) -> pred[] {
  %t.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %k = pred[] constant(false)
}

ENTRY %main (x: f32[8]) -> (f32[8], f32[]) {
  %x = f32[8]{0} parameter(0)
  %f = f32[] fusion(%x), kind=kInput, calls=%fused_computation
  %cc = f32[8]{0} custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"
  %z = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%z, %cc)
  %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %y = f32[8]{0} get-tuple-element(%loop), index=1
  ROOT %out = (f32[8]{0}, f32[]) tuple(%y, %f)
}
"""


def test_counts_the_kernels_of_the_entry_and_loop_bodies_only():
  s = hlo_stats.summarize(_HLO)
  # The reduce and the add live inside the fusion and its reducer: one kernel, not three.
  assert s["ops"] == {"fusion": 1, "while": 1, "copy": 1, "custom-call": 1}
  assert s["fusion_kinds"] == {"kInput": 1}
  assert s["custom_calls"] == {"__cudnn$fmhaSoftmax": 1} and s["cudnn_attention"]
  assert s["aliased_outputs"] == 1


def test_host_waits_are_loops_of_unknown_trip_count_and_conditionals_out_of_the_graph():
  """A conditional whose branches launch only kernels is a node of the CUDA graph; one
  whose branch launches a loop is not."""
  assert hlo_stats.summarize(_HLO)["host_waits"] == 1  # its loop has no known trip count
  compiled = lambda f, *args: jax.jit(f).lower(*args).compile().as_text()
  scan = lambda x: jax.lax.scan(lambda c, _: (c * 2, None), x, None, length=3)[0]
  until = lambda x: jax.lax.while_loop(lambda c: c[0] < c[1].sum(),
                                       lambda c: (c[0] + 1, c[1]), (0.0, x))
  cond = lambda x, p: jax.lax.cond(
      p, lambda x: jnp.sin(jax.lax.optimization_barrier(x)) * 2, lambda x: x + 1, x)
  looping = lambda x, p: jax.lax.cond(p, lambda x: until(x)[0], lambda x: x.sum(), x)
  assert hlo_stats.summarize(compiled(scan, jnp.ones(8)))["host_waits"] == 0
  assert hlo_stats.summarize(compiled(until, jnp.ones(8)))["host_waits"] == 1
  plain = hlo_stats.summarize(compiled(cond, jnp.ones(8), True))
  assert plain["ops"]["conditional"] == 1 and plain["host_waits"] == 0
  # the loop inside: the conditional and the loop
  assert hlo_stats.summarize(compiled(looping, jnp.ones(8), True))["host_waits"] == 2


def test_the_trainers_sparse_step_makes_the_host_wait_nowhere(capsys):
  """SPAM with sparse momentum: the library's own update holds the masks' redraw as a
  conditional; the trainer's step, whose loop redraws the masks, holds none."""
  library = hlo_stats.main(["--what", "optimizer", "--size", "tiny", "--optimizer",
                            "spam_sparse"])
  trainer = hlo_stats.main(["--what", "train", "--model", "llama_9m", "--optimizer", "spam",
                            "--density", "0.5", "--batch", "2", "--length", "16"])
  capsys.readouterr()
  assert library["host_waits"] == 1 and library["ops"]["conditional"] == 1
  assert trainer["host_waits"] == 0 and "conditional" not in trainer["ops"]


def test_computations_and_what_runs_inside_others():
  comps = hlo_stats.computations(_HLO)
  assert list(comps) == ["add", "fused_computation", "body", "cond", "main"]
  assert [n for n, c in comps.items() if c["entry"]] == ["main"]
  assert hlo_stats._bodies(comps) == {"add", "fused_computation"}


def test_a_compiled_scan_on_this_backend():
  def f(x):
    def body(c, _):
      return c * 2 + jnp.sin(c), jnp.sum(c)
    return jax.lax.scan(body, x, None, length=3)

  text = jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text()
  s = hlo_stats.summarize(text)
  assert s["ops"]["while"] == 1 and s["ops"]["fusion"] >= 1
  # The sum and the stacking of the scan's outputs are fused: no stand-alone reduce.
  assert "reduce" not in s["ops"] and "dynamic-update-slice" not in s["ops"]


def test_kernel_traffic_reads_operands_and_writes_results_once():
  t = hlo_stats.kernel_traffic(_HLO)
  # fusion f32[8] -> f32[]: 32 + 4; custom call f32[8] -> f32[8]: 64; the loop's copy: 64.
  assert t["kernels"] == 3 and t["bytes"] == 164
  assert t["by_kind"] == {"fusion:kInput": dict(kernels=1, bytes=36),
                          "custom-call": dict(kernels=1, bytes=64),
                          "copy": dict(kernels=1, bytes=64)}
  assert t["by_category"] == {"attention": 64, "reduction": 36, "copy/transpose": 64}
  # per launch, by instruction: the same bytes (the loop body's copy runs once here)
  moved = hlo_stats.instruction_bytes(_HLO)
  assert sorted(moved.values()) == [36, 64, 64] and sum(moved.values()) == t["bytes"]


def test_type_bytes():
  assert hlo_stats.type_bytes("f32[2,3]{1,0}") == 24
  assert hlo_stats.type_bytes("(bf16[4]{0}, s32[], pred[8])") == 8 + 4 + 8
  assert hlo_stats.type_bytes("s4[16]") == 8 and hlo_stats.type_bytes("token[]") == 0


def test_an_adam_update_moves_at_least_its_state():
  """Adam must read p, g, m, v and write p, m, v (28 B per parameter); a backend without
  multi-output fusion (XLA:CPU) writes m and v and reads them back (40 B)."""
  import optax

  n = 1 << 16
  opt = optax.adam(1e-3)
  p = jnp.ones((n,), jnp.float32)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  text = jax.jit(step, donate_argnums=(0, 1)).lower(p, opt.init(p), p).compile().as_text()
  t = hlo_stats.kernel_traffic(text)
  assert 28 * n <= t["bytes"] <= 40 * n + 4096
  assert t["kernels"] >= 1


def _skip_without_the_cuda_plugin():
  import importlib.util

  import pytest

  try:
    plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
  except ModuleNotFoundError:
    plugin = None
  if plugin is None:
    pytest.skip("the jax CUDA plugin is not installed")


def test_compiling_for_an_h100_without_one():
  """The jax CUDA plugin compiles for a described H100 on this CPU (skipped without it)."""
  _skip_without_the_cuda_plugin()
  from experiments.benchmarks import aot_gpu, bench_optimizer

  sharding = aot_gpu.target_sharding("h100")
  (model,) = aot_gpu.model_steps("llama_9m", ["bf16"], 2, 64, sharding)
  assert model["cudnn_attention"] and model["traffic"]["kernels"] > 0
  split = model["traffic"]["by_category"]
  assert split["matmul"] > 0 and split["attention"] > 0
  assert abs(sum(split.values()) - model["traffic"]["bytes"]) < 1e-6 * model["traffic"]["bytes"]
  (row,) = aot_gpu.optimizer_updates("tiny", ["adamw"], sharding)
  params = row["params"]
  # XLA:GPU fuses Adam into one pass per leaf: the 28 B per parameter the math needs.
  assert 28 * params <= row["traffic"]["bytes"] <= 28.5 * params
  # Stable-SPAM's three passes a leaf (the max, the clipped norm, the update), merged by
  # XLA: at most two kernels a leaf on the per-layer layout (8 layers, 75 leaves; fewer
  # kernels than leaves with jax 0.10's XLA, 1.9 a leaf with 0.11's), no more on the scanned
  # one (per-layer statistics), and there no more bytes.
  flat, scanned = (aot_gpu.optimizer_updates("small", ["stable_spam"], sharding,
                                             scan_layers=scan)[0]["traffic"]
                   for scan in (False, True))
  leaves = len(jax.tree.leaves(bench_optimizer.param_shapes(bench_optimizer.SIZES["small"],
                                                            jnp.float32)))
  assert scanned["kernels"] <= flat["kernels"] <= 2 * leaves
  assert scanned["bytes"] <= 1.01 * flat["bytes"]
  # The trainer's whole step, with its mesh and donated state: cuDNN attention, no warning.
  step = aot_gpu.trainer_step("llama_9m", "spam", 2, 64, aot_gpu.target_devices("h100"))
  assert step["cudnn_attention"] and step["donation_warnings"] == []
  assert 0 < step["aliased_outputs"] <= step["state_leaves"]
  assert step["peak_memory_bytes"] > 0  # XLA's buffer assignment for the described device


def test_the_h200_target_is_the_h100_with_its_memory():
  from experiments.benchmarks import aot_gpu

  h100, h200 = aot_gpu.TARGETS["h100"], aot_gpu.TARGETS["h200"]
  assert "memory_bandwidth: 4800000000000" in h200 and '"NVIDIA H200"' in h200
  assert "device_memory_size: 141000000000" in h200
  changed = [a for a, b in zip(h100.splitlines(), h200.splitlines()) if a != b]
  assert len(changed) == 3 and len(h100.splitlines()) == len(h200.splitlines())


def test_swiglu_backward_is_one_pass_for_both_targets():
  """The MLP's backward reads gate/up and the output gradient and writes the stacked
  gradient once, with no float32 sigmoid stored apart: XLA's cost model for an H200 split
  it in two kernels when σ(gate) was broadcast to both halves (skipped without the CUDA
  plugin)."""
  _skip_without_the_cuda_plugin()
  from experiments.benchmarks import aot_gpu
  from models import linears

  tokens, mlp = (64, 256), 2736  # the 350m step's (the split shows at this size)
  for target in ("h100", "h200"):
    on = aot_gpu.target_sharding(target)
    x = jax.ShapeDtypeStruct((*tokens, 2, mlp), jnp.bfloat16, sharding=on)
    dh = jax.ShapeDtypeStruct((*tokens, mlp), jnp.bfloat16, sharding=on)
    backward = jax.jit(lambda x, dh: jax.vjp(linears.swiglu, x)[1](dh))
    moved = hlo_stats.kernel_traffic(backward.lower(x, dh).compile().as_text())["bytes"]
    once = 2 * (2 * x.size + dh.size)  # bf16: gate/up and dh read, the gradient written
    assert once <= moved < 1.05 * once, (target, moved / once)  # split: 2.2× as much


def test_the_elementwise_kernels_compile_for_an_h100_as_one_pass_each():
  """RoPE's split, SwiGLU's backward, the stack of gate's and up's kernels and the loss's
  reduction as Triton kernels at the 350m step's sizes, and RoPE's with masked heads (130m's
  12) and halves (a head dimension of 96): one kernel each, reading and writing each byte
  once (skipped without the CUDA plugin)."""
  _skip_without_the_cuda_plugin()
  from experiments.benchmarks import aot_gpu
  from models import elementwise_kernels, loss_kernels

  on = aot_gpu.target_sharding("h100")
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype, sharding=on)
  cases = [(elementwise_kernels.rope_split,  # q, k, v in and out, cos and sin in (float32)
            (shape(64, 256, 3, 16, 64), shape(64, 256, 64, dtype=jnp.float32),
             shape(64, 256, 64, dtype=jnp.float32)), 2 * 2 * 3 * 2**20 * 16 + 2 * 4 * 2**20),
           (elementwise_kernels.swiglu_grad,  # gate/up and dh in, the gradient out
            (shape(64, 256, 2, 2736), shape(64, 256, 2736)), 2 * 5 * 64 * 256 * 2736),
           (lambda *k: elementwise_kernels.stack(k, jnp.bfloat16),  # two read, one written
            (shape(1024, 2736), shape(1024, 2736)), 2 * 4 * 1024 * 2736),
           (loss_kernels.softmax_stats,  # the logits and targets in, three floats a token out
            (shape(64, 256, 32000), shape(64, 256, dtype=jnp.int32)),
            2 * 64 * 256 * 32000 + 4 * 4 * 64 * 256)]
  for heads, head_dim in ((12, 64), (16, 96)):
    tables = shape(64, 256, head_dim, dtype=jnp.float32)
    cases.append((elementwise_kernels.rope_split,
                   (shape(64, 256, 3, heads, head_dim), tables, tables),
                   2 * 2 * 3 * 64 * 256 * heads * head_dim + 2 * 4 * 64 * 256 * head_dim))
  for kernel, args, once in cases:
    with aot_gpu.lowering_on(aot_gpu.target_devices("h100")[0]):
      t = hlo_stats.kernel_traffic(jax.jit(kernel).lower(*args).compile().as_text())
    assert t["kernels"] == 1 and t["bytes"] == once, (kernel.__name__, t["kernels"], t["bytes"])


def test_spams_bfloat16_update_is_one_pass_a_leaf_for_both_targets():
  """SPAM's clip, count and update of bfloat16 gate/up gradients (slices of one stacked
  product, as the trainer's) read the parameter, both moments and the gradient and write the
  three once: counted from the change, XLA's cost model for an H200 stored the clipped
  gradient in a pass of its own (skipped without the CUDA plugin)."""
  _skip_without_the_cuda_plugin()
  import optax

  import spam_optax
  from experiments.benchmarks import aot_gpu

  opt = spam_optax.spam(1e-3)
  leaf = (1024, 2736)  # the 350m step's gate and up kernels (the split shows at this size)
  params = {k: jax.ShapeDtypeStruct(leaf, jnp.bfloat16) for k in ("gate", "up")}

  def step(x, dy, params, state):
    g = jnp.einsum("td,tf->df", x, dy).reshape(leaf[0], 2, leaf[1])
    updates, state = opt.update({"gate": g[:, 0], "up": g[:, 1]}, state, params)
    return optax.apply_updates(params, updates), state

  for target in ("h100", "h200"):
    on = aot_gpu.target_sharding(target)
    place = lambda t: jax.tree.map(  # noqa: E731
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on), t)
    x, dy = (jax.ShapeDtypeStruct((4096, n), jnp.bfloat16, sharding=on)
             for n in (leaf[0], 2 * leaf[1]))
    text = jax.jit(step, donate_argnums=(2, 3)).lower(
        x, dy, place(params), place(jax.eval_shape(opt.init, params))).compile().as_text()
    t = hlo_stats.kernel_traffic(text)
    product = t["by_category"].get("matmul", 0.0)
    once = 2 * 7 * 2 * leaf[0] * leaf[1]  # bf16: p, m, v, g read, p, m, v written, 2 leaves
    assert once <= t["bytes"] - product < 1.02 * once, (target, (t["bytes"] - product) / once)


def test_without_the_cuda_plugin_the_h100_target_is_one_error_line():
  import pytest

  from experiments.benchmarks import aot_gpu

  try:
    aot_gpu.target_sharding("h100")
  except SystemExit as e:
    assert str(e).startswith("error: compiling for h100 needs the jax CUDA plugin")
    assert "\n" not in str(e)
  else:
    pytest.skip("the jax CUDA plugin is installed here")


_COND_HLO = """HloModule c, entry_computation_layout={(pred[], f32[8]{0})->f32[8]{0}}

%then (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %ca = f32[8]{0} copy(%a)
}

%else (b: f32[8]) -> f32[8] {
  %b = f32[8]{0} parameter(0)
  %cb = f32[8]{0} copy(%b)
  ROOT %cc = f32[8]{0} copy(%cb)
}

ENTRY %main (p: pred[], x: f32[8]) -> f32[8] {
  %p = pred[] parameter(0)
  %x = f32[8]{0} parameter(1)
  %y = f32[8]{0} copy(%x)
  ROOT %r = f32[8]{0} conditional(%p, %y, %y), true_computation=%then, false_computation=%else
}
"""


def test_conditional_branches_are_counted_apart():
  t = hlo_stats.kernel_traffic(_COND_HLO)
  assert (t["kernels"], t["bytes"]) == (1, 64)  # the entry's copy; one branch runs
  assert sorted((b["computation"], b["kernels"], b["bytes"]) for b in t["branches"]) == [
      ("else", 2, 128), ("then", 1, 64)]


_SCAN_HLO = """HloModule s, entry_computation_layout={(f32[4,8]{1,0}, f32[8]{0})->f32[4,8]{1,0}}

%slice_mul (w: f32[4,8], i: s32[], x: f32[8]) -> f32[8] {
  %w = f32[4,8]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = f32[8]{0} parameter(2)
  %z = s32[] constant(0)
  %row = f32[1,8]{1,0} dynamic-slice(%w, %i, %z), dynamic_slice_sizes={1,8}
  %r = f32[8]{0} bitcast(%row)
  ROOT %m = f32[8]{0} multiply(%r, %x)
}

%save (acc: f32[4,8], i.1: s32[], y: f32[8]) -> f32[4,8] {
  %acc = f32[4,8]{1,0} parameter(0)
  %i.1 = s32[] parameter(1)
  %y = f32[8]{0} parameter(2)
  %y2 = f32[1,8]{1,0} bitcast(%y)
  %z.1 = s32[] constant(0)
  ROOT %u = f32[4,8]{1,0} dynamic-update-slice(%acc, %y2, %i.1, %z.1)
}

%body (t: (s32[], f32[4,8], f32[8], f32[4,8])) -> (s32[], f32[4,8], f32[8], f32[4,8]) {
  %t = (s32[], f32[4,8]{1,0}, f32[8]{0}, f32[4,8]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%t), index=0
  %w.1 = f32[4,8]{1,0} get-tuple-element(%t), index=1
  %x.1 = f32[8]{0} get-tuple-element(%t), index=2
  %acc.1 = f32[4,8]{1,0} get-tuple-element(%t), index=3
  %y.1 = f32[8]{0} fusion(%w.1, %i.2, %x.1), kind=kLoop, calls=%slice_mul
  %acc.2 = f32[4,8]{1,0} fusion(%acc.1, %i.2, %y.1), kind=kLoop, calls=%save
  ROOT %o = (s32[], f32[4,8]{1,0}, f32[8]{0}, f32[4,8]{1,0}) tuple(%i.2, %w.1, %y.1, %acc.2)
}

%cond (t.1: (s32[], f32[4,8], f32[8], f32[4,8])) -> pred[] {
  %t.1 = (s32[], f32[4,8]{1,0}, f32[8]{0}, f32[4,8]{1,0}) parameter(0)
  ROOT %k = pred[] constant(false)
}

ENTRY %main (w.2: f32[4,8], x.2: f32[8]) -> f32[4,8] {
  %w.2 = f32[4,8]{1,0} parameter(0)
  %x.2 = f32[8]{0} parameter(1)
  %c0 = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}, f32[8]{0}, f32[4,8]{1,0}) tuple(%c0, %w.2, %x.2, %w.2)
  %loop = (s32[], f32[4,8]{1,0}, f32[8]{0}, f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"},"known_init_step":{"init":"0","step":"1"}}
  ROOT %res = f32[4,8]{1,0} get-tuple-element(%loop), index=3
}
"""


def test_scanned_loops_count_each_trip_and_read_only_their_slices():
  """A scan over 4 layers: the body's two kernels run 4 times; the first reads one row of the
  stacked weights (32 B) and x (32 B) and writes 32 B; the second writes its row in place
  (32 B) after reading the new row (32 B), not the whole (4, 8) buffer."""
  t = hlo_stats.kernel_traffic(_SCAN_HLO)
  assert t["kernels"] == 8
  assert t["bytes"] == 4 * ((32 + 4 + 32 + 32) + (0 + 4 + 32 + 32))


_SLICES_HLO = """HloModule q, entry_computation_layout={(bf16[16,24]{1,0}, f32[16,8]{1,0})->f32[16,8]{1,0}}

%two_of_three (qkv: bf16[16,24], c: f32[16,8]) -> f32[16,8] {
  %qkv = bf16[16,24]{1,0} parameter(0)
  %c = f32[16,8]{1,0} parameter(1)
  %v = bf16[16,3,8]{2,1,0} bitcast(%qkv)
  %q = bf16[16,1,8]{2,1,0} slice(%v), slice={[0:16], [0:1], [0:8]}
  %k = bf16[16,1,8]{2,1,0} slice(%v), slice={[0:16], [1:2], [0:8]}
  %qk = bf16[16,1,8]{2,1,0} multiply(%q, %k)
  %f = f32[16,1,8]{2,1,0} convert(%qk)
  %g = f32[16,8]{1,0} bitcast(%f)
  ROOT %o = f32[16,8]{1,0} multiply(%g, %c)
}

%whole_and_slice (qkv.1: bf16[16,24]) -> bf16[16,8] {
  %qkv.1 = bf16[16,24]{1,0} parameter(0)
  %s = bf16[16,8]{1,0} slice(%qkv.1), slice={[0:16], [0:8]}
  %r = bf16[16,8]{1,0} slice(%qkv.1), slice={[0:16], [16:24]}
  %n = bf16[] constant(0)
  %sum = bf16[16]{0} reduce(%qkv.1, %n), dimensions={1}, to_apply=%add
  %b = bf16[16,8]{1,0} broadcast(%sum), dimensions={0}
  %sr = bf16[16,8]{1,0} add(%s, %r)
  ROOT %t = bf16[16,8]{1,0} add(%sr, %b)
}

%add (a: bf16[], b.1: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b.1 = bf16[] parameter(1)
  ROOT %s.1 = bf16[] add(%a, %b.1)
}

ENTRY %main (p: bf16[16,24], c.1: f32[16,8]) -> f32[16,8] {
  %p = bf16[16,24]{1,0} parameter(0)
  %c.1 = f32[16,8]{1,0} parameter(1)
  %x = f32[16,8]{1,0} fusion(%p, %c.1), kind=kLoop, calls=%two_of_three
  %y = bf16[16,8]{1,0} fusion(%p), kind=kInput, calls=%whole_and_slice
  ROOT %z = f32[16,8]{1,0} fusion(%x, %y), kind=kLoop, calls=%two_of_three.2
}

%two_of_three.2 (x.1: f32[16,8], y.1: bf16[16,8]) -> f32[16,8] {
  %x.1 = f32[16,8]{1,0} parameter(0)
  %y.1 = bf16[16,8]{1,0} parameter(1)
  %yc = f32[16,8]{1,0} convert(%y.1)
  ROOT %m = f32[16,8]{1,0} multiply(%x.1, %yc)
}
"""


def test_static_slices_through_bitcasts_read_only_the_slices():
  """q and k sliced out of a stacked (16, 3·8) bf16 product read 2 × 256 B of its 768 B;
  a kernel that also reduces the whole operand reads it whole."""
  t = hlo_stats.kernel_traffic(_SLICES_HLO)
  assert t["kernels"] == 3
  first = (2 * 16 * 8 * 2) + 16 * 8 * 4 + 16 * 8 * 4  # two slices, c, the result
  second = 16 * 24 * 2 + 16 * 8 * 2  # the whole operand, the result
  third = 16 * 8 * 4 + 16 * 8 * 2 + 16 * 8 * 4
  assert t["bytes"] == first + second + third
  assert t["by_category"] == {"reduction": second, "other elementwise/fusion": first + third}


# Newer XLA writes a use of one element of a tuple as "%name#index", with no
# get-tuple-element: a kernel that takes one of a custom call's three results reads that one.
_TUPLE_ELEMENT_HLO = """HloModule m

%fused_add (p0: f32[8], p1: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %add = f32[8]{0} add(%p0, %p1)
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %cc = (f32[8]{0}, bf16[1024]{0}, (s32[], f32[4]{0})) custom-call(%x), custom_call_target="k"
  ROOT %loop_add_fusion = f32[8]{0} fusion(%cc#0, %x), kind=kLoop, calls=%fused_add
}
"""


def test_an_operand_that_is_one_element_of_a_tuple_is_read_alone():
  t = hlo_stats.kernel_traffic(_TUPLE_ELEMENT_HLO)
  # the custom call: 32 in, 32 + 2048 + 4 + 16 out; the fusion: 32 + 32 in, 32 out
  assert hlo_stats.instruction_bytes(_TUPLE_ELEMENT_HLO) == {"cc": 2132, "loop_add_fusion": 96}
  assert t["kernels"] == 2 and t["bytes"] == 2132 + 96
  from experiments.benchmarks import hlo_parse  # pylint: disable=import-outside-toplevel
  assert hlo_parse.tuple_elements("(f32[8]{0}, bf16[1024]{0}, (s32[], f32[4]{0}))") == [
      "f32[8]{0}", "bf16[1024]{0}", "(s32[], f32[4]{0})"]
  assert hlo_parse.tuple_elements("f32[8]{0}") == ["f32[8]{0}"]
  types = {"cc": "(f32[8]{0}, bf16[1024]{0}, (s32[], f32[4]{0}))", "x": "f32[8]{0}"}
  assert hlo_parse.operand_type(types, "cc#2") == "(s32[], f32[4]{0})"
  assert hlo_parse.operand_type(types, "x") == "f32[8]{0}"
  assert hlo_parse.operand_type(types, "cc#5") == hlo_parse.operand_type(types, "y") == ""
