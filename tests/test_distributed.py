"""Training under jax.shard_map: state specs, local gradients, compiled HLO."""

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

AXIS = "data"
WORKERS = 8
FEATURES, OUTPUTS, BATCH = 16, 4, 8
LR = 0.1


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(WORKERS * BATCH, FEATURES)).astype(np.float32)
  w_true = rng.normal(size=(FEATURES, OUTPUTS))
  y = (x @ w_true + 0.1 * rng.normal(size=(WORKERS * BATCH, OUTPUTS))
       ).astype(np.float32)
  return x, y


def _init_params():
  return {"w": jnp.zeros((FEATURES, OUTPUTS)), "b": jnp.zeros((OUTPUTS,))}


def _make_step(tx, mesh, specs, grad_fn):
  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), specs, P(AXIS), P(AXIS)),
                     out_specs=(P(), specs, P()))
  def step(params, opt_state, x, y):
    loss, grads = grad_fn(_loss)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            jax.lax.pmean(loss, AXIS))
  return step


def _setup(mesh, compressor):
  tx = optax.chain(gs.sparsify(compressor, axis_name=AXIS), optax.sgd(LR))
  params = _init_params()
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), AXIS)
  init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                               out_specs=specs))
  return tx, params, specs, init


def _local_grad_fn(loss):
  return gs.local_value_and_grad(loss, AXIS)


def test_twenty_shard_map_steps_match_numpy_reference(mesh):
  tx, params, specs, init = _setup(mesh, gs.top_k(0.1, method="sort"))
  opt_state = init(params)
  step = _make_step(tx, mesh, specs, _local_grad_fn)
  x, y = _data()
  sharding = NamedSharding(mesh, P(AXIS))
  x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready(loss)

  k = round(0.1 * (FEATURES * OUTPUTS + OUTPUTS))
  w, b, memory = references.linear_regression_top_k_ef(
      np.asarray(x), np.asarray(y), WORKERS, steps=20, k=k, lr=LR)
  np.testing.assert_allclose(params["w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(params["b"], b, rtol=1e-4, atol=1e-5)
  # Every worker's memory is in the state, sharded over the mesh.
  sparsify_state = opt_state[0]
  assert sparsify_state.memory[0].shape == (WORKERS, w.size + b.size)
  assert _is_sharded_over_workers(sparsify_state.memory[0])
  np.testing.assert_allclose(sparsify_state.memory[0], memory, rtol=1e-4,
                             atol=1e-5)
  stats = gs.comm_stats(opt_state)
  assert stats["workers"] == WORKERS and stats["steps"] == 20
  assert stats["sent_bytes"] == 20 * k * (4 + 4)


def _is_sharded_over_workers(x):
  spec = x.sharding.spec
  return spec[0] == AXIS and all(a is None for a in spec[1:])


def _compiled_text(step, params, opt_state, mesh):
  x, y = _data()
  sharding = NamedSharding(mesh, P(AXIS))
  x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
  return step.lower(params, opt_state, x, y).compile().as_text()


def test_compiled_step_has_sparse_all_gather_and_no_gradient_all_reduce(mesh):
  tx, params, specs, init = _setup(mesh, gs.top_k(0.1, method="sort"))
  opt_state = init(params)
  d = FEATURES * OUTPUTS + OUTPUTS
  k = round(0.1 * d)

  local = runners.compiled_collectives(_compiled_text(
      _make_step(tx, mesh, specs, _local_grad_fn), params, opt_state, mesh))
  assert ("all-gather", WORKERS * k) in local
  assert all(size < k for op, size in local if op == "all-reduce"), local

  # The check can fail: plain jax.value_and_grad all-reduces the gradient.
  plain = runners.compiled_collectives(_compiled_text(
      _make_step(tx, mesh, specs, jax.value_and_grad), params, opt_state,
      mesh))
  assert any(op == "all-reduce" and size >= FEATURES * OUTPUTS
             for op, size in plain), plain


def test_local_grad_under_shard_map_is_per_worker(mesh):
  x, y = _data()
  params = _init_params()

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                     out_specs=P(AXIS))
  def grads(params, x, y):
    g = gs.local_grad(_loss, AXIS)(params, x, y)
    return g["b"][None]

  sharding = NamedSharding(mesh, P(AXIS))
  got = np.asarray(
      grads(params, jax.device_put(x, sharding), jax.device_put(y, sharding)))
  for i in range(WORKERS):
    rows = slice(i * BATCH, (i + 1) * BATCH)
    expected = jax.grad(_loss)(params, x[rows], y[rows])["b"]
    np.testing.assert_allclose(got[i], expected, rtol=1e-5, atol=1e-6)


def test_local_grad_has_aux_and_vmap():
  loss = lambda w, x: (jnp.sum(w * x), jnp.sum(x))
  grads, aux = jax.vmap(gs.local_grad(loss, AXIS, has_aux=True),
                        in_axes=(None, 0), axis_name=AXIS)(
                            jnp.ones(3), jnp.eye(3))
  np.testing.assert_array_equal(grads, np.eye(3))
  np.testing.assert_array_equal(aux, [1.0, 1.0, 1.0])


@pytest.mark.optax_promotion  # int leaves through optax
@pytest.mark.parametrize("jit", [False, True])
def test_state_types_and_shardings_stable_after_update(mesh, jit):
  tx = optax.chain(gs.sparsify(gs.top_k(0.1), axis_name=AXIS),
                   optax.adam(1e-3))
  params = _init_params()
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          params)
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, abstract), AXIS)
  init = jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs)
  if jit:
    init = jax.jit(init)
  opt_state = init(params)

  def update(params, opt_state, grads):
    local = jax.tree.map(lambda g: g[0], grads)
    updates, opt_state = tx.update(local, opt_state, params)
    return updates, opt_state

  update = jax.shard_map(update, mesh=mesh, in_specs=(P(), specs, P(AXIS)),
                         out_specs=(P(), specs))
  if jit:
    update = jax.jit(update)
  grads = jax.device_put(
      jax.tree.map(lambda p: jnp.ones((WORKERS,) + p.shape), params),
      NamedSharding(mesh, P(AXIS)))
  _, new_state = update(params, opt_state, grads)
  jax.block_until_ready(new_state)
  describe = lambda s: jax.tree.map(lambda x: (jax.typeof(x), x.sharding),
                                    s)
  assert describe(opt_state) == describe(new_state)
  # Per-worker leaves sharded over the mesh, Adam's moments replicated.
  assert _is_sharded_over_workers(new_state[0].memory[0])
  assert all(a is None for a in new_state[1][0].mu["w"].sharding.spec)


