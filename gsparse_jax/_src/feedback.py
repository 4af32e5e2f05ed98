"""Error-feedback rules: what each worker compresses and what it remembers.

Each rule works on one flat float32 segment of one worker and is split in two
halves around the communication: `FeedbackRule.prepare` gives the vector to
compress, `FeedbackRule.finish` takes what was sent and the aggregated mean
and gives the transformation's output plus the new memories. Rules are
chosen by name in one place, `rule`.

* ``"none"``: compress the gradient; out = mean of what was sent.
* ``"ef"`` (EF14; Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory",
  2018, arXiv 1809.07599): ``a = e + g``, send ``C(a)``, ``e <- a - C(a)``;
  out = mean of what was sent.
* ``"ef21"`` (Richtarik, Sokolov, Fatkhullin, "EF21: A new, simpler,
  theoretically better, and practically faster error feedback", 2021, arXiv
  2106.05203): ``c = C(g - h_i)``, ``h_i <- h_i + c``, ``h <- h + mean(c)``;
  out = ``h``.
* ``"ef21m"`` (EF21-SGDM; Fatkhullin, Tyurin, Richtarik, "Momentum provably
  improves error feedback!", 2023, arXiv 2305.15155): first
  ``v <- momentum * v + (1 - momentum) * g``, then EF21 on ``v``.

A skipped step (a non-finite gradient somewhere) runs the same code: given
``applied`` false, `prepare` returns a finite vector and the memory as it
was, and `finish`, given a payload that stands for nothing (every slot
padding, `payload.masked`), leaves the worker memory bit for bit as it was,
so the step needs no select over the memory afterwards (which would keep the
old memory alive and make XLA copy the new one into place).

Worker memories start at zero (so EF21's first step sends ``C(g_0)``, where the
reference ARC-Top-K code starts from one dense all-reduce of ``g_0``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import pieces as pieces_lib


class EF21Memory(NamedTuple):
  """EF21 worker memory: ``h_i``, this worker's running estimate."""
  estimate: jax.Array


class EF21MMemory(NamedTuple):
  """EF21-SGDM worker memory: momentum ``v_i`` and estimate ``h_i``."""
  momentum: jax.Array
  estimate: jax.Array


@dataclasses.dataclass(frozen=True)
class FeedbackRule(abc.ABC):
  """One error-feedback rule, for one flat segment of one worker."""

  # Whether `prepare` and `finish` keep the worker memory of a skipped step
  # by themselves (given a masked payload); if not, `sparsify` restores it
  # with a select afterwards.
  skip_by_arithmetic: ClassVar[bool] = True

  @abc.abstractmethod
  def init(self, size: int) -> tuple[Any, Any]:
    """(per-worker memory, memory identical on all workers), float32."""

  @abc.abstractmethod
  def prepare(self, grad: pieces_lib.Pieces, memory: Any,
              applied: jax.Array) -> tuple[jax.Array, Any]:
    """(the vector to compress, this worker's memory updated so far).

    Args:
      grad: the segment's gradient, as its leaves' pieces (computed on with
        `Pieces.map`, so XLA never materializes the concatenated gradient).
      memory: this worker's memory, float32.
      applied: bool scalar; false in a skipped step, where (if
        `skip_by_arithmetic`) the vector must be finite and the memory
        returned is ``memory`` bit for bit.
    """

  @abc.abstractmethod
  def finish(self, accumulated: jax.Array,
             compressor: compressors.Compressor,
             sent: payload_lib.Payload, mean: jax.Array, memory: Any,
             shared: Any) -> tuple[jax.Array, Any, Any]:
    """(output, new worker memory, new shared memory) after communication.

    Args:
      accumulated: the vector `prepare` returned (what was compressed).
      compressor: the compressor that made ``sent`` (it knows what the
        payload stands for, densely).
      sent: this worker's payload.
      mean: the aggregated mean over workers of what was sent.
      memory: this worker's memory after `prepare`.
      shared: the memory identical on every worker (EF21's ``h``).
    """


def _zeros(size: int) -> jax.Array:
  return jnp.zeros((size,), jnp.float32)


class NoFeedback(FeedbackRule):
  """Compress the gradient itself; nothing is remembered."""

  def init(self, size):
    return (), ()

  def prepare(self, grad, memory, applied):
    # Nothing to keep; a skipped step's outputs are zeroed by `sparsify`.
    del applied
    return grad.vector(), memory

  def finish(self, accumulated, compressor, sent, mean, memory, shared):
    return mean, memory, shared


class ErrorFeedback(FeedbackRule):
  """EF14: compress ``e + g``, remember what was not sent."""

  def init(self, size):
    return _zeros(size), ()

  def prepare(self, grad, memory, applied):
    # Skipped: a = e, and finishing with nothing sent leaves e as it was.
    return grad.map(lambda g, e: jnp.where(applied, e + g, e),
                    memory), memory

  def finish(self, accumulated, compressor, sent, mean, memory, shared):
    return mean, compressor.add_sent(accumulated, sent, -1.0), shared


class EF21(FeedbackRule):
  """EF21: compress the change ``g - h_i``; every worker tracks ``h``."""

  def init(self, size):
    return EF21Memory(_zeros(size)), _zeros(size)

  def prepare(self, grad, memory, applied):
    return grad.map(lambda g, h: jnp.where(applied, g - h, 0.0),
                    memory.estimate), memory

  def finish(self, accumulated, compressor, sent, mean, memory, shared):
    estimate = compressor.add_sent(memory.estimate, sent, 1.0)
    new_shared = shared + mean
    return new_shared, memory._replace(estimate=estimate), new_shared


@dataclasses.dataclass(frozen=True)
class EF21M(EF21):
  """EF21-SGDM: EF21 on the momentum ``v <- b v + (1 - b) g``."""

  momentum: float = 0.9

  def init(self, size):
    return EF21MMemory(_zeros(size), _zeros(size)), _zeros(size)

  # The momentum of a skipped step is restored by a select afterwards:
  # folded into its arithmetic (per piece or not), XLA:CPU rounds
  # ``b v + (1 - b) g`` differently in the last bit of some entries.
  skip_by_arithmetic: ClassVar[bool] = False

  def prepare(self, grad, memory, applied):
    del applied
    velocity = (self.momentum * memory.momentum
                + (1.0 - self.momentum) * grad.vector())
    change = velocity - memory.estimate
    return change, memory._replace(momentum=velocity)


# The one place rules are chosen by name.
_RULES = {
    "none": lambda momentum: NoFeedback(),
    "ef": lambda momentum: ErrorFeedback(),
    "ef21": lambda momentum: EF21(),
    "ef21m": lambda momentum: EF21M(momentum=momentum),
}
FEEDBACKS = tuple(_RULES)


def rule(name: str, momentum: float = 0.9) -> FeedbackRule:
  """The `FeedbackRule` called ``name`` (one of `FEEDBACKS`)."""
  return _RULES[name](momentum)
