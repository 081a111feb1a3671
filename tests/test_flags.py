"""Every bad flag is one ``error:`` line and exit status 2, before anything is compiled or
written; --help shows every choice and default."""
import argparse

import jax
import pytest

from experiments import config, pretrain, rundir
import _processes


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
  """Runs the trainer's command line in-process; returns (status, stderr lines)."""
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the error"))

  def run(*argv):
    before = sorted(p.name for p in tmp_path.iterdir())
    status = pretrain.cli(["--save_dir", str(tmp_path / "run"), "--no-progress", *argv])
    out, err = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "wrote before the error"
    assert out == ""
    return status, err.splitlines()
  return run


def _write(path, text):
  path.write_text(text)
  return str(path)


# (argv, expected substring of the one error line). Paths are filled in by the test.
CASES = [
    (["--model_confg", "llama_9m"], "unknown flag --model_confg (did you mean --model_config?)"),
    (["llama_9m"], "unexpected argument llama_9m"),
    (["--dtype", "fp16"], "--dtype 'fp16' is not a choice"),
    (["--optimizer", "adamx"], "(did you mean adam"),
    (["--scheduler", "cosin"], "(did you mean cosine?)"),
    (["--lr", "abc"], "--lr: invalid float value"),
    (["--threshold", "-5"], "--threshold must be >= 0, got -5.0"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),
    (["--lr", "nan"], "--lr must be >= 0, got nan"),
    (["--density", "0"], "--density must be in (0, 1], got 0.0"),
    (["--max_length", "1"], "--max_length must be >= 2"),
    (["--val_fraction", "1"], "--val_fraction must be in (0, 1)"),
    (["--gradient_accumulation", "0"], "--gradient_accumulation must be >= 1"),
    (["--gradient_accumulation", "2", "--total_batch_size", "32"], "not both"),
    (["--batch_size", "4", "--total_batch_size", "6"], "not a multiple"),
    (["--optimizer", "adamw", "--density", "0.5"], "adamw does not use --density (only spam)"),
    (["--optimizer", "adamw", "--density", "1.0"], "does not use --density"),  # given = set
    (["--optimizer", "stable_spam", "--threshold", "10"], "does not use --threshold"),
    (["--optimizer", "spam", "--gamma1", "0.5"], "does not use --gamma1 (only stable_spam, --spike_guard stable_spam)"),
    (["--optimizer", "adamw", "--update_proj_gap", "10"],
     "--DeltaT (only spam, stable_spam, galore, --spike_guard stable_spam)"),
    (["--optimizer", "lion", "--eps", "1e-8"], "lion does not use --eps"),
    (["--dataset", "{missing}"], "error: --dataset {missing}: no such file or directory"),
    (["--dataset", "{empty}"], "no documents found"),
    (["--save_dir", "{file}"], "--save_dir {file} is an existing file"),
    (["--model_config", "llama_nope"], "unknown model"),
    (["--mesh", "data=64"], "needs 64 devices"),
    (["--mesh", "model=2"], "bad --mesh"),
    (["--remat_policy", "block_residuals"], "--remat_policy says what --activation_checkpointing"),
    (["--activation_checkpointing", "--remat_policy", "dots"],
     "--remat_policy 'dots' is not block_residuals or a jax.checkpoint_policies entry"),
    (["--logits_dtype", "float16"], "--logits_dtype 'float16' is not a choice"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_flag_is_one_error_line_with_status_2(cli, tmp_path, argv, expected):
  paths = {"missing": str(tmp_path / "nope.jsonl"), "file": str(tmp_path / "a_file"),
           "empty": str(tmp_path / "empty.txt")}
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "empty.txt").write_text("\n\n")
  argv = [a.format(**paths) for a in argv]
  status, err = cli(*argv)
  assert status == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert expected.format(**paths) in err[0]


def _out_of_range(r: config.Range):
  return r.lo if r.lo_open else r.lo - 1


@pytest.mark.parametrize("flag", sorted(config.RANGES))
def test_every_numeric_range_is_enforced(cli, flag):
  r = config.RANGES[flag]
  value = _out_of_range(r)
  argv = [f"--{flag}", str(value)]
  if flag in config.OPTIMIZER_FLAGS:
    argv += ["--optimizer", config.OPTIMIZER_FLAGS[flag][0]]
  status, err = cli(*argv)
  assert status == 2 and len(err) == 1
  assert err[0].startswith(f"error: --{flag} must be {r}"), err


def test_every_numeric_flag_has_a_range():
  numeric = {a.dest for a in config.build_parser()._actions if a.type in (int, float)}
  assert numeric - set(config.RANGES) == set()
  assert set(config.RANGES) - numeric == set()


def test_optimizer_flag_table_names_real_flags_and_optimizers():
  dests = {a.dest for a in config.build_parser()._actions}
  assert set(config.OPTIMIZER_FLAGS) <= dests
  guards = {f"--spike_guard {g}" for g in config.SPIKE_GUARDS}
  for users in config.OPTIMIZER_FLAGS.values():
    assert set(users) <= set(config.OPTIMIZERS) | guards


def test_an_optimizer_flag_set_for_its_optimizer_is_accepted():
  cfg = config.parse_args(["--optimizer", "stable_spam", "--gamma1", "0.5", "--DeltaT", "7",
                           "--total_T", "9"])
  assert (cfg.gamma1, cfg.DeltaT, cfg.total_T) == (0.5, 7, 9)
  # Programmatic configs: a field that differs from its default counts as given.
  with pytest.raises(config.UsageError, match="does not use --density"):
    config.resolve(config.TrainConfig(optimizer="adamw", density=0.5))
  assert config.resolve(config.resolve(config.TrainConfig(optimizer="adamw"))).optimizer == "adamw"


def test_help_shows_choices_and_every_default(capsys):
  with pytest.raises(SystemExit) as e:
    config.parse_args(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for choices in (config.OPTIMIZERS, config.DTYPES, config.SCHEDULERS):
    assert "{" + ",".join(choices) + "}" in text
  for action in config.build_parser()._actions:
    if action.help in (None, argparse.SUPPRESS) or action.dest == "help":
      continue
    assert "default" in action.help or action.default is not None, action.dest


@pytest.mark.parametrize("argv, expected", [
    (["--model_confg", "llama_9m"], "error: unknown flag --model_confg (did you mean"),
    (["--threshold", "-5"], "error: --threshold must be >= 0"),
])
def test_the_command_line_exits_2_with_one_line(tmp_path, argv, expected):
  p = _processes.run_trainer([*argv, "--save_dir", str(tmp_path / "run")], tmp_path)
  assert p.returncode == 2
  assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith(expected)
  assert p.stdout == "" and not (tmp_path / "run").exists()


def test_run_directory_with_other_settings_is_refused_untouched(cli, tmp_path):
  run = tmp_path / "held"
  run.mkdir()
  saved = config.for_backend(config.parse_args(["--optimizer", "spam", "--save_dir", str(run)]),
                             "cpu")
  (run / "config.json").write_text(saved.to_json())
  (run / "checkpoints" / "3").mkdir(parents=True)  # a finished checkpoint of that run
  before = (run / "config.json").read_text()
  status, err = cli("--save_dir", str(run), "--optimizer", "adamw", "--lr", "1e-3")
  assert status == 2 and len(err) == 1
  assert "--lr 0.003 -> 0.001, --optimizer 'spam' -> 'adamw'" in err[0]
  assert (run / "config.json").read_text() == before
  assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]


def test_run_directory_that_never_saved_a_checkpoint_takes_new_settings(tmp_path):
  # An earlier attempt crashed before its first checkpoint (only an unfinished one is left):
  # nothing to protect, the rerun is a new run.
  run = tmp_path / "crashed"
  (run / "checkpoints" / "2.orbax-checkpoint-tmp-1").mkdir(parents=True)
  saved = config.for_backend(config.parse_args(["--optimizer", "spam", "--save_dir", str(run)]),
                             "cpu")
  (run / "config.json").write_text(saved.to_json())
  new = config.for_backend(config.parse_args(["--optimizer", "adamw", "--save_dir", str(run)]),
                           "cpu")
  assert rundir.check(new) is None


def test_an_old_jax_is_one_import_error_line():
  from experiments import sharding  # pylint: disable=import-outside-toplevel
  sharding.check_jax_version("0.7.1")
  sharding.check_jax_version("0.10.2.dev20260101")
  with pytest.raises(ImportError, match=r"^the trainer needs jax>=0\.7\.1 \(jax\.set_mesh\); "
                     r"installed jax 0\.4\.35: pip install"):
    sharding.check_jax_version("0.4.35")
