"""experiments/jax_settings.py: the process-wide settings the trainer starts with."""
import jax
import pytest

from experiments import jax_settings


@pytest.fixture
def restore_threefry():
  before = jax.config.jax_threefry_gpu_kernel_lowering
  yield
  jax.config.update("jax_threefry_gpu_kernel_lowering", before)


def test_threefry_kernel_asked_for(restore_threefry):
  jax.config.update("jax_threefry_gpu_kernel_lowering", False)
  assert jax_settings.apply({}) == {"jax_threefry_gpu_kernel_lowering": True}
  assert jax.config.jax_threefry_gpu_kernel_lowering


def test_the_environment_wins(restore_threefry):
  jax.config.update("jax_threefry_gpu_kernel_lowering", False)
  assert jax_settings.apply({"JAX_THREEFRY_GPU_KERNEL_LOWERING": "0"}) == {}
  assert not jax.config.jax_threefry_gpu_kernel_lowering


def test_the_trainer_applies_them_before_compiling(restore_threefry, monkeypatch):
  """pretrain.main applies the settings first: a bad flag still fails after them."""
  from experiments import pretrain  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_threefry_gpu_kernel_lowering", False)
  monkeypatch.delenv("JAX_THREEFRY_GPU_KERNEL_LOWERING", raising=False)
  with pytest.raises(SystemExit):
    pretrain.main(["--model", "no_such_model"])
  assert jax.config.jax_threefry_gpu_kernel_lowering


def test_a_jax_without_the_option_is_left_alone(monkeypatch):
  def update(name, value):
    raise AttributeError(f"Unrecognized config option: {name}")
  monkeypatch.setattr(jax.config, "update", update)
  assert jax_settings.apply({}) == {}
