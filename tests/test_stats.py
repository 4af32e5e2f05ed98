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


def test_every_counter_after_a_skipped_step():
  """A NaN step moves `steps` and `skipped_steps` only; nothing else counts.

  hard_threshold(0) passes every entry, so each applied step fills the
  capacity and overflows the rest: every counter moves by a known amount.
  Layer granularity with a bfloat16 leaf separates values from bytes.
  """
  params = {"w": jnp.zeros((20, 10), jnp.bfloat16), "b": jnp.zeros((100,)),
            "step": jnp.zeros((), jnp.int32)}
  tx = gs.sparsify(gs.hard_threshold(0.0, capacity_ratio=0.1),
                   axis_name=runners.AXIS, granularity="layer")
  rng = np.random.default_rng(1)
  grads = {name: rng.normal(size=(STEPS, WORKERS) + p.shape).astype(p.dtype)
           for name, p in params.items()}
  grads["b"][1, 3, 7] = np.nan  # one worker's NaN skips step 1 everywhere
  _, state = runners.run_steps(tx, params, jax.tree.map(jnp.asarray, grads),
                               "vmap")
  # Per applied step and worker, by hand: w sends capacity 20 of its 200
  # bfloat16 entries (2-byte value + 4-byte index) and overflows 180; b
  # sends 10 of its 100 float32 entries (4 + 4 bytes) and overflows 90; the
  # int leaf never travels.
  applied = STEPS - 1
  expected = {
      "sent_values": applied * (20 + 10),
      "sent_bytes": applied * (20 * 6 + 10 * 8),
      "dense_values": applied * (200 + 100),
      "dense_bytes": applied * (200 * 2 + 100 * 4),
      "overflow_values": applied * (180 + 90),
  }
  stats = gs.comm_stats(state)
  assert stats["steps"] == STEPS and stats["skipped_steps"] == 1
  assert stats["workers"] == WORKERS
  for name, value in expected.items():
    assert stats[name] == value, name
    np.testing.assert_array_equal(stats["per_worker"][name],
                                  np.full(WORKERS, value), err_msg=name)
  np.testing.assert_array_equal(stats["per_worker"]["steps"], STEPS)
  np.testing.assert_array_equal(stats["per_worker"]["skipped_steps"], 1)
  assert stats["density"] == pytest.approx(30 / 300)
  assert stats["compression"] == pytest.approx(800 / 200)


def test_workers_recorded_by_the_update_win_over_the_state_rows():
  # Nested vmap over ("model", "data") gives 2 * 4 rows for 4 workers.
  stats = jax.vmap(jax.vmap(lambda _: stats_lib.init_stats()))(
      jnp.zeros((2, 4)))
  assert gs.comm_stats(stats)["workers"] == 8  # nothing recorded yet
  recorded = jax.vmap(jax.vmap(lambda s: stats_lib.record_step(
      s, applied=True, sent_values=1, sent_bytes=8, dense_values=10,
      dense_bytes=40, overflow_values=0, workers=4)))(stats)
  assert gs.comm_stats(recorded)["workers"] == 4
  np.testing.assert_array_equal(recorded.workers, np.full((2, 4, 1), 4))
  # None keeps what was recorded.
  again = stats_lib.record_step(
      jax.tree.map(lambda x: x[0, 0], recorded), applied=False,
      sent_values=0, sent_bytes=0, dense_values=0, dense_bytes=0,
      overflow_values=0)
  assert int(again.workers[0]) == 4 and int(again.skipped_steps[0]) == 1


@pytest.mark.optax_promotion  # nnx.Optimizer's step counter is uint32
def test_comm_stats_finds_the_state_in_every_nnx_form():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.chain(
      gs.sparsify(gs.top_k(k=1)), optax.sgd(0.1)), wrt=nnx.Param)
  grads = nnx.state(model, nnx.Param)
  optimizer.update(model, jax.tree.map(jnp.ones_like, grads))
  expected = gs.comm_stats(nnx.as_pure(optimizer.opt_state))
  assert expected["steps"] == 1 and expected["sent_bytes"] == 8
  for form in (optimizer.opt_state, nnx.state(optimizer),
               nnx.state((model, optimizer)),
               nnx.to_pure_dict(nnx.state(optimizer))):
    got = gs.comm_stats(form)
    assert {k: v for k, v in got.items() if k != "per_worker"} == {
        k: v for k, v in expected.items() if k != "per_worker"}


def test_sparsify_records_its_workers_not_the_state_rows():
  # axis_name=None: one worker, whatever the update compresses.
  tx = gs.sparsify(gs.top_k(k=1))
  _, state = tx.update(jnp.ones(4), tx.init(jnp.zeros(4)))
  assert gs.comm_stats(state)["workers"] == 1
  # Nested vmap: 2 x 4 state rows, 4 workers along the compressed axis.
  tx = gs.sparsify(gs.top_k(k=1), axis_name="data")
  init = jax.vmap(jax.vmap(lambda _: tx.init(jnp.zeros(4))))
  state = init(jnp.zeros((2, 4)))
  step = jax.vmap(jax.vmap(lambda g, s: tx.update(g, s), axis_name="data"),
                  axis_name="model")
  _, state = step(jnp.ones((2, 4, 4)), state)
  assert gs.comm_stats(state)["workers"] == 4
