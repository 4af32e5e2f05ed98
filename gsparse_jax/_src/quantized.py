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
    """The float32 values codes ``[..., size]`` with scales ``[...]`` mean."""

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

  def dense(self, sent: payload_lib.Payload) -> jax.Array:
    """The float32 ``[size]`` vector one payload stands for."""
    return self.decode(bits.unpack_fields(sent.values, sent.size, self.width),
                       sent.aux)

  def aggregate(self, sent, workers):
    words = workers.all_gather(sent.values)  # [workers, words]
    scales = workers.all_gather(sent.aux)  # [workers]
    codes = bits.unpack_fields(words, sent.size, self.width)
    # Summed in worker order from the same gathered arrays on every worker:
    # the same bits everywhere, under every mapping.
    mean = jnp.sum(self.decode(codes, scales), axis=0) / workers.size
    return compressors.Received(mean, workers.size)

  def add_sent(self, x, sent, sign):
    return x + sign * self.dense(sent)
