"""The compressor contract: every registry compressor x every feedback rule.

Modelled on optax's ``contrib/_common_test.py``: one table of compressors
(`gs.COMPRESSORS`, so a new compressor joins by adding its registry row and
its NumPy reference to the ``REFERENCES`` of its family in
`tests/references/`), and the same checks for each:

* in each mapping (``vmap``, ``jit(shard_map)``, ``pmap``, 8 workers) the
  outputs and final memory equal the float64 NumPy reference;
* the same under ``granularity="layer"`` (a budget per leaf, each leaf's
  compressor specialized with ``for_shape``: PowerSGD's low-rank path,
  ARC-Top-K's rows of the matrix), with EF and EF21-SGDM;
* ``vmap`` and ``shard_map`` are bit-identical;
* error feedback loses nothing: sum over steps and workers of what was sent,
  plus the final memories, equals the sum of the gradients;
* ``init`` accepts abstract parameters; ``jax.typeof`` of the state is the
  same after ``init`` and ``update``, eager and jitted; many steps trace
  once; the state can be donated;
* ``comm_stats`` bytes equal the compressors' declared wire cost;
* the output dtype equals the input dtype for float32, bfloat16, float16.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs
import references
import runners

WORKERS = 8
STEPS = 3
RATIO = 0.25
FEEDBACKS = ("none", "ef", "ef21", "ef21m")


def _params():
  return {"b": jnp.zeros((7,)), "w": jnp.zeros((6, 5))}


D = 37  # entries of _params()


@functools.lru_cache(maxsize=None)
def _grads(steps=STEPS, workers=WORKERS, seed=0):
  """``{"b": [steps, workers, 7], "w": [steps, workers, 6, 5]}``, float32."""
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=(steps, workers) + p.shape).astype(np.float32)
          for name, p in _params().items()}


def _flat(tree):
  """Leaves concatenated over trailing dims, pytree order (b, then w)."""
  leaves = jax.tree.leaves(tree)
  lead = np.asarray(leaves[0]).shape[:2]
  return np.concatenate([np.asarray(l).reshape(lead + (-1,))
                         for l in leaves], axis=-1)


def _compressor(name):
  sample = jax.tree.map(lambda g: g[0, 0], _grads())
  return gs.compressor_from_ratio(name, RATIO, sample)


NAMES = gs.compressor_names()


def _output_tolerance(name, expected):
  """assert_allclose's tolerances for outputs near ``expected``."""
  if name not in references.SUM_ROUNDING:
    return dict(rtol=2e-5, atol=2e-6)
  # A sum of n terms rounded after each addition: within n roundoffs.
  return dict(rtol=0.0, atol=WORKERS * references.SUM_ROUNDING[name] * float(
      np.abs(expected).max()))


def _segments(name, granularity):
  """``(columns, compressor)`` of every segment `sparsify` compresses, in
  its order: all of `_params()` (global), or one per leaf (layer)."""
  compressor = _compressor(name)
  if granularity == "global":
    return [(slice(0, D), compressor)]
  segments, start = [], 0
  for leaf in jax.tree.leaves(_params()):
    segments.append((slice(start, start + leaf.size),
                     compressor.for_shape(leaf.shape)))
    start += leaf.size
  return segments


# The feedback rules each (mapping, granularity) runs; the layer runs:
# EF in the vmap/shard_map pair and EF21-SGDM (ARC-Top-K's rule) once
# (layer granularity changes what each compressor is given, one leaf and
# its shape, not the feedback rules: per segment either way).
LAYER_RUNS = (("ef", "vmap"), ("ef", "shard_map"), ("ef21m", "vmap"))


def _feedbacks(context, granularity):
  if granularity == "global":
    return FEEDBACKS
  return tuple(f for f, c in LAYER_RUNS if c == context)


