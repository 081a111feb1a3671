"""LLaMA model configurations: one dataclass and the table of the official sizes.

The sizes are those of the `configs/llama_*.json` files shipped with the SPAM /
Stable-SPAM code (the same files as GaLore's `configs/`). They are written here as
data in our own format; `get_config` also reads such a JSON file directly.

Every size uses SiLU-gated MLPs, RoPE, RMSNorm (eps 1e-6), no biases, an untied
output head and normal(0, 0.02) initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from models import remat


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of one LLaMA model.

  Dtypes are stored as names (strings) so that the config stays hashable and
  JSON-serialisable; `jnp.dtype(config.dtype)` turns them into dtypes.
  """

  name: str
  hidden_size: int
  intermediate_size: int
  num_heads: int
  num_layers: int
  vocab_size: int = 32000
  max_seq_len: int = 1024
  rms_norm_eps: float = 1e-6
  init_std: float = 0.02
  rope_theta: float = 10000.0
  # Numerics: float32 master parameters, bfloat16 compute. The loss is always float32.
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  # The head's output: "float32" (float32 accumulation kept), or "bfloat16" as HF LLaMA in
  # bf16 (the official runs) returns them, the loss upcasting them; this halves the bytes of
  # the largest activation and of its gradient.
  logits_dtype: str = "float32"
  # Rematerialise every decoder block in the backward pass with `remat_policy`. (A scanned
  # block is always rematerialised: with `remat_policy` when this is on, else with
  # "block_residuals", which recomputes only element-wise work.)
  remat: bool = False
  # Used when `remat` is on: "block_residuals" (`models.remat`) or the name of a
  # `jax.checkpoint_policies` entry.
  remat_policy: str = "nothing_saveable"
  # One decoder block scanned over the layers (`flax.linen.scan`, as MaxText does): the
  # block is traced and compiled once, and the decoder parameters live in one subtree
  # `params["layers"]` whose leaves carry a leading axis of size `num_layers` (logical
  # axis "layers") instead of `layers_0`, `layers_1`, ...
  scan_layers: bool = False
  # `jax.nn.dot_product_attention`'s "xla" or "cudnn", or "pallas" (jax's Pallas flash
  # attention kernel for GPUs, `attention.pallas_attention`); None
  # (`attention.causal_attention`) picks cuDNN flash attention on a GPU where it applies and
  # XLA otherwise.
  attention_implementation: str | None = None
  # The RMSNorms, each with the residual add before it: "pallas" (one kernel forward and
  # one backward, `models.norm_kernels`; Triton on a GPU, interpreted elsewhere), "xla", or
  # None: "pallas" on one GPU of compute capability >= 8.0, "xla" otherwise.
  norm_implementation: str | None = None
  # RoPE's split of the fused q/k/v product (forward), SwiGLU (forward and backward), the
  # stack of the projections' kernels for the fused products and the loss's passes over
  # the vocabulary (which the trainer's loss takes from here): "pallas" (one kernel each,
  # `models.elementwise_kernels`, `models.loss_kernels`; Triton on a GPU, interpreted
  # elsewhere), "xla", or None: "pallas" on one GPU of compute capability >= 8.0, "xla"
  # otherwise.
  elementwise_implementation: str | None = None

  def __post_init__(self):
    for field in ("norm_implementation", "elementwise_implementation"):
      if getattr(self, field) not in (None, "xla", "pallas"):
        raise ValueError(f"{field} {getattr(self, field)!r} is not None, 'xla' or 'pallas'")
    if self.attention_implementation not in (None, "xla", "cudnn", "pallas"):
      raise ValueError(f"attention_implementation {self.attention_implementation!r} is not "
                       "None, 'xla', 'cudnn' or 'pallas'")
    remat.policy(self.remat_policy)  # a clear error for an unknown name
    if self.logits_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"logits_dtype {self.logits_dtype!r} is not 'float32' or 'bfloat16'")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def flops_per_token(self, seq_len: int, num_params: int) -> float:
    """Training FLOPs per token: 6·N for the matmuls plus attention scores.

    `num_params` is the matmul parameter count (all parameters but the input
    embedding, whose lookup does no FLOPs; the untied head is included). The
    attention term is PaLM's (arXiv:2204.02311, appendix B), 12·L·d·T, without
    halving for the causal mask.
    """
    return 6.0 * num_params + 12.0 * self.num_layers * self.hidden_size * seq_len


