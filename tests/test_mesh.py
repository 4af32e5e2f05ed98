"""Meshes with several axes: tensor-parallel shards, two-level data parallel.

Three meshes over the 8 CPU devices, each trained a few steps with Top-k + EF
and momentum SGD, against a NumPy loop over workers and shards:

* ``(4, 2)`` ``("data", "model")``: weights tensor-parallel over ``"model"``,
  a bias replicated, compression over ``"data"``;
* ``(2, 4)`` ``("slice", "data")``: replicated parameters, the batch split
  over both axes, a dense reduction inside each slice and compression across
  slices (``axis_name="slice"``, ``inner_axes="data"``);
* ``(2, 2, 2)`` ``("slice", "data", "model")``: both at once.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
import references

FEATURES, HIDDEN, OUTPUTS, BATCH = 6, 4, 3, 4
RATIO, LR, MOMENTUM, STEPS = 0.3, 0.05, 0.9, 3

MESHES = {
    "tensor_parallel": dict(shape=(4, 2), names=("data", "model"),
                            axis="data", inner=(), model="model"),
    "two_level": dict(shape=(2, 4), names=("slice", "data"), axis="slice",
                      inner=("data",), model=None),
    "both": dict(shape=(2, 2, 2), names=("slice", "data", "model"),
                 axis="slice", inner=("data",), model="model"),
}


def _param_specs(model):
  if model is None:
    return {"b": P(), "w1": P(), "w2": P()}
  return {"b": P(), "w1": P(None, model), "w2": P(model, None)}


def _loss(params, x, y, model):
  """A two-layer tanh MLP; tensor parallel (Megatron-style) over ``model``."""
  hidden = jnp.tanh(x @ params["w1"])  # this device's hidden units
  out = hidden @ params["w2"]  # partial sums over this device's units
  if model is not None:
    out = jax.lax.psum(out, model)
  return jnp.mean((out + params["b"] - y) ** 2)


def _init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"b": np.zeros(OUTPUTS, np.float32),
          "w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32),
          "w2": rng.normal(size=(HIDDEN, OUTPUTS)).astype(np.float32) * 0.5}


def _batches(devices, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(STEPS, devices * BATCH, FEATURES)).astype(np.float32)
  y = rng.normal(size=(STEPS, devices * BATCH, OUTPUTS)).astype(np.float32)
  return x, y


# ---------------------------------------------------------------- reference


def _numpy_grads(params, x, y):
  """Gradient of the mean squared error of the MLP on one batch (by hand)."""
  hidden = np.tanh(x @ params["w1"])
  residual = hidden @ params["w2"] + params["b"] - y
  d_out = 2.0 * residual / residual.size
  d_hidden = d_out @ params["w2"].T * (1.0 - hidden ** 2)
  return {"b": d_out.sum(0), "w1": x.T @ d_hidden, "w2": hidden.T @ d_out}


def _shards(leaf_name, value, shards):
  """A leaf's tensor-parallel pieces, as `_param_specs` shards it."""
  if leaf_name == "b" or shards == 1:
    return [value]
  axis = 1 if leaf_name == "w1" else 0
  return np.split(value, shards, axis=axis)


def _top_k_ef(memory, grad, ratio):
  accumulated = memory + grad
  k = max(1, round(ratio * accumulated.size))
  keep = np.argsort(-np.abs(accumulated), kind="stable")[:k]
  sent = np.zeros_like(accumulated)
  sent[keep] = accumulated[keep]
  return sent, accumulated - sent


