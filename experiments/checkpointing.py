"""Checkpoints with an orbax ``CheckpointManager``: the train state plus the loader position.

One checkpoint = ``state`` (params, optimizer state with its masks, counters and scalars, the
step and the PRNG key, saved as sharded arrays) + ``data`` (every host's loader position, as
JSON keyed by process index: each host reads its own shard, and orbax writes JSON from the
primary host only, so the positions are gathered to it first).
Orbax writes into a temporary directory and renames it when complete, so an interrupted save
never looks like a checkpoint; only the newest ``keep`` are kept. Saves are asynchronous: the
loop keeps training while the arrays are written.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import config


class Checkpointer:
  """Saves and restores ``(train_state, data_state)`` pairs under ``<save_dir>/checkpoints``."""

  def __init__(self, save_dir: str, *, keep: int):
    base = save_dir if "://" in save_dir else os.path.abspath(save_dir)  # gs://... as is
    self.directory = base.rstrip("/") + "/checkpoints"
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, train_state, data_state: dict) -> None:
    """``data_state`` is this host's loader position; all hosts call this together."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=ocp.args.JsonSave({"hosts": gather_host_states(data_state)}),
    ))

  def restore(self, abstract_state, step: int | None = None):
    """Restores into the shardings of ``abstract_state`` (a tree of ShapeDtypeStruct)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
    ))
    hosts = restored["data"]["hosts"]
    if len(hosts) != jax.process_count():  # each host's loader position is its own
      raise config.UsageError(
          f"error: {self.directory} step {step} was saved by {len(hosts)} process(es), this "
          f"run has {jax.process_count()}; resume it with {len(hosts)}")
    return step, restored["state"], hosts[str(jax.process_index())]

  def restore_params(self, step: int | None = None) -> dict:
    """Only the parameters of checkpoint ``step`` (default: the latest) as host NumPy arrays,
    in their saved dtypes; the optimizer state is not read (orbax partial restore)."""
    step = self.latest_step() if step is None else step
    path = f"{self.directory}/{step}/state"
    reader = ocp.PyTreeCheckpointer()
    meta = reader.metadata(path)
    meta = getattr(meta, "item_metadata", meta)  # StepMetadata in newer orbax
    meta = getattr(meta, "tree", meta)
    target = {"params": jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
      args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                    partial_restore=True)
    except TypeError:  # an orbax without partial restore: read everything, keep the params
      return jax.tree.map(np.asarray, reader.restore(path)["params"])
    return reader.restore(path, args=args)["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) describing ``tree``: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def gather_host_states(data_state: dict) -> dict[str, dict]:
  """Every host's JSON-able ``data_state``, keyed by process index (a collective)."""
  if jax.process_count() == 1:
    return {"0": data_state}
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  blob = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(blob.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return {str(i): json.loads(blobs[i, :n].tobytes().decode()) for i, n in enumerate(sizes)}
