"""Hugging Face interop: tensor layouts against nn.Linear's convention, exact round trips through
model.safetensors, one-line errors for checkpoints that do not fit, and (when torch and
transformers are installed) the logits of transformers' LlamaForCausalLM on the export."""
import dataclasses
import json

import chex
import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import models
from models import hf

CFG = models.LlamaConfig(name="tiny", hidden_size=32, intermediate_size=48, num_heads=4,
                         num_layers=2, vocab_size=61, max_seq_len=16, rms_norm_eps=1e-5,
                         rope_theta=500.0, dtype="float32", param_dtype="float32")


def random_params(cfg=CFG, seed=0):
  """Normal entries in every parameter (norm scales too, so a swap cannot go unseen)."""
  params = nn.meta.unbox(models.abstract_variables(cfg)["params"])
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def scan_config(cfg=CFG):
  """``cfg`` with ``scan_layers=True`` (a subclass while LlamaConfig lacks the field)."""
  if any(f.name == "scan_layers" for f in dataclasses.fields(cfg)):
    return dataclasses.replace(cfg, scan_layers=True)
  cls = dataclasses.make_dataclass("ScanConfig", [("scan_layers", bool, True)],
                                   bases=(type(cfg),), frozen=True)
  return cls(**dataclasses.asdict(cfg))


