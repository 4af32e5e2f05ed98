"""`gs.diloco` against a float64 NumPy DiLoCo, in every mapping context.

Eight workers minimize their own diagonal quadratics
``f_i(w) = 0.5 * sum(s_i * (w - t_i)**2)`` (gradient ``s_i * (w - t_i)``),
so the gradient at each worker's current parameters is computed inside the
step and the whole trajectory can be replayed in NumPy: inner SGD (with
momentum), every H calls EF on the pseudo-gradients ``anchor - local``,
Top-k, mean over workers, outer SGD with Nesterov momentum.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs

AXIS = "data"
WORKERS = 8
D = 37  # 7 + 6 * 5 entries
INNER_LR = 0.1


def _params():
  return {"b": jnp.zeros((7,)), "w": jnp.zeros((6, 5))}


def _flat(tree, lead=0):
  leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
  shape = leaves[0].shape[:lead]
  return np.concatenate([l.reshape(shape + (-1,)) for l in leaves], axis=-1)


def _problem(seed=0):
  """Per-worker curvatures ``s`` and targets ``t``, pytrees ``[workers, ...]``."""
  rng = np.random.default_rng(seed)
  make = lambda low, high: jax.tree.map(
      lambda p: jnp.asarray(rng.uniform(low, high, (WORKERS,) + p.shape),
                            jnp.float32), _params())
  return make(0.5, 2.0), make(-3.0, 3.0)


# A configuration: (sync_every, inner momentum, compressor ratio (None:
# dense), outer (lr, momentum), warmup syncs).
DP = (1, None, None, (1.0, None), 0)
COMPRESSED = (3, 0.5, 0.25, (0.7, 0.9), 0)
WARMUP = (2, None, 0.25, (1.0, None), 1)


def _tx(config):
  sync_every, inner_momentum, ratio, (outer_lr, outer_momentum), warmup = config
  return gs.diloco(
      optax.sgd(INNER_LR, momentum=inner_momentum),
      optax.sgd(outer_lr, momentum=outer_momentum,
                nesterov=outer_momentum is not None),
      sync_every=sync_every,
      compressor=gs.dense() if ratio is None else gs.top_k(ratio),
      axis_name=AXIS, warmup_steps=warmup)


def _local_step(tx, params, state, s, t):
  grads = jax.tree.map(lambda p, s, t: s * (p - t), params, s, t)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


@functools.lru_cache(maxsize=None)
def _stepper(config, context, mesh=None):
  """(init() -> (params, state), step(params, state, s, t)) for a context."""
  tx = _tx(config)
  params = _params()
  def step(params, state, s, t):
    return _local_step(tx, params, state, s, t)

  if context == "vmap":
    init = lambda: jax.vmap(lambda _: (params, tx.init(params)))(
        jnp.arange(WORKERS))
    return init, jax.jit(jax.vmap(step, axis_name=AXIS))
  if context == "pmap":
    init = lambda: jax.pmap(lambda _: (params, tx.init(params)))(
        jnp.arange(WORKERS))
    return init, jax.pmap(step, axis_name=AXIS)
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), AXIS)

  def init():
    state = jax.jit(jax.shard_map(lambda: tx.init(params), mesh=mesh,
                                  in_specs=(), out_specs=specs))()
    per_worker = jax.tree.map(lambda p: jnp.broadcast_to(p, (WORKERS,) +
                                                         p.shape), params)
    return jax.device_put(per_worker, NamedSharding(mesh, P(AXIS))), state

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(AXIS), specs, P(AXIS), P(AXIS)),
                     out_specs=(P(AXIS), specs))
  def sharded(params, state, s, t):
    squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
    params, state = step(squeeze(params), state, squeeze(s), squeeze(t))
    return jax.tree.map(lambda x: x[None], params), state

  return init, sharded


@functools.lru_cache(maxsize=None)
def _run(config, context, calls, mesh=None):
  """Every worker's parameters after each call ``[calls, workers, D]``, and
  the final state."""
  init, step = _stepper(config, context, mesh)
  params, state = init()
  s, t = _problem()
  if context == "shard_map":
    s, t = jax.device_put((s, t), NamedSharding(mesh, P(AXIS)))
  history = []
  for _ in range(calls):
    params, state = step(params, state, s, t)
    # Block each step (8 CPU devices on 2 cores: rendezvous deadlocks).
    history.append(_flat(jax.block_until_ready(params), lead=1))
  return np.stack(history), state


def _top_k_rows(x, k):
  """Each row's k largest-magnitude entries (ties to the lower index)."""
  out = np.zeros_like(x)
  for i, row in enumerate(x):
    keep = np.argsort(-np.abs(row), kind="stable")[:k]
    out[i, keep] = row[keep]
  return out


