"""ARC-Top-K (docs/algorithms.md): shared row choice, NumPy reference, wire."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
from gsparse_jax._src import transform
import runners

AXIS = runners.AXIS
WORKERS = 8


def arc_reference(grads, omega, rows_kept, row_len):
  """NumPy ARC-Top-K step over workers, in float64.

  Args:
    grads: ``[workers, d]``.
    omega: the ``[row_len, r]`` sketch (None: rows are their own sketch).
    rows_kept: rows selected.
    row_len: entries per row (the tail row zero-padded).

  Returns:
    (sorted selected rows, the aggregated mean ``[d]``).
  """
  workers, d = grads.shape
  num_rows = -(-d // row_len)
  padded = np.zeros((workers, num_rows * row_len))
  padded[:, :d] = grads
  matrices = padded.reshape(workers, num_rows, row_len)
  sketch = sum(m @ omega if omega is not None else m for m in matrices)
  energy = np.sum(sketch**2, axis=1)
  rows = np.sort(np.argsort(-energy, kind="stable")[:rows_kept])
  mean = np.zeros((num_rows, row_len))
  mean[rows] = matrices[:, rows].mean(axis=0)
  return rows, mean.reshape(-1)[:d]


def arc_step(compressor, key):
  """One worker's compress + aggregate, returning (indices, mean)."""

  def step(x):
    sent = gs.compress(compressor, x, compressor.init(x.shape[0]), key, AXIS)
    return sent.indices, gs.aggregate(sent, AXIS)

  return step


