"""Bit packing against a NumPy bit stream, for every length 0..100."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsparse_jax._src import bits
from gsparse_jax._src import wire

def _stream_words(values, width):
  """Reference: field j at bits [j*width, (j+1)*width) of a little-endian
  bit stream, cut into uint32 words."""
  values = np.asarray(values, np.uint64)
  positions = np.arange(width, dtype=np.uint64)
  stream = ((values[:, None] >> positions) & 1).astype(np.uint8).reshape(-1)
  num_words = -(-values.size * width // 32)
  stream = np.pad(stream, (0, num_words * 32 - stream.size))
  weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
  return (stream.reshape(num_words, 32) * weights).sum(1).astype(np.uint32)


def _check_round_trips(width, lengths, seed=0):
  rng = np.random.default_rng(seed)
  values = tuple(jnp.asarray(rng.integers(0, 2 ** width, size=size,
                                          dtype=np.uint64).astype(np.uint32))
                 for size in lengths)

  # One compilation for every length (one per length would take minutes).
  @jax.jit
  def round_trips(values):
    packed = [bits.pack_fields(v, width) for v in values]
    return packed, [bits.unpack_fields(w, v.shape[0], width)
                    for w, v in zip(packed, values)]

  packed, unpacked = round_trips(values)
  for size, v, words, back in zip(lengths, values, packed, unpacked):
    assert words.dtype == jnp.uint32
    assert words.shape == (wire.packed_words(size * width),)
    np.testing.assert_array_equal(words, _stream_words(v, width),
                                  err_msg=f"size {size}")
    np.testing.assert_array_equal(back, v, err_msg=f"size {size}")


@pytest.mark.parametrize("width", [1, 5])  # sign's 1 bit, QSGD's 4 + 1
def test_round_trip_and_layout_for_every_length(width):
  _check_round_trips(width, list(range(101)) + [4097, 100_003], seed=width)


@pytest.mark.parametrize("width", [2, 3, 8, 11, 31, 32])
def test_round_trip_and_layout_for_other_widths(width):
  _check_round_trips(width, [0, 1, 31, 32, 33, 95, 100_003], seed=width)


def test_bits_round_trip_with_leading_axis():
  rng = np.random.default_rng(0)
  for size in (0, 1, 33, 64, 100_003):
    flags = rng.random((3, size)) < 0.5
    words = jax.vmap(bits.pack_bits)(jnp.asarray(flags))
    assert words.shape == (3, -(-size // 32))
    np.testing.assert_array_equal(bits.unpack_bits(words, size), flags)


def test_high_bits_are_dropped():
  words = bits.pack_fields(jnp.array([0b111, 0b1010], jnp.uint32), 2)
  np.testing.assert_array_equal(bits.unpack_fields(words, 2, 2), [3, 2])


@pytest.mark.parametrize("width", [0, 33])
def test_width_out_of_range_raises(width):
  with pytest.raises(ValueError, match="1 to 32"):
    bits.pack_fields(jnp.zeros(3, jnp.uint32), width)
