"""Hugging Face interop: our Flax parameters <-> a `transformers.LlamaForCausalLM` checkpoint.

The parameter names already follow the HF model, so the mapping is one of layouts only:

| ours (Flax kernels are (in, out))           | HF (`nn.Linear.weight` is (out, in))   |
|---|---|
| `embed_tokens/embedding` (V, d)             | `model.embed_tokens.weight` (V, d)      |
| `layers_i/self_attn/q_proj/kernel` (d, h, k) | `model.layers.i.self_attn.q_proj.weight` (hk, d) |
| (k_proj, v_proj alike)                      |                                         |
| `layers_i/self_attn/o_proj/kernel` (h, k, d) | `model.layers.i.self_attn.o_proj.weight` (d, hk) |
| `layers_i/mlp/{gate,up}_proj/kernel` (d, f) | `model.layers.i.mlp.{gate,up}_proj.weight` (f, d) |
| `layers_i/mlp/down_proj/kernel` (f, d)      | `model.layers.i.mlp.down_proj.weight` (d, f) |
| `…layernorm/scale`, `norm/scale` (d,)       | `….layernorm.weight`, `model.norm.weight` (d,) |
| `lm_head/kernel` (d, V)                     | `lm_head.weight` (V, d)                 |

The heads axis flattens head-major (row `h·k + j` of the HF weight is head h, feature j), as
HF's `view(…, num_heads, head_dim)` reads it. No q/k permutation is needed: our RoPE
(`models.attention.apply_rope`) pairs feature j with j + k/2 ("rotate half"), as HF LLaMA
does. With `LlamaConfig.scan_layers`, the blocks live in one subtree `layers` whose leaves
have a leading num_layers axis; both layouts are accepted.

Files: `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`),
the layout `LlamaForCausalLM.from_pretrained(dir)` reads. Writing uses safetensors' NumPy API
(`pip install safetensors`); reading parses the documented safetensors layout directly so that
bfloat16 files load into NumPy through `ml_dtypes`, which safetensors' NumPy loader lacks.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from models.config import LlamaConfig, from_hf_json

# Per-block tensors: (our path inside a block, HF name inside `model.layers.{i}.`).
_BLOCK = (
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight"),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight"),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight"),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight"),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight"),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight"),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight"),
    (("input_layernorm", "scale"), "input_layernorm.weight"),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight"),
)
_TOP = (
    (("embed_tokens", "embedding"), "model.embed_tokens.weight"),
    (("norm", "scale"), "model.norm.weight"),
    (("lm_head", "kernel"), "lm_head.weight"),
)
# Buffers some HF checkpoints carry that hold no parameter (recomputed from rope_theta).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# safetensors dtype codes <-> NumPy dtypes (bfloat16 through ml_dtypes).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def _to_hf(our_path: tuple[str, ...], x: np.ndarray) -> np.ndarray:
  """One tensor from our layout to HF's."""
  if our_path[-1] in ("scale", "embedding"):
    return x
  if our_path[-2] in ("q_proj", "k_proj", "v_proj"):  # (d, h, k) -> (h·k, d)
    return x.reshape(x.shape[0], -1).T
  if our_path[-2] == "o_proj":  # (h, k, d) -> (d, h·k)
    return x.reshape(-1, x.shape[-1]).T
  return x.T  # gate/up/down/lm_head: (in, out) -> (out, in)


def _from_hf(our_path: tuple[str, ...], w: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """One tensor from HF's layout to ours."""
  heads, head_dim = config.num_heads, config.head_dim
  if our_path[-1] in ("scale", "embedding"):
    return w
  if our_path[-2] in ("q_proj", "k_proj", "v_proj"):  # (h·k, d) -> (d, h, k)
    return w.T.reshape(w.shape[1], heads, head_dim)
  if our_path[-2] == "o_proj":  # (d, h·k) -> (h, k, d)
    return w.T.reshape(heads, head_dim, w.shape[0])
  return w.T


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The HF name and shape of every tensor a checkpoint of `config`'s shape holds."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  block = {"self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (d, d),
           "self_attn.v_proj.weight": (d, d), "self_attn.o_proj.weight": (d, d),
           "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
           "mlp.down_proj.weight": (d, f), "input_layernorm.weight": (d,),
           "post_attention_layernorm.weight": (d,)}
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
            "lm_head.weight": (v, d)}
  for i in range(config.num_layers):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in block.items()})
  return shapes


def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _block_params(params: Mapping, config: LlamaConfig) -> list[Mapping]:
  """Each decoder block's parameters, from `layers_<i>` or from the stacked `layers`."""
  if "layers" in params:  # scan_layers: leaves (num_layers, ...)
    stacked = {path: np.asarray(_get(params["layers"], path)) for path, _ in _BLOCK}
    return [{path: x[i] for path, x in stacked.items()} for i in range(config.num_layers)]
  return [{path: _get(params[f"layers_{i}"], path) for path, _ in _BLOCK}
          for i in range(config.num_layers)]


