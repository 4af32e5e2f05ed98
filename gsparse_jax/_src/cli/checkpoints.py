"""Orbax checkpoints of one `gsparse compare` run (one directory per run).

A checkpoint holds the whole NNX state and, as JSON, the step (the run's
data position), its curves, the wall time so far and its settings, so a
resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax

from gsparse_jax._src.cli.training import Curves


class Checkpoints:
  """The Orbax checkpoints of one run, in their own directory.

  Each checkpoint holds the NNX state (parameters and the whole optax state:
  every worker's error memory, compressor state and statistics) and, as
  JSON, the step, the curves, the wall time so far and the run's settings.

  Args:
    directory: where the run's checkpoints live (created on first save).
    every: save every this many steps (and at the last step).
    settings: the run's `Settings` (as a dict), saved to check a resume.
  """

  def __init__(self, directory: str, every: int, settings: dict):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    self._ocp, self.every, self.settings = ocp, every, settings
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2))

  def due(self, step: int, steps: int) -> bool:
    return step % self.every == 0 or step == steps

  def save(self, step: int, state, curves: Curves, wall_s: float) -> None:
    ocp = self._ocp
    # Copies: the run keeps appending to its curves while Orbax writes.
    meta = {"step": step, "wall_s": wall_s, "settings": dict(self.settings),
            "curves": {k: list(v) for k, v in curves._asdict().items()}}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def restore(self, like_state) -> tuple[Any, Curves, float, int]:
    """(state, curves, wall_s, step) of the latest checkpoint.

    ``like_state``: a state of the same structure, shapes and shardings.
    """
    ocp = self._ocp
    step = self.manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore()))
    meta = restored.meta
    return (restored.state, Curves(**meta["curves"]), meta["wall_s"],
            meta["step"])

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def read_checkpoint_meta(directory: str) -> Optional[dict]:
  """The JSON part of the latest checkpoint in ``directory`` (None if none).

  Reads only: used to check a ``--resume`` before anything is written.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta
  finally:
    manager.close()
