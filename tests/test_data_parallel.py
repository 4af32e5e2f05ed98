"""`gs.data_parallel` and `gs.nnx_data_parallel`: the jit-style step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
import references
import runners

AXIS = "data"
WORKERS = 8
FEATURES, OUTPUTS, BATCH = 16, 4, 8
LR, RATIO, STEPS = 0.1, 0.1, 4
K = round(RATIO * (FEATURES * OUTPUTS + OUTPUTS))


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(WORKERS * BATCH, FEATURES)).astype(np.float32)
  y = (x @ rng.normal(size=(FEATURES, OUTPUTS))).astype(np.float32)
  return x, y


def _params():
  return {"w": jnp.zeros((FEATURES, OUTPUTS)), "b": jnp.zeros((OUTPUTS,))}


def _tx():
  return optax.chain(gs.sparsify(gs.top_k(RATIO, method="sort"),
                                 axis_name=AXIS), optax.sgd(LR))


def _run(step, params, opt_state, batch, steps=STEPS):
  for _ in range(steps):
    params, opt_state, *rest = jax.block_until_ready(
        step(params, opt_state, *batch))
  return params, opt_state, rest


@functools.cache
def _trained(axis_type):
  """(mesh, dp, jitted step, params, opt_state) after STEPS steps."""
  mesh = jax.make_mesh((WORKERS,), (AXIS,), axis_types=(axis_type,))
  dp = gs.data_parallel(_loss, _tx(), mesh=mesh, axis_name=AXIS)
  step = jax.jit(dp.step)
  opt_state = dp.init(_params())
  # The batch as a user may pass it: host arrays, not yet split over AXIS.
  params, opt_state, _ = _run(step, _params(), opt_state, _data())
  return mesh, dp, step, params, opt_state


@pytest.fixture(params=[AxisType.Explicit, AxisType.Auto],
                ids=["explicit", "auto"])
def dp_run(request):
  return _trained(request.param)


def test_matches_numpy_reference_and_hand_written_shard_map(dp_run):
  mesh, _, _, params, opt_state = dp_run
  x, y = _data()
  w, b, memory = references.linear_regression_top_k_ef(
      x, y, WORKERS, steps=STEPS, k=K, lr=LR)
  np.testing.assert_allclose(params["w"], w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(params["b"], b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(opt_state[0].memory[0], memory, rtol=1e-4,
                             atol=1e-5)
  assert opt_state[0].memory[0].sharding.spec[0] == AXIS
  stats = gs.comm_stats(opt_state)
  assert stats["workers"] == WORKERS and stats["steps"] == STEPS
  assert stats["sent_bytes"] == STEPS * K * 8

  # The step a user writes by hand (README "Training under shard_map").
  hand_step, hand_state = runners.shard_map_training_step(
      _tx(), _params(), mesh,
      lambda p, x, y: gs.local_value_and_grad(_loss, AXIS)(p, x, y)[1])

  batch = jax.device_put(_data(), NamedSharding(mesh, P(AXIS)))
  hand_params, hand_state, _ = _run(hand_step, _params(), hand_state, batch)
  jax.tree.map(np.testing.assert_array_equal, params, hand_params)
  jax.tree.map(np.testing.assert_array_equal, opt_state, hand_state)


def test_compiled_step_sends_top_k_and_no_dense_gradient():
  mesh, _, step, params, opt_state = _trained(AxisType.Explicit)
  batch = jax.device_put(_data(), NamedSharding(mesh, P(AXIS)))
  found = runners.compiled_collectives(
      step.lower(params, opt_state, *batch).compile().as_text())
  assert ("all-gather", WORKERS * K) in found, found
  assert all(size < K for op, size in found if op == "all-reduce"), found

  # The check can fail: with gs.dense() the same step all-reduces the
  # whole gradient (all FEATURES * OUTPUTS + OUTPUTS values).
  dense = gs.data_parallel(_loss, optax.chain(
      gs.sparsify(gs.dense(), axis_name=AXIS), optax.sgd(LR)), mesh=mesh)
  found = runners.compiled_collectives(jax.jit(dense.step).lower(
      params, dense.init(params), *batch).compile().as_text())
  assert ("all-reduce", FEATURES * OUTPUTS + OUTPUTS) in found, found


def test_has_aux_is_the_mean_over_workers(mesh):
  def loss_with_aux(params, x, y):
    return _loss(params, x, y), {"max_x": jnp.max(x), "first": x[0, 0]}

  dp = gs.data_parallel(loss_with_aux, _tx(), mesh=mesh, has_aux=True)
  x, y = _data(1)
  _, _, loss, aux = jax.jit(dp.step)(_params(), dp.init(_params()), x, y)
  per_worker = x.reshape(WORKERS, BATCH, FEATURES)
  np.testing.assert_allclose(loss, np.mean(y ** 2), rtol=1e-5)
  np.testing.assert_allclose(aux["max_x"], per_worker.max((1, 2)).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(aux["first"], per_worker[:, 0, 0].mean(),
                             rtol=1e-6)


# ------------------------------------------- tensor parallel: ("data", "model")

HIDDEN = 4


def _mlp_loss(params, x, y):
  """Megatron-style MLP, hidden units split over "model"."""
  out = jax.lax.psum(jnp.tanh(x @ params["w1"]) @ params["w2"], "model")
  return jnp.mean((out + params["b"] - y) ** 2)


MLP_SPECS = {"b": P(), "w1": P(None, "model"), "w2": P("model", None)}


def _mlp_params():
  rng = np.random.default_rng(3)
  return {"b": np.zeros(OUTPUTS, np.float32),
          "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32),
          "w2": rng.normal(size=(HIDDEN, OUTPUTS)).astype(np.float32)}


def test_param_specs_on_a_data_model_mesh_match_hand_written_step():
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  tx = optax.chain(gs.sparsify(gs.top_k(0.3, method="sort"), axis_name=AXIS),
                   optax.sgd(LR, momentum=0.9))
  dp = gs.data_parallel(_mlp_loss, tx, mesh=mesh, param_specs=MLP_SPECS)
  x, y = _data(2)
  params, opt_state, _ = _run(jax.jit(dp.step), _mlp_params(),
                              dp.init(_mlp_params()), (x, y), steps=2)
  assert params["w1"].sharding.spec == P(None, "model")

  put = lambda tree, specs: jax.device_put(tree, jax.tree.map(
      lambda s: NamedSharding(mesh, s), specs))
  hand_params = put(_mlp_params(), MLP_SPECS)
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, hand_params),
                                   AXIS, MLP_SPECS)
  hand_state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(MLP_SPECS,),
                                     out_specs=specs))(hand_params)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(MLP_SPECS, specs, P(AXIS), P(AXIS)),
                     out_specs=(MLP_SPECS, specs))
  def hand_step(params, opt_state, x, y):
    _, grads = gs.local_value_and_grad(_mlp_loss, AXIS)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  hand_params, hand_state, _ = _run(
      hand_step, hand_params, hand_state,
      jax.device_put((x, y), NamedSharding(mesh, P(AXIS))), steps=2)
  jax.tree.map(np.testing.assert_array_equal, params, hand_params)
  jax.tree.map(np.testing.assert_array_equal, opt_state, hand_state)


def test_sharded_params_without_param_specs_raise_naming_param_specs():
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  dp = gs.data_parallel(_mlp_loss, _tx(), mesh=mesh)
  params = jax.device_put(_mlp_params(), jax.tree.map(
      lambda s: NamedSharding(mesh, s), MLP_SPECS))
  with pytest.raises(ValueError, match=r"\['w1'\].*param_specs"):
    dp.init(params)


def test_arguments_are_checked(mesh):
  with pytest.raises(ValueError, match="`axis_name` must be one of 'data'"):
    gs.data_parallel(_loss, _tx(), mesh=mesh, axis_name="batch")
  with pytest.raises(ValueError, match="`has_aux` must be True or False"):
    gs.data_parallel(_loss, _tx(), mesh=mesh, has_aux="yes")
  with pytest.raises(TypeError, match="`tx` must be an optax"):
    gs.data_parallel(_loss, optax.sgd, mesh=mesh)
  with pytest.raises(TypeError, match="`mesh` must be"):
    gs.data_parallel(_loss, _tx(), mesh=("data",))
  with pytest.raises(TypeError, match="`loss_fn` must be callable"):
    gs.data_parallel(None, _tx(), mesh=mesh)


# ------------------------------------------------------------------ NNX


class _Linear(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(FEATURES, OUTPUTS, rngs=rngs)

  def __call__(self, x):
    return self.linear(x)


@pytest.mark.optax_promotion  # nnx.Optimizer's step counter is uint32
def test_nnx_data_parallel_matches_the_functional_step(mesh):
  model = _Linear(nnx.Rngs(0))
  start = nnx.to_pure_dict(nnx.state(model))["linear"]
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  nnx_loss = lambda m, x, y: (jnp.mean((m(x) - y) ** 2), jnp.max(x))
  dp = gs.nnx_data_parallel(nnx_loss, mesh=mesh, has_aux=True)
  dp.init(model, optimizer)
  train_step = nnx.jit(dp.step)
  x, y = _data()
  for _ in range(STEPS):
    loss, aux = jax.block_until_ready(train_step(model, optimizer, x, y))
  np.testing.assert_allclose(
      aux, x.reshape(WORKERS, -1).max(1).mean(), rtol=1e-6)

  params = {"w": start["kernel"], "b": start["bias"]}
  functional = gs.data_parallel(_loss, _tx(), mesh=mesh)
  params, opt_state, _ = _run(jax.jit(functional.step), params,
                              functional.init(params), (x, y))
  got = nnx.to_pure_dict(nnx.state(model))["linear"]
  np.testing.assert_allclose(got["kernel"], params["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["bias"], params["b"], rtol=1e-5, atol=1e-6)
  nnx_state = nnx.as_pure(optimizer.opt_state)
  np.testing.assert_allclose(nnx_state[0].memory[0], opt_state[0].memory[0],
                             rtol=1e-5, atol=1e-6)
  assert gs.comm_stats(nnx_state)["workers"] == WORKERS


def test_sparsify_warns_on_a_gradient_already_reduced_by_jit():
  # jax.jit over an explicit mesh: the gradient of a batch sharded over
  # "data" is a global array XLA all-reduced; sparsify(axis_name=None)
  # says so and points to gs.data_parallel, and counts one worker.
  import warnings
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  tx = gs.sparsify(gs.top_k(k=2))
  loss = lambda w, x: jnp.sum((x @ w) ** 2)
  with jax.set_mesh(mesh):
    w = jax.device_put(jnp.ones(4), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, P("data")))
    state = tx.init(w)
    step = jax.jit(lambda w, s, x: tx.update(jax.grad(loss)(w, x), s))
    with pytest.warns(UserWarning, match="gs.data_parallel"):
      _, state = step(w, state, x)
  assert gs.comm_stats(state)["workers"] == 1
  # One device, or inside shard_map: nothing to warn about.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.update(jnp.ones(4), tx.init(jnp.zeros(4)))
