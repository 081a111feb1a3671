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
from spam_optax._tree_util import path_names


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
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
      ))
    except ValueError as e:
      differs = self._structure_difference(step, abstract_state)
      if differs is None:
        raise
      raise config.UsageError(
          f"error: {self.directory} step {step} holds a train state of another structure "
          f"than this run's ({differs}): the optimizer state's layout changed since it was "
          "written. Start a new --save_dir, or continue from its parameters: "
          "python -m experiments.export_hf RUN OUT, then --init_from_hf OUT") from e
    hosts = restored["data"]["hosts"]
    if len(hosts) != jax.process_count():  # each host's loader position is its own
      raise config.UsageError(
          f"error: {self.directory} step {step} was saved by {len(hosts)} process(es), this "
          f"run has {jax.process_count()}; resume it with {len(hosts)}")
    return step, restored["state"], hosts[str(jax.process_index())]

  def _state_metadata(self, step: int):
    """The saved train state's tree of array metadata (its structure, not its values)."""
    meta = ocp.PyTreeCheckpointer().metadata(f"{self.directory}/{step}/state")
    meta = getattr(meta, "item_metadata", meta)  # StepMetadata in newer orbax
    return getattr(meta, "tree", meta)

  def _structure_difference(self, step: int, abstract_state) -> str | None:
    """A leaf path the saved state and ``abstract_state`` do not share, or None."""
    def paths(tree):
      return {"/".join(path_names(p))
              for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    try:
      saved = paths(self._state_metadata(step))
    except Exception:  # pylint: disable=broad-except
      return None  # no readable metadata: leave orbax's own error
    wanted = paths(abstract_state)
    if saved == wanted:
      return None
    only_wanted, only_saved = sorted(wanted - saved), sorted(saved - wanted)
    if only_wanted:
      return f"this run has {only_wanted[0]}, the checkpoint does not"
    return f"the checkpoint has {only_saved[0]}, this run does not"

  def restore_params(self, step: int | None = None) -> dict:
    """Only the parameters of checkpoint ``step`` (default: the latest) as host NumPy arrays,
    in their saved dtypes; the optimizer state is not read (orbax partial restore)."""
    step = self.latest_step() if step is None else step
    path = f"{self.directory}/{step}/state"
    reader = ocp.PyTreeCheckpointer()
    meta = self._state_metadata(step)
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
