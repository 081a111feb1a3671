"""Checkpoint / resume: an interrupted and resumed run reproduces the uninterrupted one exactly."""
import json

import jax
import numpy as np
import pytest

from experiments import checkpointing, pretrain

@pytest.fixture
def run_args(tmp_path, tiny_model_config):
  model = tiny_model_config
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


def losses(save_dir):
  with open(f"{save_dir}/metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: (r.get("loss"), r.get("eval_loss"), r.get("grad_norm"),
                     r.get("spike/clipped_total"))
          for r in records if "loss" in r}


def test_interrupted_and_resumed_run_matches_exactly(run_args, tmp_path):
  pretrain.main(run_args("straight"))
  stopped = pretrain.main(run_args("resumed", "--stop_after", "3"))
  assert stopped["latest_checkpoint"] == 3
  resumed = pretrain.main(run_args("resumed"))  # finds the checkpoint by itself
  assert resumed["start_step"] == 3
  straight = losses(tmp_path / "straight")
  assert losses(tmp_path / "resumed") == straight
  assert sum(v[3] for v in straight.values()) > 0  # spikes were clipped
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
