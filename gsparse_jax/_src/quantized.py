"""Compressors that send every entry as a few bits plus float32 scales.

A `Quantizer` encodes one worker's flat vector as a fixed-width unsigned
field per entry (`bits.pack_fields`) and a float32 scale per block of
entries (one block: the whole vector, unless the compressor cuts it into
buckets); its payload is one uint32 buffer, the packed words followed by the
scales' bits, so one all-gather of
``4 * (ceil(size * width / 32) + blocks)`` bytes per worker carries it, with
no index. Every worker decodes and averages all the workers' vectors
locally. Sign compression and QSGD are the two subclasses (`sign`, `qsgd`);
they only say how to encode and decode one block.
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


@dataclasses.dataclass(frozen=True)
class Quantizer(compressors.Compressor):
  """Fixed-width codes per entry plus a float32 scale per block, gathered."""

  @property
  @abc.abstractmethod
  def width(self) -> int:
    """Bits per entry."""

  def block_size(self, size: int) -> int:
    """Entries that share a scale (default: the whole vector)."""
    return max(size, 1)

  @abc.abstractmethod
  def encode(self, blocks: jax.Array, context: compressors.SelectContext
             ) -> tuple[jax.Array, jax.Array]:
    """Codes ``[num_blocks, block]`` (uint32, below ``2**width``) and
    float32 scales ``[num_blocks]`` of the zero-padded blocks."""

  @abc.abstractmethod
  def decode(self, codes: jax.Array, scales: jax.Array) -> jax.Array:
    """The float32 ``[num_blocks, block]`` values codes and scales stand
    for."""

  def num_blocks(self, size: int) -> int:
    return -(-size // self.block_size(size))

  def budget(self, size):
    return size  # every entry is sent, at `width` bits

  def capacity(self, size):
    return wire.packed_words(size * self.width) + self.num_blocks(size)

  def wire(self, size, value_dtype):
    del value_dtype  # codes and float32 scales, whatever the gradient dtype
    return (wire.all_gather(4 * self.capacity(size)),)

  def _blocks(self, x: jax.Array, size: int) -> jax.Array:
    """``x`` zero-padded to whole blocks, ``[num_blocks, block]``."""
    block = self.block_size(size)
    padded = jnp.pad(x, (0, self.num_blocks(size) * block - size))
    return padded.reshape(-1, block)

  def select(self, x, state, context):
    del state
    size = x.shape[0]
    codes, scales = self.encode(self._blocks(x, size), context)
    scale_bits = jax.lax.bitcast_convert_type(scales.astype(jnp.float32),
                                              jnp.uint32)
    return payload_lib.Payload(
        values=jnp.concatenate([
            bits.pack_fields(codes.reshape(-1)[:size], self.width),
            scale_bits]),
        indices=None, count=jnp.asarray(size, jnp.int32),
        overflow=jnp.zeros([], jnp.int32), aux=(), size=size,
        layout=self.layout)

  def dense_of(self, values: jax.Array, size: int) -> jax.Array:
    """The float32 ``[size]`` vector a payload's ``values`` stand for."""
    num_scales = self.num_blocks(size)
    scales = jax.lax.bitcast_convert_type(values[-num_scales:], jnp.float32)
    codes = bits.unpack_fields(values[:-num_scales], size, self.width)
    return self.decode(self._blocks(codes, size), scales).reshape(-1)[:size]

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