def _reference(params, xs, ys, *, workers, inner, shards, granularity):
  """NumPy: per worker the mean gradient of its devices, cut into shards;
  Top-k + EF per (worker, shard, segment); the mean over workers;
  momentum SGD. Segments: per leaf ("layer"), or per sharding ("global":
  the replicated bias alone, the sharded weights' pieces together)."""
  params = {k: v.astype(np.float64) for k, v in params.items()}
  names = ["b", "w1", "w2"]  # the pytree's leaf order
  if granularity == "layer":
    groups = [["b"], ["w1"], ["w2"]]
  elif shards == 1:
    groups = [names]  # replicated parameters: one global budget
  else:
    groups = [["b"], ["w1", "w2"]]
  memory, trace = {}, {k: np.zeros_like(v) for k, v in params.items()}
  for x, y in zip(xs, ys):
    devices = np.split(np.arange(len(x)), workers * inner)
    sums = {name: 0.0 for name in names}
    for w in range(workers):
      local = [_numpy_grads(params, x[rows], y[rows])
               for rows in devices[w * inner:(w + 1) * inner]]
      grad = {n: np.mean([g[n] for g in local], axis=0) for n in names}
      pieces = {n: _shards(n, grad[n], shards) for n in names}
      sent_pieces = {n: [None] * len(pieces[n]) for n in names}
      for group in groups:
        copies = max(len(pieces[n]) for n in group)
        for j in range(copies):
          parts = [pieces[n][j if len(pieces[n]) > 1 else 0] for n in group]
          flat = np.concatenate([p.reshape(-1) for p in parts])
          key = (w, tuple(group), j)
          sent, memory[key] = _top_k_ef(memory.get(key, 0.0), flat, RATIO)
          offset = 0
          for n, part in zip(group, parts):
            piece = sent[offset:offset + part.size].reshape(part.shape)
            sent_pieces[n][j if len(pieces[n]) > 1 else 0] = piece
            offset += part.size
      for n in names:
        whole = (sent_pieces[n][0] if len(sent_pieces[n]) == 1 else
                 np.concatenate(sent_pieces[n], axis=1 if n == "w1" else 0))
        sums[n] = sums[n] + whole
    for n in names:
      trace[n] = sums[n] / workers + MOMENTUM * trace[n]
      params[n] = params[n] - LR * trace[n]
  return params


# ---------------------------------------------------------------- the mesh


def _setup(config, granularity, compressor=None):
  mesh = jax.make_mesh(config["shape"], config["names"])
  axis, inner, model = config["axis"], config["inner"], config["model"]
  tx = optax.chain(
      gs.sparsify(compressor or gs.top_k(RATIO), axis_name=axis,
                  granularity=granularity, inner_axes=inner),
      optax.sgd(LR, momentum=MOMENTUM))
  param_specs = _param_specs(model)
  params = _init_params()
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), axis,
                                   param_specs)
  put = lambda tree, spec_tree: jax.device_put(tree, jax.tree.map(
      lambda s: NamedSharding(mesh, s), spec_tree))
  params = put(params, param_specs)
  opt_state = jax.jit(jax.shard_map(
      tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=specs))(params)
  batch = P((axis, *inner))

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(param_specs, specs, batch, batch),
                     out_specs=(param_specs, specs))
  def step(params, opt_state, x, y):
    _, grads = gs.local_value_and_grad(_loss, axis)(params, x, y, model)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return mesh, params, opt_state, step, lambda x: put(x, batch)


def _describe(tree):
  return jax.tree.map(lambda x: (jax.typeof(x), x.sharding), tree)


