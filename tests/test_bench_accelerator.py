"""experiments/benchmarks/accelerator.py: parts in subprocesses, the budget, targets, reports."""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from unittest import mock

import numpy as np
import pytest

from experiments.benchmarks import accelerator
from experiments.benchmarks import bench_optimizer
from models import loss_kernels

import _fake_nvidia_smi
import _processes


@pytest.fixture(autouse=True)
def _optimized_parts(monkeypatch):
  """The parts' processes compile with LLVM's optimizations, as outside the suite: they
  run and profile the tiny steps a dozen times each."""
  monkeypatch.setenv("XLA_FLAGS", _processes.without_suite_flags())


def _report(out):
  with open(out / "accelerator.json", encoding="utf-8") as f:
    report = json.load(f)
  return report, (out / "accelerator.md").read_text(encoding="utf-8")


# The trainer variants that differ from the trainer part only in XLA flags a CPU ignores
# (CUDA graphs) or in a flag another test covers (`--norm xla`, `--elementwise xla`,
# test_attention_fallback; `--two_executables`, test_bench_train): the default run leaves
# them out; the slow run takes them too.
VARIANTS_LEFT_OUT = ("train_9m_xla_elementwise", "train_9m_graphs_never_updated",
                     "train_9m_two_executables", "train_9m_no_cuda_graphs", "train_9m_xla_norm")


def _tiny_run(tmp_path, skip=()):
  peer = tmp_path / "torch_peer.py"  # a stand-in: the peer is skipped on a CPU before it runs
  peer.write_text("raise SystemExit('must not run')\n")
  out = tmp_path / "out"
  accelerator.main(["--tiny", "--parts", "train,peer", "--torch_peer", str(peer),
                    "--out", str(out), "--work", str(tmp_path / "work")]
                   + (["--skip_parts", ",".join(skip)] if skip else []))
  report, md = _report(out)
  parts = {p["name"]: {k: v for k, v in p.items() if k != "name"} for p in report["parts"]}
  assert list(parts) == ["probe", "optimizer", "optimizer_bf16", "model_9m", "model_9m_xla_norm",
                         "model_9m_xla_elementwise", "model_9m_pallas_attention", "peer",
                         "train_9m", "train_9m_xla_elementwise",
                         "train_9m_graphs_never_updated", "train_9m_two_executables",
                         "train_9m_no_cuda_graphs",
                         "train_9m_f32_logits", "optimizer_scan",
                         "train_9m_xla_norm", "hlo_optimizer", "blocks"]
  for name in skip:
    assert parts[name] == {"status": "skipped", "reason": "in --skip_parts"}
  _check_tiny_run(report, md, parts, out)
  return report, md, parts


def test_tiny_run_measures_the_trainer_and_records_the_rest(tmp_path):
  report, md, parts = _tiny_run(tmp_path, skip=VARIANTS_LEFT_OUT)
  train, f32_logits = report["results"]["train"]
  assert not train.get("variant") and not f32_logits.get("variant")
  assert "| llama_9m (no CUDA graphs) |" not in md


@pytest.mark.slow
def test_tiny_run_with_every_trainer_variant(tmp_path):
  report, md, parts = _tiny_run(tmp_path)
  for name in VARIANTS_LEFT_OUT:
    assert parts[name]["status"] == "ok", parts[name]
  train, xla_elementwise, never_updated, two, no_graphs, f32_logits, xla_norm = (
      report["results"]["train"])
  assert train["elementwise"] == xla_elementwise["elementwise"] == "xla"  # a CPU: XLA's
  assert xla_elementwise["variant"] == "XLA element-wise"
  assert "| llama_9m (XLA element-wise) | 2×16 |" in md
  assert no_graphs["variant"] == "no CUDA graphs" and "profile_in_flight" in no_graphs
  assert never_updated["variant"] == "CUDA graphs never updated"
  assert "profile_in_flight" in never_updated
  # The norm kernels beside XLA's: on a CPU both are XLA's, the second tagged as the variant.
  assert train["norm"] == xla_norm["norm"] == "xla" and xla_norm["variant"] == "XLA norm"
  assert "| llama_9m (XLA norm) | 2×16 |" in md
  assert "| llama_9m (no CUDA graphs) | 2×16 |" in md
  assert "| llama_9m (CUDA graphs never updated) | 2×16 |" in md
  assert two["variant"] == "two executables in turn" and two["two_executables"]
  assert two["loss"] == train["loss"]  # the same steps, run by two executables in turn
  assert "| llama_9m (two executables in turn) | 2×16 |" in md


