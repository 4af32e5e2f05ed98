"""Compressors that send every entry as a few bits plus one float32 scale.

A `Quantizer` encodes one worker's flat vector as a fixed-width unsigned
field per entry (`bits.pack_fields`) and one float32 scale; the payload is
the packed uint32 words (``values``) and the scale (``aux``). Every worker
all-gathers the words and scales of all workers and decodes and averages
them locally, so one collective carries
``4 * ceil(size * width / 32) + 4`` bytes per worker and no index. Sign
compression and QSGD are the two subclasses (`sign`, `qsgd`); they only say
how to encode and decode.
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

SCALE_BYTES = 4  # the scale travels as float32


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
    return wire.packed_words(size * self.width)

  def wire(self, size, value_dtype):
    del value_dtype  # codes and a float32 scale, whatever the gradient dtype
    return (wire.all_gather(4 * self.capacity(size) + SCALE_BYTES),)

  def select(self, x, state, context):
    del state
    codes, scale = self.encode(x, context)
    size = x.shape[0]
    return payload_lib.Payload(
        values=bits.pack_fields(codes, self.width), indices=None,
        count=jnp.asarray(size, jnp.int32),
        overflow=jnp.zeros([], jnp.int32),
        aux=jnp.asarray(scale, jnp.float32), size=size, layout=self.layout)

  def dense_of(self, words: jax.Array, scale: jax.Array, size: int
               ) -> jax.Array:
    """The float32 ``[size]`` vector packed ``words`` and ``scale`` stand for."""
    return self.decode(bits.unpack_fields(words, size, self.width), scale)

  def aggregate(self, sent, workers):
    words = workers.all_gather(sent.values)  # [workers, words]
    scales = workers.all_gather(sent.aux)  # [workers]
    # One decoded vector added at a time, in worker order: XLA fuses the
    # chain into one pass (a sum over a decoded [workers, size] array was
    # 15-60x slower on XLA:CPU), and every worker adds the same gathered
    # values in the same order, so the mean has the same bits everywhere.
    total = self.dense_of(words[0], scales[0], sent.size)
    for i in range(1, workers.size):
      total = total + self.dense_of(words[i], scales[i], sent.size)
    return compressors.Received(total / workers.size, workers.size)

  def add_sent(self, x, sent, sign):
    return x + sign * self.dense_of(sent.values, sent.aux, sent.size)
