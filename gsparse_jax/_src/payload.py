"""What one worker puts on the wire for one flat vector: the `Payload`.

A payload has a static capacity (XLA needs static shapes), so compressors that
send a data-dependent number of entries pad it: padding slots carry the index
`size` (out of range, dropped by every scatter) and the value 0.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# How the values of a payload are placed and aggregated across workers.
SPARSE = "sparse"  # (index, value) pairs that differ per worker: all-gather.
ALIGNED = "aligned"  # indices identical on every worker: psum of the values.
DENSE = "dense"  # the whole vector: psum.

INDEX_BYTES = 4  # indices travel as int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Payload:
  """One worker's compressed flat vector.

  Attributes:
    values: ``[capacity]`` values at the wire dtype (``[size]`` when dense).
    indices: ``[capacity]`` int32 positions, or ``None`` when dense. Padding
      slots hold ``size``.
    count: int32 scalar, the number of real (non-padding) entries.
    size: static length of the dense vector the payload stands for.
    layout: static, one of ``"sparse"``, ``"aligned"``, ``"dense"``.
    overflow: int32 scalar, entries the compressor selected but could not
      fit in the capacity (they stay in error memory), or None.
    side_values: static count of extra values the compressor exchanged to
      agree on indices (ARC-Top-K's sketch); counted in the byte statistics.
  """

  values: jax.Array
  indices: Optional[jax.Array]
  count: jax.Array
  overflow: Optional[jax.Array]
  size: int = dataclasses.field(metadata=dict(static=True))
  layout: str = dataclasses.field(metadata=dict(static=True))
  side_values: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def capacity(self) -> int:
    return self.values.shape[-1]

  def wire_bytes(self) -> int:
    """Bytes this worker sends for the payload (static)."""
    value_bytes = jnp.dtype(self.values.dtype).itemsize
    per_entry = value_bytes + (INDEX_BYTES if self.layout == SPARSE else 0)
    return self.capacity * per_entry + self.side_values * value_bytes


def sparse_payload(x: jax.Array, indices: jax.Array, count: jax.Array,
                   wire_dtype, layout: str = SPARSE) -> Payload:
  """Gathers ``x`` at ``indices`` (padding ``x.size`` gives 0) into a payload."""
  size = x.shape[0]
  indices = indices.astype(jnp.int32)
  values = jnp.take(x, indices, mode="fill", fill_value=0).astype(wire_dtype)
  return Payload(values=values, indices=indices,
                 count=jnp.asarray(count, jnp.int32), overflow=None,
                 size=size, layout=layout)


def dense_payload(x: jax.Array, wire_dtype) -> Payload:
  return Payload(values=x.astype(wire_dtype), indices=None,
                 count=jnp.asarray(x.shape[0], jnp.int32), overflow=None,
                 size=x.shape[0], layout=DENSE)


def decompress(payload: Payload, dtype=jnp.float32) -> jax.Array:
  """The dense ``[size]`` vector a payload stands for (padding dropped)."""
  if payload.layout == DENSE:
    return payload.values.astype(dtype)
  base = jnp.zeros((payload.size,), dtype)
  return base.at[payload.indices].add(payload.values.astype(dtype),
                                      mode="drop")


def add_sent(x: jax.Array, payload: Payload, sign: float = 1.0
             ) -> jax.Array:
  """``x + sign * decompress(payload)`` with one scatter, no dense temporary.

  ``sign=-1`` gives error-feedback memory (what was not sent); ``sign=+1``
  EF21's running estimate.
  """
  values = payload.values.astype(x.dtype) * sign  # exact for sign = +-1
  if payload.layout == DENSE:
    return x + values
  return x.at[payload.indices].add(values, mode="drop")
