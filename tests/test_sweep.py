"""experiments.sweep end to end on a tiny 2 x 2 grid, and every preset's commands parse."""
import csv
import os
import shlex

import pytest

import models
from experiments import config, presets, summary, sweep


def _drop(argv, *flags):
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in flags:
      skip = True
    else:
      out.append(a)
  return tuple(out)


def test_sweep_end_to_end(tiny_args, tmp_path, capsys):
  """Two runs side by side (jobs=2), one finishing and one diverging; the grid's expansion
  over several optimizers, learning rates and precisions is the presets' test below."""
  base = _drop(tiny_args(num_training_steps=4, eval_every=2, save_every=2, lr=1e-2),
               "--save_dir", "--optimizer", "--lr")
  preset = presets.Preset(
      "mini", "a 1 x 2 test grid", (presets.Grid(
          optimizers=(presets.Arm("adam", ("--optimizer", "adam")),),
          lrs=(1e-2,), precisions=(presets.Arm("float32"),), base=base,
          extras=(presets.Arm("none"), presets.Arm("nan", ("--inject_nan_at_step", "3")))),),
      paper={("", "adam", "float32", "none"): 12.34}, paper_source="a paper")
  out = tmp_path / "sweep"
  table = sweep.run_sweep(preset, str(out), jobs=2)
  names = [r.name for r in sweep.expand(preset)]
  assert [r["run"] for r in table] == names and len(names) == 2

  by_name = {r["run"]: r for r in table}
  for name in names:
    s = summary.read(str(out / name))
    assert s["finished"]
    if name.endswith("nan"):  # diverged: recorded with the trainer's error, not fatal
      assert s["diverged"] and by_name[name]["status"] == "diverged"
      assert "loss is" in s["error"] and "at step 3" in s["error"]
    else:
      assert not s["diverged"] and s["error"] is None and s["steps"] == 4
      assert by_name[name]["status"] == "finished"

  with open(out / "results.csv", encoding="utf-8") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(names)
  for name, r in rows.items():
    s = summary.read(str(out / name))
    for key in ("final_eval_perplexity", "max_grad_norm", "tokens_per_s"):
      if s[key] is None:
        assert r[key] == ""
      else:
        assert float(r[key]) == pytest.approx(s[key], rel=1e-12), (name, key)
    assert int(r["grad_norm_spikes"]) == s["grad_norm_spikes"]
  md = (out / "results.md").read_text()
  for name in names:
    line = next(l for l in md.splitlines() if l.startswith(f"| {name} |"))
    s = summary.read(str(out / name))
    if s["final_eval_perplexity"] is not None:
      assert f"{s['final_eval_perplexity']:.2f}" in line
  assert "| 12.34 |" in next(l for l in md.splitlines() if l.startswith("| adam-float32"))
  finished = [summary.read(str(out / n))["final_eval_perplexity"] for n in names
              if not n.endswith("nan")]
  assert f"**{min(finished):.2f}**" in md  # the best final perplexity is marked
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # A second invocation skips every finished run (diverged ones included) and re-collects.
  mtimes = {n: os.path.getmtime(out / n / "summary.json") for n in names}
  capsys.readouterr()
  sweep.run_sweep(preset, str(out), jobs=2)
  logged = capsys.readouterr().out
  assert all(f"skip     {n} (finished)" in logged for n in names)
  assert "start" not in logged.replace("starts", "")
  assert mtimes == {n: os.path.getmtime(out / n / "summary.json") for n in names}


def test_a_failing_run_is_recorded_and_retried(tiny_args, tmp_path, capsys):
  base = _drop(tiny_args(), "--save_dir") + ("--model_config", "llama_nope")
  preset = presets.Preset("bad", "a run that cannot start", (presets.Grid(
      optimizers=(presets.Arm("adamw"),), lrs=(1e-3,), precisions=(presets.Arm("x"),),
      base=base),))
  table = sweep.run_sweep(preset, str(tmp_path), jobs=1)
  assert table[0]["status"] == "failed"
  assert table[0]["error"].startswith("error: --model_config llama_nope")
  assert not summary.read(str(tmp_path / table[0]["run"]))["finished"]
  capsys.readouterr()
  sweep.run_sweep(preset, str(tmp_path), jobs=1)
  assert f"start    {table[0]['run']}" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_dry_run_parses_with_the_trainer_parser(name, capsys):
  sweep.main([name, "--dry_run", "--out", "runs/x"])
  lines = capsys.readouterr().out.strip().splitlines()
  runs = sweep.expand(presets.PRESETS[name])
  assert len(lines) == len(runs) > 0
  for line, run in zip(lines, runs):
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "experiments.pretrain"]
    cfg = config.parse_args(argv[3:])  # C4 needs no download to parse
    models.get_config(cfg.model_config)
    assert cfg.name == run.name and cfg.save_dir == f"runs/x/{run.name}"
    assert cfg.lr == pytest.approx(run.lr)


def test_paper_presets_carry_the_papers_numbers():
  table1 = presets.PRESETS["spam_table1"]
  paper = {(r.group, r.optimizer): r.paper for r in sweep.expand(table1)}
  assert paper[("60m", "spam")] == 30.46 and paper[("1b", "adam")] == 15.56
  assert paper[("60m", "galore")] is None  # no number given for that row
  four = {(r.group, r.optimizer, r.precision): r.paper
          for r in sweep.expand(presets.PRESETS["stable_spam_4bit"])}
  assert four[("350m", "stable_spam", "int4")] == 17.76
  assert four[("130m", "adam", "bf16")] == 24.53


def test_bad_preset_and_jobs_are_one_line_errors():
  with pytest.raises(SystemExit, match="unknown preset 'nope'"):
    sweep.main(["nope"])
  with pytest.raises(SystemExit, match="--jobs must be >= 1"):
    sweep.main(["tiny_lr_sensitivity", "--jobs", "0"])
