"""Compressors: pure selection functions on one flat vector.

A `Compressor` is a frozen, hashable description (safe as a static argument
and as a closure constant under `jax.jit`). Its `select` turns one worker's
flat float32 vector into a `Payload`; no compressor here talks to other
workers, except to agree on shared indices where its layout says so.

Example:
  >>> import jax, jax.numpy as jnp, gsparse_jax as gs
  >>> c = gs.top_k(k=2)
  >>> p = gs.compress(c, jnp.array([0.1, -3.0, 2.0, 0.5]), c.init(4),
  ...                 jax.random.key(0))
  >>> sorted(p.indices.tolist())
  [1, 2]
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp

from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import selection

Payload = payload_lib.Payload


def check_ratio(ratio: Any, name: str = "ratio") -> float:
  """Validates a kept fraction: a real number in (0, 1]."""
  if (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
      or not 0.0 < float(ratio) <= 1.0):
    raise ValueError(f"`{name}` must be a number in (0, 1], got {ratio!r}.")
  return float(ratio)


def check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
  if value not in allowed:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, allowed))}; "
        f"got {value!r}.")
  return value


def budget_from(ratio: Optional[float], k: Optional[int], size: int) -> int:
  """``k = max(1, round(ratio * size))`` (or the given ``k``), clamped to size."""
  if k is None:
    k = max(1, round(ratio * size))
  return int(min(k, size))


@dataclasses.dataclass(frozen=True)
class Compressor(abc.ABC):
  """Base class of every compressor.

  Subclasses set `layout` and implement `select`; those with per-worker state
  (RegTop-k) also override `init` and `update`.
  """

  @property
  def layout(self) -> str:
    return payload_lib.SPARSE

  @abc.abstractmethod
  def budget(self, size: int) -> int:
    """Number of values a worker aims to send for a vector of ``size``."""

  def capacity(self, size: int) -> int:
    """Static payload slots for a vector of ``size`` (default: the budget)."""
    return self.budget(size)

  def init(self, size: int) -> Any:
    """Per-worker compressor state for one flat vector of ``size``."""
    del size
    return ()

  @abc.abstractmethod
  def select(self, x: jax.Array, state: Any, key: jax.Array,
             axis_name: Optional[str]) -> Payload:
    """Compresses one worker's flat vector ``x``.

    Args:
      x: 1-D float array (the accumulated gradient of this worker).
      state: this worker's compressor state, as returned by `init`/`update`.
      key: a PRNG key identical on every worker for this step and vector.
      axis_name: the workers' mapped axis, or None for a single worker. Only
        compressors that agree on shared indices may use it.

    Returns:
      The `Payload` with values in ``x.dtype``.
    """

  def update(self, state: Any, sent: Payload, mean: jax.Array,
             num_workers: int) -> Any:
    """Next state, from what this worker sent and the aggregated mean."""
    del sent, mean, num_workers
    return state

  def for_shape(self, shape: tuple[int, ...]) -> "Compressor":
    """The compressor for a flat vector that is one tensor of ``shape``.

    `sparsify` calls it per leaf under ``granularity="layer"``, so
    compressors that view the vector as a matrix (ARC-Top-K's rows) can use
    the tensor's own shape. The default ignores the shape.
    """
    del shape
    return self


@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
  """Exact Top-k by magnitude; ties go to the lower index."""

  ratio: Optional[float] = None
  k: Optional[int] = None
  method: str = "auto"

  def budget(self, size):
    return budget_from(self.ratio, self.k, size)

  def select(self, x, state, key, axis_name):
    del state, key, axis_name
    k = self.budget(x.shape[0])
    indices = selection.top_k_abs(x, k, method=self.method)
    return payload_lib.sparse_payload(x, indices, k, x.dtype)


def uniform_subset(key: jax.Array, size: int, k: int) -> jax.Array:
  """``k`` distinct indices in ``[0, size)``, uniform over all k-subsets.

  Random numbers are the cost on CPU (~12 ns each here), so for ``k`` small
  against ``size`` only ``m`` (a little more than ``k``) indices are drawn
  with replacement and the first ``k`` distinct ones kept: sequential draws
  with duplicates rejected are exactly uniform sampling without
  replacement. ``m`` covers the expected duplicates with a wide margin; if
  it still falls short (probability far below 1e-9) the dense method runs.
  The dense method, the ``k`` largest of ``size`` i.i.d. uniforms, is used
  directly when ``k > size / 16``.

  Returns:
    int32 ``(k,)`` indices (order unspecified).
  """
  def dense_draw():
    priorities = jax.random.uniform(key, (size,), jnp.float32)
    return selection.top_k_abs(priorities, k, method="auto")

  if 16 * k > size:
    return dense_draw()
  expected_duplicates = k * k / (2.0 * size) * 1.1
  draws = k + int(expected_duplicates + 8.0 * expected_duplicates ** 0.5 + 32)
  candidates = jax.random.randint(key, (draws,), 0, size, jnp.int32)
  order = jnp.arange(draws, dtype=jnp.int32)
  # Stable sort by value: each value's first draw comes first among equals.
  values, positions = jax.lax.sort((candidates, order), num_keys=1,
                                   is_stable=True)
  first = jnp.concatenate([jnp.ones((1,), bool), values[1:] != values[:-1]])
  is_first_at = jnp.zeros((draws,), bool).at[positions].set(first)
  # The first k distinct draws, in draw order.
  kept = jnp.nonzero(is_first_at, size=k, fill_value=0)[0]
  enough = jnp.sum(is_first_at) >= k
  return jax.lax.cond(enough, lambda: candidates[kept], dense_draw)


@dataclasses.dataclass(frozen=True)
class RandK(Compressor):
  """``k`` entries drawn uniformly without replacement."""

  ratio: float = 0.01
  seed: int = 0
  shared: bool = True
  scale: bool = False

  @property
  def layout(self):
    return payload_lib.ALIGNED if self.shared else payload_lib.SPARSE

  def budget(self, size):
    return budget_from(self.ratio, None, size)

  def select(self, x, state, key, axis_name):
    del state
    size = x.shape[0]
    k = self.budget(size)
    key = jax.random.fold_in(key, self.seed)
    if not self.shared and axis_name is not None:
      key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    indices = uniform_subset(key, size, k)
    p = payload_lib.sparse_payload(x, indices, k, x.dtype, self.layout)
    if self.scale:
      p = dataclasses.replace(p, values=p.values * (size / k))
    return p


@dataclasses.dataclass(frozen=True)
class Dense(Compressor):
  """No compression: the whole vector (the baseline)."""

  @property
  def layout(self):
    return payload_lib.DENSE

  def budget(self, size):
    return size

  def select(self, x, state, key, axis_name):
    del state, key, axis_name
    return payload_lib.dense_payload(x, x.dtype)


def top_k(ratio: Optional[float] = None, *, k: Optional[int] = None,
          method: str = "auto") -> TopK:
  """Exact Top-k sparsifier: keeps the ``k`` entries of largest magnitude.

  Args:
    ratio: fraction of entries kept, in (0, 1]; ``k = max(1, round(ratio*d))``.
    k: the number kept instead of a ratio (clamped to the vector's length).
    method: ``"sort"`` (`jax.lax.top_k`), ``"threshold"`` (sampled-threshold
      exact selection, same result) or ``"auto"``.

  Returns:
    A `Compressor`.

  Example:
    >>> import gsparse_jax as gs
    >>> gs.top_k(0.01).budget(1000)
    10

  Reference: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", 2018.
  """
  if (ratio is None) == (k is None):
    raise ValueError("top_k needs exactly one of `ratio` (in (0, 1]) or `k` "
                     f"(an integer >= 1); got ratio={ratio!r}, k={k!r}.")
  if ratio is not None:
    ratio = check_ratio(ratio)
  elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"`k` must be an integer >= 1, got {k!r}.")
  else:
    k = int(k)
  check_choice(method, "method", selection.METHODS)
  return TopK(ratio=ratio, k=k, method=method)


def rand_k(ratio: float, *, seed: int = 0, shared: bool = True,
           scale: bool = False) -> RandK:
  """Random-k sparsifier: ``k`` uniformly drawn entries, fresh each step.

  Args:
    ratio: fraction of entries kept, in (0, 1].
    seed: integer seed; the draw also depends on the step count.
    shared: if True every worker draws the same indices, so aggregation is a
      psum of ``k`` values with no indices on the wire; if False each worker
      folds its axis index into the key and payloads are all-gathered.
    scale: multiply the kept values by ``d/k`` (unbiased). With error
      feedback the unscaled form is the one that converges.

  Returns:
    A `Compressor`.

  Example:
    >>> import gsparse_jax as gs
    >>> gs.rand_k(0.1, shared=False).layout
    'sparse'

  Reference: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", 2018.
  """
  ratio = check_ratio(ratio)
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(f"`seed` must be an integer, got {seed!r}.")
  return RandK(ratio=ratio, seed=int(seed), shared=bool(shared),
               scale=bool(scale))


def dense() -> Dense:
  """The identity compressor: every value is sent (dense all-reduce).

  Example:
    >>> import gsparse_jax as gs
    >>> gs.dense().layout
    'dense'
  """
  return Dense()