def _check_tiny_run(report, md, parts, out):
  """What every tiny run shows: the trainer measured, the rest recorded."""
  assert parts["probe"]["status"] == "ok" and report["environment"]["backend"] == "cpu"
  assert report["environment"]["copy_GBps"] > 0 and report["environment"]["matmul_bf16_TFLOPs"] > 0
  no_torch = importlib.util.find_spec("torch") is None
  assert parts["peer"] == {"status": "skipped", "reason": "torch is not installed" if no_torch
                           else "no CUDA GPU (jax backend: cpu)"}
  assert parts["train_9m"]["status"] == "ok", parts["train_9m"]
  assert parts["train_9m_f32_logits"]["status"] == "ok", parts["train_9m_f32_logits"]
  for name in ("optimizer", "optimizer_bf16", "model_9m", "model_9m_xla_norm",
               "model_9m_xla_elementwise", "model_9m_pallas_attention", "optimizer_scan",
               "hlo_optimizer", "blocks"):
    assert parts[name] == {"status": "skipped", "reason": "not in --parts"}
  train, *others = report["results"]["train"]
  (f32_logits,) = [r for r in others if r["logits_dtype"] == "float32"]
  assert not f32_logits.get("variant")
  assert train["norm"] == "xla"  # on a CPU the norm kernels are XLA's
  env = report["environment"]
  assert env["norm_pallas_ms"] > 0 and env["norm_xla_ms"] > 0
  assert env["norm_pallas_max_rel_diff"] < 2e-2
  assert "**Residual add + RMSNorm, forward and backward** (256×96 bf16)" in md
  assert env["loss_one_pass_ms"] > 0 and env["loss_two_pass_ms"] > 0
  assert env["loss_one_pass_grad_ms"] > 0 and "loss_error" not in env
  assert "**Loss over the vocabulary** (256×512 bf16 logits" in md
  assert env["loss_pallas_max_rel_diff"] < 1e-5 and env["loss_pallas_ms"] > 0  # interpreted
  tile = "{}x{}w{}".format(*loss_kernels.TILE)
  assert f"Forward as the Pallas kernel: tile {tile} (tokens × columns, warps)" in md
  # Each element-wise kernel beside its XLA form: interpreted, the same values up to where
  # XLA contracts a product and a sum into one rounding (RoPE's a·cos + b·sin, once a tie of
  # bf16), within one bf16 step of the largest value.
  kernels = env["elementwise_kernels"]
  assert set(kernels) == {"swiglu", "rope_grad@8192w4", "softmax_grad"}  # tiny: three
  for name, row in kernels.items():
    assert "error" not in row, (name, row)
    assert row["pallas_ms"] > 0 and row["xla_ms"] > 0 and row["GB"] > 0, name
    assert row["max_rel_diff"] <= 2**-8, name
  assert "**The models' element-wise kernels, each alone**" in md and "`swiglu` (" in md
  assert "## Python's garbage collector beside the trainer steps" in md
  assert train["gc"]["every"] == 100 and train["gc"]["full_collection_s"] > 0
  # Attention: on a CPU XLA's and the Pallas kernel interpreted (cuDNN needs a GPU), the
  # Pallas result within bf16 rounding of XLA's.
  assert env["attention_xla_ms"] > 0 and env["attention_pallas_ms"] > 0
  for blocks in ("bwd64", "bwd128", "all64"):
    assert env[f"attention_pallas_{blocks}_max_rel_diff"] < 2e-2
  assert "attention_cudnn_ms" not in env and "attention_error" not in env
  assert env["attention_pallas_max_rel_diff"] < 2e-2 and env["attention_shape"] == [2, 16, 2, 16]
  assert "**Causal attention, forward and backward** (2×16 tokens, 2 heads of 16, bf16" in md
  assert train["logits_dtype"] == "bfloat16" and f32_logits["logits_dtype"] == "float32"
  assert train["dtype"] == f32_logits["dtype"] == "bfloat16"
  assert train["model"] == "llama_9m" and train["optimizer"] == "spam"
  assert train["tokens_per_s"] > 0 and train["compile_s"] > 0 and (train["batch"], train["length"]) == (2, 16)
  peer_row = [t for t in report["results"]["targets"] if "PyTorch peer" in t["target"]]
  assert [t["status"] for t in peer_row] == ["not measured"] * len(report["results"]["train"])
  assert "| llama_9m (float32 logits) | 2×16 |" in md
  assert "The host's longest events per step in flight" in md
  assert "| train_9m | ok |" in md and "| peer | skipped |" in md
  # no nvidia-smi on a CPU host (or one that answers): each part says why it has no clocks
  assert "error" in parts["train_9m"]["gpu_clocks"] and "| train_9m | ok |" in md
  # The compiled trainer step, from the same process: the donated state is reused in place.
  (hlo,) = report["results"]["hlo"]
  assert hlo["what"] == "train-llama_9m-spam"
  assert hlo["donation_warnings"] == [] and hlo["aliased_outputs"] > 0
  assert hlo["ops"]["while"] >= 1 and not hlo["cudnn_attention"]  # accumulation scan; CPU
  assert hlo["traffic"]["kernels"] > 0 and hlo["traffic"]["bytes"] > 0
  assert "| train-llama_9m-spam |" in md
  # Where the time went: a trace of the step, summarised.
  prof = train["profile"]
  assert prof["source"] == "cpu" and 0 < prof["busy_ms_per_call"] <= prof["span_ms_per_call"]
  assert "| train step llama_9m spam |" in md and "Where the device time goes" in md
  assert train["profile_in_flight"]["source"] == "cpu"
  assert "## Trainer steps in flight" in md and "| llama_9m spam |" in md
  assert "## Targets" in md and "| llama_9m | 2×16 |" in md and "--tiny" in report["command"]
  assert "**Ceilings measured in this run:**" in md
  # Three files come back; the rest is in the archive.
  assert sorted(os.listdir(out)) == ["accelerator-parts.tar.gz", "accelerator.json",
                                     "accelerator.md"]
  with tarfile.open(out / "accelerator-parts.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"accelerator-parts/parts/train_9m.json", "accelerator-parts/logs/train_9m.log",
          "accelerator-parts/logs/probe.log",
          "accelerator-parts/hlo/train-llama_9m-spam.hlo.txt"} <= names


