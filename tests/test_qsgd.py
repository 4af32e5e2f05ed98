"""gs.qsgd: unbiased over 2,000 keys, levels and bytes exact, 8 workers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
import runners

KEYS = 2000


def _decoded(compressor, x, key, axis_name=None):
  payload = gs.compress(compressor, x, (), key, axis_name)
  return compressor.add_sent(jnp.zeros_like(x), payload, 1.0), payload


@pytest.mark.parametrize("bits,bucket_size", [(1, None), (4, 16)])
def test_unbiased_within_four_standard_errors(bits, bucket_size):
  c = gs.qsgd(bits, bucket_size=bucket_size)
  x = jnp.asarray(np.random.default_rng(bits).normal(size=64), jnp.float32)
  keys = jax.random.split(jax.random.key(11), KEYS)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: _decoded(c, x, k)[0]))(keys),
                     np.float64)
  mean, std = draws.mean(0), draws.std(0, ddof=1)
  a = np.asarray(x, np.float64)
  assert np.all(std > 0)  # no entry sits exactly on a level here
  assert np.all(np.abs(mean - a) <= 4 * std / np.sqrt(KEYS))


def test_levels_are_the_two_nearest_of_each_buckets_norm_grid():
  c = gs.qsgd(bits=3, bucket_size=100)  # s = 7 levels; buckets of 100
  x = jnp.asarray(np.random.default_rng(0).normal(size=250), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 20)
  draws = np.asarray(jax.vmap(lambda k: _decoded(c, x, k)[0])(keys))
  a = np.asarray(x, np.float64)
  norm = np.concatenate([np.full(len(b), np.linalg.norm(b))
                         for b in np.split(a, [100, 200])])
  scaled = np.abs(a) / norm * 7
  levels = np.abs(draws) / norm * 7
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  levels = np.round(levels)
  assert np.all((levels == np.floor(scaled)) | (levels == np.ceil(scaled)))
  assert np.all(np.sign(draws)[levels > 0] == np.sign(a)[None].repeat(
      20, 0)[levels > 0])


def test_zero_vector_sends_zeros():
  sent, payload = _decoded(gs.qsgd(), jnp.zeros(10), jax.random.key(0))
  np.testing.assert_array_equal(sent, np.zeros(10))
  assert int(payload.values[-1]) == 0  # the norm's bits: 0.0


def test_workers_draw_independently_and_the_mean_is_theirs(mesh):
  c = gs.qsgd(bits=2)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 50)), jnp.float32)

  def worker(x):
    sent, payload = _decoded(c, x, jax.random.key(3), runners.AXIS)
    return sent, c.aggregate(payload, gs.Workers(runners.AXIS)).mean

  same = jnp.broadcast_to(x[0], x.shape)
  sent, _ = jax.vmap(worker, axis_name=runners.AXIS)(same)
  assert len({np.asarray(s).tobytes() for s in sent}) == 8
  sent, mean = jax.vmap(worker, axis_name=runners.AXIS)(x)
  for row in np.asarray(mean):
    np.testing.assert_allclose(row, np.asarray(sent, np.float64).mean(0),
                               rtol=1e-6, atol=1e-7)


def test_vmap_and_shard_map_are_bit_identical_and_bytes_exact(mesh):
  params = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((7,))}  # 37 entries
  tx = gs.sparsify(gs.qsgd(), axis_name=runners.AXIS)
  grads = runners.normal_grads(params, 3, 8, seed=2)
  by_vmap, state = runners.run_steps(tx, params, grads, "vmap")
  by_shard_map, _ = runners.run_steps(tx, params, grads, "shard_map", mesh)
  jax.tree.map(np.testing.assert_array_equal, by_vmap, by_shard_map)
  # Hand count: 37 entries x 5 bits = 185 bits = 6 words, + a float32 norm.
  stats = gs.comm_stats(state)
  assert stats["sent_bytes"] == 3 * (6 * 4 + 4)
  assert stats["sent_bytes"] == 3 * sum(
      c.bytes for c in gs.qsgd().wire(37, jnp.float32))
  # Buckets of 10: 6 words and 4 norms.
  assert gs.qsgd(bucket_size=10).wire(37, jnp.float32)[0].bytes == 40


@pytest.mark.parametrize("bits", [0, 17, 2.0, True])
def test_bad_bits_raise(bits):
  with pytest.raises(ValueError, match="bits"):
    gs.qsgd(bits)


def test_bad_bucket_size_raises():
  with pytest.raises(ValueError, match="bucket_size"):
    gs.qsgd(bucket_size=0)
