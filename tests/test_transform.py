"""sparsify(): NumPy references in every mapping context, pytrees, chains."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs
from gsparse_jax._src import transform
import references
import runners

WORKERS = 8
STEPS = 4


def _params():
  return {"w": jnp.zeros((6, 5)), "b": jnp.zeros((7,))}


def _flat(tree):
  """Concatenation in pytree-leaf order, over the trailing dims."""
  leaves = jax.tree.leaves(tree)
  lead = leaves[0].shape[:2]
  return np.concatenate([np.asarray(l).reshape(lead + (-1,)) for l in leaves],
                        axis=-1)


def _grads_seq(seed=0, steps=STEPS, workers=WORKERS):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=(steps, workers) + p.shape),
                            jnp.float32), _params())


def _rand_k_select(compressor, d):
  """Reference selection that reuses the library's index draw (key only)."""
  def indices_for(step):
    key = transform.segment_key(jnp.asarray(step, jnp.int32), 0)
    draw = lambda _: gs.compress(compressor, jnp.zeros(d), (), key,
                                 runners.AXIS).indices
    return np.asarray(jax.vmap(draw, axis_name=runners.AXIS)(
        jnp.arange(WORKERS)))

  cache = {}

  def select(a, step, worker):
    if step not in cache:
      cache[step] = indices_for(step)
    return references.sparse.keep(a, cache[step][worker])
  return select


COMPRESSORS = {
    "top_k": lambda: gs.top_k(0.1, method="sort"),
    "rand_k_shared": lambda: gs.rand_k(0.1, seed=3, shared=True),
    "rand_k_independent": lambda: gs.rand_k(0.1, seed=3, shared=False),
}


@pytest.mark.parametrize("context", runners.CONTEXTS)
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_matches_numpy_reference_with_error_feedback(name, context, mesh):
  compressor = COMPRESSORS[name]()
  tx = gs.sparsify(compressor, feedback="ef", axis_name=runners.AXIS)
  grads = _grads_seq()
  outputs, state = runners.run_steps(tx, _params(), grads, context, mesh)

  flat_grads = _flat(grads).astype(np.float64)
  d = flat_grads.shape[-1]
  k = compressor.budget(d)
  select = (references.top_k_select(k) if name == "top_k"
            else _rand_k_select(compressor, d))
  expected, memory, _, _ = references.feedback_run(
      flat_grads, references.per_worker(select))

  got = _flat(outputs)  # [steps, workers, d]
  runners.assert_every_worker_matches(
      got, expected, state.memory[0], memory,
      rtol=1e-5, atol=1e-6)
  # Each worker sent exactly k values per step.
  assert gs.comm_stats(state)["sent_values"] == STEPS * k


def test_error_feedback_invariant_sent_plus_memory_is_accumulated():
  """sent + new memory == old memory + gradient, every step (one worker)."""
  tx = gs.sparsify(gs.top_k(0.2), feedback="ef")
  params = {"a": jnp.zeros((40,)), "b": jnp.zeros((3, 4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(1)
  for _ in range(6):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    old_memory = np.asarray(state.memory[0][0])
    sent, state = update(grads, state)
    new_memory = np.asarray(state.memory[0][0])
    np.testing.assert_allclose(
        _flat1(sent) + new_memory, old_memory + _flat1(grads), rtol=1e-6,
        atol=1e-6)
    assert np.count_nonzero(_flat1(sent)) == round(0.2 * 52)


def _flat1(tree):
  return np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(tree)])


def test_compress_invariant_over_workers_with_vmap():
  """Same invariant through the low-level API for 8 workers at once."""
  compressor = gs.top_k(k=3)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(WORKERS, 20)),
                  jnp.float32)

  def worker(x):
    payload = gs.compress(compressor, x, compressor.init(20),
                          jax.random.key(0), runners.AXIS)
    sent = jnp.zeros(20).at[payload.indices].add(payload.values)
    return sent, x - sent, gs.aggregate(payload, runners.AXIS)

  sent, memory, mean = jax.vmap(worker, axis_name=runners.AXIS)(x)
  np.testing.assert_allclose(sent + memory, x, rtol=0, atol=0)
  np.testing.assert_allclose(mean[0], np.asarray(sent).mean(0), rtol=1e-6)
  np.testing.assert_array_equal(mean, np.broadcast_to(mean[0], mean.shape))


