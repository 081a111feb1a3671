"""experiments/benchmarks/timing.py: waited-for steps and steps with one in flight."""
import jax
import jax.numpy as jnp
import pytest

from experiments.benchmarks import timing


@pytest.fixture
def recorded(monkeypatch):
  """``(events, call)``: ``call()`` dispatches call i (it returns i) and every wait is
  recorded with what it waited for."""
  events = []
  calls = iter(range(100))

  def call():
    i = next(calls)
    events.append(("dispatch", i))
    return i

  monkeypatch.setattr(jax, "block_until_ready", lambda x: events.append(("wait", x)) or x)
  return events, call


def test_in_flight_waits_for_the_previous_call_after_dispatching_the_next(recorded):
  events, call = recorded
  s = timing.in_flight_s(call, 3)
  assert s >= 0
  assert events == [("dispatch", 0), ("dispatch", 1), ("wait", 0), ("dispatch", 2),
                    ("wait", 1), ("wait", 2)]


def test_synced_waits_for_each_call_before_the_next(recorded):
  events, call = recorded
  times = timing.synced_times(call, 2)
  assert len(times) == 2 and min(times) >= 0
  assert events == [("dispatch", 0), ("wait", 0), ("dispatch", 1), ("wait", 1)]


def test_on_a_real_jitted_step():
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64)) / 64
  jax.block_until_ready(f(x))
  assert timing.in_flight_s(lambda: f(x), 4) > 0
  assert all(t > 0 for t in timing.synced_times(lambda: f(x), 3))


def test_in_flight_needs_a_call():
  with pytest.raises(ValueError, match="n must be >= 1"):
    timing.in_flight_s(lambda: None, 0)