def test_the_report_is_rewritten_after_every_part(tmp_path, monkeypatch):
  """A run stopped from outside (the device's time limit) keeps the parts it finished."""
  seen = []

  def fake_run_part(part, timeout_s, logs_dir, env):
    del timeout_s, logs_dir, env
    if part.name != "probe":
      report = json.loads((tmp_path / "accelerator.json").read_text(encoding="utf-8"))
      seen.append((part.name, [p["name"] for p in report["parts"]]))
    stdout = 'PROBE {"backend": "cpu", "device_kind": "cpu"}' if part.name == "probe" else ""
    return dict(status="ok", rc=0, wall_s=0.0, limit_s=1.0, cmd="x", log="x", stdout=stdout)

  monkeypatch.setattr(accelerator, "run_part", fake_run_part)
  accelerator.main(["--tiny", "--parts", "optimizer,model,train", "--out", str(tmp_path)])
  # Before each part, the report already holds every part before it.
  before = ["probe"]
  for name in ("optimizer", "optimizer_bf16", "model_9m", "model_9m_xla_norm",
               "model_9m_xla_elementwise", "model_9m_pallas_attention", "peer", "train_9m",
               "train_9m_xla_elementwise",
               "train_9m_graphs_never_updated", "train_9m_two_executables",
               "train_9m_no_cuda_graphs", "train_9m_f32_logits", "optimizer_scan",
               "train_9m_xla_norm"):
    if name != "peer":  # skipped without a --torch_peer: not run
      assert seen.pop(0) == (name, before)
    before = before + [name]


def test_a_part_whose_flag_xla_rejects_runs_again_with_its_other_flags(tmp_path, monkeypatch):
  """The never-updated graph's part, failed on its flag's older name (XLA prints "Flag
  parsing failed"), runs again with each later name in turn until XLA takes one; the reason
  names the flags it rejected."""
  runs, accepted = [], {"SKIP_TEMP"}

  def fake_popen(cmd, cwd, env, stdout, stderr, start_new_session):
    del cmd, cwd, stderr, start_new_session
    flag = env.get("XLA_FLAGS", "").split()[-1]
    rejected = flag.split("=")[-1] not in accepted
    runs.append(flag.split("=")[-1])
    stdout.write("F1127 parse_flags_from_env.cc:220] Check failed: Flag parsing failed.\n"
                 "\t--xla_dump_hlo_as_dot=false\tbool\tDumps HLO modules\n" if rejected
                 else "ok\n")
    return mock.Mock(wait=lambda timeout: 1 if rejected else 0, pid=0)

  monkeypatch.setattr(accelerator.subprocess, "Popen", fake_popen)
  part = accelerator.Part("train_x_graphs_never_updated", ["-c", "pass"], 10, 1,
                          env={"XLA_FLAGS": accelerator.GRAPHS_NEVER_UPDATED})
  failed = accelerator.run_part(part, 10, str(tmp_path), {})
  reason = lambda flag: f"Flag parsing failed in XLA_FLAGS='{flag}'"
  assert failed["status"] == "failed"
  assert failed["reason"] == reason(accelerator.GRAPHS_NEVER_UPDATED)
  assert runs == ["NEVER_UPDATE"]
  once = accelerator.run_with_retry(part, lambda: 100.0, str(tmp_path), {})  # no retry_envs
  assert once["status"] == "failed" and "retried_after" not in once and len(runs) == 2
  part.retry_envs = [{"XLA_FLAGS": flag} for flag in accelerator.GRAPHS_REMAPPED]
  result = accelerator.run_with_retry(part, lambda: 100.0, str(tmp_path), {})
  assert result["status"] == "ok" and result["xla_flags"] == accelerator.GRAPHS_REMAPPED[1]
  assert runs[2:] == ["NEVER_UPDATE", "SKIP_PROFILED", "SKIP_TEMP"]  # the last one not run
  assert result["retried_after"] == "; ".join(reason(flag) for flag in (
      accelerator.GRAPHS_NEVER_UPDATED, accelerator.GRAPHS_REMAPPED[0]))
  report = dict(date="d", command="c", wall_s=1.0, budget_s=2.0, tiny=True, environment={},
                parts=[dict(name=part.name, **result)], results=accelerator.collect({}))
  row = [l for l in accelerator.markdown(report).splitlines() if l.startswith(f"| {part.name} ")]
  assert row and row[0].endswith(  # the report says which name ran, after which
      f"run again after: {result['retried_after']}; "
      f"XLA_FLAGS='{accelerator.GRAPHS_REMAPPED[1]}' |"), row
  accepted.clear()  # none taken: the last one's failure, after every one was tried
  part.env = {"XLA_FLAGS": accelerator.GRAPHS_NEVER_UPDATED}
  result = accelerator.run_with_retry(part, lambda: 100.0, str(tmp_path), {})
  assert result["status"] == "failed" and runs[5:] == [
      "NEVER_UPDATE", "SKIP_PROFILED", "SKIP_TEMP", "VMM_PERSISTENT_TEMP"]
  assert result["reason"] == reason(accelerator.GRAPHS_REMAPPED[-1])
  part.env = {"XLA_FLAGS": accelerator.GRAPHS_NEVER_UPDATED}  # not run again: no time left
  assert accelerator.run_with_retry(part, lambda: 0.5, str(tmp_path), {})["status"] == "failed"
  assert len(runs) == 10