@pytest.mark.parametrize("granularity", ["layer", "global"])
@pytest.mark.parametrize("name", list(MESHES))
def test_training_matches_numpy_reference(name, granularity):
  config = MESHES[name]
  mesh, params, opt_state, step, put_batch = _setup(config, granularity)
  initial_types = _describe(opt_state)
  workers = mesh.shape[config["axis"]]
  inner = int(np.prod([mesh.shape[a] for a in config["inner"]]))
  shards = mesh.shape[config["model"]] if config["model"] else 1
  xs, ys = _batches(workers * inner)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, put_batch(x), put_batch(y))
    jax.block_until_ready(params)

  expected = _reference(_init_params(), xs, ys, workers=workers, inner=inner,
                        shards=shards, granularity=granularity)
  for leaf in expected:
    np.testing.assert_allclose(params[leaf], expected[leaf], rtol=2e-5,
                               atol=2e-6, err_msg=leaf)
  # The replicated bias is bit-identical on every one of the 8 devices.
  copies = [np.asarray(s.data) for s in params["b"].addressable_shards]
  assert len(copies) == 8
  for copy in copies[1:]:
    np.testing.assert_array_equal(copy, copies[0])
  assert _describe(opt_state) == initial_types
  stats = gs.comm_stats(opt_state)
  assert stats["workers"] == workers and stats["steps"] == STEPS
  # Two-level: each device's dense gradient was all-reduced inside its
  # slice every step (by JAX, before sparsify).
  local_size = (FEATURES * HIDDEN + HIDDEN * OUTPUTS) // shards + OUTPUTS
  assert stats["dense_values"] == STEPS * local_size
  assert stats["inner_dense_bytes"] == (
      STEPS * local_size * 4 if config["inner"] else 0)


# ------------------------------------------------------- the compiled step


def _replica_groups(text):
  """Replica groups of one HLO collective (explicit or iota form)."""
  explicit = re.search(r"replica_groups=\{(\{[0-9,{}]*\})\}", text)
  if explicit:
    return [tuple(int(i) for i in g.split(",") if i)
            for g in re.findall(r"\{([0-9,]*)\}", explicit.group(1))]
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\]"
                   r"(?:T\(([0-9,]+)\))?", text)
  if iota:
    count, size = int(iota.group(1)), int(iota.group(2))
    ids = np.arange(count * size).reshape(
        [int(d) for d in iota.group(3).split(",")])
    if iota.group(4):
      ids = ids.transpose([int(d) for d in iota.group(4).split(",")])
    return [tuple(row) for row in ids.reshape(count, size).tolist()]
  raise AssertionError(f"no replica groups in: {text[:300]}")


def _collectives(hlo_text):
  """(op, element count, replica groups) of each all-reduce / all-gather.

  XLA combines collectives into one over a tuple of buffers: the count is
  the sum over the tuple.
  """
  found = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather)"
                      r"(-start)?\(", line)
    if match:
      count = sum(int(np.prod([int(d) for d in dims.split(",") if d]))
                  for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]",
                                         match.group(1)))
      found.append((match.group(2), count, _replica_groups(line)))
  return found


def _groups_along(mesh, axis):
  """The device groups that differ only along ``axis`` (logical ids)."""
  ids = np.arange(mesh.size).reshape(mesh.devices.shape)
  moved = np.moveaxis(ids, mesh.axis_names.index(axis), -1)
  return {tuple(row) for row in moved.reshape(-1, mesh.shape[axis]).tolist()}


def _crosses(mesh, axis, groups):
  """Whether some group holds devices at different positions along axis."""
  ids = np.arange(mesh.size).reshape(mesh.devices.shape)
  position = np.moveaxis(np.indices(ids.shape),
                         0, -1)[..., mesh.axis_names.index(axis)].reshape(-1)
  return any(len({position[i] for i in g}) > 1 for g in groups)


@pytest.mark.parametrize("name", list(MESHES))
def test_compiled_step_gathers_only_across_the_compressed_axis(name):
  config = MESHES[name]
  mesh, params, opt_state, step, put_batch = _setup(config, "layer")
  axis, shards = config["axis"], mesh.shape.get(config["model"], 1)
  devices = mesh.shape[axis] * int(np.prod(
      [mesh.shape[a] for a in config["inner"]]))
  x, y = (put_batch(b[0]) for b in _batches(devices))
  found = _collectives(step.lower(params, opt_state, x, y).compile().as_text())
  smallest_gradient = OUTPUTS  # the bias; weight shards are larger
  gathers = [groups for op, _, groups in found if op == "all-gather"]
  assert gathers, found
  for groups in gathers:
    assert {tuple(g) for g in groups} == _groups_along(mesh, axis), groups
  crossing = [size for op, size, groups in found
              if op == "all-reduce" and _crosses(mesh, axis, groups)]
  assert all(size < smallest_gradient for size in crossing), found
  if config["inner"]:  # the dense reduction inside each slice is there
    inside = sum(size for op, size, groups in found if op == "all-reduce"
                 and not _crosses(mesh, axis, groups))
    assert inside >= (FEATURES * HIDDEN + HIDDEN * OUTPUTS) // shards, found


