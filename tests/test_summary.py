"""summary.json (experiments.summary) and --inject_grad_spike: hand-made records, tiny runs."""
import math

import numpy as np
import pytest

from experiments import config, pretrain, spikes, summary
from _tiny_runs import read_metrics

CFG = {"name": "r", "batch_size": 2, "total_batch_size": 4, "max_length": 8,
       "num_training_steps": 30}


def records(losses, norms, evals, tps=100.0):
  out = [{"step": 0, "eval_loss": evals[0]}]
  for t, (l, g) in enumerate(zip(losses, norms), start=1):
    out.append({"step": t, "loss": l, "grad_norm": g, "tokens_per_s": tps})
  for step, v in evals[1:]:
    out[step]["eval_loss"] = v
  return out


def test_compute_from_hand_made_records():
  losses = [3.0] * 30
  losses[24] = 6.0
  norms = [1.0] * 30
  norms[19] = 20.0
  s = summary.compute(records(losses, norms, [5.0, (10, 4.0), (20, 3.5), (30, 3.6)]), CFG,
                      wall_s=12.5, finished=True)
  assert s["finished"] and not s["diverged"] and s["error"] is None
  assert (s["steps"], s["tokens"]) == (30, 30 * 4 * 8)
  assert s["initial_eval_loss"] == 5.0
  assert s["final_eval_loss"] == 3.6 and s["best_eval_loss"] == 3.5
  assert s["final_eval_perplexity"] == pytest.approx(math.exp(3.6))
  assert s["best_eval_perplexity"] == pytest.approx(math.exp(3.5))
  assert (s["loss_spikes"], s["grad_norm_spikes"], s["max_grad_norm"]) == (1, 1, 20.0)
  assert s["loss_spikes"] == spikes.count_spikes(losses, factor=spikes.LOSS_FACTOR)
  assert s["train_s"] == pytest.approx(30 * 32 / 100.0)
  assert s["tokens_per_s"] == pytest.approx(100.0)
  assert s["wall_s"] == 12.5 and s["config"] == CFG


@pytest.mark.parametrize("losses, final, reason", [
    ([3.0] * 29 + [None], 3.0, "non-finite loss"),
    ([3.0] * 30, 5.5, "final eval above the initial"),
])
def test_diverged(losses, final, reason):
  s = summary.compute(records(losses, [1.0] * 30, [5.0, (30, final)]), CFG)
  assert s["diverged"], reason


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
  summary.write(str(tmp_path), {"a": 1})
  summary.write(str(tmp_path), {"a": 2})
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
  assert summary.read(str(tmp_path)) == {"a": 2}


def test_trainer_writes_it_and_a_resumed_run_summarises_the_whole_run(tiny_args, tmp_path):
  spike = ["--inject_grad_spike", "5:1000"]
  pretrain.main(tiny_args("whole", num_training_steps=8, eval_every=4, save_every=4) + spike)
  whole = summary.read(str(tmp_path / "whole"))
  pretrain.main(tiny_args("parts", num_training_steps=8, eval_every=4, save_every=4,
                          stop_after=6) + spike)
  part = summary.read(str(tmp_path / "parts"))
  assert part["steps"] == 6 and not part["finished"]
  pretrain.main(tiny_args("parts", num_training_steps=8, eval_every=4, save_every=4) + spike)
  resumed = summary.read(str(tmp_path / "parts"))
  assert whole["finished"] and resumed["finished"]
  for key in ("steps", "tokens", "grad_norm_spikes", "loss_spikes", "initial_eval_loss"):
    assert resumed[key] == whole[key], key
  for key in ("final_eval_loss", "best_eval_loss", "max_grad_norm"):
    assert resumed[key] == pytest.approx(whole[key], rel=1e-5), key
  assert resumed["wall_s"] > part["wall_s"]
  assert whole["tokens"] == 8 * 4 * 32
  assert whole["config"]["inject_grad_spike"] == [[5, 1000.0]]
  records = [r for r in read_metrics(tmp_path / "whole") if "loss" in r]
  norms = [r["grad_norm"] for r in records]
  assert whole["max_grad_norm"] == max(norms) == norms[4]
  assert whole["grad_norm_spikes"] == spikes.count_spikes(norms, factor=5.0)


def test_inject_grad_spike_multiplies_that_steps_gradient_only(tiny_args, tmp_path):
  pretrain.main(tiny_args("plain", num_training_steps=4, eval_every=100, save_every=100))
  pretrain.main(tiny_args("spiked", num_training_steps=4, eval_every=100, save_every=100)
                + ["--inject_grad_spike", "3:-250", "--inject_grad_spike", "3:2"])
  plain = [r for r in read_metrics(tmp_path / "plain") if "loss" in r]
  spiked = [r for r in read_metrics(tmp_path / "spiked") if "loss" in r]
  norms = np.array([[a["grad_norm"], b["grad_norm"]] for a, b in zip(plain, spiked)])
  np.testing.assert_allclose(norms[:2, 1], norms[:2, 0], rtol=1e-6)  # same run before it
  np.testing.assert_allclose(norms[2, 1], 500.0 * norms[2, 0], rtol=1e-5)
  assert spiked[3]["loss"] != plain[3]["loss"]  # the spiked update moved the parameters


@pytest.mark.parametrize("value", ["5", "a:2", "5:x", "0:2", "5:inf", "5:2:3"])
def test_malformed_inject_grad_spike_is_a_one_line_error(value):
  with pytest.raises(SystemExit, match="--inject_grad_spike") as e:
    config.parse_args(["--inject_grad_spike", value])
  assert "\n" not in str(e.value)