def _numpy_diloco(config, calls):
  """Float64 reference: (parameters [calls, workers, D], EF memory
  [workers, D], inner momentum [workers, D], syncs)."""
  sync_every, inner_momentum, ratio, (outer_lr, outer_momentum), warmup = config
  s, t = (_flat(tree, lead=1) for tree in _problem())
  anchor = np.zeros(D)
  params = np.zeros((WORKERS, D))
  memory = np.zeros((WORKERS, D))
  trace = np.zeros((WORKERS, D))
  outer_trace = np.zeros(D)
  history, syncs = [], 0
  for call in range(1, calls + 1):
    grads = s * (params - t)
    if inner_momentum is None:
      inner = -INNER_LR * grads
    else:
      trace = grads + inner_momentum * trace
      inner = -INNER_LR * trace
    if call % sync_every:
      params = params + inner
    else:
      pseudo = anchor - (params + inner)
      if ratio is None or syncs < warmup:
        mean = pseudo.mean(axis=0)
      else:
        accumulated = memory + pseudo
        sent = _top_k_rows(accumulated, max(1, round(ratio * D)))
        memory = accumulated - sent
        mean = sent.mean(axis=0)
      if outer_momentum is None:
        step = mean
      else:  # optax.trace(nesterov=True)
        outer_trace = mean + outer_momentum * outer_trace
        step = mean + outer_momentum * outer_trace
      anchor = anchor - outer_lr * step
      params = np.tile(anchor, (WORKERS, 1))
      syncs += 1
    history.append(params)
  return np.stack(history), memory, trace, syncs


def _memory(state):
  return np.asarray(state.sync_state.memory[0]).reshape(WORKERS, D)


def test_one_step_dense_sync_is_data_parallel_sgd():
  history, _ = _run(DP, "vmap", 5)
  s, t = (_flat(tree, lead=1) for tree in _problem())
  w = np.zeros(D)
  for call in range(5):
    w = w - INNER_LR * (s * (w - t)).mean(axis=0)
    for worker in range(WORKERS):
      np.testing.assert_allclose(history[call, worker], w, rtol=1e-5,
                                 atol=1e-6)


@pytest.mark.parametrize("config", [COMPRESSED, WARMUP],
                         ids=["top_k_ef_nesterov", "warmup"])