# ------------------------------------------------ transformation-level checks


def _synthetic_step(mesh, tx, specs):
  """update() on given per-(worker, shard) gradients on the (4, 2) mesh."""
  grad_specs = {"b": P("data"), "w": P("data", None, "model")}
  out_specs = {"b": P(), "w": P(None, "model")}

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(grad_specs, specs),
                     out_specs=(out_specs, specs))
  def step(grads, opt_state):
    return tx.update(jax.tree.map(lambda g: g[0], grads), opt_state)

  put = lambda tree: jax.device_put(tree, {
      k: NamedSharding(mesh, s) for k, s in grad_specs.items()})
  return step, put


def _synthetic_init(mesh, tx, param_specs, params):
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), "data",
                                   param_specs)
  params = jax.device_put(params, {k: NamedSharding(mesh, s)
                                   for k, s in param_specs.items()})
  state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,),
                                out_specs=specs))(params)
  return specs, state


def _synthetic_grads(seed, workers=4, features=4, hidden=6):
  rng = np.random.default_rng(seed)
  return {"b": rng.normal(size=(workers, 3)).astype(np.float32),
          "w": rng.normal(size=(workers, features, hidden)).astype(np.float32)}


def test_nonfinite_in_one_shard_skips_the_step_on_every_device():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  tx = gs.sparsify(gs.top_k(0.5), axis_name="data")
  param_specs = {"b": P(), "w": P(None, "model")}
  params = {"b": jnp.zeros(3), "w": jnp.zeros((4, 6))}
  specs, state = _synthetic_init(mesh, tx, param_specs, params)
  step, put = _synthetic_step(mesh, tx, specs)
  _, state = step(put(_synthetic_grads(0)), state)
  jax.block_until_ready(state)
  before = jax.tree.map(np.asarray, state)

  grads = _synthetic_grads(1)
  grads["w"][2, 0, 4] = np.nan  # worker 2, model shard 1 only
  out, state = step(put(grads), state)
  jax.block_until_ready(state)
  for leaf in out.values():
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  after = jax.tree.map(np.asarray, state)
  for field in ("memory", "count"):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, field),
                 getattr(before, field))
  stats = gs.comm_stats(state)
  assert stats["steps"] == 2 and stats["skipped_steps"] == 1


