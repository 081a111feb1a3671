"""Lowering a jitted function for CUDA from a host without a GPU, as a GPU compiles it."""
import jax
import pytest

from models import pallas_platform

TRITON = "__gpu$xla.gpu.triton"
NO_GPU = "No supported GPU devices found"


def _export(f, args) -> str:
  from jax import export  # pylint: disable=import-outside-toplevel
  return export.export(
      jax.jit(f), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(*args).mlir_module()


def mlir_for_cuda(f, *args) -> str:
  """The MLIR of ``jax.jit(f)`` exported for CUDA (``jax.export``), Triton calls allowed.

  Where this jax's Triton lowering reads the GPU's kind from a device (jax ≥ 0.11: "No
  supported GPU devices found"), it is lowered again for an abstract H100
  (``jax.sharding.use_abstract_mesh``). Skips where this jax lowers every platform's branch
  (the interpreter's is taken then).
  """
  if not pallas_platform.lowering_prunes_branches():
    pytest.skip("this jax lowers every platform's branch: the interpreter's here")
  try:
    return _export(f, args)
  except RuntimeError as e:
    if NO_GPU not in str(e):
      raise
  from jax.sharding import AbstractDevice, AbstractMesh  # pylint: disable=import-outside-toplevel
  h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")
  with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("_",), abstract_device=h100)):
    return _export(f, args)
