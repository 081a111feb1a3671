"""The optimizers on sharded arrays: same numbers as on one device, shardings kept.

Runs in a subprocess with 8 virtual CPU devices (the device count is fixed when
JAX starts, so it cannot be changed inside this test process).
"""
import json
import subprocess
import sys
import textwrap

import numpy as np

import _processes

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import spam_optax

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
    rng = np.random.default_rng(0)
    shapes = {"w1": (16, 96), "w2": (48, 64), "emb": (32, 32), "norm": (24,)}
    specs = {"w1": P("fsdp", "tensor"), "w2": P("tensor", "fsdp"),
             "emb": P("fsdp", None), "norm": P(None)}
    params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = []
    for t in range(24):
      g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
      if t in (6, 15):                     # spikes
        g["w1"][0, :5] *= 1000.0
        g["norm"][3] *= 500.0
      grads.append(g)

    def run(tx, shard):
      put = ((lambda tree: {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                            for k, v in tree.items()})
             if shard else (lambda tree: jax.tree.map(jnp.asarray, tree)))
      params = put(params0)
      state = jax.jit(tx.init)(params)

      @jax.jit
      def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, spam_optax.spike_stats(state)

      clipped = 0
      for g in grads:
        params, state, stats = step(params, state, put(g))
        clipped += int(stats.get("spike/clipped_total", 0))
      kept = all(params[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), len(shapes[k]))
                 for k in shapes) if shard else True
      return {k: np.asarray(v).tolist() for k, v in params.items()}, clipped, kept

    optimizers = {
        "spam": lambda: spam_optax.spam(1e-2, reset_interval=8, warmup_steps=3,
                                        clip_delay=2, spike_threshold=50.0),
        "spam_sparse": lambda: spam_optax.spam(1e-2, reset_interval=8, warmup_steps=3,
                                               clip_delay=2, spike_threshold=50.0,
                                               density=0.25, seed=3),
        "stable_spam": lambda: spam_optax.stable_spam(1e-2, reset_interval=8,
                                                      total_steps=24),
    }
    def gathered(tx):
      # Sizes of what the compiled sharded update all-gathers (or all-to-alls).
      params = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, specs[k]))
                for k, s in shapes.items()}
      hlo = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(
          params, jax.eval_shape(tx.init, params), params).compile().as_text()
      sizes = []
      for line in hlo.splitlines():
        if any(f" {op}(" in line or f" {op}-start(" in line for op in ("all-gather", "all-to-all")):
          dims = line.split("=", 1)[1].split("[", 1)[1].split("]", 1)[0]
          sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
      return sizes

    out = {}
    for name, make in optimizers.items():
      single, clipped_single, _ = run(make(), shard=False)
      sharded, clipped_sharded, kept = run(make(), shard=True)
      out[name] = {"single": single, "sharded": sharded, "kept": kept,
                   "clipped": [clipped_single, clipped_sharded], "gathered": gathered(make())}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_updates_match_single_device():
  env = _processes.env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  results = json.loads(line[len("RESULT"):])
  for name, r in results.items():
    assert r["kept"], f"{name}: parameter shardings changed"
    assert r["clipped"][0] == r["clipped"][1], name
    for leaf in r["single"]:
      np.testing.assert_allclose(r["sharded"][leaf], r["single"][leaf], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{name}/{leaf}")
  # The spikes were there to be clipped: the test exercises the clip, not a no-op.
  assert results["spam"]["clipped"][0] > 0
  # The per-leaf statistics reduce each sharded leaf where it lies: the dense updates
  # gather no gradient or moment, only row results (a leaf's local rows times the shards
  # of its reduced axes, where one reduction computes two sums), each smaller than the
  # smallest local shard of a sharded leaf: 192 entries, w1's (4, 48).
  for name in ("spam", "stable_spam"):
    assert all(size < 192 for size in results[name]["gathered"]), (
        name, results[name]["gathered"])
