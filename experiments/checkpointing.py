"""Checkpoints with an orbax ``CheckpointManager``: the train state plus the loader position.

One checkpoint = ``state`` (params, optimizer state with its masks, counters and scalars, the
step and the PRNG key, saved as sharded arrays) + ``data`` (the loader's JSON position).
Orbax writes into a temporary directory and renames it when complete, so an interrupted save
never looks like a checkpoint; only the newest ``keep`` are kept. Saves are asynchronous: the
loop keeps training while the arrays are written.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


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
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=ocp.args.JsonSave(data_state),
    ))

  def restore(self, abstract_state, step: int | None = None):
    """Restores into the shardings of ``abstract_state`` (a tree of ShapeDtypeStruct)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
    ))
    return step, restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) describing ``tree``: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
