"""comm_stats: bytes against hand-computed figures; 64-bit counters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs
from gsparse_jax._src import stats as stats_lib
import runners

WORKERS = 8
STEPS = 3
# 300 float32 values in two leaves, plus one int leaf that never travels.
PARAMS = {"w": jnp.zeros((20, 10)), "b": jnp.zeros((100,)),
          "step": jnp.zeros((), jnp.int32)}
D = 300


def _grads():
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(STEPS, WORKERS) + p.shape),
                            p.dtype), PARAMS)


# Hand-computed bytes per worker per step, k = round(0.05 * 300) = 15.
@pytest.mark.optax_promotion  # int leaves through optax
@pytest.mark.parametrize("compressor, per_step_bytes, per_step_values", [
    (gs.top_k(0.05), 15 * (4 + 4), 15),  # value + int32 index
    (gs.rand_k(0.05, shared=True), 15 * 4, 15),  # shared indices: values only
    (gs.rand_k(0.05, shared=False), 15 * (4 + 4), 15),
    (gs.dense(), 300 * 4, 300),
])
def test_bytes_equal_hand_computed(compressor, per_step_bytes,
                                   per_step_values):
  tx = optax.chain(gs.sparsify(compressor, axis_name=runners.AXIS),
                   optax.sgd(0.1))
  _, state = runners.run_steps(tx, PARAMS, _grads(), "vmap")
  stats = gs.comm_stats(state)
  assert stats["workers"] == WORKERS
  assert stats["steps"] == STEPS and stats["skipped_steps"] == 0
  assert stats["sent_bytes"] == STEPS * per_step_bytes
  assert stats["sent_values"] == STEPS * per_step_values
  assert stats["dense_bytes"] == STEPS * D * 4
  assert stats["dense_values"] == STEPS * D
  assert stats["density"] == pytest.approx(per_step_values / D)
  assert stats["compression"] == pytest.approx(D * 4 / per_step_bytes)
  np.testing.assert_array_equal(stats["per_worker"]["sent_bytes"],
                                np.full(WORKERS, STEPS * per_step_bytes))


def test_layer_granularity_bytes_and_bfloat16_values():
  params = {"w": jnp.zeros((20, 10), jnp.bfloat16), "b": jnp.zeros((100,))}
  tx = gs.sparsify(gs.top_k(0.05), granularity="layer")
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  _, state = tx.update(grads, tx.init(params))
  stats = gs.comm_stats(state)
  # b: k=5 float32 (4+4 bytes); w: k=10 bfloat16 (2+4 bytes).
  assert stats["sent_bytes"] == 5 * 8 + 10 * 6
  assert stats["dense_bytes"] == 100 * 4 + 200 * 2
  assert stats["sent_values"] == 15


def test_counter_carries_past_32_bits():
  counter = jnp.zeros((1, 2), jnp.uint32)
  big = 3 * (1 << 32) + 7
  counter = stats_lib.add_to_counter(counter, big)
  counter = stats_lib.add_to_counter(counter,
                                     jnp.asarray(0xFFFFFFFF, jnp.uint32))
  value = int(counter[0, 0]) + (int(counter[0, 1]) << 32)
  assert value == big + 0xFFFFFFFF


def test_comm_stats_without_sparsify_state_is_an_error():
  with pytest.raises(ValueError, match="found no gsparse_jax.SparsifyState"):
    gs.comm_stats(optax.adam(1e-3).init({"w": jnp.zeros(3)}))


def test_multi_transform_states_add_up():
  params = {"a": jnp.zeros((10,)), "b": jnp.zeros((20,))}
  tx = optax.multi_transform(
      {"x": gs.sparsify(gs.top_k(k=1)), "y": gs.sparsify(gs.top_k(k=2))},
      {"a": "x", "b": "y"})
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  stats = gs.comm_stats(state)
  assert stats["sent_values"] == 3
  assert stats["dense_values"] == 30
