"""The device mesh and how the train state and batches are laid out on it.

One ``jax.sharding.Mesh`` with axes ``data`` (replicas), ``fsdp`` (replicas whose parameters,
gradients and optimizer moments are sharded) and ``tensor`` (size 1 unless asked for). The
model names every parameter axis (``embed``, ``mlp``, ``heads``, ...); ``models`` maps those
names to mesh axes, and the optimizer state follows the parameter it belongs to. Batches are
split over ``data`` and ``fsdp`` together.
"""
from __future__ import annotations

import os
import re

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import models
from models.sharding import MESH_AXES
from spam_optax._tree_util import path_names

BATCH_AXES = ("data", "fsdp")
# jax.set_mesh (the mesh context of the trainer and the benchmarks) is in jax 0.7.1 and later;
# pyproject.toml's `train` extra asks for it. Checked when this module is imported, so the
# parts of experiments/ that need no mesh (bench_optimizer, bench_model) are not refused.
MIN_JAX = (0, 7, 1)


def check_jax_version(version: str) -> None:
  """Raises ImportError, one line, for a jax older than :data:`MIN_JAX`."""
  parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
  if parts < MIN_JAX:
    need = ".".join(map(str, MIN_JAX))
    raise ImportError(f"the trainer needs jax>={need} (jax.set_mesh); installed jax "
                      f"{version}: pip install -U 'jax>={need}' (or the project's [train] extra)")


check_jax_version(jax.__version__)


def _launched_multi_host(env) -> bool:
  """Signs of a multi-process launch that JAX's cluster detection understands."""
  return ("JAX_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def maybe_initialize_distributed(requested: bool) -> None:
  """``jax.distributed.initialize()`` for multi-host runs: with ``--distributed``, or when the
  environment shows a multi-process launch (SLURM, Open MPI, TPU worker list, or explicit
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``).

  On a Cloud TPU pod slice and under SLURM, JAX discovers the coordinator itself.
  """
  env = os.environ
  if not (requested or _launched_multi_host(env)):
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def parse_mesh(spec: str | None, n_devices: int) -> dict[str, int]:
  """``"data=4,fsdp=2"`` -> sizes per axis; omitted axes are 1, ``data`` takes the rest.

  A mesh may use fewer devices than a single host has (handy for comparisons); a multi-host
  mesh must use them all.
  """
  sizes = {}
  for part in (spec or "").split(","):
    if not part.strip():
      continue
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in MESH_AXES or not value.strip().lstrip("-").isdigit() or int(value) < 1:
      raise SystemExit(f"error: bad --mesh entry {part!r}; expected e.g. data=4,fsdp=2 "
                       f"with axes {', '.join(MESH_AXES)}")
    sizes[name] = int(value)
  if "data" not in sizes:
    rest = n_devices // int(np.prod([sizes.get(a, 1) for a in MESH_AXES if a != "data"]))
    sizes["data"] = max(rest, 1)
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  needed = int(np.prod(list(sizes.values())))
  if needed > n_devices or (jax.process_count() > 1 and needed != n_devices):
    raise SystemExit(f"error: --mesh {spec} needs {needed} devices, {n_devices} are available")
  return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """The mesh over the first data x fsdp x tensor devices (all of them, unless asked).

  ``devices``: these instead of ``jax.devices()`` (e.g. a described GPU to compile for).
  """
  n = int(np.prod([sizes[a] for a in MESH_AXES]))
  devices = jax.devices() if devices is None else list(devices)
  devices = np.asarray(devices[:n]).reshape([sizes[a] for a in MESH_AXES])
  return Mesh(devices, MESH_AXES)


def batch_parallelism(sizes: dict[str, int]) -> int:
  return sizes["data"] * sizes["fsdp"]


def param_shardings(boxed_abstract_params, mesh: Mesh,
                    rules=models.DEFAULT_LOGICAL_AXIS_RULES):
  """NamedShardings for the (unboxed) parameter tree from its logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def follow_params(tree, params, shardings, mesh: Mesh):
  """Shardings for ``tree`` (an optimizer state): a leaf whose key path ends with a parameter's
  path and has its shape takes that parameter's sharding; everything else (counters, scalars,
  compacted sparse moments) is replicated."""
  by_path = {}
  for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(shardings)):
    by_path[path_names(path)] = (p.shape, s)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    key = path_names(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == getattr(leaf, "shape", None):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def train_state_shardings(model, init_fn, example_tokens, mesh: Mesh, rules):
  """Shardings of the train state ``{step, params, rng, opt_state}`` built by ``init_fn``.

  Parameters by their logical axis names, each optimizer-state leaf like the parameter it
  follows, counters and the PRNG key replicated. Returns ``(param_shardings,
  state_shardings, abstract_state)``; call inside ``nn.logical_axis_rules(rules)``.
  """
  replicated = NamedSharding(mesh, P())
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), example_tokens))["params"]
  params = param_shardings(boxed, mesh, rules)
  # The trainer seeds its state with a raw uint32 key (`jax.random.PRNGKey`), not a typed
  # one: the key is checkpointed, orbax-checkpoint 0.11 cannot save typed key arrays, and
  # existing checkpoints hold uint32[2]. The abstract state must hold the same kind of key.
  # Its shape only: no array is made, so this also works for devices only described.
  abstract = jax.eval_shape(init_fn, jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  state = {
      "step": replicated, "params": params, "rng": replicated,
      "opt_state": follow_params(abstract["opt_state"], abstract["params"], params, mesh),
  }
  return params, state, abstract


def train_batch_sharding(mesh: Mesh) -> NamedSharding:
  """(accumulation steps, rows, length): rows over data x fsdp."""
  return NamedSharding(mesh, P(None, BATCH_AXES, None))


def eval_batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def to_global(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
  """Assembles every host's rows into one global array (a no-op copy on one host)."""
  return jax.make_array_from_process_local_data(sharding, local, global_shape)