@pytest.mark.parametrize("granularity", ["global", "layer"])
def test_granularity_matches_reference(granularity):
  params = {"big": jnp.zeros((1000,)), "small": jnp.zeros((10,)),
            "mid": jnp.zeros((10, 10))}
  tx = gs.sparsify(gs.top_k(0.01), granularity=granularity)
  state = tx.init(params)
  rng = np.random.default_rng(3)
  grads = {"big": jnp.asarray(rng.normal(size=1000) * 0.01, jnp.float32),
           "small": jnp.asarray(rng.normal(size=10) * 10, jnp.float32),
           "mid": jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)}
  out, state = jax.jit(tx.update)(grads, state)
  if granularity == "global":
    flat = _flat1(grads)
    expected = np.zeros_like(flat)
    idx = references.top_k_indices(flat, round(0.01 * flat.size))
    expected[idx] = flat[idx]
    np.testing.assert_array_equal(_flat1(out), expected)
    # The large-magnitude small leaf takes most of the global budget.
    assert np.count_nonzero(out["small"]) > np.count_nonzero(out["big"])
  else:
    for name, g in grads.items():
      g = np.asarray(g).ravel()
      k = max(1, round(0.01 * g.size))
      expected = np.zeros_like(g)
      idx = references.top_k_indices(g, k)
      expected[idx] = g[idx]
      np.testing.assert_array_equal(np.asarray(out[name]).ravel(), expected)
    assert len(state.memory) == 3


def test_layer_wise_rand_k_draws_independently_per_leaf_and_step():
  """Equal-size leaves and successive steps each get their own draw."""
  params = {f"layer{i}": jnp.zeros((1000,)) for i in range(4)}
  tx = gs.sparsify(gs.rand_k(0.01), feedback="none", granularity="layer")
  grads = jax.tree.map(lambda p: jnp.arange(1.0, 1001.0), params)  # no zeros
  step = jax.jit(tx.update)
  state = tx.init(params)
  chosen = []
  for _ in range(2):
    out, state = step(grads, state)
    chosen += [frozenset(np.flatnonzero(np.asarray(leaf)).tolist())
               for leaf in jax.tree.leaves(out)]
  assert [len(c) for c in chosen] == [10] * 8
  # Independent uniform draws of 10 of 1000 entries: some pair of the 8
  # sets coincides with probability 28 / C(1000, 10) ~ 1e-21.
  assert len(set(chosen)) == len(chosen)


def test_k_at_least_d_clamps_to_dense():
  tx = gs.sparsify(gs.top_k(k=1000))
  grads = {"w": jnp.arange(12.0).reshape(3, 4)}
  out, state = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(out["w"], grads["w"])
  np.testing.assert_array_equal(state.memory[0], 0.0)
  assert gs.comm_stats(state)["sent_values"] == 12


def test_zero_size_integer_leaves_and_empty_pytrees_pass_through():
  tx = gs.sparsify(gs.top_k(0.5))
  grads = {"empty": jnp.zeros((0, 3)), "count": jnp.arange(3),
           "w": jnp.array([3.0, -1.0, 0.5, 2.0])}
  out, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert out["empty"].shape == (0, 3)
  np.testing.assert_array_equal(out["count"], grads["count"])
  assert out["count"].dtype == grads["count"].dtype
  np.testing.assert_array_equal(out["w"], [3.0, 0.0, 0.0, 2.0])

  for empty in ({}, (), None):
    out, state = tx.update(empty, tx.init(empty))
    assert out == empty
    assert gs.comm_stats(state)["steps"] == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_output_dtype_equals_input_dtype(dtype):
  tx = optax.chain(gs.sparsify(gs.top_k(0.25)), optax.sgd(0.1))
  params = {"w": jnp.zeros((8,), dtype), "v": jnp.zeros((2, 2), jnp.float32)}
  state = tx.init(params)
  grads = {"w": jnp.linspace(-1, 1, 8).astype(dtype),
           "v": jnp.ones((2, 2), jnp.float32)}
  out, state = jax.jit(tx.update)(grads, state, params)
  assert out["w"].dtype == dtype and out["v"].dtype == jnp.float32
  # Memory stays float32 whatever the gradient dtype.
  assert state[0].memory[0].dtype == jnp.float32


