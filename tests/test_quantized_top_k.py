"""gs.quantized_top_k: values, bytes and the 8-worker mean against NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
from references import quantized as ref
import runners

D = 1000


def _vector(seed=0, shape=(D,)):
  return jnp.asarray(np.random.default_rng(seed).standard_t(3, size=shape),
                     jnp.float32)


@functools.lru_cache(maxsize=None)
def _sent_fn(compressor):
  def sent(x):
    payload = gs.compress(compressor, x, (), jax.random.key(0))
    return compressor.add_sent(jnp.zeros_like(x), payload, 1.0)
  return jax.jit(sent)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_sent_values_equal_numpy_reference(bits):
  c = gs.quantized_top_k(k=100, bits=bits, chunk=32)  # 4 chunks, last of 4
  x = _vector(bits)
  got = np.asarray(_sent_fn(c)(x), np.float64)
  expected = ref.select_quantized_top_k(np.asarray(x, np.float64), 0, 0, c)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  kept = np.flatnonzero(expected)
  assert len(kept) == 100 or bits == 1  # nothing rounds to 0 but 1-bit signs
  # Within half a level's spacing of the true value, 2m / (L - 1) / 2.
  a = np.asarray(x, np.float64)
  order = np.sort(np.argsort(-np.abs(a), kind="stable")[:100])
  for start in range(0, 100, 32):
    chunk = order[start:start + 32]
    m = np.abs(a[chunk]).max()
    assert np.all(np.abs(got[chunk] - a[chunk]) <= m / (2 ** bits - 1) + 1e-6)
  assert np.all(got[np.setdiff1d(np.arange(D), order)] == 0)


def test_mean_over_eight_workers_equals_numpy(mesh):
  c = gs.quantized_top_k(0.05, bits=2, chunk=16)
  x = _vector(7, (8, D))

  def worker(x):
    payload = gs.compress(c, x, (), jax.random.key(0), runners.AXIS)
    return c.aggregate(payload, gs.Workers(runners.AXIS)).mean

  got = np.asarray(jax.jit(jax.vmap(worker, axis_name=runners.AXIS))(x))
  expected = np.mean([ref.select_quantized_top_k(
      np.asarray(row, np.float64), 0, i, c) for i, row in enumerate(x)],
                     axis=0)
  for row in got:  # identical on every worker
    np.testing.assert_array_equal(row, got[0])
  np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,chunk", [(2, 64), (4, 32), (8, 128)])
def test_wire_bytes_and_stats_count_the_low_bit_values(bits, chunk):
  c = gs.quantized_top_k(0.1, bits=bits, chunk=chunk)
  k = 100
  expected = 4 * k + 4 * (-(-k * bits // 32) + -(-k // chunk))
  assert [w.bytes for w in c.wire(D, "float32")] == [expected]
  assert expected < 8 * k  # less than top_k's (value, index) pairs
  tx = gs.sparsify(c)
  state = tx.init(jnp.zeros(D))
  _, state = jax.jit(tx.update)(_vector(), state)
  stats = gs.comm_stats(state)
  assert stats["sent_bytes"] == expected and stats["sent_values"] == k


def test_error_feedback_keeps_the_rounding_error():
  c = gs.quantized_top_k(k=50, bits=2)
  tx = gs.sparsify(c, feedback="ef")
  state = tx.init(jnp.zeros(D))
  g = _vector(3)
  out, state = tx.update(g, state)
  memory = np.asarray(state.memory[0][0], np.float64)
  np.testing.assert_allclose(np.asarray(out, np.float64) + memory,
                             np.asarray(g, np.float64), atol=1e-6)


def test_zero_vector_sends_zeros():
  c = gs.quantized_top_k(k=8, bits=2, chunk=4)
  np.testing.assert_array_equal(_sent_fn(c)(jnp.zeros(16)), np.zeros(16))


@pytest.mark.parametrize("kwargs,match", [
    (dict(ratio=0.1, bits=0), "bits"), (dict(ratio=0.1, bits=9), "bits"),
    (dict(ratio=0.1, chunk=0), "chunk"), (dict(), "ratio"),
    (dict(ratio=0.1, k=3), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(ratio=0.1, method="fast"), "method")])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gs.quantized_top_k(**kwargs)
