"""experiments/benchmarks/bench_optimizer.py: its tables, and its hand-fused SPAM equals spam()."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spam_optax
from experiments.benchmarks import bench_optimizer


def table_rows(text):
  """The markdown table rows of ``text`` as lists of cells (header included)."""
  return [[c.strip() for c in line.strip("|").split("|")]
          for line in text.splitlines() if line.startswith("| ") and "---" not in line]


def test_state_bytes_at_1b_meet_the_sparse_target(capsys):
  bench_optimizer.main(["--size", "1b", "--no-time"])
  rows = {r[0]: r for r in table_rows(capsys.readouterr().out)}
  assert rows["spam"][5] == "1.000" and rows["stable_spam"][5] == "1.000"
  sparse = float(rows["spam d=0.25"][6])
  assert sparse == 0.436  # exact: eval_shape of the state, no allocation


def test_timed_tables_on_a_tiny_tree(capsys):
  bench_optimizer.main(["--size", "tiny", "--warmup", "1", "--iters", "2"])
  rows = table_rows(capsys.readouterr().out)
  assert [r[0] for r in rows[1:]] == ["adamw", "spam", "stable_spam", "spam d=0.25"]
  assert rows[1][2] == "1.00"
  for row in rows[1:]:
    assert float(row[1]) > 0 and float(row[3].replace(",", "")) >= 0


def test_hand_fused_spam_matches_the_alias():
  kw = dict(interval=10, delay=2, warmup=4)
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

  grads = [gradient(t) for t in range(24)]
  alias = spam_optax.spam(1e-3, reset_interval=10, clip_delay=2, warmup_steps=4)
  fused = {mode: bench_optimizer._fused_spam(1e-3, count=mode, **kw)
           for mode in ("changed", "mask", "none")}

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
