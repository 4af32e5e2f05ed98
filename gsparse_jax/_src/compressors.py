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
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from gsparse_jax._src import aggregate as aggregate_lib
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import selection
from gsparse_jax._src import validation
from gsparse_jax._src import wire
from gsparse_jax._src import workers as workers_lib

Payload = payload_lib.Payload


class SelectContext(NamedTuple):
  """What `Compressor.select` gets besides the vector and its state.

  Attributes:
    key: a PRNG key identical on every worker for this step and vector.
    worker: this worker's index (int32 scalar), or None for a single worker.
    agreed: what `Compressor.agree` returned (None by default).
    value_dtype: the dtype values travel in.
  """

  key: jax.Array
  worker: Optional[jax.Array]
  agreed: Any
  value_dtype: Any


class Received(NamedTuple):
  """What every worker received in a step (`Compressor.aggregate`).

  Attributes:
    mean: ``[size]`` float32, the mean over workers of what they sent,
      identical on every worker.
    num_workers: the number of workers (static).
    aux: anything else the compressor's aggregation produced that its
      `Compressor.update` needs (e.g. aggregated low-rank factors); None
      for the standard layouts.
  """

  mean: jax.Array
  num_workers: int
  aux: Any = None

  @property
  def total(self) -> jax.Array:
    """The sum over workers of what they sent."""
    return self.mean * self.num_workers


@dataclasses.dataclass(frozen=True)
class Compressor(abc.ABC):
  """The contract every compressor obeys; `sparsify` knows nothing else.

  One step of one worker and one flat vector ``x`` (a segment of the model):

  1. `agree` (optional): collectives the workers run BEFORE choosing what to
     send (ARC-Top-K's shared sketch); default none.
  2. `select`: the `Payload` this worker sends; no collectives.
  3. `aggregate`: what every worker receives, a `Received` whose ``mean``
     is the mean over workers of what they sent (a dense float32 vector
     identical on every worker); by default from the payload's standard
     layout (`layout`).
  4. `add_sent`: ``x + sign * (what this worker sent, dense)``, which error
     feedback uses to keep what was not sent.
  5. `update`: the compressor's per-worker state for the next step, from
     what it sent and what every worker received.

  Static facts: `budget` (values aimed at), `capacity` (payload slots) and
  `wire` (the collectives one worker joins, with their bytes), which the
  statistics and the cost model read; `for_shape` specializes the
  compressor to a tensor's shape under layer granularity.
  """

  @property
  def layout(self) -> str:
    """How payloads are aggregated: ``"sparse"``, ``"aligned"``, ``"dense"``
    (standard, see `gsparse_jax.aggregate`) or a format of its own."""
    return payload_lib.SPARSE

  @property
  def needs_shape(self) -> bool:
    """Whether it compresses only once `for_shape` has told it a tensor's
    shape (it sends a flat vector of unknown shape dense), so that
    ``granularity="global"`` would not compress at all."""
    return False

  @abc.abstractmethod
  def budget(self, size: int) -> int:
    """Number of values a worker aims to send for a vector of ``size``."""

  def capacity(self, size: int) -> int:
    """Static payload slots for a vector of ``size`` (default: the budget)."""
    return self.budget(size)

  def wire(self, size: int, value_dtype: Any) -> tuple[wire.Collective, ...]:
    """The collectives one worker joins in a step, with its bytes in each.

    The default follows the standard layouts: an all-gather of
    ``capacity`` (value, int32 index) pairs (sparse), an all-reduce of
    ``capacity`` values (aligned) or of all ``size`` values (dense).
    """
    value_bytes = jnp.dtype(value_dtype).itemsize
    if self.layout == payload_lib.DENSE:
      return (wire.all_reduce(size * value_bytes),)
    if self.layout == payload_lib.ALIGNED:
      return (wire.all_reduce(self.capacity(size) * value_bytes),)
    return (wire.all_gather(
        self.capacity(size) * (value_bytes + wire.INDEX_BYTES)),)

  def init(self, size: int) -> Any:
    """Per-worker compressor state for one flat vector of ``size``."""
    del size
    return ()

  def for_shape(self, shape: tuple[int, ...]) -> "Compressor":
    """The compressor for a flat vector that is one tensor of ``shape``.

    `sparsify` calls it per leaf under ``granularity="layer"``, so
    compressors that view the vector as a matrix (ARC-Top-K's rows) can use
    the tensor's own shape. The default ignores the shape.
    """
    del shape
    return self

  def agree(self, x: jax.Array, state: Any, key: jax.Array,
            workers: workers_lib.Workers) -> Any:
    """Collectives run before selecting; the result reaches `select`."""
    del x, state, key, workers
    return None

  @abc.abstractmethod
  def select(self, x: jax.Array, state: Any, context: SelectContext
             ) -> Payload:
    """Compresses one worker's flat vector ``x`` (no collectives here).

    Args:
      x: 1-D float32 array (the accumulated gradient of this worker).
      state: this worker's compressor state, as returned by `init`/`update`.
      context: the step's key, this worker's index, what `agree` returned
        and the wire dtype of the values.

    Returns:
      The `Payload`.
    """

  def aggregate(self, sent: Payload, workers: workers_lib.Workers
                ) -> Received:
    """What every worker receives: the float32 mean of what all sent."""
    return Received(aggregate_lib.aggregate(sent, workers), workers.size)

  def add_sent(self, x: jax.Array, sent: Payload, sign: float) -> jax.Array:
    """``x + sign * (the dense vector this worker's payload stands for)``."""
    return payload_lib.add_sent(x, sent, sign)

  def update(self, state: Any, sent: Payload, received: Received) -> Any:
    """Next state, from what this worker sent and what all received."""
    del sent, received
    return state