def to_hf_state_dict(params: Mapping, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Our parameter tree (boxed or not, on device or host) -> HF `state_dict` of NumPy arrays.

  Dtypes are kept; the arrays are in HF's layout (Linear weights (out, in), heads flattened).
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  params = nn.meta.unbox(params)
  out = {}
  for path, name in _TOP:
    out[name] = np.ascontiguousarray(_to_hf(path, np.asarray(_get(params, path))))
  for i, block in enumerate(_block_params(params, config)):
    for path, name in _BLOCK:
      out[f"model.layers.{i}.{name}"] = np.ascontiguousarray(
          _to_hf(path, np.asarray(block[path])))
  return out


def from_hf_state_dict(state_dict: Mapping[str, Any], config: LlamaConfig,
                       dtype: Any = None) -> dict:
  """HF `LlamaForCausalLM` `state_dict` (NumPy arrays, or anything `np.asarray` takes) ->
  our parameter tree (NumPy), in `dtype` if given, else the checkpoint's dtypes.

  Raises ValueError naming the first tensor that is missing, unexpected (a bias, grouped
  key/value heads, ...) or of another shape than `config` implies.
  """
  expected = hf_shapes(config)
  for name in state_dict:
    if name not in expected and not name.endswith(_IGNORED_SUFFIXES):
      raise ValueError(f"unexpected tensor {name} (not part of a {config.name} LLaMA: "
                       "biases, tied or grouped-query weights are not supported)")
  for name, shape in expected.items():
    if name not in state_dict:
      raise ValueError(f"tensor {name} is missing")
    got = tuple(np.shape(state_dict[name]))
    if got != shape:
      raise ValueError(f"tensor {name} has shape {got}, the model config "
                       f"({config.name}) needs {shape}")

  def load(name, path):
    w = np.asarray(state_dict[name])
    return _from_hf(path, w if dtype is None else w.astype(dtype), config)

  params: dict = {}
  for path, name in _TOP:
    _set(params, path, load(name, path))
  blocks = [{path: load(f"model.layers.{i}.{name}", path) for path, name in _BLOCK}
            for i in range(config.num_layers)]
  if getattr(config, "scan_layers", False):
    for path, _ in _BLOCK:
      _set(params, ("layers",) + path, np.stack([b[path] for b in blocks]))
  else:
    for i, block in enumerate(blocks):
      for path, value in block.items():
        _set(params, (f"layers_{i}",) + path, value)
  return params


def hf_config(config: LlamaConfig, dtype: str = "float32", **extra: Any) -> dict[str, Any]:
  """The `config.json` of a `LlamaForCausalLM` of `config`'s shape (`extra`: token ids, ...)."""
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_heads,
      "head_dim": config.head_dim,
      "num_hidden_layers": config.num_layers,
      "vocab_size": config.vocab_size,
      "max_position_embeddings": config.max_seq_len,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": None,
      "initializer_range": config.init_std,
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": False,
      "torch_dtype": dtype,
  }
  out.update(extra)
  return out


def save_pretrained(out_dir: str | os.PathLike, params: Mapping, config: LlamaConfig,
                    dtype: str = "float32", **extra: Any) -> None:
  """Writes `config.json` and `model.safetensors` (weights cast to `dtype`) into `out_dir`."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
  try:
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("writing model.safetensors needs the 'safetensors' package "
                      "(pip install safetensors, part of the [train] extra)") from e
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  tensors = {k: v.astype(np_dtype) for k, v in to_hf_state_dict(params, config).items()}
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config(config, dtype, **extra), f, indent=2, sort_keys=True)
    f.write("\n")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one `.safetensors` file as NumPy arrays (memory-mapped, bfloat16 too).

  The format: an 8-byte little-endian header length n, n bytes of JSON
  `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data.
  """
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[info["dtype"]].newbyteorder("<")
    out[name] = data[begin:end].view(dtype).reshape(info["shape"])
  return out


def read_hf_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """The `state_dict` of a HF model directory: `model.safetensors` or its sharded index."""
  directory = os.fspath(directory)
  single = os.path.join(directory, "model.safetensors")
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.isfile(single):
    return read_safetensors(single)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(read_safetensors(os.path.join(directory, shard)))
    return out
  raise FileNotFoundError(f"{directory} holds no model.safetensors (nor a sharded index); "
                          "PyTorch .bin checkpoints: re-save them with "
                          "save_pretrained(dir, safe_serialization=True)")


def load_pretrained(directory: str | os.PathLike, config: LlamaConfig | None = None,
                    dtype: Any = None) -> tuple[dict, LlamaConfig]:
  """Reads a HF LLaMA directory -> (our parameter tree of NumPy arrays, its LlamaConfig).

  Without `config`, the shape comes from the directory's `config.json`.
  """
  if config is None:
    config = from_hf_json(os.path.join(os.fspath(directory), "config.json"))
  return from_hf_state_dict(read_hf_weights(directory), config, dtype), config