def test_a_part_keeps_the_gpu_clocks_sampled_while_it_ran(tmp_path, monkeypatch):
  _fake_nvidia_smi.install(tmp_path, monkeypatch, "1755, 3201, 690, 61, 0x4")
  monkeypatch.setattr(accelerator, "PART_CLOCKS_MS", 20)
  part = accelerator.Part("peer", ["-c", "import time; time.sleep(1.0)"], 30, 1)
  result = accelerator.run_part(part, 30, str(tmp_path), {**os.environ})
  assert result["status"] == "ok"
  clocks = result["gpu_clocks"]
  assert clocks["samples"] >= 3 and clocks["sm_mhz_median"] == 1755.0, clocks
  assert clocks["reasons"] == {"software power cap": 1.0}
  report = dict(date="d", command="c", wall_s=1.0, budget_s=2.0, tiny=True, environment={},
                parts=[dict(name="peer", **dict(result, wall_s=1.0))],
                results=accelerator.collect({}))
  assert ("| peer | ok | 1.0 | 30.0 | SM 1755 MHz (1755–1755), 690 W, 61 °C, software power "
          "cap 100% |  |") in accelerator.markdown(report)


def test_parts_that_do_not_fit_the_budget_are_skipped(tmp_path):
  accelerator.main(["--tiny", "--budget_s", "1", "--out", str(tmp_path)])
  report, md = _report(tmp_path)
  parts = {p["name"]: {k: v for k, v in p.items() if k != "name"} for p in report["parts"]}
  assert parts["peer"]["reason"].startswith("no --torch_peer given")
  for name in ("train_9m", "train_9m_no_cuda_graphs", "train_9m_graphs_never_updated",
               "train_9m_xla_norm", "train_9m_f32_logits", "train_9m_xla_elementwise",
               "optimizer", "optimizer_bf16", "model_9m", "model_9m_xla_norm",
               "model_9m_xla_elementwise", "model_9m_pallas_attention",
               "optimizer_scan", "hlo_optimizer", "blocks"):
    assert parts[name]["status"] == "skipped" and parts[name]["reason"].startswith("budget:")
  assert all(t["status"] == "not measured" for t in report["results"]["targets"])
  assert "| blocks | skipped |" in md


def test_the_device_plan(tmp_path):
  """What a GPU run would start, without starting it: the parts in order, their sizes, which
  are profiled, and the limits that keep each under the budget."""
  args = accelerator.parse_args(["--out", str(tmp_path)])
  parts = accelerator.plan(args, str(tmp_path / "work"))
  names = [p.name for p in parts]
  assert names == ["optimizer", "optimizer_bf16", "model_350m", "model_60m", "model_60m_xla_norm",
                   "model_350m_xla_elementwise", "model_350m_pallas_attention", "peer",
                   "train_60m", "train_130m", "train_350m", "train_1b",
                   "train_350m_xla_elementwise", "train_350m_graphs_never_updated",
                   "train_350m_two_executables",
                   "train_350m_no_cuda_graphs",
                   "train_60m_f32_logits", "optimizer_scan", "train_130m_f32_logits",
                   "train_350m_xla_norm", "hlo_optimizer", "blocks", "model_1b"]
  by_name = dict(zip(names, parts))
  profiled = {n for n, p in by_name.items() if "--profile" in p.argv}
  assert profiled == {"optimizer", "optimizer_bf16", "model_350m", "model_60m", "train_60m",
                      "train_130m",
                      "train_350m", "train_1b", "train_350m_no_cuda_graphs",
                      "train_350m_graphs_never_updated", "train_350m_two_executables",
                      "optimizer_scan"}
  assert [n for n, p in by_name.items() if "--hlo" in p.argv] == ["train_350m"]
  for name in ("model_60m_xla_norm", "train_350m_xla_norm"):  # the same step, XLA's norm
    argv = by_name[name].argv
    assert argv[argv.index("--norm") + 1] == "xla"
    assert argv[argv.index("--models") + 1] == "llama_" + name.split("_")[1]
  for name in ("model_350m_xla_elementwise", "train_350m_xla_elementwise"):  # XLA's RoPE, SwiGLU
    argv = by_name[name].argv
    assert argv[argv.index("--elementwise") + 1] == "xla" and "llama_350m" in argv
    assert "--profile" not in argv
  argv = by_name["model_350m_pallas_attention"].argv  # the same step, Pallas attention
  assert argv[argv.index("--attention") + 1] == "pallas" and "llama_350m" in argv
  no_graphs = by_name["train_350m_no_cuda_graphs"]  # the same step, no CUDA graphs
  assert no_graphs.env["XLA_FLAGS"].split()[-1] == "--xla_gpu_enable_command_buffer="
  assert "llama_350m" in no_graphs.argv and "--hlo" not in no_graphs.argv
  for name in ("train_60m", "train_350m", "train_1b", "train_350m_graphs_never_updated"):
    # profiled with the CUDA graphs they are timed with
    assert "--xla_enable_command_buffers_during_profiling=true" in by_name[name].env["XLA_FLAGS"]
  never_updated = by_name["train_350m_graphs_never_updated"]  # graphs kept, never re-recorded
  assert never_updated.env["XLA_FLAGS"].split()[-1] == (
      "--xla_gpu_command_buffer_update_mode=NEVER_UPDATE")
  assert [env["XLA_FLAGS"].split()[-1] for env in never_updated.retry_envs] == [
      f"--xla_gpu_command_buffer_update_mode={mode}"  # the later XLAs' names
      for mode in ("SKIP_PROFILED", "SKIP_TEMP", "VMM_PERSISTENT_TEMP")]
  for name in ("model_350m", "model_60m", "model_60m_xla_norm", "model_350m_pallas_attention",
               "model_350m_xla_elementwise", "train_60m", "train_350m", "train_1b",
               "train_350m_no_cuda_graphs", "train_350m_graphs_never_updated",
               "train_350m_xla_norm", "train_350m_xla_elementwise"):
    argv = by_name[name].argv
    value = lambda flag, argv=argv: argv[argv.index(flag) + 1]
    assert (value("--batch"), value("--seq_len" if name.startswith("model") else "--length")) == (
        "64", "256")
  assert "--size" in by_name["optimizer"].argv and "1b" in by_name["optimizer"].argv
  argv = by_name["optimizer_bf16"].argv  # the bf16 trainer's update at its deciding size
  assert argv[argv.index("--size") + 1] == "350m" and "350m" in bench_optimizer.SIZES
  assert argv[argv.index("--dtype") + 1] == "bfloat16"
  named = argv[argv.index("--optimizers") + 1].split(",")
  assert named == ["spam", bench_optimizer.COUNT_ROWS_BEFORE, "scale_by_spam (no clip)"]
  assert all(n in bench_optimizer.known_optimizers(0.25) for n in named)
  # every optimizer the part names, bench_optimizer knows (its list is split at commas)
  argv = by_name["optimizer"].argv
  named = argv[argv.index("--optimizers") + 1].split(",")
  known = bench_optimizer.known_optimizers(0.25)
  assert named and all(n in known for n in named), named
  assert {bench_optimizer.STATS_ROWS, bench_optimizer.TWO_PASSES,
          bench_optimizer.UNSETTLED} <= set(named)
  assert by_name["train_1b"].retry_argv[-1] == "--activation_checkpointing"
  assert by_name["model_1b"].retry_argv[-1] == "--remat"
  for part in parts:
    assert 0 < part.min_s < part.cap_s <= 150
  # --attention: every model and trainer part with that kernel, a variant's own flags last.
  assert not any("--attention" in p.argv for n, p in by_name.items()
                 if n != "model_350m_pallas_attention")
  args = accelerator.parse_args(["--out", str(tmp_path), "--attention", "xla"])
  by_name = {p.name: p for p in accelerator.plan(args, str(tmp_path / "work"))}
  for name in ("model_350m", "train_350m", "train_350m_no_cuda_graphs", "model_60m_xla_norm"):
    argv = by_name[name].argv
    assert argv[argv.index("--attention") + 1] == "xla", name
  argv = by_name["model_350m_pallas_attention"].argv
  assert argv[len(argv) - argv[::-1].index("--attention")] == "pallas"
  assert "--attention" not in by_name["optimizer"].argv


