"""The LLaMA decoder as the SPAM / Stable-SPAM experiments pretrain it, in Flax Linen.

Why Linen rather than NNX: Linen's logical partitioning (`with_logical_partitioning`,
`logical_axis_rules`, `get_partition_spec`) is mature and is what MaxText-style
FSDP/tensor-parallel trainers build on; parameters are a plain nested dict that
orbax checkpoints as is and optax transforms directly; and `model.apply` is a pure
function that jits and shards without module-state plumbing.

Parameter names follow the HF model (`embed_tokens`, `layers_<i>/self_attn/q_proj`,
`mlp/gate_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`). With
`LlamaConfig.scan_layers`, the blocks are one `layers/...` subtree whose leaves are stacked
over a leading `num_layers` axis (`stack_layers` / `unstack_layers` convert).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from models.attention import Attention
from models.config import LlamaConfig, get_config
from models.linears import MLP, DenseGeneral
from models.normalization import RMSNorm
from models.quantization import QuantConfig
from models import remat

ACTIVATION_AXES = ("batch", "length", "embed")


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)).

  The residual stream travels between blocks as a pair `(x, delta)`: the stream and the
  output of the last sublayer, not yet added, so that every residual add runs in the norm
  that reads the sum (`RMSNorm(x, residual)`; one kernel with `norm_implementation`
  "pallas"). A block takes the pair and returns the next; `delta` is None before the first
  unscanned block. With `scanned`, returns `((x, delta), None)`: the carry and (no) output
  of `nn.scan`.
  """

  config: LlamaConfig
  quant: QuantConfig | None = None
  scanned: bool = False

  @nn.compact
  def __call__(self, carry: tuple, positions: jax.Array) -> tuple:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, param_dtype,
                                implementation=cfg.norm_implementation, name=name)
    x, delta = carry
    if delta is None:
      h = norm("input_layernorm")(x)
    else:
      x, h = norm("input_layernorm")(x, delta)
      x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    h = Attention(
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        quant=self.quant,
        init_std=cfg.init_std,
        dtype=dtype,
        param_dtype=param_dtype,
        implementation=cfg.attention_implementation,
        elementwise_implementation=cfg.elementwise_implementation,
        name="self_attn",
    )(h, positions)
    x, h = norm("post_attention_layernorm")(x, nn.with_logical_constraint(h, ACTIVATION_AXES))
    x = checkpoint_name(nn.with_logical_constraint(x, ACTIVATION_AXES), "residual_mid")
    h = MLP(
        cfg.intermediate_size,
        quant=self.quant,
        init_std=cfg.init_std,
        dtype=dtype,
        param_dtype=param_dtype,
        elementwise_implementation=cfg.elementwise_implementation,
        name="mlp",
    )(h)
    carry = (x, nn.with_logical_constraint(h, ACTIVATION_AXES))
    return (carry, None) if self.scanned else carry


class Llama(nn.Module):
  """LLaMA causal LM: tokens int32 (batch, length) → logits (batch, length, vocab), float32
  unless `config.logits_dtype` is "bfloat16".

  Usage:
    model = Llama(get_config("llama_60m"), quant=None)   # or QuantConfig(...)
    variables = model.init(jax.random.key(0), tokens)
    logits = model.apply({"params": params}, tokens, rngs={"quant": key})

  The `quant` rng is only needed with `QuantConfig(stochastic=True)`. `init`
  returns parameters boxed with their logical axis names
  (`nn.LogicallyPartitioned`); `apply` accepts them boxed or unboxed
  (`nn.meta.unbox`).
  """

  config: LlamaConfig
  quant: QuantConfig | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    x = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")
        ),
        dtype=dtype,
        param_dtype=param_dtype,
        name="embed_tokens",
    )(tokens)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    block = DecoderBlock
    if cfg.remat or cfg.scan_layers:
      # A scanned block without remat would store every intermediate of its backward pass
      # in stacked buffers (XLA cannot recompute cheap ones across the loop); with
      # `block_residuals` it keeps the matrix-product and attention outputs only.
      policy = cfg.remat_policy if cfg.remat else "block_residuals"
      block = nn.remat(block, policy=remat.policy(policy), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      block = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "quant": True},
          in_axes=(nn.broadcast,),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      # Every scanned step adds a delta: the first adds zeros (exact).
      carry, _ = block(cfg, self.quant, scanned=True, name="layers")((x, jnp.zeros_like(x)),
                                                                     positions)
    else:
      carry = (x, None)
      for i in range(cfg.num_layers):
        carry = block(cfg, self.quant, name=f"layers_{i}")(carry, positions)
    x, delta = carry
    norm = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype,
                   implementation=cfg.norm_implementation, name="norm")
    x = norm(x) if delta is None else norm(x, delta)[1]
    # The head runs in the compute dtype, accumulates in float32 and returns logits_dtype.
    logits = DenseGeneral(
        cfg.vocab_size,
        kernel_axes=("embed", "vocab"),
        init_std=cfg.init_std,
        dtype=dtype,
        param_dtype=param_dtype,
        out_dtype=jnp.dtype(cfg.logits_dtype),
        name="lm_head",
    )(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def abstract_variables(
    config: LlamaConfig | str, quant: QuantConfig | None = None, batch: int = 1, length: int = 8
):
  """Shapes/dtypes (boxed with logical axis names) of `Llama.init`, nothing allocated."""
  config = get_config(config)
  model = Llama(config, quant=quant)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)


def stack_layers(params: dict) -> dict:
  """Unboxed parameters of `layers_0` … `layers_<n-1>` → the `scan_layers` layout.

  The blocks become one `layers` subtree whose leaves are stacked on a new leading axis,
  in layer order; every other entry is kept as is.
  """
  names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k[7:]))
  rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
  return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in names])}


def unstack_layers(params: dict) -> dict:
  """The inverse of `stack_layers`: `layers` (leading axis L) → `layers_0` … `layers_<L-1>`."""
  layers = params["layers"]
  n = jax.tree.leaves(layers)[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "layers"}
  return {**rest, **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}}


def count_params(config: LlamaConfig | str, *, exclude_embedding: bool = False) -> int:
  """Number of parameters of `Llama(config)`, counted from `jax.eval_shape` of its init.

  With `exclude_embedding`, the input embedding table (a lookup, no FLOPs) is left
  out; the untied output head is always counted.
  """
  params = nn.meta.unbox(abstract_variables(config)["params"])
  if exclude_embedding:
    params = {k: v for k, v in params.items() if k != "embed_tokens"}
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def flops_per_token(config: LlamaConfig | str, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token: 6·N + 12·L·d·T (PaLM's convention)."""
  config = get_config(config)
  return config.flops_per_token(seq_len, count_params(config, exclude_embedding=True))
