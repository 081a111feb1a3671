"""Checkpoint / resume: an interrupted and resumed run reproduces the uninterrupted one exactly,
whether it stopped at --stop_after, on SIGINT / SIGTERM, or was killed during a save."""
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import checkpointing, preemption, pretrain

import _processes
from _tiny_runs import write_tiny_model_config


def make_args(tmp_path):
  model = write_tiny_model_config(tmp_path)
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(1)
  corpus.write_text("\n".join(
      " ".join(rng.choice(["spike", "moment", "reset", "adam", "clip", "warm", "up"],
                          size=5 + i % 13)) for i in range(200)))

  def args(run, *extra):
    # SPAM with sparse moments, a reset every 3 steps, a 1-step reset warm-up and spike
    # clipping from the first step: every piece of optimizer state (masks, counters,
    # moments) must survive the checkpoint.
    return ["--model_config", str(model), "--dataset", str(corpus), "--optimizer", "spam",
            "--density", "0.5", "--DeltaT", "3", "--warmup_epoch", "1", "--threshold", "2",
            "--grad_accu_steps", "1",
            "--batch_size", "4", "--total_batch_size", "8", "--max_length", "24",
            "--num_training_steps", "6", "--warmup_steps", "1", "--lr", "1e-2",
            "--eval_every", "3", "--eval_batches", "2", "--save_every", "2",
            "--dtype", "bfloat16", "--no-progress", "--save_dir", str(tmp_path / run), *extra]
  return args


@pytest.fixture
def run_args(tmp_path):
  return make_args(tmp_path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run's per-step metrics."""
  tmp = tmp_path_factory.mktemp("straight")
  pretrain.main(make_args(tmp)("straight"))
  return losses(tmp / "straight")


def losses(save_dir):
  with open(f"{save_dir}/metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: (r.get("loss"), r.get("eval_loss"), r.get("grad_norm"),
                     r.get("spike/clipped_total"))
          for r in records if "loss" in r}


def test_interrupted_and_resumed_run_matches_exactly(run_args, tmp_path, straight):
  stopped = pretrain.main(run_args("resumed", "--stop_after", "3"))
  assert stopped["latest_checkpoint"] == 3
  resumed = pretrain.main(run_args("resumed"))  # finds the checkpoint by itself
  assert resumed["start_step"] == 3
  assert losses(tmp_path / "resumed") == straight
  assert sum(v[3] for v in straight.values()) > 0  # spikes were clipped
  # The resume is recorded with the setting it changed.
  with open(tmp_path / "resumed" / "resumes.jsonl") as f:
    resumes = [json.loads(line) for line in f]
  assert [(r["step"], r["changed"]) for r in resumes] == [(3, {"stop_after": [3, None]})]
  # keep_checkpoints (default 2): only the newest two remain.
  ckpt = checkpointing.Checkpointer(str(tmp_path / "resumed"), keep=2)
  assert ckpt.manager.all_steps() == [4, 6]
  # What a checkpoint holds: the bf16 train state and the loader position.
  step, state, data_state = ckpt.restore(None)
  ckpt.close()
  assert step == 6 and int(state["step"]) == 6
  assert {"epoch", "doc", "offset"} <= set(data_state)
  assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(state["params"]))
  # --dtype bfloat16 keeps the moments in bf16 too, like the official runs.
  moments = [x for x in jax.tree.leaves(state["opt_state"])
             if x.ndim and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  assert moments and all(x.dtype == jax.numpy.bfloat16 for x in moments)
  # Nothing left to do: the finished run is not retrained.
  again = pretrain.main(run_args("resumed", "--resume"))
  assert again["start_step"] == 6 and again["last"] is None


def _metrics_step0(save_dir):
  with open(f"{save_dir}/metrics.jsonl") as f:
    return json.loads(f.readline())


def test_sigterm_then_kill_during_a_save_then_rerun_matches_exactly(run_args, tmp_path,
                                                                    straight, capsys):
  # SIGTERM arrives after step 2's work: step 3 (in flight) finishes and is saved.
  p = _processes.run_trainer(run_args("run", "--inject_signal", "2:TERM"), tmp_path)
  assert p.returncode == 128 + signal.SIGTERM, p.stderr[-2000:]
  assert p.stdout.splitlines()[-1] == (
      "interrupted at step 3; checkpoint saved; rerun the same command to resume")
  assert "Traceback" not in p.stderr
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), keep=2)
  assert ckpt.latest_step() == 3
  ckpt.close()
  # The rerun resumes there and is killed (-9) right after the asynchronous save of step 4
  # started: the latest checkpoint is the last complete one (3, or 4 if it finished).
  p = _processes.run_trainer(run_args("run", "--inject_signal", "4:KILL"), tmp_path)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  assert "at step 3" in p.stdout  # resumed from ...
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run"), keep=2)
  latest = ckpt.latest_step()
  ckpt.close()
  assert latest in (3, 4)
  resumed = pretrain.main(run_args("run"))
  assert resumed["start_step"] == latest
  assert losses(tmp_path / "run") == straight
  # The resumed run still reports the whole run's perplexity, from the step-0 evaluation.
  first = _metrics_step0(tmp_path / "run")
  assert first["step"] == 0 and resumed["first_eval"]["eval_loss"] == first["eval_loss"]
  assert (f"validation perplexity {first['eval_perplexity']:.2f} -> "
          f"{resumed['last_eval']['eval_perplexity']:.2f}") in capsys.readouterr().out