def _is_key(key) -> bool:
  """A typed PRNG key, or a legacy uint32[2] one."""
  if not isinstance(key, jax.Array):
    return False
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.ndim == 0
  return key.dtype == jnp.uint32 and key.shape == (2,)


def compress(compressor: Compressor, x: jax.Array, state: Any,
             key: jax.Array, axis_name: Optional[str] = None,
             wire_dtype: Any = None) -> Payload:
  """Compresses one worker's flat vector into a `Payload`.

  Runs the compressor's `agree` collectives (if any) over ``axis_name``,
  then its `select`.

  Args:
    compressor: a `Compressor` (e.g. `gsparse_jax.top_k(0.01)`); for one
      tensor under a shape-aware compressor, pass
      ``compressor.for_shape(shape)``.
    x: a 1-D float array, this worker's (accumulated) vector.
    state: the compressor's state for this vector (``compressor.init(x.size)``
      on the first step).
    key: a PRNG key, identical on every worker for this step.
    axis_name: the workers' axis, or None for one worker.
    wire_dtype: dtype of the values on the wire (default ``x.dtype``).

  Returns:
    The `Payload`, ready for ``compressor.aggregate`` (or
    `gsparse_jax.aggregate` for the standard layouts).

  Example:
    >>> import jax, jax.numpy as jnp, gsparse_jax as gs
    >>> c = gs.top_k(k=1)
    >>> p = gs.compress(c, jnp.array([1.0, -4.0, 2.0]), c.init(3),
    ...                 jax.random.key(0))
    >>> p.indices.tolist(), p.values.tolist()
    ([1], [-4.0])
  """
  if not isinstance(compressor, Compressor):
    raise TypeError("`compressor` must be a gsparse_jax Compressor (e.g. "
                    f"gs.top_k(0.01)); got {type(compressor).__name__}.")
  if getattr(x, "ndim", None) != 1 or not hasattr(x, "dtype"):
    raise ValueError("compress takes a 1-D float array `x`, got shape "
                     f"{getattr(x, 'shape', None)}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"compress takes a float `x`, got dtype {x.dtype}.")
  if not _is_key(key):
    raise TypeError("compress: `key` must be a PRNG key (jax.random.key(0)), "
                    f"got {type(key).__name__}.")
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"compress: `axis_name` must be a string or None, got "
                    f"{axis_name!r}.")
  workers = workers_lib.Workers(axis_name)
  context = SelectContext(
      key=key,
      worker=None if axis_name is None else workers.index(),
      agreed=compressor.agree(x, state, key, workers),
      value_dtype=jnp.dtype(wire_dtype or x.dtype))
  return compressor.select(x, state, context)


