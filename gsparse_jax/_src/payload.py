"""What one worker puts on the wire for one flat vector: the `Payload`.

A payload has a static capacity (XLA needs static shapes), so compressors that
send a data-dependent number of entries pad it: padding slots carry the index
`size` (out of range, dropped by every scatter) and the value 0.

The three standard layouts say how payloads are aggregated across workers
(`gsparse_jax.aggregate`); a compressor with its own wire format (packed bits,
low-rank factors) declares its own layout name and aggregates itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

SPARSE = "sparse"  # (index, value) pairs that differ per worker: all-gather.
ALIGNED = "aligned"  # indices identical on every worker: psum of the values.
DENSE = "dense"  # the whole vector: psum.
STANDARD_LAYOUTS = (SPARSE, ALIGNED, DENSE)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Payload:
  """One worker's compressed flat vector.

  Attributes:
    values: ``[capacity]`` values at the wire dtype (``[size]`` when dense;
      a compressor with its own format may put packed words here).
    indices: ``[capacity]`` int32 positions, or ``None`` when the layout
      needs none. Padding slots hold ``size``.
    count: int32 scalar, the number of real (non-padding) entries.
    overflow: int32 scalar, entries the compressor selected but could not
      fit in the capacity (they stay in error memory); 0 for most.
    aux: a pytree of further arrays a compressor's own format needs (e.g. a
      scale), ``()`` for the standard layouts.
    size: static length of the dense vector the payload stands for.
    layout: static: ``"sparse"``, ``"aligned"``, ``"dense"``, or the name of
      a compressor's own format.
  """

  values: jax.Array
  indices: Optional[jax.Array]
  count: jax.Array
  overflow: jax.Array
  aux: Any
  size: int = dataclasses.field(metadata=dict(static=True))
  layout: str = dataclasses.field(metadata=dict(static=True))

  @property
  def capacity(self) -> int:
    return self.values.shape[-1]


def _no_overflow() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def sparse_payload(x: jax.Array, indices: jax.Array, count: jax.Array,
                   wire_dtype, layout: str = SPARSE,
                   overflow: Optional[jax.Array] = None) -> Payload:
  """Gathers ``x`` at ``indices`` (padding ``x.size`` gives 0) into a payload."""
  size = x.shape[0]
  indices = indices.astype(jnp.int32)
  values = jnp.take(x, indices, mode="fill", fill_value=0).astype(wire_dtype)
  return Payload(values=values, indices=indices,
                 count=jnp.asarray(count, jnp.int32),
                 overflow=_no_overflow() if overflow is None
                 else jnp.asarray(overflow, jnp.int32),
                 aux=(), size=size, layout=layout)


def dense_payload(x: jax.Array, wire_dtype) -> Payload:
  return Payload(values=x.astype(wire_dtype), indices=None,
                 count=jnp.asarray(x.shape[0], jnp.int32),
                 overflow=_no_overflow(), aux=(), size=x.shape[0],
                 layout=DENSE)


# Layouts whose payload can be made to stand for nothing by padding every
# slot: its scatters (aggregation, `add_sent`) then drop every entry, so
# adding it leaves any vector bit for bit as it was (a dense payload of
# zeros would not: -0.0 + 0.0 is +0.0).
MASKABLE_LAYOUTS = (SPARSE, ALIGNED)


def masked(payload: Payload, keep: jax.Array) -> Payload:
  """``payload``, or (``keep`` false) one of the same shapes standing for
  nothing: every index padding (``size``), every value 0, count 0.

  For the layouts in `MASKABLE_LAYOUTS` only; the selects are on the
  ``capacity`` slots, not on a ``size`` vector.
  """
  if payload.layout not in MASKABLE_LAYOUTS:
    raise ValueError(f"masked: layout {payload.layout!r} is not one of "
                     f"{MASKABLE_LAYOUTS}.")
  return dataclasses.replace(
      payload,
      indices=jnp.where(keep, payload.indices, payload.size),
      values=jnp.where(keep, payload.values, 0).astype(payload.values.dtype),
      count=jnp.where(keep, payload.count, 0))


def late_zeros(payload: Payload, dtype=jnp.float32) -> jax.Array:
  """A ``[size]`` vector of +0.0, computed from the payload's indices.

  The value is that of ``jnp.zeros``, but a constant broadcast has no
  operands, so XLA:CPU schedules it at the start of the step, where it is
  alive beside every other temporary; made from the indices it is created
  after the selection, in the space of temporaries already dead.
  """
  zero = jnp.minimum(payload.indices[0], 0).astype(dtype)  # indices >= 0
  return jnp.broadcast_to(zero, (payload.size,))


def decompress(payload: Payload, dtype=jnp.float32) -> jax.Array:
  """The dense ``[size]`` vector a standard-layout payload stands for."""
  if payload.layout == DENSE:
    return payload.values.astype(dtype)
  base = late_zeros(payload, dtype)
  return base.at[payload.indices].add(payload.values.astype(dtype),
                                      mode="drop")


def add_sent(x: jax.Array, payload: Payload, sign: float = 1.0
             ) -> jax.Array:
  """``x + sign * decompress(payload)`` with one scatter, no dense temporary.

  ``sign=-1`` gives error-feedback memory (what was not sent); ``sign=+1``
  EF21's running estimate. Standard layouts only.
  """
  values = payload.values.astype(x.dtype) * sign  # exact for sign = +-1
  if payload.layout == DENSE:
    return x + values
  return x.at[payload.indices].add(values, mode="drop")