def test_a_signal_before_training_stops_at_once_then_only_sets_a_flag():
  previous = signal.getsignal(signal.SIGINT)
  with preemption.Preemption() as stop:
    with pytest.raises(preemption.Interrupted) as e:
      os.kill(os.getpid(), signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM and not stop.reached(1)
    stop.arm()
    os.kill(os.getpid(), signal.SIGINT)  # armed: only a flag, the step goes on
    assert stop.reached(1) and stop.signum == signal.SIGINT
    assert preemption.Interrupted(stop.signum).code == 130
  assert signal.getsignal(signal.SIGINT) is previous  # handlers restored


def test_a_second_signal_exits_at_once():
  code = ("import os, signal, time\n"
          "from experiments import preemption\n"
          "with preemption.Preemption() as stop:\n"
          "  stop.arm()\n"
          "  os.kill(os.getpid(), signal.SIGTERM)\n"
          "  print('flag', stop.signum, flush=True)\n"
          "  os.kill(os.getpid(), signal.SIGINT)\n"
          "  time.sleep(30)\n"
          "  print('not reached')\n")
  p = subprocess.run([sys.executable, "-c", code], env=_processes.env(), capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 128 + signal.SIGINT
  assert p.stdout == f"flag {int(signal.SIGTERM)}\n"
  assert "SIGINT again: exiting now; the last complete checkpoint is kept" in p.stderr


TWO_PROCESSES = """
import json, os, signal, sys, time
import jax
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], 2,
                           int(os.environ["JAX_PROCESS_ID"]))
from experiments import preemption
signalled, name = int(sys.argv[1]), sys.argv[2]
with preemption.Preemption() as stop:
  stop.arm()
  stopped = None
  for step in range(1, 400):
    time.sleep(0.05)  # a training step
    if step == 3 and jax.process_index() == signalled:
      os.kill(os.getpid(), getattr(signal, name))
    if stop.reached(step):
      stopped = step
      break
print(json.dumps({"stopped": stopped, "signum": stop.signum}), flush=True)
"""


@pytest.mark.parametrize("signalled, name", [(1, "SIGTERM"), (0, "SIGINT")])
def test_two_processes_agree_on_the_step_to_save(tmp_path, signalled, name):
  """JAX's preemption sync: one host gets the signal, both stop at the same step."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(signalled), name],
                            env=_processes.env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert outs[0]["stopped"] is not None and outs[0]["stopped"] == outs[1]["stopped"]
  assert outs[signalled]["signum"] == getattr(signal, name)


def test_resuming_with_another_number_of_processes_is_one_error_line(tmp_path):
  # Each process's loader position is saved apart; another process count cannot continue it.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  state = {"w": jax.numpy.ones(3)}
  ckpt.manager.save(1, args=ocp.args.Composite(  # as two processes would have saved it
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave({"hosts": {"0": {"position": 7}, "1": {"position": 9}}})))
  ckpt.wait()
  with pytest.raises(SystemExit, match=r"^error: .* saved by 2 process\(es\), this run has 1"):
    ckpt.restore(checkpointing.abstract_like(state))
  ckpt.close()


def test_a_checkpoint_of_another_state_structure_is_one_error_line(tmp_path):
  # E.g. written before the optimizer's per-leaf statistics became one vector.
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
  saved = {"params": {"w": jax.numpy.ones(3)},
           "opt": {"max_ema": {"w": jax.numpy.zeros(())}}}
  ckpt.manager.save(1, args=ocp.args.Composite(
      state=ocp.args.StandardSave(saved),
      data=ocp.args.JsonSave({"hosts": {"0": {"position": 7}}})))
  ckpt.wait()
  wanted = {"params": {"w": jax.numpy.ones(3)},
            "opt": {"max_ema": {"values": jax.numpy.zeros(1)}}}
  with pytest.raises(SystemExit, match=r"^error: .* step 1 holds a train state of another "
                     r"structure than this run's \(this run has opt/max_ema/values, the "
                     r"checkpoint does not\).*export_hf"):
    ckpt.restore(checkpointing.abstract_like(wanted))
  # The same structure restores as before.
  step, state, host = ckpt.restore(checkpointing.abstract_like(saved))
  assert step == 1 and host == {"position": 7}
  np.testing.assert_array_equal(state["params"]["w"], np.ones(3))
  ckpt.close()