def heterogeneous_rows(rng, workers, num_rows, row_len):
  """Gaussian data whose rows have very different norms (a clear ranking)."""
  scales = np.exp(rng.normal(size=(1, num_rows, 1)) * 1.5)
  data = rng.normal(size=(workers, num_rows, row_len)) * scales
  return data.reshape(workers, -1).astype(np.float32)


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
def test_same_rows_on_every_worker_and_numpy_reference(context, mesh):
  d, row_len, rank, ratio = 203, 10, 3, 0.25  # 21 rows, the last 3 wide
  compressor = gs.arc_top_k(ratio, rank=rank, row_size=row_len)
  key = jax.random.key(7)
  grads = heterogeneous_rows(np.random.default_rng(0), WORKERS, 21,
                             row_len)[:, :d]
  step = arc_step(compressor, key)
  if context == "vmap":
    indices, mean = jax.jit(jax.vmap(step, axis_name=AXIS))(grads)
  else:
    sharded = jax.jit(jax.shard_map(
        lambda x: jax.tree.map(lambda y: y[None], step(x[0])), mesh=mesh,
        in_specs=P(AXIS), out_specs=P(AXIS)))
    indices, mean = sharded(
        jax.device_put(grads, NamedSharding(mesh, P(AXIS))))
  indices, mean = np.asarray(indices), np.asarray(mean)

  # Every worker selected the same entries and holds the same mean.
  np.testing.assert_array_equal(indices, np.broadcast_to(indices[0],
                                                         indices.shape))
  np.testing.assert_array_equal(mean, np.broadcast_to(mean[0], mean.shape))

  # The sketch Omega is the same jax.random call as inside the compressor;
  # the rest of the step is NumPy.
  omega = np.asarray(jax.random.normal(key, (row_len, rank), jnp.float32),
                     np.float64)
  rows, expected = arc_reference(grads.astype(np.float64), omega,
                                 compressor.rows_kept(d), row_len)
  assert len(rows) == 5  # floor(0.25 * 21)
  real = indices[0][indices[0] < d]
  np.testing.assert_array_equal(np.unique(real // row_len), rows)
  np.testing.assert_allclose(mean[0], expected, rtol=1e-5, atol=1e-6)


def test_sparsify_agrees_across_vmap_shard_map_and_pmap(mesh):
  # The sketch is drawn from the step key (from the replicated step count),
  # so every mapping context draws the same Omega and picks the same rows.
  tx = gs.sparsify(gs.arc_top_k(0.2, rank=2, row_size=8), feedback="ef21m",
                   axis_name=AXIS)
  grads = jnp.asarray(np.random.default_rng(6).normal(
      size=(3, WORKERS, 80)).astype(np.float32))
  outputs = {context: runners.run_steps(tx, jnp.zeros(80), grads, context,
                                        mesh)[0]
             for context in runners.CONTEXTS}
  for context, out in outputs.items():
    np.testing.assert_array_equal(out, np.broadcast_to(out[:, :1], out.shape))
    np.testing.assert_allclose(out, outputs["vmap"], rtol=1e-6, atol=1e-7,
                               err_msg=context)
  # The first step sends 2 of the 10 rows (h starts at 0): 16 values.
  assert np.count_nonzero(outputs["vmap"][0, 0]) == 16


def test_sketched_rows_of_similar_norms_match_numpy_in_sparsify():
  """rank < row length on i.i.d. rows: only the sketch decides the rows.

  Rows of similar norms make the sketched ranking differ from the exact
  aggregate-energy ranking, so the row choice checks the sketch itself:
  Omega from the step's key (drawn here with the same `jax.random` call on
  the key of step t, segment 0), the psum over the 8 workers, and the
  squared-norm ranking.
  """
  num_rows, row_len, rank, steps = 40, 16, 3, 2
  d = num_rows * row_len
  compressor = gs.arc_top_k(0.1, rank=rank, row_size=row_len)
  kept = compressor.rows_kept(d)
  assert kept == 4
  grads = np.random.default_rng(2).normal(size=(steps, WORKERS, d)).astype(
      np.float32)
  tx = gs.sparsify(compressor, feedback="none", axis_name=AXIS)
  outputs, _ = runners.run_steps(tx, jnp.zeros(d), jnp.asarray(grads), "vmap")

  for t in range(steps):
    key = transform.segment_key(jnp.asarray(t, jnp.int32), 0)
    omega = np.asarray(jax.random.normal(key, (row_len, rank), jnp.float32),
                       np.float64)
    g = grads[t].astype(np.float64)
    rows, expected = arc_reference(g, omega, kept, row_len)
    # The data exercises the sketch: the exact ranking picks other rows,
    # and float32 rounding cannot swap the 4th and 5th sketched rows.
    matrices = g.reshape(WORKERS, num_rows, row_len)
    exact = np.sort(np.argsort(-np.sum(matrices.sum(0) ** 2, axis=1),
                               kind="stable")[:kept])
    assert set(exact) != set(rows)
    energy = np.sum(sum(m @ omega for m in matrices) ** 2, axis=1)
    fourth, fifth = np.sort(energy)[::-1][kept - 1:kept + 1]
    assert fourth - fifth > 1e-3 * fourth

    out = outputs[t]
    np.testing.assert_array_equal(out, np.broadcast_to(out[0], out.shape))
    sent_rows = np.flatnonzero(np.any(out[0].reshape(num_rows, row_len) != 0,
                                      axis=1))
    np.testing.assert_array_equal(sent_rows, rows)
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-6)


def test_single_worker_without_axis_name():
  row_len = 6  # 10 rows of 6: a vector of 60
  compressor = gs.arc_top_k(0.3, rank=2, row_size=row_len)
  x = heterogeneous_rows(np.random.default_rng(1), 1, 10, row_len)[0]
  key = jax.random.key(3)
  sent = gs.compress(compressor, jnp.asarray(x), (), key)
  omega = np.asarray(jax.random.normal(key, (row_len, 2), jnp.float32),
                     np.float64)
  rows, expected = arc_reference(x[None].astype(np.float64), omega, 3,
                                 row_len)
  np.testing.assert_allclose(np.asarray(gs.aggregate(sent, None)), expected,
                             rtol=1e-6)
  assert sent.layout == "aligned" and int(sent.count) == 3 * row_len
  assert sorted(set(np.asarray(sent.indices) // row_len)) == list(rows)


def test_padded_tail_row_uses_the_padding_convention():
  # d = 23 as 5 rows of 5: the last row has 3 real entries and is the
  # largest, so it is selected and its 2 padding slots carry index `size`.
  x = jnp.concatenate([jnp.full(21, 0.01), jnp.array([5.0, -6.0])])
  compressor = gs.arc_top_k(0.2, rank=8, row_size=5)  # rank >= c: exact
  sent = gs.compress(compressor, x, (), jax.random.key(0))
  assert sorted(np.asarray(sent.indices).tolist()) == [20, 21, 22, 23, 23]
  assert int(sent.count) == 3
  np.testing.assert_array_equal(
      np.asarray(gs.aggregate(sent, None))[20:],
      np.float32([0.01, 5.0, -6.0]))


def test_layer_granularity_uses_each_leaf_shape():
  rng = np.random.default_rng(2)
  grads = {
      "kernel": rng.normal(size=(6, 5)).astype(np.float32),
      "conv": rng.normal(size=(4, 3, 2)).astype(np.float32),
      "bias": np.array([0.1, -3.0, 0.2, 2.0, 0.0, -0.3, 0.05], np.float32),
  }
  grads["kernel"][4] *= 10.0  # the row that must win
  grads["conv"][1] *= 10.0
  params = jax.tree.map(jnp.zeros_like, grads)
  tx = gs.sparsify(gs.arc_top_k(0.3, rank=2), feedback="none",
                   granularity="layer")
  out, _ = jax.jit(tx.update)(grads, tx.init(params))
  out = jax.tree.map(np.asarray, out)
  # 6 rows of 5 -> 1 row kept; (4, 6) rows -> 1; 7 entries as rows -> 2,
  # chosen exactly (a 1-D leaf is its own sketch, as in the reference).
  expected_kernel = np.zeros_like(grads["kernel"])
  expected_kernel[4] = grads["kernel"][4]
  expected_conv = np.zeros_like(grads["conv"])
  expected_conv[1] = grads["conv"][1]
  np.testing.assert_array_equal(out["kernel"], expected_kernel)
  np.testing.assert_array_equal(out["conv"], expected_conv)
  np.testing.assert_array_equal(out["bias"], [0, -3.0, 0, 2.0, 0, 0, 0])


def test_for_shape_sets_the_rows_compress_uses():
  compressor = gs.arc_top_k(0.5, rank=1)
  assert compressor.for_shape((4, 3)).grid(12) == (4, 3)
  assert compressor.for_shape((12,)).grid(12) == (12, 1)
  assert compressor.grid(12) == (3, 4)  # no shape: ~sqrt(d) per row
  x = jnp.arange(12.0)
  sent = gs.compress(compressor.for_shape((4, 3)), x, (), jax.random.key(0))
  assert sorted(np.asarray(sent.indices).tolist()) == list(range(6, 12))
  with pytest.raises(ValueError, match="shape"):
    gs.compress(compressor.for_shape((5, 3)), x, (), jax.random.key(0))


def test_bytes_are_sketch_plus_values_without_indices():
  d = 2000
  tx = gs.sparsify(gs.arc_top_k(0.05, rank=2, row_size=10))
  _, state = jax.jit(tx.update)(jnp.ones(d), tx.init(jnp.zeros(d)))
  stats = gs.comm_stats(state)
  # 10 rows of 10 values + the 200 x 2 sketch, 4 bytes each.
  assert stats["sent_bytes"] == (100 + 400) * 4
  assert stats["sent_values"] == 100
  tx = gs.sparsify(gs.top_k(0.05))
  _, state = jax.jit(tx.update)(jnp.ones(d), tx.init(jnp.zeros(d)))
  assert gs.comm_stats(state)["sent_bytes"] == 100 * (4 + 4)


def test_lowered_arc_step_all_reduces_sketch_and_rows_only(mesh):
  reduces, gathers = runners.collectives(runners.lowered_step_text(
      gs.arc_top_k(0.05, rank=2, row_size=10), mesh))
  assert gathers == 0
  # One psum of the 200 x 2 sketch and one of the 10 selected rows' values;
  # nothing of the gradient's size.
  assert sorted(reduces) == ["tensor<100xf32>", "tensor<200x2xf32>"]


def test_lowered_top_k_step_all_gathers(mesh):
  reduces, gathers = runners.collectives(
      runners.lowered_step_text(gs.top_k(0.05), mesh))
  assert gathers >= 2 and not reduces  # indices and values


def _contraction_ratios(compressor, x, keys):
  """||C(x) - x||^2 / ||x||^2 for each key (one worker)."""

  def ratio(key):
    sent = gs.compress(compressor, x, (), key)
    residual = x - gs.aggregate(sent, None)
    return jnp.sum(residual**2) / jnp.sum(x**2)

  return np.asarray(jax.jit(jax.vmap(ratio))(jnp.stack(list(keys))))


def test_exact_rows_are_deterministically_contractive():
  # Rows no wider than the rank are ranked by their exact energy (block
  # Top-k): keeping the top q of m rows keeps at least q/m of the energy,
  # ||C(x) - x||^2 <= (1 - q/m) ||x||^2 for every x. The slack 1e-6 covers
  # float32 rounding of the two sums of squares.
  rng = np.random.default_rng(4)
  compressor = gs.arc_top_k(0.1, rank=4, row_size=4)
  delta = compressor.rows_kept(400) / 100
  for _ in range(5):
    x = jnp.asarray(rng.standard_t(2, size=400).astype(np.float32))
    (ratio,) = _contraction_ratios(compressor, x, [jax.random.key(0)])
    assert ratio <= 1.0 - delta + 1e-6


def test_sketched_rows_are_contractive_on_average():
  # With a sketch the choice depends on Omega, so the bound holds in
  # expectation over the draw: E||C(x) - x||^2 <= (1 - q/m) ||x||^2, where
  # q/m is what a uniformly random choice of q rows keeps on average (the
  # sketch ranks rows by an unbiased estimate of their energy, so it keeps
  # more). Every single draw keeps some energy (ratio < 1). Tolerance: the
  # mean of 32 draws has standard error std/sqrt(32); measured here:
  # * rows of very different norms: std <= 0.15 (SE < 0.03), mean 0.1-0.4,
  #   so we can demand a margin of 0.1 below 1 - q/m = 0.9;
  # * i.i.d. Gaussian rows (nearly equal norms, the hard case): std ~0.015
  #   (SE ~0.003), mean 0.87-0.89: at or below 0.9 with no slack (>= 4 SE).
  rng = np.random.default_rng(5)
  compressor = gs.arc_top_k(0.1, rank=2, row_size=20)
  d = 20 * 50
  delta = compressor.rows_kept(d) / 50
  keys = jax.random.split(jax.random.key(1), 32)
  for _ in range(2):
    x = jnp.asarray(heterogeneous_rows(rng, 1, 50, 20)[0])
    ratios = _contraction_ratios(compressor, x, keys)
    assert np.all(ratios < 1.0)
    assert ratios.mean() <= 1.0 - delta - 0.1
  x = jnp.asarray(rng.normal(size=d).astype(np.float32))
  ratios = _contraction_ratios(compressor, x, keys)
  assert np.all(ratios < 1.0)
  assert ratios.mean() <= 1.0 - delta


def test_zero_vector_is_defined():
  sent = gs.compress(gs.arc_top_k(0.5, row_size=3), jnp.zeros(9), (),
                     jax.random.key(0))
  assert np.all(np.isfinite(np.asarray(sent.values)))
  assert int(sent.count) == 3  # one of the 3 rows (the lowest index)
  np.testing.assert_array_equal(np.sort(np.asarray(sent.indices)), [0, 1, 2])


@pytest.mark.parametrize("kwargs, name", [
    (dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"),
    (dict(ratio=0.1, rank=0), "rank"), (dict(ratio=0.1, rank=True), "rank"),
    (dict(ratio=0.1, row_size=0), "row_size"),
    (dict(ratio=0.1, row_size=2.5), "row_size"),
])
def test_invalid_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    gs.arc_top_k(**kwargs)


def test_is_hashable_and_jit_static():
  a = gs.arc_top_k(0.2, rank=4, row_size=8)
  assert a == gs.arc_top_k(0.2, rank=4, row_size=8) and hash(a) == hash(
      gs.arc_top_k(0.2, rank=4, row_size=8))
  assert a.for_shape((3, 4)) != a

  traced = []

  @functools.partial(jax.jit, static_argnums=0)
  def mean_of(compressor, x):
    traced.append(compressor)
    sent = gs.compress(compressor, x, (), jax.random.key(0))
    return gs.aggregate(sent, None)

  x = heterogeneous_rows(np.random.default_rng(8), 1, 16, 8)[0]
  omega = np.asarray(jax.random.normal(jax.random.key(0), (8, 4), jnp.float32),
                     np.float64)
  first = mean_of(a, jnp.asarray(x))
  # An equal compressor built anew hits the compilation cache ...
  again = mean_of(gs.arc_top_k(0.2, rank=4, row_size=8), jnp.asarray(x))
  assert traced == [a]
  np.testing.assert_array_equal(first, again)
  _, expected = arc_reference(x[None].astype(np.float64), omega, 3, 8)
  np.testing.assert_allclose(first, expected, rtol=1e-6)
  # ... a different one is a new static argument: traced again.
  wider = gs.arc_top_k(0.5, rank=4, row_size=8)
  _, expected = arc_reference(x[None].astype(np.float64), omega, 8, 8)
  np.testing.assert_allclose(mean_of(wider, jnp.asarray(x)), expected,
                             rtol=1e-6)
  assert traced == [a, wider]
