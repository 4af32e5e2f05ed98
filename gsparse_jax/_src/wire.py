"""Sizes on the wire: budgets, row shapes, index bytes and collectives.

One home for the arithmetic that the compressors, the statistics and the
cost model must agree on. A compressor declares what one worker puts into
the collectives of one step as a tuple of `Collective` (static: it depends
only on the vector's size and dtype), so the byte statistics and the cost
model never need to know which compressor they count.

Example:
  >>> from gsparse_jax._src import wire
  >>> wire.budget(0.01, 1000)
  10
  >>> wire.total_bytes((wire.all_gather(10 * (4 + wire.INDEX_BYTES)),))
  80
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

INDEX_BYTES = 4  # indices travel as int32

ALL_REDUCE = "all_reduce"  # every worker contributes the same-shaped buffer
ALL_GATHER = "all_gather"  # every worker receives every worker's buffer
KINDS = (ALL_REDUCE, ALL_GATHER)


class Collective(NamedTuple):
  """One collective of a step, as one worker sees it.

  Attributes:
    kind: ``"all_reduce"`` or ``"all_gather"``.
    bytes: what this worker contributes (its buffer), in bytes.
  """

  kind: str
  bytes: int


def all_reduce(num_bytes: int) -> Collective:
  return Collective(ALL_REDUCE, int(num_bytes))


def all_gather(num_bytes: int) -> Collective:
  return Collective(ALL_GATHER, int(num_bytes))


def total_bytes(collectives: tuple[Collective, ...]) -> int:
  """Bytes one worker contributes over all of ``collectives``."""
  return sum(c.bytes for c in collectives)


def chunked_budget(ratio: Optional[float], size: int, chunk: int,
                   k: Optional[int] = None) -> int:
  """Values kept by a budget per chunk of ``chunk`` entries: `budget` of a
  chunk for each whole chunk, plus `budget` of the shorter last one."""
  whole, rest = divmod(size, chunk)
  return int(whole) * budget(ratio, chunk, k) + (
      budget(ratio, rest, k) if rest >= 1 else 0)


def budget(ratio: Optional[float], size: int, k: Optional[int] = None) -> int:
  """Values kept: ``k = max(1, round(ratio * size))`` (or ``k``), at most size.

  Args:
    ratio: the kept fraction (ignored when ``k`` is given).
    size: the vector's length (a float is fine for projections).
    k: an explicit count instead of a ratio.
  """
  if k is None:
    k = max(1, round(ratio * size))
  return int(min(k, size)) if size >= 1 else 0


def default_row_size(size: int) -> int:
  """About ``sqrt(size)`` entries per row: a square-ish matrix view."""
  return max(1, math.isqrt(max(int(size) - 1, 0)) + 1)


def num_rows(size: int, row_size: Optional[int] = None) -> int:
  """Rows of a vector viewed as rows of ``row_size`` (tail zero-padded)."""
  row_size = row_size or default_row_size(size)
  return -(-int(size) // int(row_size))


def packed_words(num_bits: int) -> int:
  """uint32 words that hold ``num_bits`` bits."""
  return -(-int(num_bits) // 32)
