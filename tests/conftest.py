"""Shared pytest configuration: run JAX on the CPU with deterministic settings."""
import json
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def tiny_model_config(tmp_path):
  """A Hugging Face LlamaConfig JSON of a 2-layer, width-32 LLaMA for the trainer's tests.

  Its 258 ids hold the byte tokenizer's vocabulary (256 bytes, padding and end of text).
  """
  path = tmp_path / "tiny.json"
  path.write_text(json.dumps({
      "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
      "num_hidden_layers": 2, "vocab_size": 258, "max_sequence_length": 64}))
  return path
