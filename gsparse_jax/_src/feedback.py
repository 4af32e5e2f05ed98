"""Error-feedback rules: what each worker compresses and what it remembers.

Each rule works on one flat float32 segment of one worker and is split in two
halves around the communication: `prepare` gives the vector to compress,
`finish` takes the payload that was sent and the aggregated mean and gives
the transformation's output plus the new memories.

* ``"none"``: compress the gradient; out = mean of what was sent.
* ``"ef"`` (EF14; Stich, Cordonnier, Jaggi 2018): ``a = e + g``, send
  ``C(a)``, ``e <- a - C(a)``; out = mean of what was sent.
* ``"ef21"`` (Richtarik, Sokolov, Fatkhullin 2021): ``c = C(g - h_i)``,
  ``h_i <- h_i + c``, ``h <- h + mean(c)``; out = ``h``.
* ``"ef21m"`` (EF21-SGDM; Fatkhullin, Tyurin, Richtarik 2023): first
  ``v <- momentum * v + (1 - momentum) * g``, then EF21 on ``v``.

Worker memories start at zero (so EF21's first step sends ``C(g_0)``, where the
reference ARC-Top-K code starts from one dense all-reduce of ``g_0``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gsparse_jax._src import payload as payload_lib

FEEDBACKS = ("none", "ef", "ef21", "ef21m")


class EF21Memory(NamedTuple):
  """EF21 worker memory: ``h_i``, this worker's running estimate."""
  estimate: jax.Array


class EF21MMemory(NamedTuple):
  """EF21-SGDM worker memory: momentum ``v_i`` and estimate ``h_i``."""
  momentum: jax.Array
  estimate: jax.Array


def init_memory(feedback: str, size: int) -> tuple[Any, Any]:
  """(per-worker memory, memory shared by all workers) for one segment."""
  zeros = lambda: jnp.zeros((size,), jnp.float32)
  if feedback == "none":
    return (), ()
  if feedback == "ef":
    return zeros(), ()
  if feedback == "ef21":
    return EF21Memory(zeros()), zeros()
  return EF21MMemory(zeros(), zeros()), zeros()


def prepare(feedback: str, grad: jax.Array, memory: Any, momentum: float
            ) -> tuple[jax.Array, Any]:
  """The vector this worker compresses, and its memory updated so far."""
  if feedback == "none":
    return grad, memory
  if feedback == "ef":
    return memory + grad, memory
  if feedback == "ef21":
    return grad - memory.estimate, memory
  velocity = momentum * memory.momentum + (1.0 - momentum) * grad
  return velocity - memory.estimate, memory._replace(momentum=velocity)


def finish(feedback: str, compressed: jax.Array, sent: payload_lib.Payload,
           mean: jax.Array, memory: Any, shared: Any
           ) -> tuple[jax.Array, Any, Any]:
  """(output, new worker memory, new shared memory) after communication.

  Args:
    feedback: one of `FEEDBACKS`.
    compressed: the vector `prepare` returned (what was compressed).
    sent: this worker's payload.
    mean: the aggregated mean over workers of what was sent.
    memory: this worker's memory after `prepare`.
    shared: the memory identical on every worker (EF21's ``h``).
  """
  if feedback == "none":
    return mean, memory, shared
  if feedback == "ef":
    return mean, payload_lib.add_sent(compressed, sent, -1.0), shared
  estimate = payload_lib.add_sent(memory.estimate, sent, 1.0)
  new_shared = shared + mean
  return new_shared, memory._replace(estimate=estimate), new_shared
