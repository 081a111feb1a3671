"""experiments/benchmarks/bench_optimizer.py: its tables, its JSON saved as rows finish, its
profiles, and its hand-fused SPAM equals spam()."""
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax
from experiments.benchmarks import bench_optimizer
from spam_optax import _clip_and_norm_history
from spam_optax import _count
from spam_optax import _leaf_stats


def table_rows(text):
  """The markdown table rows of ``text`` as lists of cells (header included)."""
  return [[c.strip() for c in line.strip("|").split("|")]
          for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def test_state_bytes_at_1b_meet_the_sparse_target(capsys):
  bench_optimizer.main(["--size", "1b", "--no-time"])
  rows = {r[0]: r for r in table_rows(capsys.readouterr().out)}
  assert rows["spam"][7] == "1.000" and rows["stable_spam"][7] == "1.000"
  sparse = float(rows["spam d=0.25"][8])
  assert sparse == 0.436  # exact: eval_shape of the state, no allocation


def test_sparse_spam_as_the_trainer_runs_it(capsys):
  """``spam d=0.25 (loop redraw)``: the same state as ``spam d=0.25``, an update without the
  redraw's conditional."""
  bench_optimizer.main(["--size", "tiny", "--no-time", "--optimizers",
                        "spam d=0.25 (loop redraw),spam d=0.25"])
  rows = {r[0]: r for r in table_rows(capsys.readouterr().out)[1:]}
  assert list(rows) == ["adamw", "spam d=0.25 (loop redraw)", "spam d=0.25"]
  assert rows["spam d=0.25 (loop redraw)"][6:] == rows["spam d=0.25"][6:]
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES["tiny"], jnp.float32)
  (name, opt), = bench_optimizer.loop_redraw_optimizer(0.25).items()
  state = jax.eval_shape(opt.init, shapes)
  compiled = jax.jit(opt.update).lower(shapes, state, shapes).compile().as_text()
  assert " conditional(" not in compiled
  assert bench_optimizer.sanitize(name) == "spam_d=0.25_loop_redraw"


def test_timed_tables_on_a_tiny_tree(capsys):
  bench_optimizer.main(["--size", "tiny", "--warmup", "1", "--iters", "2"])
  rows = table_rows(capsys.readouterr().out)
  assert [r[0] for r in rows[1:]] == ["adamw", "spam", "stable_spam", "spam d=0.25"]
  assert rows[1][2] == "1.00"
  for row in rows[1:]:
    assert float(row[1]) > 0 and float(row[5].replace(",", "")) >= 0
    assert row[3] == row[4] == "—"  # interleaved: no in-flight timing


def test_scanned_layout_and_a_subset_of_optimizers(tmp_path, capsys):
  """--scan_layers: one leaf per weight of all layers, Stable-SPAM with a statistic per layer;
  --optimizers keeps adamw as the baseline."""
  out = tmp_path / "scan.json"
  bench_optimizer.main(["--size", "tiny", "--scan_layers", "--optimizers", "stable_spam",
                        "--warmup", "0", "--iters", "1", "--json", str(out)])
  rows = table_rows(capsys.readouterr().out)
  assert [r[0] for r in rows[1:]] == ["adamw", "stable_spam"]
  result = json.loads(out.read_text())
  assert result["scan_layers"] and result["params"] == sum(
      x.size for x in jax.tree.leaves(bench_optimizer.param_shapes(
          bench_optimizer.SIZES["tiny"], jnp.float32)))
  shapes = bench_optimizer.param_shapes(
      bench_optimizer.SIZES["tiny"].replace(scan_layers=True), jnp.float32)
  layers = bench_optimizer.SIZES["tiny"].num_layers
  state = jax.eval_shape(bench_optimizer.optimizers(0.25, scan_layers=True)["stable_spam"].init,
                         shapes)
  assert state[0][0].max_ema.tree()["layers"]["mlp"]["up_proj"]["kernel"].shape == (layers,)
  bench_optimizer.main(["--size", "tiny", "--optimizers",
                        "hand-fused stable_spam (vector statistics),stable_spam", "--no-time"])
  rows = table_rows(capsys.readouterr().out)
  assert [r[0] for r in rows[1:]] == ["adamw", "hand-fused stable_spam (vector statistics)",
                                      "stable_spam"]
  try:
    bench_optimizer.main(["--size", "tiny", "--optimizers", "adam", "--no-time"])
  except SystemExit as e:
    assert "unknown --optimizers adam" in str(e)
  else:
    raise AssertionError("an unknown optimizer name was accepted")


