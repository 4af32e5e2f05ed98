"""`sparsify(..., keep_dense=...)`: chosen leaves all-reduced densely in the
same transformation, without feedback memory; the rest compressed as if
those leaves were not there. Checked against the NumPy feedback loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
import references
import runners

WORKERS, STEPS, K = 8, 3, 4
# Sorted leaf order: b (vector), n (vector), w (matrix), i (int, passes).
PARAMS = {"b": jnp.zeros(3), "i": jnp.zeros(2, jnp.int32),
          "n": jnp.zeros(5), "w": jnp.zeros((4, 6))}
FLOATS = {k: v for k, v in PARAMS.items() if k != "i"}
GRADS = {**runners.normal_grads(FLOATS, STEPS, WORKERS, seed=5),
         "i": jnp.ones((STEPS, WORKERS, 2), jnp.int32)}
KEEP = gs.small_or_vector_leaves(min_size=10)


def _run(context, mesh, feedback="ef", keep=KEEP, granularity="global"):
  tx = gs.sparsify(gs.top_k(k=K), feedback=feedback, axis_name=runners.AXIS,
                   granularity=granularity, keep_dense=keep)
  return runners.run_steps(tx, PARAMS, GRADS, context, mesh)


def _rows(tree, name):
  return np.asarray(tree[name], np.float64).reshape(STEPS, WORKERS, -1)


# EF in every context; EF21M (whose output is a momentum) under shard_map.
@pytest.mark.parametrize("context, feedback", [
    *((c, "ef") for c in runners.CONTEXTS), ("shard_map", "ef21m")])
def test_kept_leaves_get_the_exact_mean_and_the_rest_the_reference(
    context, feedback, mesh):
  outputs, state = _run(context, mesh, feedback)
  # b and n: the workers' mean, whatever the feedback rule (EF21M would
  # otherwise send its momentum).
  for name in ("b", "n"):
    got = _rows(outputs, name)
    mean = _rows(GRADS, name).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(got, np.broadcast_to(mean, got.shape),
                               rtol=1e-6, atol=1e-7)
  # w alone goes through Top-k with the rule, as if b and n were not there.
  run = references.feedback_run(_rows(GRADS, "w"), references.per_worker(
      references.top_k_select(K)), feedback=feedback, dtype=np.float32)
  np.testing.assert_allclose(_rows(outputs, "w")[:, 0], run.outputs,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(outputs["i"]),
                                np.asarray(GRADS["i"]))
  # Two segments: the matrix (compressed) and the vectors (dense, no memory).
  plan = state.plan
  assert [(s.size, s.kept_dense) for s in plan.segments] == [(8, True),
                                                             (24, False)]
  assert state.memory[0] == () and state.shared_memory[0] == ()
  assert jax.tree.leaves(state.memory[1])[0].shape[-1] == 24
  stats = gs.comm_stats(state)
  assert stats["sent_bytes"] == STEPS * (8 * 4 + K * 8)
  assert stats["dense_bytes"] == STEPS * 32 * 4
  assert stats["sent_values"] == STEPS * (8 + K)


def test_a_bool_pytree_and_a_prefix_choose_as_the_predicate_does(mesh):
  by_predicate, _ = _run("vmap", mesh)
  mask = {"b": True, "i": False, "n": True, "w": False}
  by_mask, _ = _run("vmap", mesh, keep=mask)
  jax.tree.map(np.testing.assert_array_equal, by_mask, by_predicate)
  # `True` for everything: exactly what sparsify(dense()) returns.
  all_dense, state = _run("vmap", mesh, keep=True)
  tx = gs.sparsify(gs.dense(), axis_name=runners.AXIS)
  plain, _ = runners.run_steps(tx, PARAMS, GRADS, "vmap")
  jax.tree.map(np.testing.assert_array_equal, all_dense, plain)
  assert gs.comm_stats(state)["density"] == 1.0


def test_layer_granularity_keeps_each_chosen_leaf_its_own_dense_segment(mesh):
  outputs, state = _run("vmap", mesh, granularity="layer")
  assert [(s.size, s.kept_dense) for s in state.plan.segments] == [
      (3, True), (5, True), (24, False)]
  by_global, _ = _run("vmap", mesh)
  jax.tree.map(np.testing.assert_array_equal, outputs, by_global)


def test_tensor_parallel_specs_and_steps_with_kept_leaves():
  """On a (data, model) mesh a kept-dense vector and a sharded matrix."""
  mesh = jax.make_mesh((4, 2), (runners.AXIS, "model"))
  tx = gs.sparsify(gs.top_k(k=2), axis_name=runners.AXIS, keep_dense=KEEP)
  params = {"b": jnp.zeros(3), "w": jnp.zeros((4, 6))}
  param_specs = {"b": P(), "w": P(None, "model")}
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params),
                                   runners.AXIS, param_specs)
  assert specs.memory == ((), P((runners.AXIS, "model")))
  put = lambda tree, spec: jax.device_put(tree, jax.tree.map(
      lambda s: NamedSharding(mesh, s), spec))
  state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,),
                                out_specs=specs))(put(params, param_specs))
  grad_specs = {"b": P(runners.AXIS), "w": P(runners.AXIS, None, "model")}

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(grad_specs, specs),
                     out_specs=({"b": P(), "w": P(None, "model")}, specs))
  def step(grads, state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), state)

  rng = np.random.default_rng(0)
  grads = {"b": rng.normal(size=(4, 3)), "w": rng.normal(size=(4, 4, 6))}
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
  out, state = step(put(grads, grad_specs), state)
  np.testing.assert_allclose(out["b"], np.asarray(grads["b"]).mean(0),
                             rtol=1e-6)
  # Each model shard (3 columns) compressed on its own: Top-2 per worker.
  expected = np.zeros((4, 6))
  for shard in (slice(0, 3), slice(3, 6)):
    for g in np.asarray(grads["w"]):
      part = g[:, shard].reshape(-1)
      expected[:, shard] += references.sparse.keep(
          part, references.top_k_indices(part, 2)).reshape(4, 3) / 4
  np.testing.assert_allclose(out["w"], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("keep, error, match", [
    ("vectors", ValueError, "`keep_dense` must be None, a"),
    ({"b": True}, ValueError, "`keep_dense` must be None, a"),
    ({"b": 1, "n": True, "w": False}, ValueError,
     "`keep_dense` must be None, a"),
    (lambda path, leaf: "yes", ValueError, r"keep_dense for leaf \['b'\]"),
])
def test_bad_keep_dense_is_a_clear_error(keep, error, match):
  params = {"b": jnp.zeros(3), "n": jnp.zeros(2), "w": jnp.zeros((2, 2))}
  with pytest.raises(error, match=match):
    gs.sparsify(gs.top_k(k=1), keep_dense=keep).init(params)


def test_kept_leaves_leave_the_chain_as_optax_masked_cannot():
  """The reason for keep_dense: `optax.masked` around sparsify passes the
  masked-out leaves through un-aggregated (each worker keeps its own)."""
  grads = {"b": jnp.arange(8.0).reshape(8, 1), "w": jnp.ones((8, 4))}
  params = {"b": jnp.zeros(1), "w": jnp.zeros(4)}
  masked = optax.masked(gs.sparsify(gs.top_k(k=1), axis_name=runners.AXIS),
                        {"b": False, "w": True})
  kept = gs.sparsify(gs.top_k(k=1), axis_name=runners.AXIS,
                     keep_dense={"b": True, "w": False})
  outs = {}
  for name, tx in (("masked", masked), ("kept", kept)):
    state = jax.vmap(lambda _, tx=tx: tx.init(params))(jnp.arange(8))
    outs[name] = jax.vmap(tx.update, axis_name=runners.AXIS)(grads, state)[0]
  np.testing.assert_array_equal(outs["masked"]["b"], grads["b"])
  np.testing.assert_allclose(outs["kept"]["b"],
                             np.full((8, 1), np.arange(8.0).mean()))
