"""Fast exact top-k selection by magnitude.

`top_k_abs` returns the indices of the `k` entries of largest `|x|` of a flat
array, ties broken by lower index: the same set as
`jax.lax.top_k(jnp.abs(x), k)`. Two exact methods:

- ``"sort"``: `jax.lax.top_k` on `|x|`. Simple; on XLA:CPU it costs 4x to
  200x a plain read+write pass over `x` and grows quickly with `k`.
- ``"threshold"``: sampled-threshold selection, 0.3x to 1.2x that pass at
  d = 1e7, k = 1e4 to 1e6 (see ``benchmarks/selection.py``):

  1. The magnitude of rank `r` in a fixed random sample of 16k entries is a
     threshold `t0` that ~1.3 k entries pass (`threshold_plan` sets `r` and
     the buffer capacity from binomial margins).
  2. One pass over `x` packs the mask `|x| >= t0` into uint32 words.
  3. If between `k` and `capacity` entries pass, their indices (increasing)
     and magnitudes are compacted into a static `capacity`-sized buffer:
     a prefix sum of word popcounts, a histogram of word ends and a rank
     select inside each word; no pass over `x` and no sort.
  4. The exact k-th magnitude is found by bisection on the candidates, ties
     at it are taken in index order, and the chosen slots are compacted the
     same way into exactly `k` indices.

  When the sample misses, a `lax.cond` switches to a fallback that finds
  the k-th magnitude by counting passes over `x` (one pass for the common
  case of massive ties such as zeros, at most 31 otherwise) and builds a
  candidate set of at most `capacity` entries from it, so the result is
  always exact and every shape static.

Both are pure JAX without collectives and run under `jax.jit`, `jax.vmap`
(the threshold kernel maps over the batch, see `threshold_kernel.threshold_kernel`),
`jax.pmap` and `jax.shard_map`.

The plan of the sampled-threshold method (its sizes, and the choice of
method) is in `selection_plan`; the kernel in `threshold_kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gsparse_jax._src import threshold_kernel as kernels
from gsparse_jax._src.selection_plan import _check_k
from gsparse_jax._src.selection_plan import METHODS  # pylint: disable=unused-import
from gsparse_jax._src.selection_plan import resolve_method
from gsparse_jax._src.selection_plan import threshold_plan
from gsparse_jax._src.selection_plan import ThresholdPlan  # pylint: disable=unused-import


def top_k_abs(x: jax.Array, k: int, method: str = "sort") -> jax.Array:
  """Indices of the `k` entries of largest magnitude of a 1-D array.

  Ties are broken by lower index, so every method returns the same set as
  `jax.lax.top_k(jnp.abs(x), k)`. The order of the returned indices is
  unspecified; treat them as a set.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([0.5, -3.0, 1.0, 3.0])
    >>> sorted(top_k_abs(x, 2, method="threshold").tolist())
    [1, 3]

  Args:
    x: 1-D floating-point array. Non-finite values are not supported.
    k: static number of entries to select, `1 <= k <= x.size`.
    method: `"sort"` (`jax.lax.top_k` on `|x|`), `"threshold"` (sampled
      threshold with exact finish, see the module docstring) or `"auto"`
      (whichever is faster for this size and `k` on XLA:CPU).

  Returns:
    int32 array of shape `(k,)`.

  Raises:
    ValueError: if `method` is unknown, `x` is not 1-D or `k` is out of range.
  """
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"x must be a 1-D array, got shape {x.shape}.")
  size = x.shape[0]
  _check_k(size, k)
  method = resolve_method(method, size, k, x.dtype)
  if k == size:
    return jnp.arange(size, dtype=jnp.int32)
  # Selection is not differentiable; zero tangents keep autodiff of callers
  # away from the custom batching rule below.
  x = lax.stop_gradient(x)
  if method == "sort":
    return kernels.sort_kernel(x, k)
  # bfloat16 / float16 widen exactly, so every float dtype shares one kernel.
  kernel = kernels.threshold_kernel(threshold_plan(size, k))
  return kernel(x.astype(jnp.float32))[0]


def kth_largest_abs(x: jax.Array, k: int, method: str = "auto") -> jax.Array:
  """The `k`-th largest magnitude of a 1-D array (`k = 1` is `max |x|`).

  Args:
    x: 1-D floating-point array.
    k: static rank, `1 <= k <= x.size`.
    method: as in `top_k_abs`.

  Returns:
    A scalar of the dtype of `x`.
  """
  x = jnp.asarray(x)
  indices = top_k_abs(x, k, method)
  return jnp.min(jnp.abs(x[indices]))


def count_at_least(x: jax.Array, threshold: jax.Array, *,
                   strict: bool = False) -> jax.Array:
  """Number of entries with ``|x| >= threshold`` (``>`` if ``strict``).

  One fast pass over ``x`` (no boolean reduction, no ``|x|`` temporary).

  Example:
    >>> import jax.numpy as jnp
    >>> int(count_at_least(jnp.array([0.5, -2.0, 1.0]), 1.0))
    2

  Args:
    x: 1-D float array of at most 32 bits.
    threshold: float scalar (may be traced).
    strict: compare with ``>`` instead of ``>=``.

  Returns:
    int32 scalar.
  """
  return kernels.count_ge(x, kernels.threshold_bits(threshold, strict))


def compact_at_least(x: jax.Array, threshold: jax.Array, capacity: int, *,
                     strict: bool = False) -> tuple[jax.Array, jax.Array]:
  """Indices of the entries with ``|x| >= threshold``, in a fixed buffer.

  One pass over ``x`` packs the passing entries into bit words; the indices
  are then extracted from the ~``d/32`` words only, never with a full-size
  `nonzero` or prefix sum.

  Example:
    >>> import jax.numpy as jnp
    >>> idx, n = compact_at_least(jnp.array([0.5, -2.0, 1.0, 3.0]), 1.0, 2)
    >>> idx.tolist(), int(n)
    ([1, 2], 3)

  Args:
    x: 1-D float array of at most 32 bits.
    threshold: float scalar (may be traced).
    capacity: static number of slots.
    strict: compare with ``>`` instead of ``>=``.

  Returns:
    ``(indices, passed)``: int32 ``(capacity,)`` indices of the first
    ``min(passed, capacity)`` passing entries in increasing order, padded
    with ``x.size``; and the int32 number of entries that passed (which may
    exceed ``capacity``).
  """
  size = x.shape[0]
  words = kernels.pack_words(x, kernels.threshold_bits(threshold, strict))
  passed = kernels.total_popcount(words)
  valid = jnp.arange(capacity, dtype=jnp.int32) < passed
  return jnp.where(valid, kernels.unpack_words(words, capacity), size), passed


def chunked_top_k_abs(x: jax.Array, chunk: int, k_of) -> jax.Array:
  """Indices of the entries of largest ``|x|`` within each chunk.

  ``x`` is cut into chunks of ``chunk`` consecutive entries (the last one
  may be shorter); chunk ``c`` keeps its ``k_of(len(c))`` largest, ties to
  the lower index (`jax.lax.top_k` per row: chunks are short).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([3.0, -1.0, 0.5, -4.0, 2.0])
    >>> chunked_top_k_abs(x, 2, lambda n: 1).tolist()
    [0, 3, 4]

  Returns:
    int32 indices, in increasing chunk order.
  """
  x = lax.stop_gradient(jnp.asarray(x))
  size = x.shape[0]
  whole = size // chunk
  parts = []
  if whole:
    rows = jnp.abs(x[:whole * chunk].reshape(whole, chunk))
    picked = lax.top_k(rows, k_of(chunk))[1]
    offsets = jnp.arange(whole, dtype=jnp.int32)[:, None] * chunk
    parts.append((picked.astype(jnp.int32) + offsets).reshape(-1))
  if size - whole * chunk:
    tail = jnp.abs(x[whole * chunk:])
    parts.append(lax.top_k(tail, k_of(tail.shape[0]))[1].astype(jnp.int32)
                 + whole * chunk)
  return jnp.concatenate(parts)