def test_targets_from_part_results():
  opt = {"size": "1b", "optimizers": [
      {"name": "adamw", "x_adamw": 1.0}, {"name": "spam", "x_adamw": 1.04},
      {"name": "stable_spam", "x_adamw": 1.5}]}
  model = [dict(model="llama_350m", quant="bf16", step_s=0.10, mfu=0.42),
           dict(model="llama_350m", quant="int4", step_s=0.14, mfu=0.30),
           dict(model="llama_60m", quant="bf16", step_s=0.02, mfu=0.2),
           dict(model="llama_60m", quant="int4", step_s=0.025, mfu=0.16)]
  train = [dict(model="llama_60m", tokens_per_s=900e3), dict(model="llama_1b", tokens_per_s=30e3)]
  peer = [dict(size="60m", tokens_per_s=400e3), dict(size="1b", error="out of memory")]
  rows = {t["target"]: t for t in accelerator.targets(
      dict(optimizer=opt, model=model, train=train, peer=peer))}
  assert rows["spam update ÷ optax.adamw (1b)"]["status"] == "met"
  assert rows["stable_spam update ÷ optax.adamw (1b)"]["status"] == "missed"
  assert rows["MFU, llama_350m bf16"]["status"] == "met"
  assert rows["int4 step ÷ bf16 step, llama_350m"]["value"] == pytest.approx(1.4)
  assert rows["int4 step ÷ bf16 step, llama_350m"]["status"] == "missed"
  assert rows["int4 step ÷ bf16 step, llama_60m"]["status"] == "met"
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_60m"]["value"] == pytest.approx(2.25)
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_60m"]["status"] == "met"
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_1b"]["status"] == "not measured"
  assert not any("scanned" in name for name in rows)  # that part did not run
  # A step measured again with XLA's norm is its own row, never the default step's.
  variants = dict(model=model + [dict(model="llama_350m", quant="bf16", step_s=0.2, mfu=0.21,
                                      norm="xla", variant="XLA norm"),
                                 dict(model="llama_350m", quant="bf16", step_s=0.3, mfu=0.14,
                                      attention="pallas", variant="Pallas attention")],
                  train=train + [dict(model="llama_60m", tokens_per_s=700e3, norm="xla",
                                      variant="XLA norm"),
                                 dict(model="llama_60m", tokens_per_s=800e3,
                                      variant="no CUDA graphs")])
  rows = {t["target"]: t for t in accelerator.targets(
      dict(optimizer=opt, peer=peer, **variants))}
  assert rows["MFU, llama_350m bf16"]["value"] == 0.42
  assert rows["int4 step ÷ bf16 step, llama_350m"]["value"] == pytest.approx(1.4)
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_60m"]["value"] == pytest.approx(2.25)
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_60m (XLA norm)"]["value"] == \
      pytest.approx(1.75)
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_60m (no CUDA graphs)"]["value"] == \
      pytest.approx(2.0)
  # With its steps' median (a record that has one), ours is compared on it, as the peer
  # times its own: a slow step moves the mean, not the target; the table shows both.
  slow = dict(model="llama_60m", tokens_per_s=600e3, step_s=0.020, step_s_in_flight_median=0.010,
              batch=64, length=256)
  timed = [dict(size="60m", tokens_per_s=400e3, step_ms=25.0)]
  rows = {t["target"]: t for t in accelerator.targets(dict(optimizer=opt, model=model,
                                                           train=[slow], peer=timed))}
  assert rows["trainer tokens/s ÷ PyTorch peer, llama_60m"]["value"] == pytest.approx(2.5)
  assert "| llama_60m | 64×256 | 20.0 | 10.0 | – | 600,000 |" in "\n".join(
      accelerator.trainer_lines(dict(train=[slow], peer=timed)))
  assert accelerator.train_label(dict(model="m", attention="pallas",
                                     variant="Pallas attention")) == "m (Pallas attention)"
  assert accelerator.train_label(dict(model="m", attention="xla")) == "m (XLA attention)"
  assert accelerator.train_label(dict(model="m", attention="pallas")) == "m (Pallas attention)"
  scan = {"size": "1b", "scan_layers": True, "optimizers": [
      {"name": "adamw", "x_adamw": 1.0}, {"name": "spam", "x_adamw": 1.01},
      {"name": "stable_spam", "x_adamw": 1.3}]}
  rows = {t["target"]: t for t in accelerator.targets(
      dict(optimizer=opt, optimizer_scan=scan, model=model, train=train, peer=peer))}
  assert rows["stable_spam update ÷ optax.adamw (1b)"]["status"] == "missed"
  assert rows["stable_spam update ÷ optax.adamw (1b, scanned layers)"]["status"] == "met"
  assert rows["spam update ÷ optax.adamw (1b, scanned layers)"]["value"] == 1.01
  assert rows["spam update ÷ optax.adamw (1b)"]["note"] == "waited-for updates"
  # Measured in flight, the in-flight ratio decides (the waited-for one flatters).
  opt["optimizers"][1].update(x_adamw_in_flight=1.08)
  rows = {t["target"]: t for t in accelerator.targets(
      dict(optimizer=opt, model=model, train=train, peer=peer))}
  spam = rows["spam update ÷ optax.adamw (1b)"]
  assert (spam["value"], spam["status"], spam["note"]) == (1.08, "missed", "")
  # Profiled on a GPU, both: the kernels' busy time decides (a host-bound adamw in flight
  # would flatter SPAM); a profile of one update alone, or a host trace, does not.
  gpu = lambda ms: dict(source="gpu", busy_ms_per_call=ms)
  opt["optimizers"][0].update(profile=gpu(9.0), x_adamw_in_flight=1.0)
  opt["optimizers"][1].update(profile=gpu(9.45), x_adamw_in_flight=0.87)
  opt["optimizers"][2].update(profile=dict(source="cpu", busy_ms_per_call=1.0))
  rows = {t["target"]: t for t in accelerator.targets(
      dict(optimizer=opt, model=model, train=train, peer=peer))}
  spam = rows["spam update ÷ optax.adamw (1b)"]
  assert (spam["value"], spam["status"], spam["note"]) == (pytest.approx(1.05), "met",
                                                            "device time")
  assert rows["stable_spam update ÷ optax.adamw (1b)"]["note"] == "waited-for updates"
  opt["optimizers"][1].update(profile=gpu(9.9))
  rows = {t["target"]: t for t in accelerator.targets(
      dict(optimizer=opt, model=model, train=train, peer=peer))}
  assert rows["spam update ÷ optax.adamw (1b)"]["status"] == "missed"


