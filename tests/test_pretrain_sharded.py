"""Scale-out: sharded runs equal the single-device run; a two-process jax.distributed run."""
import json
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import _processes

ROOT = _processes.ROOT


@pytest.fixture
def flags(tmp_path, tiny_model_config):
  model = tiny_model_config
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(2)
  corpus.write_text("\n".join(" ".join(rng.choice(list("abcdefgh"), size=10 + i % 11))
                              for i in range(300)))
  # Sparse moments, a reset every 3 steps, and spike clipping from the first step.
  return ["--model_config", str(model), "--dataset", str(corpus), "--optimizer", "spam",
          "--density", "0.5", "--DeltaT", "3", "--warmup_epoch", "1", "--threshold", "2",
          "--grad_accu_steps", "1",
          "--batch_size", "8", "--max_length", "32", "--num_training_steps", "4",
          "--warmup_steps", "1", "--lr", "1e-2", "--eval_every", "2", "--eval_batches", "2",
          "--dtype", "float32", "--no-progress", "--packing", "--val_fraction", "0.1"]


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    import models
    from experiments import pretrain, sharding
    assert jax.device_count() == 8
    flags, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    runs = {}
    for mesh in ["data=1", "data=2,fsdp=4"]:
      pretrain.main(flags + ["--mesh", mesh, "--save_dir", f"{out_dir}/{mesh}"])
      with open(f"{out_dir}/{mesh}/metrics.jsonl") as f:
        runs[mesh] = [json.loads(line) for line in f]
    # The parameters really are split over fsdp.
    mesh = sharding.make_mesh(sharding.parse_mesh("fsdp=8", 8))
    cfg = models.get_config(flags[1])
    shardings = sharding.param_shardings(models.abstract_variables(cfg)["params"], mesh)
    spec = shardings["layers_0"]["mlp"]["up_proj"]["kernel"].spec
    print(json.dumps({"runs": runs, "spec": [str(s) for s in spec]}))
""")


def test_sharded_runs_match_single_device(flags, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-c", SHARDED, json.dumps(flags), str(tmp_path / "runs")],
      env=_processes.env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), cwd=ROOT,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert "fsdp" in result["spec"][0]
  runs = result["runs"]
  reference = runs["data=1"]
  for mesh in ("data=2,fsdp=4",):
    assert [r["step"] for r in runs[mesh]] == [r["step"] for r in reference]
    for got, want in zip(runs[mesh], reference):
      for key in ("loss", "grad_norm", "eval_loss"):
        if key in want:
          np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=f"{mesh} {key}")
      # Spike counts and reset clocks are integers: identical, not just close.
      counts = {k: v for k, v in want.items() if k.startswith(("spike/clipped", "reset/"))}
      assert counts or "loss" not in want
      assert counts == {k: got[k] for k in counts}, mesh
  assert sum(r.get("spike/clipped_total", 0) for r in reference) > 0  # clipping did happen


def _gloo_available() -> bool:
  try:
    import jax
    return jax.config.jax_cpu_collectives_implementation in ("gloo", "mpi")
  except AttributeError:
    return False


DISTRIBUTED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from experiments import pretrain
    from experiments import checkpointing
    summary = pretrain.main(json.loads(sys.argv[1]))
    assert jax.process_count() == 2
    # Each host gets its own loader position back from the last checkpoint.
    ckpt = checkpointing.Checkpointer(summary["checkpoint"].rsplit("/", 1)[0], keep=2)
    saved = ckpt.manager.restore(ckpt.latest_step(), args=checkpointing.ocp.args.Composite(
        data=checkpointing.ocp.args.JsonRestore()))["data"]["hosts"]
    ckpt.close()
    print(json.dumps({"process": jax.process_index(), "loss": summary["last"]["loss"],
                      "eval": summary["last_eval"]["eval_loss"],
                      "checkpoint": summary["latest_checkpoint"],
                      "data_state": summary["data_state"], "saved_hosts": saved}))
""")


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no CPU collectives (gloo)")
def test_two_process_distributed_run(flags, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  argv = json.dumps(flags + ["--mesh", "data=2", "--save_dir", str(tmp_path / "dist")])
  # Output goes to files: a full pipe on one process would stall both in a collective.
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, "-c", DISTRIBUTED, argv], cwd=ROOT, text=True,
      stdout=logs[i], stderr=subprocess.STDOUT,
      env=_processes.env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i))) for i in range(2)]
  outs = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=300)
      log.seek(0)
      text = log.read()
      assert p.returncode == 0, text[-3000:]
      outs.append(json.loads(text.strip().splitlines()[-1]))
  finally:
    for p, log in zip(procs, logs):
      if p.poll() is None:
        p.kill()
      log.close()
  assert sorted(o["process"] for o in outs) == [0, 1]
  # One global computation: both processes see the same loss and evaluation.
  assert outs[0]["loss"] == outs[1]["loss"] and outs[0]["eval"] == outs[1]["eval"]
  assert outs[0]["checkpoint"] == 4
  # The checkpoint holds both hosts' loader positions, each as that host last saw it.
  for o in outs:
    assert sorted(o["saved_hosts"]) == ["0", "1"]
    assert o["saved_hosts"][str(o["process"])] == o["data_state"]
  with open(tmp_path / "dist" / "metrics.jsonl") as f:
    assert len([line for line in f if '"loss"' in line]) == 4  # written once, by process 0


def test_multi_host_launch_detection():
  from experiments import sharding
  assert not sharding._launched_multi_host({})
  assert not sharding._launched_multi_host({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "a"})
  assert sharding._launched_multi_host({"SLURM_NTASKS": "4"})
  assert sharding._launched_multi_host({"TPU_WORKER_HOSTNAMES": "w0,w1"})
  assert sharding._launched_multi_host({"JAX_COORDINATOR_ADDRESS": "h:1"})
