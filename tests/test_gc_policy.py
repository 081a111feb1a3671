"""Garbage collection on a schedule in the training loop (experiments/gc_policy.py)."""
import gc
import weakref

import pytest

from experiments import gc_policy, pretrain



class _Node:
  pass


def _cycle():
  """A reference cycle nothing else points to, and a weak reference that says when it is
  collected (reference counting alone never frees it)."""
  a, b = _Node(), _Node()
  a.other, b.other = b, a
  return weakref.ref(a)


@pytest.fixture(autouse=True)
def _collector_restored():
  was_enabled = gc.isenabled()
  yield
  gc.unfreeze()
  (gc.enable if was_enabled else gc.disable)()


def test_the_loop_collects_only_at_its_steps_and_the_heap_before_it_is_frozen():
  gc.enable()
  old = _Node()
  with gc_policy.scheduled(3) as collect:
    assert not gc.isenabled()
    assert gc.get_freeze_count() > 0  # what was alive before the loop: never walked again
    assert gc.is_tracked(old)
    garbage = _cycle()
    assert collect(1) == 0.0 and collect(2) == 0.0
    assert garbage() is not None  # automatic collection is off: not yet freed
    assert collect(3) > 0.0
    assert garbage() is None  # freed at the step due
  assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_collectors_state_comes_back_also_after_an_error():
  gc.disable()
  with pytest.raises(RuntimeError, match="boom"):
    with gc_policy.scheduled(2):
      raise RuntimeError("boom")
  assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_every_zero_leaves_python_collecting_as_before():
  gc.enable()
  with gc_policy.scheduled(0) as collect:
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert collect(100) == 0.0
  assert gc.isenabled()


def test_a_negative_interval_is_refused():
  with pytest.raises(ValueError, match="every must be >= 0"):
    with gc_policy.scheduled(-1):
      pass


def test_pauses_record_each_pass_its_generation_and_step():
  step = [4]
  with gc_policy.Pauses(lambda: step[0]) as pauses:
    gc.collect(0)
    step[0] = 7
    gc.collect(2)
  gc.collect(1)  # after the block: not recorded
  got = [(p["generation"], p["step"]) for p in pauses.passes]
  assert got == [(0, 4), (2, 7)] and all(p["s"] >= 0 for p in pauses.passes)
  summary = pauses.summary()
  assert summary["passes"] == {"0": 1, "1": 0, "2": 1}
  assert summary["longest"] in pauses.passes
  assert summary["total_s"] == pytest.approx(sum(p["s"] for p in pauses.passes), abs=1e-5)
  assert gc_policy.Pauses().summary() == {"passes": {"0": 0, "1": 0, "2": 0}, "total_s": 0.0,
                                          "longest": None}
  with gc_policy.Pauses() as without_steps:
    gc.collect(0)
  assert without_steps.passes[0]["step"] is None
  assert gc_policy.full_collection_s() >= 0


def test_the_trainer_collects_on_its_schedule(tiny_args, monkeypatch):
  """Six steps with --gc_every 2: Python's collector off during the loop, a collection at
  steps 2, 4 and 6."""
  collected, real = [], gc_policy.scheduled

  def scheduled(every):
    assert every == 2
    scope = real(every)
    collect = scope.__enter__()

    class Scope:
      def __enter__(self):
        assert not gc.isenabled()
        return lambda step: collected.append((step, collect(step) > 0))

      def __exit__(self, *exc):
        return scope.__exit__(*exc)

    return Scope()

  monkeypatch.setattr(gc_policy, "scheduled", scheduled)
  pretrain.main(tiny_args(gc_every=2, num_training_steps=6))
  assert collected == [(1, False), (2, True), (3, False), (4, True), (5, False), (6, True)]
  assert gc.isenabled()  # as before the run
