"""Shared pytest configuration: run JAX on the CPU with deterministic settings."""
import os

import pytest

from _tiny_model import write_tiny_model_config

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def tiny_model_config(tmp_path):
  """The tiny LLaMA config of the trainer's tests (see _tiny_model), written under tmp_path."""
  return write_tiny_model_config(tmp_path)