def test_bfloat16_rounding_stays_in_memory():
  """Values go out at bf16; what rounding lost is remembered, not dropped."""
  tx = gs.sparsify(gs.dense(), feedback="ef")
  g = {"w": jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16)}
  state = tx.init(g)
  out, state = tx.update(g, state)
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), [1, 2, 3])
  np.testing.assert_array_equal(state.memory[0], 0.0)


def _make_chain(kind):
  sparsify = gs.sparsify(gs.top_k(0.1))
  if kind == "chain":
    return optax.chain(sparsify, optax.adam(1e-2))
  if kind == "named_chain":
    return optax.named_chain(("compress", sparsify), ("adam", optax.adam(1e-2)))
  return optax.inject_hyperparams(
      lambda learning_rate: optax.chain(sparsify, optax.sgd(learning_rate)))(
          learning_rate=0.1)


@pytest.mark.optax_promotion  # int leaves through optax
@pytest.mark.parametrize("kind", ["chain", "named_chain", "inject_hyperparams"])
def test_chained_traced_once_and_stats_found(kind):
  tx = _make_chain(kind)
  params = {"w": jnp.zeros((50,)), "b": jnp.zeros((5,))}
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(4)
  for _ in range(10):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    params, state = step(params, state, grads)
  stats = gs.comm_stats(state)
  assert stats["steps"] == 10
  assert stats["sent_values"] == 10 * round(0.1 * 55)
  assert stats["dense_bytes"] == 10 * 55 * 4
  assert stats["density"] == pytest.approx(round(0.1 * 55) / 55)
  chex.clear_trace_counter()


@pytest.mark.optax_promotion  # int leaves through optax
def test_init_accepts_abstract_params_and_state_types_are_stable():
  tx = optax.chain(gs.sparsify(gs.top_k(0.1)), optax.adam(1e-3))
  params = {"w": jnp.zeros((30, 3)), "b": jnp.zeros((3,), jnp.bfloat16)}
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                          params)
  abstract_state = jax.eval_shape(tx.init, abstract)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, eager_state = tx.update(grads, state, params)
  _, jit_state = jax.jit(tx.update)(grads, state, params)
  types = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
  assert types(abstract_state) == types(state) == types(eager_state) == types(
      jit_state)


@pytest.mark.parametrize("context", runners.CONTEXTS)
@pytest.mark.parametrize("feedback", ["ef", "none", "ef21", "ef21m"])
def test_nonfinite_skip_keeps_state_on_every_worker(feedback, context, mesh):
  """One worker's NaN makes every worker skip; state and memory unchanged."""
  tx = gs.sparsify(gs.top_k(0.25), axis_name=runners.AXIS, feedback=feedback)
  params = {"w": jnp.zeros((8,))}
  grads = np.random.default_rng(5).normal(size=(3, WORKERS, 8)).astype(
      np.float32)
  grads[1, 5, 2] = np.nan
  outputs, state = runners.run_steps(tx, params, {"w": jnp.asarray(grads)},
                                     context, mesh)
  np.testing.assert_array_equal(outputs["w"][1], 0.0)
  # Steps 0 and 2 equal a run that never saw step 1.
  clean = {"w": jnp.asarray(grads[[0, 2]])}
  expected, clean_state = runners.run_steps(tx, params, clean, context, mesh)
  np.testing.assert_allclose(outputs["w"][[0, 2]], expected["w"], rtol=1e-6)
  chex.assert_trees_all_equal(state.memory, clean_state.memory)
  chex.assert_trees_all_equal(state.shared_memory, clean_state.shared_memory)
  stats = gs.comm_stats(state)
  assert stats["steps"] == 3 and stats["skipped_steps"] == 1
  assert stats["sent_values"] == 2 * 2
  assert int(np.asarray(state.count).ravel()[0]) == 2


