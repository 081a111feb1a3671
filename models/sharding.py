"""Logical axis names of the LLaMA parameters and activations, and their default mesh mapping.

Every parameter and activation of `models.Llama` carries logical axis names; the
trainer maps them to mesh axes with `flax.linen` logical partitioning, e.g.

    with mesh, nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
      specs = nn.get_partition_spec(abstract_variables)   # logical names
      shardings = nn.logical_to_mesh_sharding(specs, mesh, DEFAULT_LOGICAL_AXIS_RULES)

Names: `vocab`, `embed`, `mlp`, `heads`, `kv` (per-head features), `norm` (RMSNorm
scales), `layers` (the stacked axis of `LlamaConfig.scan_layers`) on parameters; `batch`,
`length`, `embed`, `heads`, `kv`, `mlp`, `vocab` on activations.
"""

from __future__ import annotations

# Mesh axes: "data" (pure data parallel), "fsdp" (data parallel with parameters,
# gradients and optimizer state sharded), "tensor" (tensor/model parallel).
MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# A mesh axis is used at most once per array: Flax takes the rules in order and
# skips a mesh axis already taken. So the activation (batch, length, embed) gets
# batch → (data, fsdp) and embed → replicated, while the (embed, mlp) kernel gets
# embed → fsdp, mlp → tensor.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # the stacked axis of `LlamaConfig.scan_layers`: never sharded
)

LOGICAL_AXIS_NAMES: tuple[str, ...] = tuple(name for name, _ in DEFAULT_LOGICAL_AXIS_RULES)
