"""gs.sign: the NumPy reference with error feedback, 8 workers, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs
import references
import runners

WORKERS = 8
STEPS = 4
PARAMS = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((7,))}  # 37 entries


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
@pytest.mark.parametrize("scale", ["l1", "l2"])
def test_matches_reference_with_error_feedback(scale, context, mesh):
  tx = gs.sparsify(gs.sign(scale=scale), axis_name=runners.AXIS)
  grads = runners.normal_grads(PARAMS, STEPS, WORKERS, seed=1)
  outputs, state = runners.run_steps(tx, PARAMS, grads, context, mesh)

  expected, memory, sent, _ = references.feedback_run(
      runners.flat(grads).astype(np.float64),
      references.per_worker(lambda a, t, i: references.quantized.select_sign(
          a, t, i, scale)))
  got = runners.flat(outputs)
  runners.assert_every_worker_matches(
      got, expected, state.memory[0], memory,
      rtol=1e-5, atol=1e-6)
  # Every worker sent one magnitude: its entries are +-scale exactly.
  assert np.all(np.abs(np.abs(sent) - np.abs(sent[..., :1])) == 0)


def test_vmap_and_shard_map_are_bit_identical(mesh):
  tx = gs.sparsify(gs.sign(), axis_name=runners.AXIS)
  grads = runners.normal_grads(PARAMS, 3, WORKERS, seed=2)
  by_vmap, _ = runners.run_steps(tx, PARAMS, grads, "vmap")
  by_shard_map, _ = runners.run_steps(tx, PARAMS, grads, "shard_map", mesh)
  jax.tree.map(np.testing.assert_array_equal, by_vmap, by_shard_map)


def test_zero_is_positive_and_a_zero_vector_sends_zeros():
  c = gs.sign()
  x = jnp.array([0.0, -2.0, 0.0, 6.0])
  sent = c.add_sent(jnp.zeros(4), gs.compress(c, x, (), jax.random.key(0)),
                    1.0)
  np.testing.assert_array_equal(sent, [2.0, -2.0, 2.0, 2.0])
  zeros = gs.compress(c, jnp.zeros(5), (), jax.random.key(0))
  np.testing.assert_array_equal(c.add_sent(jnp.zeros(5), zeros, 1.0),
                                np.zeros(5))


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_bytes_are_the_declared_wire_cost(granularity):
  tx = gs.sparsify(gs.sign(), axis_name=runners.AXIS,
                   granularity=granularity)
  grads = runners.normal_grads(PARAMS, 2, 2, seed=3)
  _, state = runners.run_steps(tx, PARAMS, grads, "vmap")
  stats = gs.comm_stats(state)
  # Hand count: ceil(entries / 32) uint32 words + a float32 scale per segment.
  words = [2] if granularity == "global" else [1, 1]  # 37; 7 and 30
  assert stats["sent_bytes"] == 2 * sum(4 * w + 4 for w in words)
  declared = sum(c.bytes for size in ([37] if granularity == "global"
                                      else [7, 30])
                 for c in gs.sign().wire(size, jnp.float32))
  assert stats["sent_bytes"] == 2 * declared
  assert stats["dense_bytes"] == 2 * 37 * 4


def test_ef_signsgd_trains_a_quadratic():
  """EF-signSGD reaches the minimum of 0.5 ||x - t||^2."""
  target = jnp.asarray(np.random.default_rng(4).normal(size=50), jnp.float32)
  tx = optax.chain(gs.sparsify(gs.sign()), optax.sgd(0.2))
  x = jnp.zeros(50)
  state = tx.init(x)

  @jax.jit
  def step(x, state):
    updates, state = tx.update(x - target, state)
    return optax.apply_updates(x, updates), state

  for _ in range(200):
    x, state = step(x, state)
  assert float(jnp.linalg.norm(x - target)) < 1e-2 * float(
      jnp.linalg.norm(target))


@pytest.mark.parametrize("bad", ["l3", None, 1])
def test_bad_scale_raises(bad):
  with pytest.raises(ValueError, match="scale"):
    gs.sign(scale=bad)