@pytest.mark.parametrize("context", runners.CONTEXTS)
def test_finite_gradient_whose_sum_overflows_is_applied(context, mesh):
  """The check's quick sum overflows to inf on huge finite entries (and is
  NaN on inf - inf): the exact count then decides. A finite step whose
  sum overflows is applied, bit for bit as with ``nonfinite="ignore"``;
  a step with +inf and -inf entries (their sum is NaN) is skipped."""
  params = {"w": jnp.zeros((8,)), "b": jnp.zeros((3,))}
  grads = np.random.default_rng(9).normal(
      size=(3, WORKERS, 8)).astype(np.float32)
  grads[0, 0, :2] = 2e38  # finite; worker 0's sum is inf, the mean is not
  grads[2, 1, 0], grads[2, 1, 1] = np.inf, -np.inf
  tree = {"w": jnp.asarray(grads), "b": jnp.ones((3, WORKERS, 3))}
  outs, state = runners.run_steps(
      gs.sparsify(gs.top_k(0.25), axis_name=runners.AXIS), params, tree,
      context, mesh)
  ref, ref_state = runners.run_steps(
      gs.sparsify(gs.top_k(0.25), axis_name=runners.AXIS,
                  nonfinite="ignore"), params,
      jax.tree.map(lambda g: g[:2], tree), context, mesh)
  for got, want in zip(jax.tree.leaves(outs), jax.tree.leaves(ref)):
    assert np.all(np.isfinite(want))
    np.testing.assert_array_equal(got[:2], want)
    np.testing.assert_array_equal(got[2], 0.0)
  chex.assert_trees_all_equal(state.memory, ref_state.memory)
  stats = gs.comm_stats(state)
  assert stats["steps"] == 3 and stats["skipped_steps"] == 1


@pytest.mark.parametrize("context", runners.CONTEXTS)
@pytest.mark.parametrize("compressor", [
    gs.reg_top_k(0.25),  # sparse payload masked; state kept by a select
    gs.rand_k(0.25),  # aligned payload masked
    gs.sign(),  # a format of its own: memory kept by a select
], ids=["reg_top_k", "rand_k", "sign"])
def test_skipped_step_keeps_compressor_state_and_every_leaf(
    compressor, context, mesh):
  """A NaN in one leaf of one worker, global granularity over two leaves,
  EF: the skipped step outputs zeros in every leaf, and memory, compressor
  state (RegTop-k's posterior statistics) and count are bit for bit those
  of a run that never saw it, whether the memory is kept by the arithmetic
  (a masked payload) or by a select."""
  tx = gs.sparsify(compressor, axis_name=runners.AXIS)
  params = {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))}
  rng = np.random.default_rng(7)
  grads = {"a": rng.normal(size=(4, WORKERS, 4, 3)).astype(np.float32),
           "b": rng.normal(size=(4, WORKERS, 5)).astype(np.float32)}
  grads["b"][2, 3, 1] = np.inf
  outputs, state = runners.run_steps(
      tx, params, jax.tree.map(jnp.asarray, grads), context, mesh)
  for leaf in jax.tree.leaves(outputs):
    np.testing.assert_array_equal(leaf[2], 0.0)
  clean = jax.tree.map(lambda g: jnp.asarray(g[[0, 1, 3]]), grads)
  expected, clean_state = runners.run_steps(tx, params, clean, context, mesh)
  for got, want in zip(jax.tree.leaves(outputs), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got[[0, 1, 3]], want)
  chex.assert_trees_all_equal(state.memory, clean_state.memory)
  chex.assert_trees_all_equal(state.compressor_state,
                              clean_state.compressor_state)
  chex.assert_trees_all_equal(state.count, clean_state.count)
  assert gs.comm_stats(state)["skipped_steps"] == 1