def _spiky_run(steps):
  """Tiny-layout params, ``steps`` gradients with a spike every fifth step, and a runner:
  ``run(opt, clipped)`` applies them all and returns the params and ``clipped(state)`` per
  step."""
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES["tiny"], jnp.float32)
  (params,) = bench_optimizer.random_trees(shapes, 1, seed=1)
  rng = np.random.default_rng(0)

  def gradient(t):
    def leaf(s):
      g = 0.02 * rng.normal(size=s.shape).astype(np.float32)
      if t % 5 == 4:  # a spike: a few entries of every leaf 1000x larger
        g[..., :3] *= 1000.0
      return jnp.asarray(g)
    return jax.tree.map(leaf, shapes)

  grads = [gradient(t) for t in range(steps)]

  def run(opt, clipped):
    @jax.jit
    def step(p, s, g):
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s, clipped(s)

    p, state, counts = params, opt.init(params), []
    for g in grads:
      p, state, n = step(p, state, g)
      counts.append(int(n))
    return p, counts

  return run


def test_hand_fused_stable_spam_with_vector_statistics_matches_the_alias():
  """The reference keeps AdaClip's and AdaGN's per-leaf statistics as vectors: same updates
  and clipped counts as spam_optax.stable_spam (no decay, no cosine), resets included."""
  run = _spiky_run(12)
  want, want_counts = run(spam_optax.stable_spam(1e-3, reset_interval=4),
                          lambda s: spam_optax.spike_stats(s)["spike/clipped_total"])
  assert sum(want_counts) > 0
  for count in (True, False):
    got, counts = run(bench_optimizer._fused_stable_spam_vector(1e-3, interval=4, count=count),
                      lambda s: jnp.sum(s.clipped))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert counts == (want_counts if count else [0] * 12)


def test_hand_fused_spam_matches_the_alias():
  kw = dict(interval=10, delay=2, warmup=4)
  run = _spiky_run(24)
  alias = spam_optax.spam(1e-3, reset_interval=10, clip_delay=2, warmup_steps=4)
  fused = {mode: bench_optimizer._fused_spam(1e-3, count=mode, **kw)
           for mode in ("changed", "mask", "none")}
  want, want_counts = run(
      alias, lambda s: spam_optax.spike_stats(s)["spike/clipped_total"])
  assert sum(want_counts) > 0
  for mode, opt in fused.items():
    total = lambda s: sum(jax.tree.leaves(s.clipped)) if mode != "none" else 0
    got, counts = run(opt, total)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 got, want)
    if mode != "none":
      assert counts == want_counts, mode


def _cheap_optimizers(density, scan_layers=False):
  """Stand-ins under the real names: the flow of main() without SPAM's compile time."""
  del density, scan_layers
  return {"adamw": optax.adamw(1e-3), "spam": optax.adam(1e-3), "spam d=0.25": optax.sgd(1e-3)}


def _spy_profiles(monkeypatch, out):
  """Records, at each profile, the rows the JSON held and the row being profiled."""
  seen = []
  real = bench_optimizer.profile_runner

  def spy(runner, calls, log_dir, label):
    seen.append((label, json.loads(out.read_text())))
    return real(runner, calls, log_dir, label)

  monkeypatch.setattr(bench_optimizer, "profile_runner", spy)
  return seen


def test_sequential_rows_are_saved_then_profiled(tmp_path, monkeypatch, capsys):
  out, prof = tmp_path / "opt.json", tmp_path / "prof"
  monkeypatch.setattr(bench_optimizer, "optimizers", _cheap_optimizers)
  seen = _spy_profiles(monkeypatch, out)
  bench_optimizer.main(["--size", "tiny", "--sequential", "--warmup", "0", "--iters", "2",
                        "--profile", str(prof), "--profile_calls", "2", "--json", str(out)])
  names = ["adamw", "spam", "spam d=0.25"]
  assert [label for label, _ in seen] == ["adamw", "spam", "spam_d=0.25"]
  for i, (_, saved) in enumerate(seen):  # the finished rows, the current one unprofiled
    rows = saved["optimizers"]
    assert [r["name"] for r in rows] == names[:i + 1]
    assert all("profile" in r for r in rows[:i]) and "profile" not in rows[i]
    assert rows[i]["update_ms"] > 0 and rows[i]["x_adamw"] > 0
    assert rows[i]["in_flight_ms"] > 0 and rows[i]["x_adamw_in_flight"] > 0
  rows = json.loads(out.read_text())["optimizers"]
  assert [r["name"] for r in rows] == names
  assert rows[0]["x_adamw_in_flight"] == 1.0
  assert rows[1]["x_adamw_in_flight"] == rows[1]["in_flight_ms"] / rows[0]["in_flight_ms"]
  for r in rows:
    p = r["profile"]
    assert p["source"] == "cpu" and p["calls"] == 2 and p["top"], r["name"]
    assert 0 < p["busy_ms_per_call"] <= p["span_ms_per_call"]
    assert os.path.isfile(p["xplane"])
  assert sorted(os.listdir(prof)) == ["adamw", "spam", "spam_d=0.25"]
  text = capsys.readouterr().out
  assert "profile spam_d=0.25: cpu busy " in text and "**adamw update** (cpu, 2 calls)" in text


