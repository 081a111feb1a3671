"""The trainer tests' tiny runs: a 2-layer, width-32 LLaMA (a Hugging Face LlamaConfig JSON
whose 258 ids hold the byte tokenizer's vocabulary: 256 bytes, padding, end of text) and the
reading of a run's ``metrics.jsonl``.
"""
import json

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
              "num_hidden_layers": 2, "vocab_size": 258, "max_sequence_length": 64}


def write_tiny_model_config(directory):
  """Writes ``tiny.json`` into ``directory`` (a pathlib.Path) and returns its path."""
  path = directory / "tiny.json"
  path.write_text(json.dumps(TINY_MODEL))
  return path


def read_metrics(save_dir):
  """The records of ``<save_dir>/metrics.jsonl``, in order."""
  with open(f"{save_dir}/metrics.jsonl") as f:
    return [json.loads(line) for line in f]
