"""The benchmarks measure again with XLA's attention when cuDNN's fails; the trainer's
--attention flag."""
import argparse
import json

import pytest

import models
from experiments import config, pretrain, rundir
from experiments.benchmarks import attention_fallback, bench_model, bench_train

CUDNN_ERROR = ("INTERNAL: cuDNN graph for __cudnn$fmhaSoftmax failed: "
               "CUDNN_STATUS_NOT_SUPPORTED\nmore lines")
TRITON_ERROR = "INTERNAL: Triton compilation failed for pallas_call add_rms_norm\nmore lines"


def test_run_retries_once_with_xla_on_a_cudnn_failure():
  calls = []

  def measure(args):
    calls.append(args.attention)
    if args.attention != "xla":
      raise RuntimeError(CUDNN_ERROR)
    return {"step_s": 1.0}

  args = argparse.Namespace(attention="auto", other=3)
  result = attention_fallback.run(measure, args)
  assert calls == ["auto", "xla"] and args.attention == "auto"  # the caller's args untouched
  assert result == {"step_s": 1.0, "attention_fallback": CUDNN_ERROR.splitlines()[0]}


@pytest.mark.parametrize("attention, error", [
    ("cudnn", RuntimeError(CUDNN_ERROR)),           # asked for cuDNN: its failure is the result
    ("auto", RuntimeError("RESOURCE_EXHAUSTED: out of memory")),  # not cuDNN's
])
def test_other_failures_are_not_retried(attention, error):
  calls = []

  def measure(args):
    calls.append(args.attention)
    raise error

  with pytest.raises(RuntimeError):
    attention_fallback.run(measure, argparse.Namespace(attention=attention))
  assert calls == [attention]


def test_is_cudnn_attention_failure():
  assert models.is_cudnn_attention_failure(RuntimeError(CUDNN_ERROR))
  assert models.is_cudnn_attention_failure(
      ValueError("dot_product_attention: head_dim 72 is not supported"))
  assert not models.is_cudnn_attention_failure(MemoryError("out of memory"))


@pytest.fixture
def cudnn_fails(monkeypatch):
  """Attention that fails unless XLA's is asked for, as a cuDNN refusal would on a GPU."""
  real = models.attention.causal_attention
  asked = []

  def failing(q, k, v, implementation=None):
    asked.append(implementation)
    if implementation != "xla":
      raise RuntimeError(CUDNN_ERROR)
    return real(q, k, v, implementation)

  monkeypatch.setattr(models.attention, "causal_attention", failing)
  return asked


def test_bench_model_falls_back_to_xla(tmp_path, cudnn_fails):
  out = tmp_path / "model.json"
  bench_model.main(["--models", "llama_9m", "--quant", "bf16", "--batch", "2", "--seq_len",
                    "16", "--steps", "1", "--warmup", "0", "--json", str(out)])
  (row,) = json.loads(out.read_text())
  assert row["attention"] == "xla" and row["step_s"] > 0
  assert row["attention_fallback"] == CUDNN_ERROR.splitlines()[0]
  assert None in cudnn_fails and "xla" in cudnn_fails


@pytest.fixture
def pallas_norm_fails(monkeypatch):
  """A GPU's default (the Pallas norm kernels) that fails, as a Triton refusal would."""
  def failing(*args, **kwargs):
    raise RuntimeError(TRITON_ERROR)

  monkeypatch.setattr(models.normalization, "default_implementation", lambda: "pallas")
  monkeypatch.setattr(models.norm_kernels, "add_rms_norm", failing)
  monkeypatch.setattr(models.norm_kernels, "rms_norm", failing)


def test_bench_train_falls_back_to_xla(tmp_path, cudnn_fails, pallas_norm_fails):
  """cuDNN's attention and the Pallas norm kernels both failing: measured a third time with
  both of XLA's, each first error noted."""
  del pallas_norm_fails
  out = tmp_path / "bench.json"
  bench_train.main(["--models", "llama_9m", "--optimizers", "spam", "--batch", "2",
                    "--length", "16", "--steps", "1", "--warmup", "0", "--no_loader",
                    "--json", str(out)])
  (row,) = json.loads(out.read_text())["steps"]
  assert row["attention"] == row["norm"] == "xla" and row["tokens_per_s"] > 0
  assert row["attention_fallback"] == CUDNN_ERROR.splitlines()[0]
  assert row["norm_fallback"] == TRITON_ERROR.splitlines()[0]
  assert cudnn_fails[0] is None and cudnn_fails[-1] == "xla"


def test_asked_for_xla_is_not_retried():
  """``--attention xla`` (or ``--norm xla``): a failure there is the result, not retried."""
  for flag, error in (("attention", CUDNN_ERROR), ("norm", TRITON_ERROR)):
    calls = []

    def measure(args):
      calls.append(getattr(args, flag))
      raise RuntimeError(error)

    with pytest.raises(RuntimeError):
      attention_fallback.run(measure, argparse.Namespace(**{flag: "xla"}))
    assert calls == ["xla"], flag