@dataclasses.dataclass(frozen=True)
class TopK(Compressor):
  """Exact Top-k by magnitude; ties go to the lower index."""

  ratio: Optional[float] = None
  k: Optional[int] = None
  method: str = "auto"
  value_dtype: Optional[Any] = None  # None: the gradient's dtype
  chunk: Optional[int] = None  # None: one budget over the whole vector

  def budget(self, size):
    if self.chunk is not None:
      return wire.chunked_budget(self.ratio, size, self.chunk, self.k)
    return wire.budget(self.ratio, size, self.k)

  def wire(self, size, value_dtype):
    return super().wire(size, self.value_dtype or value_dtype)

  def select(self, x, state, context):
    del state
    k = self.budget(x.shape[0])
    if self.chunk is None:
      indices = selection.top_k_abs(x, k, method=self.method)
    else:
      indices = selection.chunked_top_k_abs(
          x, self.chunk, lambda n: wire.budget(self.ratio, n, self.k))
    # Values rounded to `value_dtype` are what travels and what `add_sent`
    # adds, so error feedback keeps the rounding error too.
    return payload_lib.sparse_payload(x, indices, k,
                                      self.value_dtype or context.value_dtype)


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
    return wire.budget(self.ratio, size)

  def select(self, x, state, context):
    del state
    size = x.shape[0]
    k = self.budget(size)
    key = jax.random.fold_in(context.key, self.seed)
    if not self.shared and context.worker is not None:
      key = jax.random.fold_in(key, context.worker)
    indices = uniform_subset(key, size, k)
    sent = payload_lib.sparse_payload(x, indices, k, context.value_dtype,
                                      self.layout)
    if self.scale:
      sent = dataclasses.replace(sent, values=sent.values * (size / k))
    return sent


@dataclasses.dataclass(frozen=True)
class Dense(Compressor):
  """No compression: the whole vector (the baseline)."""

  @property
  def layout(self):
    return payload_lib.DENSE

  def budget(self, size):
    return size

  def select(self, x, state, context):
    del state
    return payload_lib.dense_payload(x, context.value_dtype)


VALUE_DTYPES = ("bfloat16", "float16", "float32")


def top_k(ratio: Optional[float] = None, *, k: Optional[int] = None,
          method: str = "auto", value_dtype: Any = None,
          chunk: Optional[int] = None) -> TopK:
  """Exact Top-k sparsifier: keeps the ``k`` entries of largest magnitude.

  Args:
    ratio: fraction of entries kept, in (0, 1]; ``k = max(1, round(ratio*d))``.
    k: the number kept instead of a ratio (clamped to the vector's length).
    method: ``"sort"`` (`jax.lax.top_k`), ``"threshold"`` (sampled-threshold
      exact selection, same result) or ``"auto"``.
    value_dtype: the dtype the kept values travel in (``jnp.bfloat16``:
      6 bytes per entry with its int32 index instead of 8); None: the
      gradient's dtype. With error feedback the rounding error stays in
      memory.
    chunk: None, or chunked Top-k: the vector is cut into chunks of this
      many entries and each keeps its own ``max(1, round(ratio * chunk))``
      (``k`` per chunk when ``k`` is given; the shorter last chunk by its
      own length), as SparseLoCo selects; ``method`` is then unused.

  Returns:
    A `Compressor`.

  Example:
    >>> import gsparse_jax as gs
    >>> gs.top_k(0.01).budget(1000)
    10
    >>> gs.top_k(0.01, chunk=64).budget(1000)  # 15 chunks of 64, then 40
    16

  Reference: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", 2018.
  """
  ratio, k = validation.ratio_or_k(ratio, k, "top_k")
  validation.choice(method, "method", selection.METHODS)
  if value_dtype is not None:
    value_dtype = validation.dtype(value_dtype, "value_dtype", VALUE_DTYPES)
  chunk = validation.optional_positive_int(chunk, "chunk")
  return TopK(ratio=ratio, k=k, method=method, value_dtype=value_dtype,
              chunk=chunk)


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
  ratio = validation.ratio(ratio)
  seed = validation.integer(seed, "seed")
  return RandK(ratio=ratio, seed=seed,
               shared=validation.boolean(shared, "shared"),
               scale=validation.boolean(scale, "scale"))


def dense() -> Dense:
  """The identity compressor: every value is sent (dense all-reduce).

  Example:
    >>> import gsparse_jax as gs
    >>> gs.dense().layout
    'dense'
  """
  return Dense()