def test_layouts_follow_torch_linear():
  """HF applies a weight W as x @ W.T; that must equal our kernels' contraction."""
  params = random_params()
  sd = models.to_hf_state_dict(params, CFG)
  x = np.random.default_rng(1).normal(size=(3, CFG.hidden_size)).astype(np.float32)
  block = params["layers_1"]
  prefix = "model.layers.1."
  for name in ("q_proj", "k_proj", "v_proj"):
    ours = np.einsum("bd,dhk->bhk", x, block["self_attn"][name]["kernel"])
    theirs = x @ sd[f"{prefix}self_attn.{name}.weight"].T  # HF then views (b, heads, head_dim)
    np.testing.assert_allclose(theirs.reshape(ours.shape), ours, rtol=1e-5, atol=1e-5)
  heads = np.random.default_rng(2).normal(size=(3, CFG.num_heads, CFG.head_dim))
  ours = np.einsum("bhk,hkd->bd", heads, block["self_attn"]["o_proj"]["kernel"])
  theirs = heads.reshape(3, -1) @ sd[f"{prefix}self_attn.o_proj.weight"].T
  np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
  for name in ("gate_proj", "up_proj"):
    np.testing.assert_allclose(x @ sd[f"{prefix}mlp.{name}.weight"].T,
                               x @ block["mlp"][name]["kernel"], rtol=1e-5, atol=1e-5)
  h = np.random.default_rng(3).normal(size=(3, CFG.intermediate_size))
  np.testing.assert_allclose(h @ sd[f"{prefix}mlp.down_proj.weight"].T,
                             h @ block["mlp"]["down_proj"]["kernel"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x @ sd["lm_head.weight"].T, x @ params["lm_head"]["kernel"],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(sd["model.embed_tokens.weight"],
                                params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(sd[f"{prefix}post_attention_layernorm.weight"],
                                block["post_attention_layernorm"]["scale"])
  np.testing.assert_array_equal(sd["model.norm.weight"], params["norm"]["scale"])
  assert set(sd) == set(hf.hf_shapes(CFG))
  assert {k: v.shape for k, v in sd.items()} == hf.hf_shapes(CFG)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_through_files_is_exact(tmp_path, dtype):
  params = random_params()
  models.save_pretrained(tmp_path, params, CFG, dtype=dtype)
  loaded, cfg = models.load_pretrained(tmp_path)
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  chex.assert_trees_all_equal(loaded, jax.tree.map(lambda p: p.astype(np_dtype), params))
  chex.assert_trees_all_equal_dtypes(loaded, jax.tree.map(lambda p: p.astype(np_dtype), params))
  shape = ("hidden_size", "intermediate_size", "num_heads", "num_layers", "vocab_size",
           "max_seq_len", "rms_norm_eps", "rope_theta", "init_std")
  assert {k: getattr(cfg, k) for k in shape} == {k: getattr(CFG, k) for k in shape}
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["architectures"] == ["LlamaForCausalLM"] and written["torch_dtype"] == dtype
  assert written["tie_word_embeddings"] is False


def test_reader_agrees_with_safetensors(tmp_path):
  models.save_pretrained(tmp_path, random_params(), CFG)
  ours = hf.read_safetensors(tmp_path / "model.safetensors")
  theirs = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  chex.assert_trees_all_equal(dict(ours), theirs)


def test_sharded_checkpoint_index_is_read(tmp_path):
  """A HF model saved in several shards with model.safetensors.index.json."""
  sd = models.to_hf_state_dict(random_params(), CFG)
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[:5],
            "model-00002-of-00002.safetensors": names[5:]}
  for shard, keys in shards.items():
    safetensors.numpy.save_file({k: sd[k] for k in keys}, str(tmp_path / shard))
  weight_map = {k: shard for shard, keys in shards.items() for k in keys}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  chex.assert_trees_all_equal(dict(hf.read_hf_weights(tmp_path)), sd)


def test_scan_layers_layout_is_accepted():
  """Stacked blocks (``params["layers"]``, leading num_layers axis) export like layers_<i>."""
  params = random_params()
  blocks = [params.pop(f"layers_{i}") for i in range(CFG.num_layers)]
  stacked = {**params, "layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
  per_layer = {**params, **{f"layers_{i}": b for i, b in enumerate(blocks)}}
  sd = models.to_hf_state_dict(stacked, CFG)
  chex.assert_trees_all_equal(sd, models.to_hf_state_dict(per_layer, CFG))
  chex.assert_trees_all_equal(models.from_hf_state_dict(sd, scan_config()), stacked)
  chex.assert_trees_all_equal(models.from_hf_state_dict(sd, CFG), per_layer)


def test_checkpoints_that_do_not_fit_name_the_tensor():
  sd = models.to_hf_state_dict(random_params(), CFG)
  wider = dataclasses.replace(CFG, intermediate_size=64)
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape "
                                       r"\(48, 32\), the model config \(tiny\) needs \(64, 32\)"):
    models.from_hf_state_dict(sd, wider)
  with pytest.raises(ValueError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
    models.from_hf_state_dict({**sd, "model.layers.0.self_attn.q_proj.bias": np.zeros(32)}, CFG)
  with pytest.raises(ValueError, match="tensor lm_head.weight is missing"):
    models.from_hf_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, CFG)
  # Old checkpoints carry the RoPE frequencies as a buffer: ignored.
  buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
  chex.assert_trees_all_equal(models.from_hf_state_dict({**sd, **buffer}, CFG),
                              models.from_hf_state_dict(sd, CFG))


HF_JSON = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
           "num_hidden_layers": 2, "vocab_size": 61}


@pytest.mark.parametrize("fields, message", [
    ({"num_key_value_heads": 2}, "grouped-query attention"),
    ({"attention_bias": True}, "attention_bias is not supported"),
    ({"head_dim": 16}, "head_dim 16"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling 'yarn'"),
])
def test_unsupported_hf_variants_are_one_line_errors(tmp_path, fields, message):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({**HF_JSON, **fields}))
  with pytest.raises(ValueError, match=message) as e:
    models.get_config(tmp_path)
  assert "\n" not in str(e.value)


def test_hf_directory_config_reads_both_rope_theta_spellings(tmp_path):
  """transformers < 5 writes rope_theta; 5 nests it in rope_parameters."""
  model_dir = tmp_path / "my_model"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(json.dumps(
      {**HF_JSON, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}))
  cfg = models.get_config(model_dir)
  assert cfg.rope_theta == 5e5 and cfg.name == "my_model" and cfg.head_dim == 8
  (model_dir / "config.json").write_text(json.dumps({**HF_JSON, "rope_theta": 123.0}))
  assert models.get_config(model_dir).rope_theta == 123.0


def test_logits_match_transformers(tmp_path):
  torch = pytest.importorskip("torch", reason="torch is optional (not a dependency)")
  transformers = pytest.importorskip("transformers",
                                     reason="transformers is optional (not a dependency)")
  params = random_params()
  params = jax.tree.map(lambda p: 0.2 * p, params)  # keep activations in a sane range
  params["norm"]["scale"] = 1.0 + params["norm"]["scale"]
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, size=(2, 12))
  ours = np.asarray(models.Llama(CFG).apply({"params": params}, tokens))
  models.save_pretrained(tmp_path, params, CFG)
  model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(ours).max() > 0.5  # the comparison is not between two near-zero arrays
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)