def test_trainer_attention_flag(tiny_args):
  assert pretrain.model_config(config.parse_args(tiny_args())).attention_implementation is None
  cfg = config.parse_args(tiny_args(attention="xla"))
  assert pretrain.model_config(cfg).attention_implementation == "xla"
  assert config.for_backend(config.parse_args(tiny_args(attention="cudnn")), "gpu").attention \
      == "cudnn"
  with pytest.raises(config.UsageError, match="--attention cudnn needs a GPU"):
    config.for_backend(config.parse_args(tiny_args(attention="cudnn")), "cpu")
  cfg = config.for_backend(config.parse_args(tiny_args(attention="pallas")), "gpu")
  assert pretrain.model_config(cfg).attention_implementation == "pallas"
  with pytest.raises(config.UsageError, match="--attention pallas needs a GPU"):
    config.for_backend(config.parse_args(tiny_args(attention="pallas")), "cpu")
  for length in (256, 384, 96):
    config.for_backend(config.parse_args(tiny_args(attention="pallas", max_length=length)),
                       "gpu")
  with pytest.raises(config.UsageError, match="at most 128 or a multiple of 128, got 200"):
    config.for_backend(config.parse_args(tiny_args(attention="pallas", max_length=200)), "gpu")
  with pytest.raises(config.UsageError, match="--attention pallas runs on one device"):
    pretrain.check_devices(config.parse_args(tiny_args(attention="pallas")),
                           {"data": 2, "fsdp": 1, "tensor": 1})
  pretrain.check_devices(config.parse_args(tiny_args(attention="pallas")),
                         {"data": 1, "fsdp": 1, "tensor": 1})
  with pytest.raises(SystemExit):
    config.parse_args(tiny_args(attention="flash"))
  assert "attention" in rundir.RESUMABLE  # the same attention by another kernel: resumable


@pytest.mark.parametrize("flag", ["norm", "elementwise"])
def test_trainer_pallas_kernel_flags(tiny_args, flag):
  field = f"{flag}_implementation"
  assert getattr(pretrain.model_config(config.parse_args(tiny_args())), field) is None
  cfg = config.parse_args(tiny_args(**{flag: "xla"}))
  assert getattr(pretrain.model_config(cfg), field) == "xla"
  pallas = config.parse_args(tiny_args(**{flag: "pallas"}))
  assert getattr(config.for_backend(pallas, "gpu"), flag) == "pallas"
  with pytest.raises(config.UsageError, match=f"--{flag} pallas needs a GPU"):
    config.for_backend(pallas, "cpu")
  with pytest.raises(config.UsageError, match=f"--{flag} pallas runs on one device"):
    pretrain.check_devices(pallas, {"data": 2, "fsdp": 1, "tensor": 1})
  pretrain.check_devices(pallas, {"data": 1, "fsdp": 1, "tensor": 1})
  with pytest.raises(SystemExit):
    config.parse_args(tiny_args(**{flag: "triton"}))
  assert flag in rundir.RESUMABLE  # the same operations by other kernels: resumable


@pytest.mark.parametrize("flag", ["attention", "norm", "elementwise"])
def test_pallas_kernels_are_refused_by_a_jax_without_tritons_backend(tiny_args, flag,
                                                                      monkeypatch):
  """jax 0.11 deprecates Pallas's Triton backend; a jax without it refuses ``pallas`` with
  one line before compiling, and ``auto`` runs XLA's forms (``default_implementation``)."""
  monkeypatch.setattr(models.pallas_platform, "triton_available", lambda: False)
  with pytest.raises(config.UsageError,
                     match=f"^error: --{flag} pallas needs Pallas's Triton backend, which "
                           r"this jax \(.+\) does not have; use auto or xla$"):
    config.for_backend(config.parse_args(tiny_args(**{flag: "pallas"})), "gpu")
  assert config.for_backend(config.parse_args(tiny_args(**{flag: "auto"})), "gpu")


def test_trainer_names_the_flag_when_cudnn_attention_fails(tiny_args, cudnn_fails):
  """With --attention auto a cuDNN failure is one error line naming --attention xla; the
  same run with --attention xla trains."""
  with pytest.raises(config.UsageError, match=r"cuDNN attention failed on this GPU \(INTERNAL"
                     r".*rerun with --attention xla"):
    pretrain.main(tiny_args(num_training_steps=2))
  result = pretrain.main(tiny_args(run="xla", attention="xla", num_training_steps=2))
  assert result is not None