def test_memory_floor_and_profile_table():
  # 1.339e9 float32 params at 3.0 TB/s: Adam moves 28 B per param, 12.5 ms.
  assert accelerator.floor_ms("adamw", 1_339_082_752, "float32", 3000.0) == pytest.approx(
      12.498, abs=1e-3)
  assert accelerator.floor_ms("stable_spam", 10**9, "float32", 1000.0) == pytest.approx(36.0)
  assert accelerator.floor_ms("spam d=0.25", 10**9, "float32", 1000.0) is None
  assert accelerator.floor_ms("adamw", 10**9, "bfloat16", 1000.0) is None
  prof = dict(source="gpu", calls=3, busy_ms_per_call=8.0, span_ms_per_call=10.0,
              kernels_per_call=12, categories={"matmul": 6.0, "reduction": 2.0},
              top=[dict(op="fusion.1", ms_per_call=6.0, share=0.75, count_per_call=1, name="k")])
  lines = accelerator.profile_lines(dict(
      optimizer=None, model=[], train=[dict(model="llama_60m", optimizer="spam", profile=prof),
                                       dict(model="llama_1b", optimizer="spam",
                                            profile={"error": "CUPTI | not found"})]))
  assert "| train step llama_60m spam | 12 | 8.00 | 0.80 | matmul 6.00, reduction 2.00 | " \
         "fusion.1 6.00 (75%) |" in lines
  assert any(l.startswith("| train step llama_1b spam |") and "CUPTI \\| not found" in l
             for l in lines)
  # with each category's rate: 5.4 GB of reductions in 2 ms
  rated = dict(prof, category_GBps={"reduction": 2700.0})
  lines = accelerator.profile_lines(dict(optimizer=None, model=[], train=[
      dict(model="llama_350m", optimizer="spam", profile=rated)]))
  assert "| train step llama_350m spam | 12 | 8.00 | 0.80 | matmul 6.00, reduction 2.00 " \
         "(2,700 GB/s) | fusion.1 6.00 (75%) |" in lines
  # the trainer steps traced in flight
  in_flight = dict(prof, period_ms_per_call=11.0, between_ms_per_call=1.0, host_top=[
      dict(name="command_buffer::update", ms_per_call=3.5, count_per_call=1),
      dict(name="cuGraphLaunch", ms_per_call=0.25, count_per_call=1.0)])
  lines = accelerator.in_flight_lines(dict(train=[
      dict(model="llama_350m", optimizer="spam", step_s=0.0112, profile_in_flight=in_flight,
           step_s_in_flight_median=0.011, step_s_in_flight_max=0.0141),
      dict(model="llama_1b", optimizer="spam", step_s=0.3, profile_in_flight={"error": "x"})]))
  assert ("| llama_350m spam | 11.20 | 11.00 / 14.10 | 11.00 | 8.00 | 10.00 | 1.00 | – / – |"
          in lines)
  assert ("- llama_350m spam: `command_buffer::update` 3.50 (×1); `cuGraphLaunch` 0.25 (×1)"
          in lines)
  assert not any("llama_1b" in l for l in lines)
  no_host = dict(in_flight, host_top=[])  # a trace without host events: no list
  lines = accelerator.in_flight_lines(dict(train=[
      dict(model="llama_350m", optimizer="spam", step_s=0.0112, profile_in_flight=no_host)]))
  assert not any("longest events" in l for l in lines)
  assert "| llama_350m spam | 11.20 | – | 11.00 | 8.00 | 10.00 | 1.00 | – / – |" in lines
  # the GPU's clocks while timed and while traced: the timed steps ran 5% slower clocks
  clocked = dict(no_host, gpu_clocks=dict(samples=4, sm_mhz_median=1980.0))
  lines = accelerator.in_flight_lines(dict(train=[
      dict(model="llama_350m", optimizer="spam", step_s=0.0112, profile_in_flight=clocked,
           gpu_clocks_in_flight=dict(samples=30, sm_mhz_median=1881.0))]))
  assert "| llama_350m spam | 11.20 | – | 11.00 | 8.00 | 10.00 | 1.00 | 1881 / 1980 |" in lines
  assert accelerator.in_flight_lines(dict(train=[])) == []
  # Python's collector: a 210 ms full pass; scheduled, 3 ms; while timed with automatic
  # collection, one oldest-generation pass of 205 ms in call 7.
  timed = dict(passes={"0": 12, "1": 1, "2": 1}, total_s=0.21,
               longest=dict(generation=2, step=7, s=0.205))
  lines = accelerator.gc_lines(dict(train=[
      dict(model="llama_130m", optimizer="spam", gc=dict(
          every=100, full_collection_s=0.21, scheduled_collection_s=0.003,
          in_flight=dict(passes={"0": 0, "1": 0, "2": 0}, total_s=0.0, longest=None))),
      dict(model="llama_130m", optimizer="spam", gc=dict(
          every=0, full_collection_s=0.21, scheduled_collection_s=None, in_flight=timed)),
      dict(model="llama_1b", optimizer="spam")]))
  assert "| llama_130m spam | 100 | 210.0 | 3.0 | 0 / 0 / 0 | – |" in lines
  assert "| llama_130m spam | 0 | 210.0 | – | 12 / 1 / 1 | 205.0 (7) |" in lines
  assert not any("llama_1b" in l for l in lines)
  assert accelerator.gc_lines(dict(train=[dict(model="llama_1b", optimizer="spam")])) == []


