"""The static plan of exact top-k selection: which method, and the sizes of
the sampled-threshold kernel (`threshold_kernel`) for one `(size, k)`.

Everything here is Python on static sizes: no array is touched.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

METHODS = ("auto", "sort", "threshold")

# Sampled-threshold tuning. A sample of `_SAMPLE_SIZE` magnitudes; the
# threshold sits `_MARGIN_SIGMAS` binomial standard deviations below the
# estimated k-th magnitude so that fewer than k candidates pass with
# probability ~3e-5; the buffer holds that many more standard deviations.
_SAMPLE_SIZE = 16384
_MARGIN_SIGMAS = 4.0
_WORD_BITS = 32
# Rows of this many elements for counting reductions (see
# `threshold_kernel`).
_ROW = 32
# Word arrays cover whole rows of `_ROW` words (`_ALIGN` entries), and the
# candidate capacity is a multiple of it: no word-level array then needs a
# pad, which XLA:CPU fuses badly into the reductions that follow.
_ALIGN = _WORD_BITS * _ROW
# `auto` picks the threshold method from `_AUTO_MIN_SIZE` entries on when
# k >= `_AUTO_MIN_K`, and for every k from `_AUTO_ANY_K_SIZE` entries on.
_AUTO_MIN_SIZE = 1 << 15
_AUTO_MIN_K = 1 << 11
_AUTO_ANY_K_SIZE = 1 << 19


class ThresholdPlan(NamedTuple):
  """Static sizes of the sampled-threshold selection for one `(size, k)`.

  Attributes:
    size: number of entries of the input.
    k: number of entries selected.
    sample_size: number of magnitudes sampled (with replacement).
    sample_rank: 1-based rank, counted from the largest, of the sampled
      magnitude used as the candidate threshold.
    capacity: size of the candidate buffer; more candidates than this take
      the fallback path.
  """

  size: int
  k: int
  sample_size: int
  sample_rank: int
  capacity: int


def threshold_plan(
    size: int,
    k: int,
    *,
    sample_size: int = _SAMPLE_SIZE,
    margin_sigmas: float = _MARGIN_SIGMAS,
) -> ThresholdPlan:
  """Chooses the threshold rank and buffer capacity for sampled selection.

  With a sample of `s` magnitudes, about `m = k * s / size` sampled values lie
  above the true k-th magnitude, with a binomial spread of `sqrt(m)`. Taking
  the sampled value of rank `r = m + margin * sqrt(m) + 1` as threshold makes
  at least `k` entries pass with high probability; about `r * size / s` pass
  on average and the capacity adds `margin * sqrt(r)` ranks on top.

  Args:
    size: number of entries of the input.
    k: number of entries to select, `1 <= k <= size`.
    sample_size: number of magnitudes to sample.
    margin_sigmas: safety margin in binomial standard deviations.

  Returns:
    A `ThresholdPlan`.
  """
  _check_k(size, k)
  sample_size = int(max(1, sample_size))
  expected_rank = k * sample_size / size
  rank = math.ceil(
      expected_rank + margin_sigmas * math.sqrt(expected_rank) + 1)
  rank = min(sample_size, rank)
  capacity = math.ceil(
      (rank + margin_sigmas * math.sqrt(rank) + 1) * size / sample_size)
  # A multiple of `_ALIGN` keeps the candidate words free of padding.
  capacity = _round_up(max(k, min(size, capacity)), _ALIGN)
  return ThresholdPlan(size, k, sample_size, rank, capacity)



def resolve_method(method: str, size: int, k: int, dtype=jnp.float32) -> str:
  """Validates `method` and turns `"auto"` into `"sort"` or `"threshold"`.

  `"auto"` follows timings on XLA:CPU (2 cores; ``benchmarks/selection.py``):
  the threshold kernel has a fixed cost of ~0.6 ms, while `lax.top_k` grows
  with both the size and `k`; the threshold wins from ~32k entries once `k`
  reaches a few thousand, and at every `k` from ~0.5M entries.

  Args:
    method: `"auto"`, `"sort"` or `"threshold"`.
    size: number of entries of the input.
    k: number of entries selected.
    dtype: dtype of the input; the threshold kernel handles floats of at most
      32 bits, other dtypes always use the sort.

  Returns:
    `"sort"` or `"threshold"`.

  Raises:
    ValueError: if `method` is not one of the allowed values.
  """
  if method not in METHODS:
    raise ValueError(
        f"method must be one of {METHODS}, got {method!r}.")
  if not _threshold_supports(dtype):
    return "sort"
  if method == "auto":
    use_threshold = size >= _AUTO_MIN_SIZE and (
        k >= _AUTO_MIN_K or size >= _AUTO_ANY_K_SIZE)
    return "threshold" if use_threshold else "sort"
  return method



def _threshold_supports(dtype) -> bool:
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize <= 4


def _check_k(size: int, k) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise ValueError(f"k must be a Python int, got {k!r}.")
  if not 1 <= k <= size:
    raise ValueError(
        f"k must satisfy 1 <= k <= x.size = {size}, got k = {k}.")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
