"""A trained run leaves as a Hugging Face directory (experiments.export_hf) and comes back:
--init_from_hf trains from it, --eval_only evaluates it or a run's checkpoint."""
import json
import os
import re

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest

import models
from experiments import checkpointing, export_hf, pretrain

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 258, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step run (checkpoints and evaluations at steps 2 and 4) and a flag builder."""
  root = tmp_path_factory.mktemp("hf")
  (root / "tiny.json").write_text(json.dumps(TINY))
  rng = np.random.default_rng(2)
  (root / "corpus.txt").write_text("\n".join(
      " ".join(rng.choice(["export", "import", "layer", "head", "norm", "rope"], size=4 + i % 11))
      for i in range(200)))

  def args(save_dir, *extra, model=True):
    return ([*(["--model_config", str(root / "tiny.json")] if model else []),
             "--dataset", str(root / "corpus.txt"), "--optimizer", "adamw", "--batch_size", "4",
             "--max_length", "24", "--num_training_steps", "4", "--warmup_steps", "1",
             "--lr", "1e-2", "--eval_every", "2", "--save_every", "2", "--eval_batches", "2",
             "--dtype", "float32", "--no-progress", "--save_dir", str(save_dir), *extra])

  pretrain.main(args(root / "run"))
  return root, args


def evals(save_dir):
  with open(os.path.join(save_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r}


def checkpoint_params(save_dir, step):
  ckpt = checkpointing.Checkpointer(str(save_dir), keep=2)
  try:
    return ckpt.restore_params(step)
  finally:
    ckpt.close()


def test_export_reads_back_exactly(run, capsys):
  root, _ = run
  out = export_hf.main([str(root / "run"), str(root / "export")])
  assert out["step"] == 4 and "from_pretrained" in capsys.readouterr().out
  config = json.loads((root / "export" / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
  assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (258, 32, 2)
  assert config["pad_token_id"] == 0 and config["eos_token_id"] == 1  # the byte tokenizer's
  params, _ = models.load_pretrained(root / "export")
  chex.assert_trees_all_equal(params, checkpoint_params(root / "run", 4))
  # --step picks an older checkpoint.
  export_hf.main([str(root / "run"), str(root / "export2"), "--step", "2", "--dtype", "bfloat16"])
  params2, _ = models.load_pretrained(root / "export2", dtype=np.float32)
  expected = checkpoint_params(root / "run", 2)
  chex.assert_trees_all_close(params2, expected, rtol=1e-2, atol=1e-2)
  assert not np.array_equal(params2["lm_head"]["kernel"], params["lm_head"]["kernel"])


@pytest.mark.parametrize("argv, message", [
    (["{root}/nope", "{root}/x"], r"nope: no such run directory"),
    (["{root}", "{root}/x"], r"no config.json there"),
    (["{root}/run", "{root}/x", "--step", "3"], r"has no checkpoint at step 3; it has steps 2, 4"),
    (["{root}/run", "{root}/x", "--step", "-1"], r"--step must be >= 0"),
])
def test_export_errors_are_one_line(run, argv, message):
  root, _ = run
  with pytest.raises(SystemExit, match=message) as e:
    export_hf.main([a.format(root=root) for a in argv])
  assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
  assert not (root / "x").exists()


def test_eval_only_prints_the_runs_last_validation_loss(run, capsys):
  root, args = run
  before = {p: os.path.getmtime(p) for p in (root / "run").rglob("*")}
  result = pretrain.main(args(root / "run", "--eval_only"))
  assert result["step"] == 4
  last = evals(root / "run")[4]
  assert result["eval_loss"] == pytest.approx(last, rel=1e-6)
  assert re.search(rf"at step 4: validation loss {last:.4f}, perplexity", capsys.readouterr().out)
  assert {p: os.path.getmtime(p) for p in (root / "run").rglob("*")} == before  # nothing written


def test_init_from_hf_starts_from_the_export_and_trains(run):
  """The first evaluation of a run started from the export is the original run's last one."""
  root, args = run
  export_hf.main([str(root / "run"), str(root / "warm_export")])
  warm = root / "warm"
  summary = pretrain.main(args(warm, "--init_from_hf", str(root / "warm_export"),
                               "--num_training_steps", "2", model=False))
  assert summary["first_eval"]["eval_loss"] == pytest.approx(evals(root / "run")[4], rel=1e-6)
  assert summary["latest_checkpoint"] == 2 and np.isfinite(summary["last"]["loss"])
  saved = json.loads((warm / "config.json").read_text())
  assert saved["model_config"] == str(root / "warm_export")  # the shape came from the export
  assert evals(warm)[2] < evals(warm)[0]  # and it trains
  # --eval_only --init_from_hf agrees with the run it came from, and writes nothing.
  result = pretrain.main(args(root / "never", "--init_from_hf", str(root / "warm_export"),
                              "--eval_only", model=False))
  assert result["eval_loss"] == pytest.approx(evals(root / "run")[4], rel=1e-6)
  assert not (root / "never").exists()