def test_compressed_rounds_equal_numpy_reference(config):
  calls = 9
  history, state = _run(config, "vmap", calls)
  expected, memory, trace, syncs = _numpy_diloco(config, calls)
  np.testing.assert_allclose(history, expected, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(_memory(state), memory, rtol=2e-5, atol=2e-5)
  stats = gs.comm_stats(state)
  assert stats["steps"] == syncs  # one round per sync
  k = max(1, round(config[2] * D))
  dense_syncs = min(config[4], syncs)
  assert stats["sent_bytes"] == (dense_syncs * D * 4
                                 + (syncs - dense_syncs) * k * 8)
  if config[1] is not None:  # the inner momentum survives the syncs
    inner_trace = _flat(state.inner_state[0].trace, lead=1)
    assert np.abs(trace).max() > 0
    np.testing.assert_allclose(inner_trace, trace, rtol=2e-5, atol=2e-5)


def test_workers_hold_the_same_parameters_after_a_sync():
  history, state = _run(COMPRESSED, "vmap", 9)
  anchor = _flat(state.anchor, lead=1)[0].astype(np.float32)
  for call in (2, 5, 8):  # the syncs
    after = history[call].astype(np.float32)
    # Each worker computes params + (anchor - params), rounded twice: within
    # an ulp of the anchor at the scale of the larger of the two, so two
    # workers are within two of each other.
    scale = np.maximum(np.abs(history[call - 1]).max(axis=0),
                       np.abs(after).max(axis=0)).astype(np.float32)
    ulp = np.spacing(scale)
    assert np.all(np.abs(after - after[0]) <= 2 * ulp)
  assert np.all(np.abs(history[8] - anchor) <= ulp)  # the last call synced
  # ...and they differ between syncs (the local steps are local).
  assert np.abs(history[3] - history[3][0]).max() > 1e-3


@pytest.mark.parametrize("context", ["shard_map", "pmap"])
def test_mapping_contexts_agree(context, mesh):
  vmapped, vstate = _run(COMPRESSED, "vmap", 6)
  other, state = _run(COMPRESSED, context, 6, mesh)
  np.testing.assert_allclose(other, vmapped, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_memory(state), _memory(vstate), rtol=1e-6,
                             atol=1e-6)
  assert gs.comm_stats(state)["steps"] == gs.comm_stats(vstate)["steps"] == 2
  if context == "shard_map":  # per-worker state sharded, the anchor not
    assert state.inner_state[0].trace["w"].sharding.spec[0] == AXIS
    assert state.anchor["w"].sharding.is_fully_replicated


def test_syncs_and_local_steps_share_one_trace():
  tx = _tx(COMPRESSED)
  chex.clear_trace_counter()

  @jax.jit
  @functools.partial(jax.vmap, axis_name=AXIS)
  @chex.assert_max_traces(n=1)
  def step(params, state, s, t):
    return _local_step(tx, params, state, s, t)

  params, state = jax.vmap(lambda _: (_params(), tx.init(_params())))(
      jnp.arange(WORKERS))
  s, t = _problem()
  for _ in range(7):  # local steps and syncs
    params, state = jax.block_until_ready(step(params, state, s, t))
  assert gs.comm_stats(state)["steps"] == 2


def test_state_partition_specs():
  tx = _tx(COMPRESSED)
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, _params()), AXIS)
  assert specs.count == P() and specs.anchor == {"b": P(), "w": P()}
  assert jax.tree.leaves(specs.inner_state) == [P(AXIS), P(AXIS)]
  assert jax.tree.leaves(specs.outer_state) == [P(), P()]
  assert specs.sync_state.memory == (P(AXIS),)
  assert specs.sync_state.count == P()
  # Tensor parallel: parameter-shaped parts follow the parameters' specs,
  # with the worker axis in front where the state is per worker.
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, _params()), AXIS,
                                   {"b": P(), "w": P(None, "model")})
  assert specs.anchor == {"b": P(), "w": P(None, "model")}
  assert specs.inner_state[0].trace == {"b": P(AXIS),
                                        "w": P(AXIS, None, "model")}
  assert specs.outer_state[0].trace == {"b": P(), "w": P(None, "model")}
  assert specs.sync_state.memory == (P(AXIS), P((AXIS, "model")))


def test_orbax_round_trip_resumes_same_trajectory(tmp_path):
  init, step = _stepper(COMPRESSED, "vmap")
  s, t = _problem()

  def run(carry, calls):
    for _ in range(calls):
      carry = jax.block_until_ready(step(*carry, s, t))
    return carry

  full = run(init(), 7)
  half = run(init(), 4)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", half)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, half))
  assert jax.tree.structure(restored) == jax.tree.structure(half)
  jax.tree.map(np.testing.assert_array_equal, run(restored, 3), full)


def test_low_precision_parameters_keep_their_dtype():
  tx = gs.diloco(optax.sgd(0.1), optax.sgd(0.7, momentum=0.9, nesterov=True),
                 sync_every=2, compressor=gs.top_k(0.5))
  params = {"b": jnp.zeros((4,), jnp.bfloat16), "w": jnp.zeros((3,))}
  state = tx.init(params)
  step = jax.jit(functools.partial(_local_step, tx))
  s = jax.tree.map(jnp.ones_like, params)
  with jax.numpy_dtype_promotion("strict"):
    for _ in range(4):
      params, state = step(params, state, s, s)
  assert params["b"].dtype == jnp.bfloat16 and params["w"].dtype == jnp.float32
  assert jax.tree.map(lambda x: x.dtype, state.anchor) == {
      "b": jnp.bfloat16, "w": jnp.float32}
  assert gs.comm_stats(state)["steps"] == 2


def test_bad_arguments_raise_clear_errors():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="sync_every"):
    gs.diloco(sgd, sgd, sync_every=0)
  with pytest.raises(TypeError, match="inner"):
    gs.diloco(lambda g: g, sgd, sync_every=2)
  with pytest.raises(TypeError, match="outer"):
    gs.diloco(sgd, "sgd", sync_every=2)
  with pytest.raises(TypeError, match="compressor"):
    gs.diloco(sgd, sgd, sync_every=2, compressor="top_k")
  with pytest.raises(ValueError, match="warmup_steps"):
    gs.diloco(sgd, sgd, sync_every=2, warmup_steps=-1)
  tx = gs.diloco(sgd, sgd, sync_every=2)
  state = tx.init(jnp.zeros(3))
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones(3), state)