def _side_by_side(txs):
  """One transformation stepping every ``tx`` of ``txs`` on the same
  gradients, each on its own state: one compiled step serves them all."""

  def update(grads, states, params=None):
    results = [tx.update(grads, state, params)
               for tx, state in zip(txs, states)]
    return tuple(r[0] for r in results), tuple(r[1] for r in results)

  return optax.GradientTransformation(
      lambda params: tuple(tx.init(params) for tx in txs), update)


@functools.lru_cache(maxsize=None)
def _run_group(name, context, granularity):
  """feedback -> (outputs ``[steps, workers, D]``, memory ``[workers, D]``,
  state) for every rule of `_feedbacks`, run side by side."""
  feedbacks = _feedbacks(context, granularity)
  tx = _side_by_side([gs.sparsify(_compressor(name), feedback=feedback,
                                  axis_name=runners.AXIS,
                                  granularity=granularity)
                      for feedback in feedbacks])
  mesh = jax.make_mesh((WORKERS,), (runners.AXIS,))
  grads = jax.tree.map(jnp.asarray, _grads())
  outputs, states = runners.run_steps(tx, _params(), grads, context, mesh)
  runs = {}
  for feedback, output, state in zip(feedbacks, outputs, states):
    memory = [np.zeros((WORKERS, cols.stop - cols.start))
              if not jax.tree.leaves(segment_memory) else
              runners.worker_rows(jax.tree.leaves(segment_memory)[-1], WORKERS)
              for (cols, _), segment_memory in zip(
                  _segments(name, granularity), state.memory)]
    runs[feedback] = (_flat(output), np.concatenate(memory, axis=-1), state)
  return runs


def _run(name, feedback, context, granularity="global"):
  """(outputs ``[steps, workers, D]``, memory ``[workers, D]``, state)."""
  return _run_group(name, context, granularity)[feedback]


@functools.lru_cache(maxsize=None)
def _reference(name, feedback, granularity="global"):
  """(outputs ``[steps, D]``, memory ``[workers, D]``): each segment's
  reference on its columns, as `sparsify` runs them."""
  grads = _flat(_grads()).astype(np.float64)
  runs = [references.feedback_run(
      grads[..., cols],
      *references.compressor_reference(name, compressor,
                                       cols.stop - cols.start, index),
      feedback) for index, (cols, compressor) in enumerate(
          _segments(name, granularity))]
  return (np.concatenate([run.outputs for run in runs], axis=-1),
          np.concatenate([run.memory for run in runs], axis=-1))


def test_every_registry_compressor_has_a_reference():
  assert not references.missing(NAMES), (
      f"registry compressors without a NumPy reference: "
      f"{references.missing(NAMES)} (add each to the REFERENCES of its "
      "family in tests/references/)")


def _check_against_reference(name, feedback, context, granularity):
  got, memory, state = _run(name, feedback, context, granularity)
  expected, expected_memory = _reference(name, feedback, granularity)
  for worker in range(WORKERS):
    np.testing.assert_allclose(got[:, worker], expected,
                               **_output_tolerance(name, expected))
  np.testing.assert_allclose(memory, expected_memory, rtol=2e-5, atol=2e-6)
  stats = gs.comm_stats(state)
  assert stats["steps"] == STEPS and stats["skipped_steps"] == 0