@pytest.mark.parametrize("name", gs.compressor_names())
def test_every_compressor_per_shard_as_on_a_one_axis_mesh(name):
  """On (4, 2) each model shard compresses as 4 vmapped workers would."""
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  grads_seq = [_synthetic_grads(seed) for seed in range(2)]
  compressor = gs.compressor_from_ratio(
      name, 0.3, jax.tree.map(lambda g: jnp.asarray(g[0]), grads_seq[0]))
  tx = gs.sparsify(compressor, axis_name="data", granularity="layer",
                   feedback="ef21")
  param_specs = {"b": P(), "w": P(None, "model")}
  specs, state = _synthetic_init(mesh, tx, param_specs,
                                 {"b": jnp.zeros(3), "w": jnp.zeros((4, 6))})
  step, put = _synthetic_step(mesh, tx, specs)

  # The reference: the model shards side by side (a plain vmap), each with
  # its 4 workers (a vmap over "data"); the bias is the same in both.
  def by_shard(grads):
    w = grads["w"].reshape(4, 4, 2, 3).transpose(2, 0, 1, 3)
    return {"b": np.stack([grads["b"]] * 2), "w": w}

  ref_state = jax.vmap(jax.vmap(lambda _: tx.init(
      {"b": jnp.zeros(3), "w": jnp.zeros((4, 3))})))(jnp.zeros((2, 4)))
  ref_update = jax.jit(jax.vmap(jax.vmap(tx.update, axis_name="data")))
  for grads in grads_seq:
    out, state = step(put(grads), state)
    jax.block_until_ready(out)
    expected, ref_state = ref_update(by_shard(grads), ref_state)
    expected_w = np.concatenate(list(np.asarray(expected["w"])[:, 0]), -1)
    # A narrow collective rounds its sum differently in each mapping.
    tolerance = (dict(rtol=0, atol=4 * references.SUM_ROUNDING[name] * float(
        np.abs(expected_w).max())) if name in references.SUM_ROUNDING
                 else dict(rtol=1e-5, atol=1e-6))
    np.testing.assert_allclose(out["w"], expected_w, **tolerance)
    np.testing.assert_allclose(out["b"], expected["b"][0, 0], **tolerance)
    copies = [np.asarray(s.data) for s in out["b"].addressable_shards]
    for copy in copies[1:]:
      np.testing.assert_array_equal(copy, copies[0])


# ------------------------------------------------------------------- specs


def test_state_partition_specs_follow_the_parameters():
  tx = optax.chain(gs.sparsify(gs.top_k(0.5), feedback="ef21",
                               axis_name="data"), optax.adam(1e-3))
  params = {"b": jnp.zeros(3), "n": jnp.zeros(2, jnp.int32),
            "w": jnp.zeros((4, 6))}
  param_specs = {"b": P(), "n": P(), "w": P(None, "model")}
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), "data",
                                   param_specs)
  sparsify_specs, (adam_specs, _) = specs
  # Global granularity: the replicated and the sharded leaf are separate
  # segments (the int leaf is not compressed).
  assert jax.tree.leaves(sparsify_specs.memory) == [
      P("data"), P(("data", "model"))]
  assert sparsify_specs.shared_memory == (P(), P(("model",)))
  assert all(s == P("data") for s in sparsify_specs.stats)
  assert adam_specs.mu == param_specs and adam_specs.nu == param_specs
  assert adam_specs.count == P()
  # Without param_specs: as on a one-axis mesh.
  plain = gs.state_partition_specs(jax.eval_shape(tx.init, params), "data")
  assert jax.tree.leaves(plain[0].memory) == [P("data")]
  assert all(s == P() for s in jax.tree.leaves(plain[1]))


def test_param_specs_sharded_over_the_workers_axis_is_refused():
  tx = gs.sparsify(gs.top_k(0.5), axis_name="data")
  state = tx.init({"w": jnp.zeros((4, 6))})
  with pytest.raises(ValueError, match=r"\['w'\].*'data'"):
    gs.state_partition_specs(state, "data", {"w": P("data", "model")})
  with pytest.raises(ValueError, match="param_specs"):
    gs.state_partition_specs(state, "data", {"v": P()})


def test_state_specs_without_the_model_axis_name_leaf_axis_and_spec():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  tx = gs.sparsify(gs.top_k(0.5), axis_name="data", granularity="layer")
  params = {"b": jnp.zeros(3), "w": jnp.zeros((4, 6))}
  param_specs = {"b": P(), "w": P(None, "model")}
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), "data")
  state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,),
                                out_specs=specs))(jax.device_put(params, {
                                    k: NamedSharding(mesh, s)
                                    for k, s in param_specs.items()}))
  step, put = _synthetic_step(mesh, tx, specs)
  with pytest.raises(ValueError, match=r"memory\[1\].*P\('data',?\).*"
                     r"\['w'\].*'model'.*P\(\('data', 'model'\),?\)"):
    step(put(_synthetic_grads(0)), state)
