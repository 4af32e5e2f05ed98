"""What defines a `gsparse compare` run besides the compressor (`Settings`,
saved with its checkpoints) and the optax transformation it trains with."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import optax

import gsparse_jax as gs

AXIS = "workers"

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What defines a run besides the compressor (all saved with checkpoints).

  Attributes mirror the options of `gsparse compare`; ``batch_size`` is
  per worker and micro-batch, ``steps`` counts optimizer steps.
  """

  task: str
  ratio: float
  feedback: str
  granularity: str
  batch_size: int
  lr: float
  optimizer: str
  workers: int
  seed: int
  accumulate: int
  simulate: bool
  eval_every: int
  # DiLoCo (--diloco H): local steps, the compressed pseudo-gradient every
  # `sync_every` steps; None: data parallelism (every step communicates).
  sync_every: Optional[int] = None
  outer_lr: float = 0.7
  outer_momentum: float = 0.9
  # sparsify's dense warm-up steps (DiLoCo: syncs) and, when set, the
  # `gs.small_or_vector_leaves` size under which leaves are kept dense.
  warmup_steps: int = 0
  keep_dense: Optional[int] = None


def keep_dense(settings: Settings):
  """sparsify's ``keep_dense`` for ``settings`` (None: every leaf
  compressed)."""
  if settings.keep_dense is None:
    return None
  return gs.small_or_vector_leaves(settings.keep_dense)


def outer_optimizer(settings: Settings) -> optax.GradientTransformation:
  """DiLoCo's outer optimizer: SGD, Nesterov momentum unless it is 0."""
  momentum = settings.outer_momentum or None
  return optax.sgd(settings.outer_lr, momentum=momentum,
                   nesterov=momentum is not None)


def make_tx(compressor: gs.Compressor, settings: Settings
            ) -> optax.GradientTransformation:
  """``optax.chain(gs.sparsify(...), optimizer)``, accumulated if asked;
  under DiLoCo ``gs.diloco(optimizer, outer, compressor=...)``."""
  optimizer = OPTIMIZERS[settings.optimizer](settings.lr)
  if settings.sync_every is not None:
    return gs.diloco(optimizer, outer_optimizer(settings),
                     sync_every=settings.sync_every, compressor=compressor,
                     feedback=settings.feedback, axis_name=AXIS,
                     granularity=settings.granularity,
                     warmup_steps=settings.warmup_steps)
  tx = optax.chain(
      gs.sparsify(compressor, feedback=settings.feedback, axis_name=AXIS,
                  granularity=settings.granularity,
                  warmup_steps=settings.warmup_steps,
                  keep_dense=keep_dense(settings)),
      optimizer)
  return (gs.multi_steps(tx, settings.accumulate) if settings.accumulate > 1
          else tx)
