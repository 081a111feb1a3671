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
  # Call 0 fills the pipeline (untimed); calls 1–3 are timed, each waited for after the
  # next is dispatched.
  assert events == [("dispatch", 0), ("dispatch", 1), ("wait", 0), ("dispatch", 2),
                    ("wait", 1), ("dispatch", 3), ("wait", 2), ("wait", 3)]


def test_in_flight_times_are_the_intervals_between_completions(recorded, monkeypatch):
  events, call = recorded
  clock = iter([10.0, 10.5, 11.5, 12.0])  # the clock start, then each completion
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
  assert timing.in_flight_times(call, 3) == [0.5, 1.0, 0.5]
  assert events == [("dispatch", 0), ("dispatch", 1), ("wait", 0), ("dispatch", 2),
                    ("wait", 1), ("dispatch", 3), ("wait", 2), ("wait", 3)]


def test_synced_waits_for_each_call_before_the_next(recorded):
  events, call = recorded
  times = timing.synced_times(call, 2)
  assert len(times) == 2 and min(times) >= 0
  assert events == [("dispatch", 0), ("wait", 0), ("dispatch", 1), ("wait", 1)]


def test_back_to_back_waits_for_the_last_call_only(recorded):
  events, call = recorded
  assert timing.back_to_back_s(call, 3) >= 0
  assert events == [("dispatch", 0), ("dispatch", 1), ("dispatch", 2), ("wait", 2)]


def test_back_to_back_on_a_donated_chain():
  """Each call donates its input; an earlier result could not be waited for."""
  f = jax.jit(lambda x: x * 0.5 + 1.0, donate_argnums=0)
  holder = [jnp.ones((256,))]

  def call():
    holder[0] = f(holder[0])
    return holder[0]

  assert timing.back_to_back_s(call, 4) > 0
  assert float(holder[0][0]) == 1.9375  # 1 → 1.5 → 1.75 → 1.875 → 1.9375


def test_on_a_real_jitted_step():
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64)) / 64
  jax.block_until_ready(f(x))
  assert timing.in_flight_s(lambda: f(x), 4) > 0
  assert all(t > 0 for t in timing.synced_times(lambda: f(x), 3))


def test_a_call_is_needed():
  for measure in (timing.in_flight_s, timing.in_flight_times, timing.back_to_back_s):
    with pytest.raises(ValueError, match="n must be >= 1"):
      measure(lambda: None, 0)
