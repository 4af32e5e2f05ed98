"""A segment's flat vector kept as the pieces it is made of: its leaves.

A segment is its leaves flattened and concatenated. Concatenating first and
computing on the result makes XLA write the concatenation into a buffer of
its own before the arithmetic reads it again (on XLA:CPU a full-size copy
and, for buffers over 64 MB, a fresh ``mmap`` with its page faults on every
step). `Pieces.map` instead applies an elementwise function to each leaf
with the matching slices of other segment-sized vectors and concatenates
the results: XLA fuses that into one loop that reads each leaf once and
writes the segment once (XLA:CPU still gives each piece's result a
temporary before the concatenation copies it into place, in the donated
memory's buffer where it replaces one: one gradient-sized temporary instead
of two; a chain of in-place dynamic-update-slices instead measured 100x
slower on XLA:CPU, see ``benchmarks/README.md``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Pieces(NamedTuple):
  """A segment's flat float32 vector as its leaves' flat pieces, in order.

  Example:
    >>> import jax.numpy as jnp
    >>> p = Pieces((jnp.array([1.0, 2.0]), jnp.array([3.0])))
    >>> p.map(lambda g, m: g + m, jnp.array([10.0, 20.0, 30.0])).tolist()
    [11.0, 22.0, 33.0]
  """

  parts: tuple

  @property
  def size(self) -> int:
    return sum(part.shape[0] for part in self.parts)

  def map(self, fn: Callable[..., jax.Array], *vectors: jax.Array
          ) -> jax.Array:
    """``fn(piece, *slices)`` for every piece, concatenated: the segment
    ``fn(vector, *vectors)``, elementwise ``fn`` only."""
    outs, offset = [], 0
    for part in self.parts:
      n = part.shape[0]
      outs.append(fn(part, *(v[offset:offset + n] for v in vectors)))
      offset += n
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)

  def vector(self) -> jax.Array:
    """The segment's flat vector."""
    return self.map(lambda part: part)


def of_leaves(leaves, leaf_ids, scale: float = 1.0) -> Pieces:
  """The pieces of the segment of ``leaves[i]`` for ``i`` in ``leaf_ids``:
  flat, float32, times ``scale`` (the inner devices' mean under two-level
  data parallelism)."""
  parts = [leaves[i].reshape(-1).astype(jnp.float32) for i in leaf_ids]
  return Pieces(tuple(parts if scale == 1.0 else [p * scale for p in parts]))
