"""Bit packing: fixed-width unsigned fields in uint32 words, and back.

Quantizing compressors (sign, QSGD) send a few bits per entry. Field ``j`` of
a vector of ``width``-bit fields occupies bits ``[j * width, (j + 1) * width)``
of the little-endian bit stream the words hold (bit ``b`` is bit ``b % 32``
of word ``b // 32``), so a field may straddle two words when ``width`` does
not divide 32. The stream takes ``ceil(size * width / 32)`` words
(`wire.packed_words`); unused high bits of the last word are zero.

Both directions work on groups of 32 fields (``width`` words each) with
shifts and word positions that are static, so XLA fuses them into a few
elementwise passes: no scatter and no sort.

Example:
  >>> import jax.numpy as jnp
  >>> from gsparse_jax._src import bits
  >>> words = bits.pack_fields(jnp.array([1, 0, 3, 2], jnp.uint32), 2)
  >>> hex(int(words[0]))
  '0xb1'
  >>> bits.unpack_fields(words, 4, 2).tolist()
  [1, 0, 3, 2]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gsparse_jax._src import wire

_GROUP = 32  # fields per group: a group of `width`-bit fields fills `width` words


def _check_width(width: int) -> int:
  if not 1 <= int(width) <= 32:
    raise ValueError(f"bit fields are 1 to 32 bits wide, got {width}.")
  return int(width)


def _mask(width: int) -> jax.Array:
  return jnp.uint32((1 << width) - 1)


def _layout(width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per field of a group: (word it starts in, bit offset, spills over)."""
  start = np.arange(_GROUP) * width
  offset = start % 32
  return start // 32, offset.astype(np.uint32), offset + width > 32


def pack_fields(values: jax.Array, width: int) -> jax.Array:
  """Packs unsigned integers into a stream of ``width``-bit fields.

  Args:
    values: ``[size]`` non-negative integers below ``2**width`` (higher bits
      are dropped).
    width: bits per field, 1 to 32.

  Returns:
    ``[ceil(size * width / 32)]`` uint32 words.
  """
  width = _check_width(width)
  size = values.shape[0]
  groups = -(-size // _GROUP)
  fields = jnp.pad(values.astype(jnp.uint32) & _mask(width),
                   (0, groups * _GROUP - size)).reshape(groups, _GROUP)
  word, offset, spills = _layout(width)
  low = fields << offset
  high = fields >> np.where(spills, 32 - offset, 0).astype(np.uint32)
  words = []
  for k in range(width):
    # The fields starting in word k are contiguous and their bits disjoint,
    # so a sum is their OR; a field that spilled from word k - 1 adds its
    # high bits.
    starting = np.flatnonzero(word == k)
    total = jnp.sum(low[:, starting[0]:starting[-1] + 1], axis=1,
                    dtype=jnp.uint32)
    if k and spills[np.flatnonzero(word == k - 1)[-1]]:
      total = total | high[:, np.flatnonzero(word == k - 1)[-1]]
    words.append(total)
  # Padding fields are zero, so the words past the stream's end are too.
  return jnp.stack(words, axis=1).reshape(-1)[:wire.packed_words(size * width)]


def unpack_fields(words: jax.Array, size: int, width: int) -> jax.Array:
  """The ``size`` fields of ``width`` bits that `pack_fields` packed.

  Args:
    words: ``[..., ceil(size * width / 32)]`` uint32 words (leading axes,
      e.g. workers, are kept).
    size: the number of fields.
    width: bits per field, 1 to 32.

  Returns:
    ``[..., size]`` uint32 fields.
  """
  width = _check_width(width)
  groups = -(-size // _GROUP)
  lead = words.shape[:-1]
  # One zero word past the end, so every word has a successor.
  padded = jnp.pad(words.astype(jnp.uint32), [(0, 0)] * len(lead) + [
      (0, groups * width + 1 - words.shape[-1])])
  here = padded[..., :groups * width].reshape(lead + (groups, width))
  after = padded[..., 1:groups * width + 1].reshape(lead + (groups, width))
  word, offset, spills = _layout(width)
  # Static gathers of each field's word and the one after it.
  low = jnp.take(here, word, axis=-1) >> offset
  high = jnp.take(after, word, axis=-1) << np.where(
      spills, 32 - offset, 0).astype(np.uint32)
  fields = (low | jnp.where(spills, high, 0)) & _mask(width)
  return fields.reshape(lead + (groups * _GROUP,))[..., :size]


def pack_bits(flags: jax.Array) -> jax.Array:
  """Packs booleans one bit each (`pack_fields` with width 1)."""
  return pack_fields(flags.astype(jnp.uint32), 1)


def unpack_bits(words: jax.Array, size: int) -> jax.Array:
  """The ``size`` booleans `pack_bits` packed (leading axes kept)."""
  return unpack_fields(words, size, 1).astype(bool)