@pytest.mark.parametrize("context", runners.CONTEXTS)
@pytest.mark.parametrize("feedback", FEEDBACKS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_reference(name, feedback, context):
  _check_against_reference(name, feedback, context, "global")


@pytest.mark.parametrize("feedback,context", LAYER_RUNS)
@pytest.mark.parametrize("name", NAMES)
def test_layer_granularity_matches_numpy_reference(name, feedback, context):
  _check_against_reference(name, feedback, context, "layer")


def test_layer_granularity_reaches_the_shape_specialized_paths():
  """The layer runs do exercise PowerSGD's low-rank factors and ARC-Top-K's
  sketch of the weight's own rows, not their fallbacks."""
  (_, bias), (_, weight) = _segments("power_sgd", "layer")
  assert bias.layout == "dense" and weight.matrix == (6, 5)
  _, weight = _segments("arc_top_k", "layer")[1]
  assert weight.grid(30) == (6, 5) and weight.rank < 5  # a sketch, not rows


@pytest.mark.parametrize("name", NAMES)
def test_layer_granularity_bytes_are_each_leafs_declared_wire(name):
  _, _, state = _run(name, "ef", "vmap", "layer")
  declared = sum(c.bytes for cols, compressor in _segments(name, "layer")
                 for c in compressor.wire(cols.stop - cols.start,
                                          jnp.float32))
  assert gs.comm_stats(state)["sent_bytes"] == STEPS * declared


@pytest.mark.parametrize("feedback,granularity",
                         [(f, "global") for f in FEEDBACKS] + [("ef", "layer")])
@pytest.mark.parametrize("name", NAMES)
def test_vmap_and_shard_map_are_bit_identical(name, feedback, granularity):
  got_vmap, memory_vmap, _ = _run(name, feedback, "vmap", granularity)
  got_shard, memory_shard, _ = _run(name, feedback, "shard_map", granularity)
  if name in references.SUM_ROUNDING:  # the collective's rounding
    np.testing.assert_allclose(got_vmap, got_shard,
                               **_output_tolerance(name, got_shard))
  else:
    np.testing.assert_array_equal(got_vmap, got_shard)
  np.testing.assert_array_equal(memory_vmap, memory_shard)


# A compressor whose collective rounds the sum outside any memory
# (references.SUM_ROUNDING) cannot keep this invariant; its memories are
# checked exactly instead.
@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize(
    "name", [n for n in NAMES if n not in references.SUM_ROUNDING])
def test_error_feedback_loses_nothing(name, granularity):
  """n * sum_t out_t + sum_i e_i(T) == sum_t sum_i g_t,i (EF's invariant)."""
  got, memory, _ = _run(name, "ef", "vmap", granularity)
  sent_total = WORKERS * got[:, 0].astype(np.float64).sum(axis=0)
  grads_total = _flat(_grads()).astype(np.float64).sum(axis=(0, 1))
  np.testing.assert_allclose(sent_total + memory.sum(axis=0), grads_total,
                             rtol=1e-5, atol=1e-4)


@functools.lru_cache(maxsize=None)
def _jitted_one_worker(name):
  """feedback -> (step outputs, donated-step outputs, each state's types
  after every jitted step, final states, the first step from `init`) of
  every rule, side by side on one worker: one jitted step (which must trace
  once for all the steps) and one with the state donated."""
  txs = [gs.sparsify(_compressor(name), feedback=f) for f in FEEDBACKS]
  tx = _side_by_side(txs)
  params = _params()
  grads = [jax.tree.map(lambda g: jnp.asarray(g[t, 0]), _grads())
           for t in range(STEPS)]
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(g, s):
    return tx.update(g, s)

  donated = jax.jit(tx.update, donate_argnums=1)
  state_a, state_b = tx.init(params), tx.init(params)
  outs_a, outs_b, types = [], [], []
  for g in grads:
    out_a, state_a = step(g, state_a)
    out_b, state_b = donated(g, state_b)
    outs_a.append(out_a)
    outs_b.append(out_b)
    types.append(jax.tree.map(jax.typeof, state_a))
  first = step(grads[0], tx.init(params))[0]
  return {f: ([o[i] for o in outs_a], [o[i] for o in outs_b],
              [t[i] for t in types], state_a[i], state_b[i], first[i])
          for i, f in enumerate(FEEDBACKS)}


@pytest.mark.parametrize("feedback", FEEDBACKS)
@pytest.mark.parametrize("name", NAMES)
def test_state_contract_on_one_worker(name, feedback):
  """Abstract init, stable types, one trace, donation, bytes == wire cost."""
  compressor = _compressor(name)
  tx = gs.sparsify(compressor, feedback=feedback)
  params = _params()
  grad = jax.tree.map(lambda g: jnp.asarray(g[0, 0]), _grads())

  abstract = jax.eval_shape(
      tx.init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                            params))
  state = tx.init(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, state)
  types = jax.tree.map(jax.typeof, state)

  eager_out, eager_state = tx.update(grad, state)
  assert jax.tree.map(jax.typeof, eager_state) == types

  outs_a, outs_b, step_types, state_a, state_b, first = _jitted_one_worker(
      name)[feedback]
  for out_a, out_b, step_type in zip(outs_a, outs_b, step_types):
    assert step_type == types
    chex.assert_trees_all_equal(out_a, out_b)
  chex.assert_trees_all_equal(state_a, state_b)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, eager_out),
                              jax.tree.map(np.asarray, first),
                              rtol=1e-6, atol=1e-7)

  stats = gs.comm_stats(state_a)
  declared = sum(c.bytes for c in compressor.wire(D, jnp.float32))
  assert stats["sent_bytes"] == STEPS * declared
  assert stats["dense_bytes"] == STEPS * D * 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", NAMES)