def test_state_partition_specs_structure():
  tx = optax.chain(gs.sparsify(gs.top_k(0.5), feedback="ef21",
                               axis_name=AXIS), optax.adam(1e-3))
  specs = gs.state_partition_specs(tx.init({"w": jnp.zeros(4)}), AXIS)
  sparsify_specs = specs[0]
  assert sparsify_specs.count == P()
  assert sparsify_specs.shared_memory == (P(),)
  assert jax.tree.leaves(sparsify_specs.memory) == [P(AXIS)]
  assert all(s == P(AXIS) for s in sparsify_specs.stats)
  assert all(s == P() for s in jax.tree.leaves(specs[1]))


@pytest.mark.parametrize("wrap, message", [
    (lambda tx: optax.MultiSteps(tx, 2), r"optax.MultiSteps.*gs.multi_steps"),
    (lambda tx: optax.apply_if_finite(tx, 3),
     r"optax.apply_if_finite.*nonfinite='skip'"),
])
def test_optax_wrappers_around_sparsify_are_refused_with_the_alternative(
    wrap, message):
  tx = wrap(optax.chain(gs.sparsify(gs.top_k(0.5), axis_name=AXIS),
                        optax.sgd(LR)))
  state = jax.eval_shape(tx.init, _init_params())
  with pytest.raises(ValueError, match=message):
    gs.state_partition_specs(state, AXIS)
  # Around the optimizer alone (after sparsify) they are fine.
  inside = optax.chain(gs.sparsify(gs.top_k(0.5), axis_name=AXIS),
                       wrap(optax.sgd(LR)))
  specs = gs.state_partition_specs(
      jax.eval_shape(inside.init, _init_params()), AXIS)
  assert specs[0].memory == (P(AXIS),)