def test_tensor_parallel_shards_follow_the_parameters():
  """On a ("data", "model") mesh with "w" sharded over "model", DiLoCo
  under shard_map equals 4 vmapped workers (dense pseudo-gradients: Top-k
  of a shard is not Top-k of the whole; tests/test_mesh.py covers that)."""
  mesh = jax.make_mesh((4, 2), (AXIS, "model"))
  param_specs = {"b": P(), "w": P(None, "model")}
  params = {"b": jnp.zeros((7,)), "w": jnp.zeros((6, 4))}
  rng = np.random.default_rng(5)
  s = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 2.0, (4,) + p.shape),
                                         jnp.float32), params)
  t = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(4,) + p.shape),
                                         jnp.float32), params)
  make = lambda: gs.diloco(optax.sgd(INNER_LR, momentum=0.5),
                           optax.sgd(0.7, momentum=0.9, nesterov=True),
                           sync_every=2, axis_name=AXIS)
  tx = make()
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), AXIS,
                                   param_specs)
  worker_specs = jax.tree.map(lambda spec: P(AXIS, *spec), param_specs,
                              is_leaf=lambda x: isinstance(x, P))
  initial = jax.tree.map(
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), params,
      param_specs)
  state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,),
                                out_specs=specs))(initial)

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(worker_specs, specs, worker_specs,
                               worker_specs),
                     out_specs=(worker_specs, specs))
  def step(p, state, s, t):
    squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)
    p, state = _local_step(tx, squeeze(p), state, squeeze(s), squeeze(t))
    return jax.tree.map(lambda x: x[None], p), state

  put = lambda tree: jax.tree.map(
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree,
      worker_specs)
  p = put(jax.tree.map(lambda x: jnp.broadcast_to(x, (4,) + x.shape), params))
  vs, vt = s, t
  s, t = put(s), put(t)
  vtx = make()
  vstep = jax.jit(jax.vmap(functools.partial(_local_step, vtx),
                           axis_name=AXIS))
  vp = jax.tree.map(lambda x: jnp.broadcast_to(x, (4,) + x.shape), params)
  vstate = jax.vmap(lambda _: vtx.init(params))(jnp.arange(4))
  for _ in range(4):
    p, state = jax.block_until_ready(step(p, state, s, t))
    vp, vstate = jax.block_until_ready(vstep(vp, vstate, vs, vt))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6,
                                 atol=1e-6), p, vp)
  assert gs.comm_stats(state)["steps"] == 2
  assert state.anchor["w"].sharding.spec == P(None, "model")


def test_data_parallel_keeps_a_copy_per_worker_and_matches_numpy(mesh):
  """`gs.data_parallel` sees diloco's per-worker parameters: a copy per
  worker along a leading axis, stepped in the caller's jax.jit."""

  def loss_fn(params, s, t):
    terms = jax.tree.map(lambda p, s, t: jnp.sum(s[0] * (p - t[0]) ** 2),
                         params, s, t)
    return 0.5 * sum(jax.tree.leaves(terms))

  dp = gs.data_parallel(loss_fn, _tx(COMPRESSED), mesh=mesh)
  opt_state = dp.init(_params())
  params = dp.worker_params(_params())
  for leaf, start in zip(jax.tree.leaves(params), jax.tree.leaves(_params())):
    assert leaf.shape == (WORKERS,) + start.shape
    assert leaf.sharding.spec == P(AXIS)
  step = jax.jit(dp.step)
  s, t = _problem()
  history = []
  for _ in range(9):
    params, opt_state, _ = step(params, opt_state, s, t)
    history.append(_flat(jax.block_until_ready(params), lead=1))
  expected, memory, _, syncs = _numpy_diloco(COMPRESSED, 9)
  np.testing.assert_allclose(np.stack(history), expected, rtol=2e-5,
                             atol=2e-5)
  np.testing.assert_allclose(_memory(opt_state), memory, rtol=2e-5,
                             atol=2e-5)
  assert gs.comm_stats(opt_state)["steps"] == syncs
  # Without diloco the parameters stay one replicated copy.
  plain = gs.data_parallel(loss_fn, optax.chain(
      gs.sparsify(gs.top_k(0.25), axis_name=AXIS), optax.sgd(0.1)),
                           mesh=mesh)
  placed = plain.worker_params(_params())
  assert jax.tree.map(jnp.shape, placed) == jax.tree.map(jnp.shape, _params())