def test_probe_lines():
  # 1.05 GB of logits read in 0.35 ms: 3,000 GB/s.
  env = dict(loss_logits_GB=1.05, loss_one_pass_ms=0.35, loss_two_pass_ms=0.42,
             loss_one_pass_grad_ms=1.2)
  assert accelerator.loss_line(env, tiny=False) == (
      "**Loss over the vocabulary** (16384×32000 bf16 logits, 1.05 GB): forward, one pass "
      "0.350 ms (3,000 GB/s of logits read), `jax.nn.logsumexp` (two reads) 0.420 ms "
      "(2,500 GB/s of logits read); forward and backward 1.200 ms.")
  # the Pallas kernel's tiles: the default first, a failed one with its reason
  env.update(loss_pallas_tile=[2, 2048, 8], loss_pallas_ms=0.35, loss_pallas_max_rel_diff=2e-7,
             loss_pallas_1x4096w8_ms=0.7, loss_pallas_1x4096w8_max_rel_diff=1e-7,
             loss_pallas_4x2048w8_error="INTERNAL: Triton | x")
  assert accelerator.loss_line(env, tiny=False).endswith(
      "forward and backward 1.200 ms. Forward as the Pallas kernel: tile 2x2048w8 (tokens × "
      "columns, warps) 0.350 ms (3,000 GB/s of logits read), max rel. diff from XLA's 2.0e-07; "
      "tile 1x4096w8 (tokens × columns, warps) 0.700 ms (1,500 GB/s of logits read), max rel. "
      "diff from XLA's 1.0e-07; tile 4x2048w8 (tokens × columns, warps) failed: INTERNAL: "
      "Triton \\| x.")
  assert accelerator.loss_line({"loss_error": "OOM | x"}, tiny=False) == (
      "**The loss failed in the probe:** OOM \\| x")
  assert accelerator.loss_line({}, tiny=True) is None
  # One layer at 64×256×16×64: 12 passes over 16.8M bf16 values, 0.403 GB.
  env = dict(attention_shape=[64, 256, 16, 64], attention_min_GB=0.403,
             attention_cudnn_ms=0.2, attention_cudnn_max_rel_diff=4e-3,
             attention_pallas_bwd64_ms=0.25, attention_xla_ms=1.0,
             attention_pallas_error="ValueError: block | size")
  assert accelerator.attention_line(env) == (
      "**Causal attention, forward and backward** (64×256 tokens, 16 heads of 64, bf16; one "
      "layer, the least fused kernels move is 0.403 GB): cuDNN 0.200 ms (2,015 GB/s, "
      "largest difference 4.0e-03), Pallas (backward blocks of 64) 0.250 ms (1,612 GB/s), "
      "XLA 1.000 ms (403 GB/s); Pallas (Triton; the model's blocks) failed: "
      "ValueError: block \\| size.")
  assert accelerator.attention_line({"attention_error": "ImportError: x"}) == (
      "**Attention failed in the probe:** ImportError: x")
  assert accelerator.attention_line({}) is None
  # SwiGLU's forward: 0.269 GB in 0.1 ms (2,690 GB/s) against 0.125 ms.
  env = {"elementwise_kernels": {
      "swiglu": dict(GB=0.269, pallas_ms=0.1, xla_ms=0.125, max_rel_diff=0.0),
      "stack_qkv": dict(GB=0.019, error="INTERNAL: Triton | x")}}
  assert accelerator.elementwise_line(env) == (
      "**The models' element-wise kernels, each alone** (one layer of the 350m step; bytes "
      "read + written): `swiglu` (0.269 GB) Pallas 0.100 ms (2,690 GB/s), XLA 0.125 ms "
      "(2,152 GB/s), Pallas ÷ XLA 0.80, largest difference 0.0e+00; `stack_qkv` failed: "
      "INTERNAL: Triton \\| x.")
  assert accelerator.elementwise_line({"elementwise_kernels_error": "ImportError: x"}) == (
      "**The element-wise kernels failed in the probe:** ImportError: x")
  assert accelerator.elementwise_line({}) is None