def _cfg(name, hidden, mlp, heads, layers, **kw) -> LlamaConfig:
  return LlamaConfig(
      name=name,
      hidden_size=hidden,
      intermediate_size=mlp,
      num_heads=heads,
      num_layers=layers,
      **kw,
  )


# name: (hidden_size, intermediate_size, num_attention_heads, num_hidden_layers).
# Quirks kept from the official files: llama_100m uses vocab 32100 and
# llama_7b max length 2048; llama_71m's MLP is 1368 (not 1376).
CONFIGS: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        _cfg("llama_9m", 128, 352, 4, 4),
        _cfg("llama_20m", 256, 688, 4, 4),
        _cfg("llama_35m", 384, 1024, 8, 6),
        _cfg("llama_40m", 416, 1024, 8, 8),
        _cfg("llama_60m", 512, 1376, 8, 8),
        _cfg("llama_71m", 512, 1368, 8, 12),
        _cfg("llama_100m", 640, 1708, 10, 12, vocab_size=32100),
        _cfg("llama_130m", 768, 2048, 12, 12),
        _cfg("llama_250m", 768, 2560, 16, 24),
        _cfg("llama_350m", 1024, 2736, 16, 24),
        _cfg("llama_1b", 2048, 5461, 32, 24),
        _cfg("llama_3b", 2560, 6848, 32, 32),
        _cfg("llama_7b", 4096, 11008, 32, 32, max_seq_len=2048),
    )
}

CONFIG_NAMES: tuple[str, ...] = tuple(CONFIGS)


def from_hf_json(path: str | os.PathLike, **overrides: Any) -> LlamaConfig:
  """Reads a HuggingFace `LlamaConfig` JSON file (the official repo's format)."""
  with open(path) as f:
    hf = json.load(f)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
  if hf.get("tie_word_embeddings", False):
    raise ValueError(f"{path}: tied embeddings are not supported")
  _check_hf_fields(path, hf)
  rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
  max_len = hf.get("max_sequence_length", hf.get("max_position_embeddings", 1024))
  name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
  if name == "config":  # a HF model directory's config.json: name it after the directory
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or name
  kw = dict(
      name=name,
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_heads=int(hf["num_attention_heads"]),
      num_layers=int(hf["num_hidden_layers"]),
      vocab_size=int(hf.get("vocab_size", 32000)),
      max_seq_len=int(max_len),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      init_std=float(hf.get("initializer_range", 0.02)),
      rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
  )
  kw.update(overrides)
  return LlamaConfig(**kw)


def _check_hf_fields(path, hf: dict) -> None:
  """Rejects HF LLaMA variants this model does not implement (one-line ValueError)."""
  heads = int(hf["num_attention_heads"])
  if int(hf.get("num_key_value_heads") or heads) != heads:
    raise ValueError(f"{path}: grouped-query attention (num_key_value_heads "
                     f"{hf['num_key_value_heads']} != num_attention_heads {heads}) "
                     "is not supported")
  if hf.get("head_dim") not in (None, int(hf["hidden_size"]) // heads):
    raise ValueError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"{path}: {flag} is not supported")
  scaling = hf.get("rope_scaling") or {}
  rope_type = (scaling.get("rope_type") or scaling.get("type")
               or (hf.get("rope_parameters") or {}).get("rope_type", "default"))
  if rope_type != "default":
    raise ValueError(f"{path}: rope scaling {rope_type!r} is not supported")


def get_config(name: str | os.PathLike | LlamaConfig, **overrides: Any) -> LlamaConfig:
  """Returns the config called `name` (`llama_60m` or `60m`), or read from a HF config JSON
  path or a HF model directory holding `config.json`.

  Keyword arguments override fields, e.g. `get_config("60m", vocab_size=32100)`.
  """
  if isinstance(name, LlamaConfig):
    return dataclasses.replace(name, **overrides) if overrides else name
  key = os.fspath(name)
  if os.path.isfile(os.path.join(key, "config.json")):  # a HF model directory
    key = os.path.join(key, "config.json")
  if key.endswith(".json") or os.path.isfile(key):
    return from_hf_json(key, **overrides)
  key = key.strip().lower()
  if not key.startswith("llama_"):
    key = "llama_" + key
  if key not in CONFIGS:
    raise ValueError(
        f"unknown model {os.fspath(name)!r}; valid names: {', '.join(CONFIG_NAMES)}"
        " (with or without the 'llama_' prefix), a HF config JSON or a HF model directory"
    )
  config = CONFIGS[key]
  return dataclasses.replace(config, **overrides) if overrides else config