def test_interleaved_profiles_after_all_timing(tmp_path, monkeypatch):
  out = tmp_path / "opt.json"
  monkeypatch.setattr(bench_optimizer, "optimizers", _cheap_optimizers)
  seen = _spy_profiles(monkeypatch, out)
  calls = []  # (number of profiles started so far, whether the call was timed)
  run = bench_optimizer.Runner.run
  monkeypatch.setattr(bench_optimizer.Runner, "run",
                      lambda self, record: calls.append((len(seen), record)) or run(self, record))
  bench_optimizer.main(["--size", "tiny", "--warmup", "0", "--iters", "2",
                        "--profile", str(tmp_path / "prof"), "--json", str(out)])
  assert [n for n, timed in calls if timed] == [0] * 6  # 3 optimizers × 2, all before
  assert len([n for n, timed in calls if not timed]) == 3 * 3  # --profile_calls 3 each
  first = seen[0][1]["optimizers"]
  assert [r["name"] for r in first] == ["adamw"] and first[0]["update_ms"] > 0
  rows = json.loads(out.read_text())["optimizers"]
  assert [r["profile"]["calls"] for r in rows] == [3, 3, 3]
  assert rows[0]["x_adamw"] == 1.0 and rows[2]["state_x_dense_spam"] < 1


def test_blocks_save_each_group_and_profile_each_chain(tmp_path, monkeypatch):
  out, prof = tmp_path / "blocks.json", tmp_path / "prof"
  monkeypatch.setattr(bench_optimizer, "block_optimizers", lambda: {
      "adamw": optax.adamw(1e-3), "sgd": optax.sgd(1e-3), "adam": optax.adam(1e-3)})
  seen = _spy_profiles(monkeypatch, out)
  bench_optimizer.main(["--size", "tiny", "--blocks", "--sequential", "--warmup", "0",
                        "--iters", "1", "--profile", str(prof), "--profile_calls", "1",
                        "--json", str(out)])
  assert [label for label, _ in seen] == ["0-adamw", "0-sgd", "0-adam", "1-adamw"]
  assert [r["name"] for r in seen[-1][1]["blocks"]] == ["adamw", "sgd", "adam", "adamw"]
  rows = json.loads(out.read_text())["blocks"]
  assert [(r["name"], r["group"]) for r in rows] == [
      ("adamw", 0), ("sgd", 0), ("adam", 0), ("adamw", 1)]
  assert all(r["profile"]["source"] == "cpu" for r in rows)
  assert rows[0]["x_adamw"] == 1.0 and rows[3]["x_adamw"] == 1.0
  assert sorted(os.listdir(prof)) == ["0-adam", "0-adamw", "0-sgd", "1-adamw"]


def test_sanitize():
  assert bench_optimizer.sanitize("periodic_reset(.., after_update=True)") == (
      "periodic_reset_.._after_update=True")
  assert bench_optimizer.sanitize("spam d=0.25") == "spam_d=0.25"


def test_every_state_keeps_its_structure_across_an_update():
  """A compiled, donated step takes back only the state it was compiled for (--blocks runs
  each chain many times)."""
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES["tiny"], jnp.float32)
  opts = {**bench_optimizer.optimizers(0.25), **bench_optimizer.block_optimizers()}
  for name, opt in opts.items():
    before = jax.eval_shape(opt.init, shapes)
    after = jax.eval_shape(opt.update, shapes, before, shapes)[1]
    assert jax.tree.structure(after) == jax.tree.structure(before), name
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(after)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(before)], name


def test_stable_spam_statistics_variants():
  """The two-pass variant and the unsettled one compute Stable-SPAM's update (the second
  with its running max zeroed first); the library and the unsettled variant hold the
  second statistics pass in a conditional, the two-pass variant does not; the library is
  left as it was."""
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES["tiny"], jnp.float32)
  variants = bench_optimizer.stable_spam_variants()
  assert list(variants) == [bench_optimizer.TWO_PASSES, bench_optimizer.UNSETTLED,
                            bench_optimizer.STATS_ROWS]
  library = bench_optimizer.optimizers(0.25)["stable_spam"]
  keys = iter(jax.random.split(jax.random.key(0), 64))
  params = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), shapes)
  grads = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), shapes)
  conditionals = lambda o: jax.jit(o.update).lower(grads, o.init(params), params).as_text(
      ).count("stablehlo.case")
  state = library.init(params)
  library_update = jax.jit(library.update)
  want = library_update(grads, state, params)
  got = jax.jit(variants[bench_optimizer.TWO_PASSES].update)(grads, state, params)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  # after an update, the unsettled variant updates as the library does from that state
  # with its running max set to 0
  _, state = want
  clip, scale = state[0]
  assert np.all(np.asarray(clip.max_ema.values) > 0)
  ema = _leaf_stats.LeafStats(jnp.zeros_like(clip.max_ema.values), clip.max_ema.layout)
  zeroed = ((clip._replace(max_ema=ema), scale),) + tuple(state[1:])
  got = jax.jit(variants[bench_optimizer.UNSETTLED].update)(grads, state, params)
  chex.assert_trees_all_close(got, library_update(grads, zeroed, params),
                              rtol=1e-6, atol=1e-7)
  assert conditionals(library) == 1
  assert conditionals(variants[bench_optimizer.UNSETTLED]) == 1
  assert conditionals(variants[bench_optimizer.TWO_PASSES]) == 0
  assert _clip_and_norm_history._ONE_PASS