def test_a_resumed_init_from_hf_run_reads_its_checkpoint_not_the_export(run, monkeypatch,
                                                                          tmp_path):
  """Resuming a run started with --init_from_hf restores the checkpoint and never reads the
  Hugging Face directory again (a 1b export is gigabytes); the run goes on where it was."""
  root, args = run
  export_hf.main([str(root / "run"), str(tmp_path / "export")])
  warm = ["--init_from_hf", str(tmp_path / "export")]
  pretrain.main(args(tmp_path / "warm", *warm, "--num_training_steps", "2", model=False))
  reads = []
  real = models.load_pretrained
  monkeypatch.setattr(models, "load_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
  summary = pretrain.main(args(tmp_path / "warm", *warm, model=False))
  assert reads == [] and summary["latest_checkpoint"] == 4
  assert sorted(evals(tmp_path / "warm")) == [0, 2, 4]
  # A new run with the same flags still starts from the export.
  pretrain.main(args(tmp_path / "fresh", *warm, "--num_training_steps", "2", model=False))
  assert len(reads) == 1


def test_init_from_hf_errors_are_one_line_before_compiling(run, monkeypatch, tmp_path):
  root, args = run
  export_hf.main([str(root / "run"), str(tmp_path / "export")])
  wider = tmp_path / "wider.json"
  wider.write_text(json.dumps({**TINY, "intermediate_size": 96}))
  # A HF model with its own 300-id vocabulary, started with the byte tokenizer (258 ids).
  other = models.get_config(wider, intermediate_size=64, vocab_size=300)
  models.save_pretrained(tmp_path / "vocab300", jax.tree.map(
      lambda x: np.zeros(x.shape, np.float32),
      nn.meta.unbox(models.abstract_variables(other)["params"])), other)
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the check"))
  cases = [
      (args(tmp_path / "v", "--init_from_hf", str(tmp_path / "vocab300"), model=False),
       r"model.embed_tokens.weight has shape \(300, 32\).* \(--tokenizer bytes has 258 ids"),
      (args(tmp_path / "a", "--init_from_hf", str(tmp_path / "export"), "--model_config",
            str(wider), model=False),
       r"model.layers.0.mlp.gate_proj.weight has shape \(64, 32\), the model config "
       r"\(wider\) needs \(96, 32\)"),
      (args(tmp_path / "b", "--init_from_hf", str(tmp_path / "missing")), "no config.json there"),
      (args(tmp_path / "c", "--eval_only"), "--eval_only needs --init_from_hf DIR or a --save_dir"),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit, match=message) as e:
      pretrain.main(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_command_line_error_is_one_line_with_status_2(tmp_path):
  import _processes  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  p = subprocess.run([sys.executable, "-m", "experiments.export_hf", str(tmp_path / "nope"),
                      str(tmp_path / "out")], cwd=_processes.ROOT, env=_processes.env(),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such run directory"]
