"""LLaMA in Flax Linen with Stable-SPAM's fake quantization (INT4/INT8/FP4).

    import models
    config = models.get_config("llama_60m")
    model = models.Llama(config, quant=models.QuantConfig(weight_bits=4))
"""

from models.attention import is_cudnn_attention_failure
from models.config import CONFIG_NAMES, CONFIGS, LlamaConfig, from_hf_json, get_config
from models.hf import from_hf_state_dict, load_pretrained, save_pretrained, to_hf_state_dict
from models.llama import (
    DecoderBlock,
    Llama,
    abstract_variables,
    count_params,
    flops_per_token,
    stack_layers,
    unstack_layers,
)
from models.loss import cross_entropy_loss, token_nll
from models.norm_kernels import is_pallas_failure
from models.quantization import QuantConfig, get_quant_config
from models.sharding import DEFAULT_LOGICAL_AXIS_RULES, LOGICAL_AXIS_NAMES, MESH_AXES

__all__ = [
    "CONFIG_NAMES",
    "CONFIGS",
    "DEFAULT_LOGICAL_AXIS_RULES",
    "DecoderBlock",
    "LOGICAL_AXIS_NAMES",
    "Llama",
    "LlamaConfig",
    "MESH_AXES",
    "QuantConfig",
    "abstract_variables",
    "count_params",
    "cross_entropy_loss",
    "flops_per_token",
    "from_hf_json",
    "from_hf_state_dict",
    "get_config",
    "get_quant_config",
    "is_cudnn_attention_failure",
    "is_pallas_failure",
    "load_pretrained",
    "save_pretrained",
    "stack_layers",
    "to_hf_state_dict",
    "token_nll",
    "unstack_layers",
]