def test_the_archive_drops_traces_then_hlo_to_stay_under_its_limit(tmp_path):
  work = tmp_path / "work"
  (work / "profiles").mkdir(parents=True)
  (work / "hlo").mkdir()
  (work / "parts").mkdir()
  rng = np.random.default_rng(0)
  (work / "profiles" / "a.xplane.pb").write_bytes(rng.bytes(300_000))  # incompressible
  (work / "hlo" / "step.hlo.txt").write_bytes(rng.bytes(300_000))
  (work / "parts" / "x.json").write_text("{}")

  def names(limit):
    path = tmp_path / f"a{limit}.tar.gz"
    accelerator._bundle(str(work), str(path), max_bytes=limit)
    with tarfile.open(path) as tar:
      return {n.rsplit("/", 1)[-1] for n in tar.getnames()}

  assert {"a.xplane.pb", "step.hlo.txt", "x.json"} <= names(10**6)
  assert "a.xplane.pb" not in names(500_000) and "step.hlo.txt" in names(500_000)
  small = names(100_000)
  assert "step.hlo.txt" not in small and "x.json" in small


def test_the_probe_leaves_out_the_sections_asked(tmp_path):
  """--skip_probe: a second call need not measure the kernels the first measured."""
  with pytest.raises(SystemExit):
    accelerator.parse_args(["--out", str(tmp_path), "--skip_probe", "loss,kernels"])
  assert accelerator.parse_args(["--out", str(tmp_path), "--skip_probe",
                                 "loss,attention"]).skip_probe == "loss,attention"
  probe = accelerator._PROBE  # pylint: disable=protected-access
  done = subprocess.run([sys.executable, "-c", probe, "tiny", ",".join(accelerator.PROBE_SECTIONS)],
                        capture_output=True, text=True, check=True, cwd=accelerator.ROOT,
                        env=dict(os.environ, PYTHONPATH=accelerator.ROOT, JAX_PLATFORMS="cpu"))
  info = json.loads([l for l in done.stdout.splitlines() if l.startswith("PROBE ")][-1][6:])
  assert info["copy_GBps"] > 0 and info["matmul_bf16_TFLOPs"] > 0
  assert not any(k.startswith(("norm_", "loss_", "elementwise_", "attention_")) for k in info)


def test_the_installed_xla_takes_one_of_the_never_updated_graphs_names():
  """The never-updated graph's part runs only if this jax's XLA takes one of the names it
  tries; XLA parses its flags on any backend, so the CPU tells."""
  def accepted(flag):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flag)
    run = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 or accelerator.REJECTED_FLAG in run.stderr, run.stderr[-500:]
    return run.returncode == 0

  names = (accelerator.GRAPHS_NEVER_UPDATED,) + accelerator.GRAPHS_REMAPPED
  assert any(accepted(flag) for flag in names)  # stops at the first one taken
  assert not accepted("--xla_gpu_command_buffer_update_mode=NO_SUCH_MODE")
