"""Approximate Top-k on `jax.lax.approx_max_k` (fast on TPU).

On TPU, `approx_max_k` runs a partial reduction that is much faster than an
exact top-k, at the price of missing some of the true top entries (on
average a fraction ``1 - recall_target``). On CPU and GPU XLA computes it
exactly. Misses are harmless with error feedback: they stay in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import validation
from gsparse_jax._src import wire


@dataclasses.dataclass(frozen=True)
class ApproxTopK(compressors.Compressor):
  """Approximate Top-k (see `approx_top_k`)."""

  ratio: float = 0.01
  recall_target: float = 0.95

  def budget(self, size):
    return wire.budget(self.ratio, size)

  def select(self, x, state, context):
    del state
    k = self.budget(x.shape[0])
    _, indices = jax.lax.approx_max_k(
        jnp.abs(x), k, recall_target=self.recall_target)
    return payload_lib.sparse_payload(x, indices, k, context.value_dtype)


def approx_top_k(ratio: float, *, recall_target: float = 0.95) -> ApproxTopK:
  """Approximate Top-k: ``k`` large-magnitude entries by `lax.approx_max_k`.

  Args:
    ratio: fraction of entries kept, in (0, 1]; ``k = max(1, round(ratio*d))``.
    recall_target: expected fraction of the true Top-k found, in (0, 1]
      (honoured on TPU; exact elsewhere).

  Returns:
    A `Compressor` sending exactly ``k`` distinct entries.

  Example:
    >>> import jax, jax.numpy as jnp, gsparse_jax as gs
    >>> c = gs.approx_top_k(0.5)
    >>> p = gs.compress(c, jnp.array([0.1, -3.0, 2.0, 0.5]), c.init(4),
    ...                 jax.random.key(0))
    >>> sorted(p.indices.tolist())
    [1, 2]

  Reference: Chern, Hechtman, Davis, Guo, Majnemer, Kumar, "TPU-KNN: K
  nearest neighbor search at peak FLOP/s", 2022 (arXiv 2206.14286,
  `approx_max_k`); Top-k with memory: Stich, Cordonnier, Jaggi, "Sparsified
  SGD with Memory", 2018 (arXiv 1809.07599).
  """
  ratio = validation.ratio(ratio)
  recall_target = validation.ratio(recall_target, "recall_target")
  return ApproxTopK(ratio=ratio, recall_target=recall_target)
