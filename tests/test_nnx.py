"""Flax NNX under shard_map: `nnx_shard`, `nnx_partition_specs`,
`nnx_local_value_and_grad`, and the example loop."""

import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
import runners

AXIS = "data"
WORKERS = 8
STEPS = 4


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 5, rngs=rngs)
    self.out = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def _plain_forward(params, x):
  """The same network written out in jax.numpy (no NNX)."""
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"] + params["out"]["bias"]


def _tx():
  return optax.chain(gs.sparsify(gs.top_k(0.2), axis_name=AXIS),
                     optax.adam(0.05))


def _batches():
  rng = np.random.default_rng(0)
  return [(rng.normal(size=(WORKERS * 4, 6)).astype(np.float32),
           rng.normal(size=(WORKERS * 4, 3)).astype(np.float32))
          for _ in range(STEPS)]


def _mse(predictions, y):
  return jnp.mean((predictions - y) ** 2)


def _nnx_loop(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  graphdef, state, specs = gs.nnx_shard((model, optimizer), mesh, AXIS)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(specs, P(AXIS), P(AXIS)), out_specs=specs)
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    _, grads = gs.nnx_local_value_and_grad(
        lambda m, x, y: _mse(m(x), y), AXIS)(model, x, y)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  for x, y in _batches():
    state = jax.block_until_ready(
        step(state, *jax.device_put((x, y), NamedSharding(mesh, P(AXIS)))))
  model, optimizer = nnx.merge(graphdef, state)
  return nnx.to_pure_dict(nnx.state(model)), nnx.as_pure(optimizer.opt_state)


def _plain_loop(mesh):
  params = nnx.to_pure_dict(nnx.state(MLP(nnx.Rngs(0))))
  tx = _tx()
  step, opt_state = runners.shard_map_training_step(
      tx, params, mesh, lambda p, x, y: gs.local_grad(
          lambda p: _mse(_plain_forward(p, x), y), AXIS)(p))

  for x, y in _batches():
    params, opt_state = jax.block_until_ready(step(
        params, opt_state,
        *jax.device_put((x, y), NamedSharding(mesh, P(AXIS)))))
  return params, opt_state


@pytest.mark.optax_promotion  # optax (adam, MultiSteps) is not strict-clean
def test_nnx_loop_matches_plain_optax_loop(mesh):
  nnx_params, nnx_opt_state = _nnx_loop(mesh)
  plain_params, plain_opt_state = _plain_loop(mesh)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                 atol=1e-6), nnx_params, plain_params)
  # Every worker's error memory, not one worker's copy: the rows differ.
  nnx_memory = np.asarray(nnx_opt_state[0].memory[0])
  assert nnx_memory.shape == (WORKERS, 5 * 6 + 5 + 3 * 5 + 3)
  assert len({row.tobytes() for row in nnx_memory}) == WORKERS
  np.testing.assert_allclose(nnx_memory, plain_opt_state[0].memory[0],
                             rtol=1e-5, atol=1e-6)
  assert (gs.comm_stats(nnx_opt_state)["sent_bytes"]
          == gs.comm_stats(plain_opt_state)["sent_bytes"])


def test_partition_specs_shard_exactly_the_per_worker_leaves():
  model = MLP(nnx.Rngs(0))
  tx = gs.multi_steps(_tx(), 2)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  flat = nnx.to_flat_state(gs.nnx_partition_specs((model, optimizer), AXIS))
  sharded = {path for path, variable in flat if variable.get_value() != P()}
  inner = (1, "opt_state", "inner_state", 0)  # multi_steps > chain > sparsify
  expected = {inner + ("memory", 0)}
  expected |= {inner + ("stats", field) for field in gs.CommStats._fields}
  expected |= {(1, "opt_state", "micro_grads", layer, name)
               for layer in ("hidden", "out") for name in ("bias", "kernel")}
  assert sharded == expected
  replicated = {path for path, _ in flat} - sharded
  assert (0, "hidden", "kernel") in replicated  # parameters
  assert (1, "opt_state", "inner_state", 1, 0, "mu", "out",
          "bias") in replicated  # Adam's moments


