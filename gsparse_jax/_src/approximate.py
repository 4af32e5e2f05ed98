"""Approximate Top-k on `jax.lax.approx_max_k` (fast on TPU).

On TPU, `approx_max_k` runs a partial reduction that is much faster than an
exact top-k, at the price of missing some of the true top entries (on
average a fraction ``1 - recall_target``). On CPU and GPU XLA computes it
exactly. Misses are harmless with error feedback: they stay in memory.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib


@dataclasses.dataclass(frozen=True)
class ApproxTopK(compressors.Compressor):
  """Approximate Top-k (see `approx_top_k`)."""

  ratio: float = 0.01
  recall_target: float = 0.95

  def budget(self, size):
    return compressors.budget_from(self.ratio, None, size)

  def select(self, x, state, key, axis_name):
    del state, key, axis_name
    k = self.budget(x.shape[0])
    _, indices = jax.lax.approx_max_k(
        jnp.abs(x), k, recall_target=self.recall_target)
    return payload_lib.sparse_payload(x, indices, k, x.dtype)


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
  nearest neighbor search at peak FLOP/s", 2022 (`approx_max_k`); Top-k with
  memory: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", 2018.
  """
  ratio = compressors.check_ratio(ratio)
  if (isinstance(recall_target, bool)
      or not isinstance(recall_target, numbers.Real)
      or not 0.0 < float(recall_target) <= 1.0):
    raise ValueError("`recall_target` must be a number in (0, 1], got "
                     f"{recall_target!r}.")
  return ApproxTopK(ratio=ratio, recall_target=float(recall_target))