def test_the_accelerator_report_shows_the_fallback():
  from experiments.benchmarks import accelerator  # pylint: disable=import-outside-toplevel
  fell_back = dict(model="llama_350m", optimizer="spam", dtype="bfloat16", batch=64,
                   length=256, step_s=0.1, tokens_per_s=163840.0, mfu=0.4, compile_s=30.0,
                   attention="xla", attention_fallback=CUDNN_ERROR.splitlines()[0])
  model = dict(model="llama_350m", quant="bf16", batch=64, seq_len=256, step_s=0.08,
               tokens_per_s=2e5, mfu=0.45, compile_s=20.0, attention="auto", norm="xla",
               norm_fallback="INTERNAL: Triton compilation failed")
  report = dict(date="d", command="c", budget_s=1.0, wall_s=1.0, tiny=False, parts=[],
                environment={}, results=dict(optimizer=None, optimizer_scan=None, blocks=None,
                                             model=[model], train=[fell_back], peer=[], hlo=[],
                                             targets=[]))
  md = accelerator.markdown(report)
  assert "| llama_350m (XLA attention) | 64×256 |" in md
  assert "| llama_350m | bf16 | 64×256 |" in md  # cuDNN (auto): no tag
  assert ("**cuDNN attention failed, measured again with XLA's:** llama_350m spam: INTERNAL: "
          "cuDNN graph") in md
  assert ("**The Pallas norm kernels failed, measured again with XLA's:** llama_350m bf16: "
          "INTERNAL: Triton compilation failed") in md


def test_is_pallas_failure():
  assert models.is_pallas_failure(RuntimeError(TRITON_ERROR))
  assert not models.is_pallas_failure(RuntimeError(CUDNN_ERROR))
  assert not models.is_pallas_failure(MemoryError("out of memory"))


def test_run_falls_back_for_each_kernel_once():
  calls = []

  def measure(args):
    calls.append((args.attention, args.norm))
    if args.attention != "xla":
      raise RuntimeError(CUDNN_ERROR)
    if args.norm != "xla":
      raise RuntimeError(TRITON_ERROR)
    return {"step_s": 1.0}

  result = attention_fallback.run(measure, argparse.Namespace(attention="auto", norm="auto",
                                                             elementwise="auto"))
  # The norm kernels' error names them: the element-wise kernels are not blamed.
  assert calls == [("auto", "auto"), ("xla", "auto"), ("xla", "xla")]
  assert result == {"step_s": 1.0, "attention_fallback": CUDNN_ERROR.splitlines()[0],
                    "norm_fallback": TRITON_ERROR.splitlines()[0]}
  calls.clear()
  with pytest.raises(RuntimeError, match="Triton"):  # asked for: its failure is the result
    attention_fallback.run(measure, argparse.Namespace(attention="xla", norm="pallas"))
  assert calls == [("xla", "pallas")]


def test_run_puts_an_anonymous_triton_failure_on_the_elementwise_kernels_first():
  calls = []
  anonymous = "INTERNAL: Triton compilation failed\nmore lines"

  def measure(args):
    calls.append((args.elementwise, args.norm))
    if "auto" in calls[-1]:
      raise RuntimeError(anonymous)
    return {"step_s": 1.0}

  result = attention_fallback.run(measure, argparse.Namespace(attention="auto", norm="auto",
                                                             elementwise="auto"))
  assert calls == [("auto", "auto"), ("xla", "auto"), ("xla", "xla")]
  assert result == {"step_s": 1.0, "elementwise_fallback": anonymous.splitlines()[0],
                    "norm_fallback": anonymous.splitlines()[0]}


@pytest.fixture
def pallas_elementwise_fails(monkeypatch):
  """A GPU's default for RoPE's split and SwiGLU's backward (the Pallas kernels) that fails
  as a Triton refusal would; the norms stay XLA's."""
  def failing(*args, **kwargs):
    raise RuntimeError(TRITON_ERROR.replace("add_rms_norm", "_rope_kernel"))

  monkeypatch.setattr(models.pallas_platform, "default_implementation", lambda: "pallas")
  monkeypatch.setattr(models.normalization, "default_implementation", lambda: "xla")
  monkeypatch.setattr(models.elementwise_kernels, "rope_split", failing)
  monkeypatch.setattr(models.elementwise_kernels, "swiglu_grad", failing)


@pytest.mark.parametrize("failing, flag, what", [
    ("pallas_norm_fails", "norm", "norm"),
    ("pallas_elementwise_fails", "elementwise", "element-wise")], ids=["norm", "elementwise"])
def test_trainer_names_the_flag_when_pallas_kernels_fail(tiny_args, request, failing, flag,
                                                         what):
  request.getfixturevalue(failing)
  with pytest.raises(config.UsageError, match=rf"the Pallas {what} kernels failed on this GPU "
                     rf"\(INTERNAL: Triton.*rerun with --{flag} xla$"):
    pretrain.main(tiny_args(num_training_steps=2))
  assert pretrain.main(tiny_args(run="xla", num_training_steps=2, **{flag: "xla"})) is not None
