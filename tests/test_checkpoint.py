"""The whole optax state round-trips through Orbax and flax serialization.

Resuming from a checkpoint gives the same trajectory as not stopping: the
error memory, RNG step count and statistics are all in the state.
"""

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs

STEPS = 6


def _tx():
  return optax.chain(gs.sparsify(gs.rand_k(0.2, seed=1), feedback="ef21m"),
                     optax.adam(1e-2))


def _grads(t):
  rng = np.random.default_rng(t)
  return {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}


def _run(params, state, steps):
  tx = _tx()
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(g, s, p)))
  for t in steps:
    params, state = step(params, state, _grads(t))
  return params, state


def _start():
  params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros((4,), jnp.bfloat16)}
  return params, _tx().init(params)


def _resume_equals_uninterrupted(save_and_restore):
  params, state = _start()
  full_params, full_state = _run(params, state, range(STEPS))
  half_params, half_state = _run(params, state, range(STEPS // 2))
  half_params, half_state = save_and_restore((half_params, half_state))
  resumed_params, resumed_state = _run(half_params, half_state,
                                       range(STEPS // 2, STEPS))
  jax.tree.map(np.testing.assert_array_equal, resumed_params, full_params)
  jax.tree.map(np.testing.assert_array_equal, resumed_state, full_state)
  # rand_k(0.2) of 24 values: 5 float32 values a step, no indices.
  assert gs.comm_stats(resumed_state)["sent_bytes"] == STEPS * 5 * 4


@pytest.mark.optax_promotion  # int leaves through optax
def test_orbax_round_trip_resumes_same_trajectory(tmp_path):
  def save_and_restore(tree):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    # Same structure (NamedTuples included), dtypes and values.
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    return restored

  _resume_equals_uninterrupted(save_and_restore)


@pytest.mark.optax_promotion  # int leaves through optax
def test_flax_serialization_round_trip_resumes_same_trajectory():
  def save_and_restore(tree):
    blob = flax.serialization.to_bytes(tree)
    template = jax.tree.map(jnp.zeros_like, tree)
    return flax.serialization.from_bytes(template, blob)

  _resume_equals_uninterrupted(save_and_restore)


@pytest.mark.optax_promotion  # int leaves through optax
def test_sharded_state_round_trips_with_every_workers_memory(tmp_path, mesh):
  """The shard_map state (memory sharded over 8 devices) saves and restores
  with its sharding, and training resumes on the same trajectory."""
  axis = "data"
  tx = optax.chain(gs.sparsify(gs.top_k(0.25), axis_name=axis),
                   optax.adam(1e-2))
  params = {"w": jnp.zeros((8, 4))}
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), axis)
  opt_state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                                    out_specs=specs))(params)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), specs, P(axis)), out_specs=(P(), specs))
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(jax.tree.map(lambda g: g[0], grads),
                                   opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(params, opt_state, steps):
    for t in steps:
      g = np.random.default_rng(t).normal(size=(8, 8, 4)).astype(np.float32)
      grads = jax.device_put({"w": g}, NamedSharding(mesh, P(axis)))
      params, opt_state = step(params, opt_state, grads)
      jax.block_until_ready(params)
    return params, opt_state

  full = run(params, opt_state, range(4))
  half = run(params, opt_state, range(2))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "sharded", half)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, half)
  restored = checkpointer.restore(tmp_path / "sharded", abstract)
  memory = restored[1][0].memory[0]
  assert memory.shape == (8, 32) and memory.sharding.spec[0] == axis
  np.testing.assert_array_equal(memory, half[1][0].memory[0])
  resumed = run(*restored, range(2, 4))
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
