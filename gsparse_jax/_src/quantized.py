"""Compressors that send every entry as a few bits plus one float32 scale.

A `Quantizer` encodes one worker's flat vector as a fixed-width unsigned
field per entry (`bits.pack_fields`) and one float32 scale; its payload is
one uint32 buffer, the packed words followed by the scale's bits, so one
all-gather of ``4 * ceil(size * width / 32) + 4`` bytes per worker carries
it, with no index. Every worker decodes and averages all the workers'
vectors locally. Sign compression and QSGD are the two subclasses (`sign`,
`qsgd`); they only say how to encode and decode.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp

from gsparse_jax._src import bits
from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import wire

SCALE_BYTES = 4  # the scale travels as float32, in the last uint32 slot


@dataclasses.dataclass(frozen=True)
class Quantizer(compressors.Compressor):
  """Fixed-width codes per entry plus a float32 scale, all-gathered."""

  @property
  @abc.abstractmethod
  def width(self) -> int:
    """Bits per entry."""

  @abc.abstractmethod
  def encode(self, x: jax.Array, context: compressors.SelectContext
             ) -> tuple[jax.Array, jax.Array]:
    """(``[size]`` uint32 codes below ``2**width``, float32 scale)."""

  @abc.abstractmethod
  def decode(self, codes: jax.Array, scale: jax.Array) -> jax.Array:
    """The float32 values that ``[size]`` codes with ``scale`` stand for."""

  def budget(self, size):
    return size  # every entry is sent, at `width` bits

  def capacity(self, size):
    return wire.packed_words(size * self.width) + 1  # + the scale

  def wire(self, size, value_dtype):
    del value_dtype  # codes and a float32 scale, whatever the gradient dtype
    return (wire.all_gather(4 * self.capacity(size)),)

  def select(self, x, state, context):
    del state
    codes, scale = self.encode(x, context)
    scale_bits = jax.lax.bitcast_convert_type(
        jnp.asarray(scale, jnp.float32), jnp.uint32)
    size = x.shape[0]
    return payload_lib.Payload(
        values=jnp.concatenate([bits.pack_fields(codes, self.width),
                                scale_bits[None]]),
        indices=None, count=jnp.asarray(size, jnp.int32),
        overflow=jnp.zeros([], jnp.int32), aux=(), size=size,
        layout=self.layout)

  def dense_of(self, values: jax.Array, size: int) -> jax.Array:
    """The float32 ``[size]`` vector a payload's ``values`` stand for."""
    scale = jax.lax.bitcast_convert_type(values[-1], jnp.float32)
    return self.decode(bits.unpack_fields(values[:-1], size, self.width),
                       scale)

  def aggregate(self, sent, workers):
    gathered = workers.all_gather(sent.values)  # [workers, capacity]
    # One decoded vector added at a time, in worker order: XLA fuses the
    # chain into one pass (a sum over a decoded [workers, size] array was
    # 15-60x slower on XLA:CPU), and every worker adds the same gathered
    # values in the same order, so the mean has the same bits everywhere.
    total = self.dense_of(gathered[0], sent.size)
    for i in range(1, workers.size):
      total = total + self.dense_of(gathered[i], sent.size)
    return compressors.Received(total / workers.size, workers.size)

  def add_sent(self, x, sent, sign):
    return x + sign * self.dense_of(sent.values, sent.size)