def test_stable_spam_statistics_in_rows_of_512():
  """The variant updates as the library's Stable-SPAM does, a spike clipped and counted,
  reading the leaves that 512 divides in rows of 512, and leaves the library as it was."""
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES["tiny"], jnp.float32)
  variant = bench_optimizer.stable_spam_variants()[bench_optimizer.STATS_ROWS]
  library = bench_optimizer.optimizers(0.25)["stable_spam"]
  def normal(seed):
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    return jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), shapes)
  params = normal(1)
  states = {"library": library.init(params), "variant": library.init(params)}
  steps = {"library": jax.jit(library.update), "variant": jax.jit(variant.update)}
  for t in range(3):
    grads = normal(t + 2)
    if t == 2:
      grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].mul(1e3), grads)
    out = {k: fn(grads, states[k], params) for k, fn in steps.items()}
    states = {k: o[1] for k, o in out.items()}
    chex.assert_trees_all_close(out["variant"], out["library"], rtol=1e-5, atol=1e-7)
  clipped = np.asarray(states["variant"][0][0].clipped.values)
  np.testing.assert_array_equal(clipped, np.asarray(states["library"][0][0].clipped.values))
  assert clipped.sum() > 0

  def eqns(jaxpr):  # with those of the jaxprs inside (nested jit, conditionals)
    for e in jaxpr.eqns:
      yield e
      for v in e.params.values():
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            yield from eqns(inner)

  def reduced(opt):
    jaxpr = jax.make_jaxpr(opt.update)(grads, library.init(params), params)
    return {tuple(e.invars[0].aval.shape) for e in eqns(jaxpr.jaxpr)
            if e.primitive.name.startswith("reduce")}
  divided = {(math.prod(s.shape) // 512, 512) for s in jax.tree.leaves(shapes)
             if len(s.shape) >= 2 and math.prod(s.shape) % 512 == 0}
  assert divided and divided <= reduced(variant)
  assert not divided & reduced(library)
  assert _leaf_stats._STATS_ROW is None


def test_spam_counting_in_the_rows_before(monkeypatch):
  """The variant updates as the library's SPAM does, clipped counts included, with each
  leaf counted in the rows before the rows of 128, and leaves the library as it was."""
  shapes = bench_optimizer.param_shapes(bench_optimizer.SIZES["tiny"], jnp.float32)
  (name, variant), = bench_optimizer.count_rows_variants().items()
  assert name == bench_optimizer.COUNT_ROWS_BEFORE
  library = bench_optimizer.optimizers(0.25)["spam"]
  def normal(seed):
    keys = iter(jax.random.split(jax.random.key(seed), 32))
    return jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape), shapes)
  params = normal(0)
  views = []
  counted = _count.count_rows
  monkeypatch.setattr(_count, "count_rows",
                      lambda shape, *a, **k: views.append(counted(shape, *a, **k)) or views[-1])
  step = lambda opt: jax.jit(opt.update)
  steps = {"library": step(library), "before": step(variant)}
  states = {k: library.init(params) for k in steps}
  seen = {}
  for t in range(22):  # the clip starts at step 20; step 22's gradient spikes
    grads = normal(t + 1)
    if t == 21:
      grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].mul(1e4), grads)
    out = {}
    for k, fn in steps.items():
      views.clear()
      out[k], states[k] = fn(grads, states[k], params)
      seen.setdefault(k, list(views))
    chex.assert_trees_all_equal(out["library"], out["before"])
  chex.assert_trees_all_equal(states["library"], states["before"])
  clipped = np.asarray(states["library"][0].inner_state.clipped.values)
  np.testing.assert_array_equal(clipped, 1)  # each leaf's spike, and only it
  assert (128, 128) in seen["library"] and (128, 128) not in seen["before"]
  assert (22, 2048) in seen["before"]  # the MLP's 128×352 leaves, in rows of 2048
  assert _leaf_stats._SHORT_ROWS