def test_output_dtype_equals_input_dtype(name, dtype):
  tx = gs.sparsify(_compressor(name), feedback="ef", axis_name=runners.AXIS)
  params = {"b": jnp.zeros((7,), dtype), "w": jnp.zeros((6, 5), dtype),
            "n": jnp.zeros((2,), jnp.int32)}
  grads = jax.tree.map(lambda p: jnp.ones((WORKERS,) + p.shape, p.dtype),
                       params)
  state = jax.vmap(lambda _: tx.init(params))(jnp.arange(WORKERS))
  out, new_state = jax.eval_shape(
      jax.vmap(tx.update, axis_name=runners.AXIS), grads, state)
  for key in params:
    assert out[key].dtype == params[key].dtype, key
    assert out[key].shape == grads[key].shape, key
  assert jax.tree.map(lambda s: (s.shape, s.dtype), new_state) == (
      jax.tree.map(lambda s: (s.shape, s.dtype), state))


@dataclasses.dataclass(frozen=True)
class SignMagnitudeTopK(gs.Compressor):
  """A compressor written outside the library: the Top-k positions, each
  sent as ``sign(a_j)`` times the mean magnitude of the kept entries."""

  k: int = 5

  def budget(self, size):
    return min(self.k, size)

  def select(self, x, state, context):
    _, indices = jax.lax.top_k(jnp.abs(x), self.budget(x.shape[0]))
    kept = x[indices]
    values = jnp.sign(kept) * jnp.mean(jnp.abs(kept))
    return gs.Payload(values=values.astype(context.value_dtype),
                      indices=indices.astype(jnp.int32),
                      count=jnp.asarray(indices.shape[0], jnp.int32),
                      overflow=jnp.zeros([], jnp.int32), aux=(),
                      size=x.shape[0], layout="sparse")


def _sign_magnitude_reference(a, step, state):
  sent = np.zeros_like(a)
  for i, row in enumerate(a):
    indices = references.top_k_indices(row, 5)
    sent[i, indices] = np.sign(row[indices]) * np.abs(row[indices]).mean()
  return sent, state


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
def test_a_new_compressor_needs_no_library_change(context):
  """Defined in this file alone, it runs with EF in every mapping, matches
  its NumPy reference and is counted at its declared wire cost."""
  tx = gs.sparsify(SignMagnitudeTopK(), feedback="ef", axis_name=runners.AXIS)
  mesh = jax.make_mesh((WORKERS,), (runners.AXIS,))
  outputs, state = runners.run_steps(
      tx, _params(), jax.tree.map(jnp.asarray, _grads()), context, mesh)
  expected, memory, _, _ = references.feedback_run(
      _flat(_grads()).astype(np.float64), _sign_magnitude_reference)
  np.testing.assert_allclose(_flat(outputs)[:, 0], expected, rtol=2e-5,
                             atol=2e-6)
  np.testing.assert_allclose(
      runners.worker_rows(state.memory[0], WORKERS), memory, rtol=2e-5,
      atol=2e-6)
  assert gs.comm_stats(state)["sent_bytes"] == STEPS * 5 * (4 + 4)