def test_nonfinite_raise():
  tx = gs.sparsify(gs.top_k(0.5), nonfinite="raise")
  g = {"w": jnp.array([1.0, jnp.inf])}
  with pytest.raises(Exception, match="non-finite"):
    jax.block_until_ready(jax.jit(tx.update)(g, tx.init(g)))


def test_state_mismatch_is_a_clear_error():
  tx = gs.sparsify(gs.top_k(0.5))
  state = tx.init({"w": jnp.zeros(4)})
  with pytest.raises(ValueError, match="the state was initialized"):
    tx.update({"w": jnp.zeros(5)}, state)


@pytest.mark.parametrize("kwargs, match", [
    (dict(feedback="ef22"), "`feedback` must be one of"),
    (dict(granularity="leaf"), "`granularity` must be one of"),
    (dict(nonfinite="drop"), "`nonfinite` must be one of"),
    (dict(momentum=1.0), "`momentum` must be a number in"),
])
def test_sparsify_argument_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    gs.sparsify(gs.top_k(0.1), **kwargs)


def test_sparsify_wrong_kinds_of_object_are_type_errors():
  """docs/errors.md: the wrong kind of object is a TypeError."""
  with pytest.raises(TypeError, match="`axis_name` must be"):
    gs.sparsify(gs.top_k(0.1), axis_name=3)
  with pytest.raises(TypeError, match="`compressor` must be"):
    gs.sparsify("top_k")


def test_single_worker_sgd_with_dense_equals_plain_sgd():
  params = {"w": jnp.arange(5.0)}
  plain = optax.sgd(0.5)
  ours = optax.chain(gs.sparsify(gs.dense()), optax.sgd(0.5))
  s1, s2 = plain.init(params), ours.init(params)
  p1 = p2 = params
  for t in range(3):
    g = {"w": jnp.sin(jnp.arange(5.0) + t)}
    u1, s1 = plain.update(g, s1, p1)
    u2, s2 = ours.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  chex.assert_trees_all_close(p1, p2)


@pytest.mark.optax_promotion  # int leaves through optax
def test_state_from_eager_init_can_be_donated():
  """No two state leaves share a buffer, so a step may donate the state."""
  tx = optax.chain(gs.sparsify(gs.top_k(0.5), feedback="ef21m"),
                   optax.adam(1e-3))
  params = {"w": jnp.zeros((6,)), "b": jnp.zeros((2,))}
  state = tx.init(params)
  step = jax.jit(lambda g, s: tx.update(g, s, params), donate_argnums=(1,))
  for _ in range(2):
    _, state = step(jax.tree.map(jnp.ones_like, params), state)
  assert gs.comm_stats(state)["steps"] == 2


def test_the_segment_plan_is_worked_out_once_by_init(monkeypatch):
  """init makes the plan; update, jit and the specs read it from the state."""
  from gsparse_jax._src import segments
  calls = []
  make = segments._make_plan
  monkeypatch.setattr(segments, "_make_plan",
                      lambda *args: calls.append(args) or make(*args))
  compressor = gs.top_k(0.5)
  tx = gs.sparsify(compressor, granularity="layer")
  params = {"b": jnp.zeros(3), "n": jnp.zeros(2, jnp.int32),
            "w": jnp.zeros((2, 4))}
  state = tx.init(params)
  grads = {"b": jnp.ones(3), "n": jnp.ones(2, jnp.int32),
           "w": jnp.arange(8.0).reshape(2, 4)}
  out, state = jax.jit(tx.update)(grads, state)
  gs.state_partition_specs(state, "data")
  assert len(calls) == 1
  # Static metadata: no array leaves, the same plan as the public function.
  assert state.plan == gs.segment_plan(params, compressor, granularity="layer")
  assert [(s.leaf_ids, s.size) for s in state.plan.segments] == [
      ((0,), 3), ((2,), 8)]
  assert not jax.tree.leaves(state.plan)
  np.testing.assert_array_equal(out["w"], [[0, 0, 0, 0], [4, 5, 6, 7]])