def test_nnx_shard_copies_the_initial_state_to_every_worker(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  _, state, _ = gs.nnx_shard((model, optimizer), mesh, AXIS)
  memory = state[1]["opt_state"][0]["memory"][0].get_value()
  assert memory.shape == (WORKERS, 53)
  assert memory.sharding.spec == P(AXIS)
  kernel = state[0]["hidden"]["kernel"].get_value()
  assert kernel.sharding.spec == P() and kernel.shape == (6, 5)


@pytest.mark.optax_promotion  # optax (adam, MultiSteps) is not strict-clean
def test_example_trains_a_cnn_over_eight_devices():
  path = os.path.join(os.path.dirname(__file__), os.pardir, "examples",
                      "flax_nnx.py")
  spec = importlib.util.spec_from_file_location("_example_flax_nnx", path)
  example = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = example
  spec.loader.exec_module(example)
  result = example.main(["--steps", "40"])
  assert result["accuracy"] > 0.3  # chance is 0.1
  stats = result["stats"]
  assert stats["workers"] == WORKERS and stats["steps"] == 40
  # top_k(0.01) of the CNN's 9,930 parameters: 99 (value, int32 index) pairs.
  assert stats["sent_bytes"] == 40 * 99 * 8


def test_nnx_shard_rejects_a_state_laid_out_for_other_workers(mesh):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  memory = optimizer.opt_state[0].memory[0]
  memory.set_value(jnp.zeros((3,) + memory.get_value().shape[1:]))
  with pytest.raises(ValueError, match="leading size 3"):
    gs.nnx_shard((model, optimizer), mesh, AXIS)


class _NormDropNet(nnx.Module):
  """Linear, BatchNorm (training mode) and a Dropout fed an nnx.Rngs."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(6, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.drop = nnx.Dropout(0.5)

  def __call__(self, x, rngs):
    return self.drop(self.norm(self.linear(x)), rngs=rngs)


def test_local_grad_averages_batch_stats_and_folds_rng_keys_per_worker(mesh):
  model = _NormDropNet(nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=1)
  graphdef, state = nnx.split((model, rngs))
  start = nnx.to_pure_dict(state)

  def loss_fn(model, x, rngs):
    out = model(x, rngs)
    return jnp.mean(out ** 2), out != 0

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(AXIS)),
                     out_specs=(P(), P(AXIS), P(AXIS)))
  def step(state, x):
    model, rngs = nnx.merge(graphdef, state)
    (_, kept), grads = gs.nnx_local_value_and_grad(
        loss_fn, AXIS, has_aux=True)(model, x, rngs)
    kernel_grad = grads["linear"]["kernel"].get_value()[None]
    return nnx.state((model, rngs)), kept, kernel_grad

  x = _batches()[0][0]
  new_state, kept, kernel_grads = step(
      state, jax.device_put(x, NamedSharding(mesh, P(AXIS))))
  new = nnx.to_pure_dict(new_state)

  # BatchNorm: each worker's running statistics of its slice, averaged.
  h = (x.astype(np.float64) @ start[0]["linear"]["kernel"]
       + start[0]["linear"]["bias"]).reshape(WORKERS, 4, 4)
  mean, var = h.mean(1), (h ** 2).mean(1) - h.mean(1) ** 2
  np.testing.assert_allclose(new[0]["norm"]["mean"], 0.1 * mean.mean(0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new[0]["norm"]["var"],
                             0.9 + 0.1 * var.mean(0), rtol=1e-5, atol=1e-6)
  # Dropout: worker i drew with the key folded with i (its own mask).
  masks = np.asarray(kept).reshape(WORKERS, 4, 4)
  for i in range(WORKERS):
    own = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(1), i))
    expected = nnx.Dropout(0.5)(jnp.ones((4, 4)), rngs=own) != 0
    np.testing.assert_array_equal(masks[i], expected)
  assert len({m.tobytes() for m in masks}) == WORKERS
  # The shared stream advanced once; its key is the shared one.
  assert int(new[1]["dropout"]["count"]) == 1
  np.testing.assert_array_equal(
      jax.random.key_data(new[1]["dropout"]["key"]),
      jax.random.key_data(start[1]["dropout"]["key"]))
  # Gradients stayed local: one per worker, all different.
  assert len({np.asarray(g).tobytes() for g in kernel_grads}) == WORKERS


def test_optimizer_on_annotated_params_builds():
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  with jax.set_mesh(mesh):
    model = nnx.Linear(4, 6, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), (None, "model")), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  assert gs.comm_stats(optimizer.opt_state)["steps"] == 0


def _annotated_linear(mesh, annotate=True):
  init = nnx.initializers.lecun_normal()
  with jax.set_mesh(mesh):
    return nnx.Linear(4, 6, rngs=nnx.Rngs(0), kernel_init=(
        nnx.with_partitioning(init, (None, "model")) if annotate else init))


def test_nnx_shard_keeps_tensor_parallel_annotations():
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  model = _annotated_linear(mesh)
  _, state, specs = gs.nnx_shard(model, mesh, AXIS)
  assert specs["kernel"].get_value() == P(None, "model")
  assert state["kernel"].get_value().sharding.spec == P(None, "model")
  assert state["bias"].get_value().sharding.spec == P()
  np.testing.assert_array_equal(state["kernel"].get_value(),
                                model.kernel.get_value())


@pytest.mark.optax_promotion  # optax (adam) is not strict-clean
def test_tensor_parallel_nnx_optimizer_matches_the_functional_step():
  """A kernel annotated over "model" with a sparsify optimizer: nnx_shard
  rebuilds the optimizer state per shard, and nnx_data_parallel trains as
  gs.data_parallel does on the pure parameters with param_specs."""
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  spec = P(None, "model")
  with jax.set_mesh(mesh):
    model = nnx.Linear(4, 6, use_bias=False, rngs=nnx.Rngs(0),
                       kernel_init=nnx.with_partitioning(
                           nnx.initializers.lecun_normal(), (None, "model")))
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  kernel = np.asarray(model.kernel.get_value())
  square = lambda out: jax.lax.psum(jnp.sum(out ** 2), "model")
  dp = gs.nnx_data_parallel(lambda m, x: square(m(x)), mesh=mesh)
  dp.init(model, optimizer)
  memory = optimizer.opt_state[0].memory[0]
  assert memory.sharding.spec == P((AXIS, "model"))
  assert memory.shape == (8, 12)  # a 4x3 shard per device
  functional = gs.data_parallel(lambda p, x: square(x @ p["kernel"]), _tx(),
                                mesh=mesh, param_specs={"kernel": spec})
  params = {"kernel": jnp.asarray(kernel)}
  opt_state = functional.init(params)
  step = jax.jit(functional.step)
  x = jax.random.normal(jax.random.key(3), (16, 4))
  train_step = nnx.jit(dp.step)
  for _ in range(3):
    float(train_step(model, optimizer, x))
    params, opt_state, _ = step(params, opt_state, x)
    jax.block_until_ready(params)
  assert model.kernel.get_value().sharding.spec == spec
  np.testing.assert_allclose(model.kernel.get_value(), params["kernel"],
                             rtol=1e-6, atol=1e-7)
  assert not np.allclose(params["kernel"], kernel)
  nnx_stats, stats = gs.comm_stats(nnx.state(optimizer)), gs.comm_stats(
      opt_state)
  for key in ("steps", "sent_bytes", "dense_bytes", "workers"):
    assert nnx_stats[key] == stats[key], key
  assert stats["steps"] == 3 and stats["workers"] == 4


def test_annotations_over_the_workers_axis_are_refused():
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  model = _annotated_linear(mesh, annotate=False)
  model.kernel.set_metadata(out_sharding=(AXIS, None))
  with pytest.raises(ValueError, match="workers' axis 'data'"):
    gs.nnx_partition_specs(model, AXIS)
