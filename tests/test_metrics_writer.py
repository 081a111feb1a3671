"""experiments/metrics.py: per-step records, the per-leaf counts packed into one vector."""
import json

import jax
import jax.numpy as jnp
import numpy as np

import spam_optax
from experiments import metrics
from experiments import train_step


class _FakeBoard:
  def __init__(self):
    self.scalars = []

  def add_scalar(self, tag, value, step):
    self.scalars.append((tag, value, step))

  def close(self):
    pass


def _writer(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path), tokens_per_step=100, flops_per_step=1.0,
                            peak_flops=None)
  w._tb = _FakeBoard()  # pylint: disable=protected-access
  return w


def test_packed_scalars_leave_a_jitted_function_as_one_vector():
  @jax.jit
  def f(x):
    return {"loss": x * 2.0, "counts": metrics.PackedScalars.pack(
        {"spike/clipped/a": x.astype(jnp.int32), "spike/clipped/b/c": jnp.int32(7)})}

  out = f(jnp.float32(3.0))
  assert len(jax.tree.leaves(out)) == 2  # the loss and one vector
  fetched = jax.device_get(out)
  assert isinstance(fetched["counts"].values, np.ndarray)
  assert fetched["counts"].as_dict() == {"spike/clipped/a": 3, "spike/clipped/b/c": 7}
  assert metrics.PackedScalars.pack({}).as_dict() == {}


def test_the_record_names_the_packed_scalars_and_tensorboard_gets_the_others(tmp_path):
  w = _writer(tmp_path)
  for step in (1, 2, 3):
    w.push(step, {"loss": jnp.float32(step), "spike/clipped_total": jnp.int32(3 * step),
                  "spike/clipped/*": metrics.PackedScalars.pack(
                      {"spike/clipped/w": jnp.int32(step), "spike/clipped/b": jnp.int32(2 * step)})})
  last = w.flush()
  w.close()
  assert {k: last[k] for k in ("step", "loss", "spike/clipped_total", "spike/clipped/w",
                               "spike/clipped/b")} == {
      "step": 3, "loss": 3.0, "spike/clipped_total": 9, "spike/clipped/w": 3, "spike/clipped/b": 6}
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [1, 2, 3] and lines[0]["spike/clipped/b"] == 2
  tags = {tag for tag, _, _ in w._tb.scalars}  # pylint: disable=protected-access
  assert {"loss", "spike/clipped_total"} <= tags
  assert not any(t.startswith("spike/clipped/") for t in tags)


def test_the_train_steps_spike_metrics_match_spike_stats():
  params = {"layers": [{"w": jnp.ones((3, 4))}, {"w": jnp.ones((4, 2))}], "b": jnp.ones(2)}
  opt = spam_optax.spam(1e-2, clip_delay=0, spike_threshold=1.0)
  state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  _, state = opt.update(grads, state, params)
  _, state = opt.update(jax.tree.map(lambda g: 10 * g, grads), state, params)
  got = jax.device_get(jax.jit(train_step.spike_metrics)(state))
  want = jax.device_get(spam_optax.spike_stats(state))
  packed = got.pop("spike/clipped/*")
  assert set(packed.names) == {k for k in want if k.startswith("spike/clipped/")}
  flat = {**{k: int(v) for k, v in got.items()}, **packed.as_dict()}
  assert flat == {k: int(v) for k, v in want.items()}
  assert want["spike/clipped_total"] > 0
