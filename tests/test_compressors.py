"""Compressors: validation, exact Top-k with ties, Rand-k draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
import references


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.1",
                                 True, None])
def test_ratio_out_of_bounds_raises(bad):
  with pytest.raises(ValueError, match=r"`ratio` must be a number in \(0, 1\]"):
    gs.rand_k(bad)
  if bad is not None:
    with pytest.raises(ValueError, match="`ratio`"):
      gs.top_k(bad)


def test_top_k_argument_errors():
  with pytest.raises(ValueError, match="exactly one of `ratio`"):
    gs.top_k()
  with pytest.raises(ValueError, match="exactly one of `ratio`"):
    gs.top_k(0.1, k=3)
  for bad in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
      gs.top_k(k=bad)
  with pytest.raises(ValueError, match="`method` must be one of"):
    gs.top_k(0.1, method="heap")
  with pytest.raises(ValueError, match="`seed` must be an integer"):
    gs.rand_k(0.1, seed=1.5)


def test_compressors_are_hashable_and_compare_by_value():
  assert gs.top_k(0.1) == gs.top_k(0.1)
  assert hash(gs.rand_k(0.1, seed=2)) == hash(gs.rand_k(0.1, seed=2))
  assert gs.top_k(0.1) != gs.top_k(0.2)
  assert len({gs.dense(), gs.dense()}) == 1


@pytest.mark.parametrize("size, ratio, expected", [
    (1000, 0.01, 10), (10, 0.01, 1), (7, 1.0, 7), (100, 0.125, 12),
    (100, 0.135, 14)])
def test_budget_rounds_and_keeps_at_least_one(size, ratio, expected):
  assert gs.top_k(ratio).budget(size) == expected
  assert gs.rand_k(ratio).budget(size) == expected


@pytest.mark.parametrize("method", ["sort", "auto", "threshold"])
def test_top_k_ties_go_to_lower_index(method):
  x = jnp.array([1.0, -3.0, 3.0, 2.0, 3.0, -3.0, 0.0])
  payload = gs.compress(gs.top_k(k=3, method=method), x, (),
                        jax.random.key(0))
  np.testing.assert_array_equal(np.sort(payload.indices), [1, 2, 4])
  chosen = dict(zip(payload.indices.tolist(), payload.values.tolist()))
  assert chosen == {1: -3.0, 2: 3.0, 4: 3.0}


@pytest.mark.parametrize("seed", range(3))
def test_top_k_matches_numpy_on_random_data(seed):
  x = np.random.default_rng(seed).standard_t(2, size=500).astype(np.float32)
  x[::7] = x[3]  # plenty of ties
  payload = gs.compress(gs.top_k(0.05), jnp.asarray(x), (), jax.random.key(0))
  np.testing.assert_array_equal(np.sort(payload.indices),
                                np.sort(references.top_k_indices(x, 25)))
  np.testing.assert_array_equal(payload.values, x[payload.indices])


def test_rand_k_draws_distinct_indices_uniformly():
  c = gs.rand_k(0.1, seed=0)
  x = jnp.arange(50.0)
  counts = np.zeros(50)
  for step in range(400):
    p = gs.compress(c, x, (), jax.random.key(step))
    idx = np.asarray(p.indices)
    assert len(set(idx.tolist())) == 5
    np.testing.assert_array_equal(p.values, idx.astype(np.float32))
    counts[idx] += 1
  # 2000 draws over 50 slots: each expects 40; a chi-square bound at ~p=1e-4.
  chi2 = ((counts - 40.0) ** 2 / 40.0).sum()
  assert chi2 < 100.0, chi2


def test_rand_k_shared_vs_independent_and_scale():
  x = jnp.ones((4, 40))

  def indices(compressor):
    f = lambda x: gs.compress(compressor, x, (), jax.random.key(1), "w")
    return jax.vmap(f, axis_name="w")(x)

  shared = indices(gs.rand_k(0.1, shared=True))
  assert shared.layout == "aligned"
  assert all((shared.indices[i] == shared.indices[0]).all() for i in range(4))
  independent = indices(gs.rand_k(0.1, shared=False))
  assert independent.layout == "sparse"
  assert not all((independent.indices[i] == independent.indices[0]).all()
                 for i in range(1, 4))
  scaled = gs.compress(gs.rand_k(0.1, scale=True), x[0], (), jax.random.key(1))
  np.testing.assert_allclose(scaled.values, 10.0)  # d/k = 40/4


def test_dense_payload_is_whole_vector():
  x = jnp.array([1.0, -2.0, 0.0])
  p = gs.compress(gs.dense(), x, (), jax.random.key(0))
  assert p.layout == "dense" and p.indices is None
  np.testing.assert_array_equal(p.values, x)
  assert gs.dense().wire(3, jnp.float32) == (("all_reduce", 12),)


def test_compress_rejects_non_flat_input():
  with pytest.raises(ValueError, match="1-D"):
    gs.compress(gs.top_k(k=1), jnp.ones((2, 2)), (), jax.random.key(0))


@pytest.mark.parametrize("name", gs.compressor_names())
def test_needs_sample_says_which_compressors_calibrate_on_a_sample(name):
  entry = gs.COMPRESSORS[name]
  sample = {"w": jnp.linspace(-1.0, 1.0, 64)}
  assert isinstance(gs.compressor_from_ratio(name, 0.1, sample),
                    gs.Compressor)
  if entry.needs_sample:
    with pytest.raises(ValueError, match="calibrates on a sample"):
      gs.compressor_from_ratio(name, 0.1)
  else:
    assert isinstance(gs.compressor_from_ratio(name, 0.1), gs.Compressor)


def test_errors_follow_the_rule_of_docs_errors_md():
  """TypeError: not the kind of object taken; ValueError: a value not
  allowed, whatever the Python type of a configuration argument."""
  x, key = jnp.linspace(-1.0, 1.0, 16), jax.random.key(0)
  payload = gs.compress(gs.top_k(0.25), x, (), key)
  for wrong_kind in (lambda: gs.compress("top_k", x, (), key),
                     lambda: gs.compress(gs.top_k(0.25), x, (), 0),
                     lambda: gs.compress(gs.top_k(0.25), x, (), key,
                                         axis_name=3),
                     lambda: gs.aggregate(x, axis_name=None),
                     lambda: gs.aggregate(payload, axis_name=3)):
    with pytest.raises(TypeError):
      wrong_kind()
  for wrong_value in (lambda: gs.top_k(1.5), lambda: gs.top_k("0.1"),
                      lambda: gs.top_k(k=2.5), lambda: gs.qsgd(bits=0),
                      lambda: gs.rand_k(0.1, shared="yes"),
                      lambda: gs.compress(gs.top_k(0.25), x[None], (), key),
                      lambda: gs.multi_steps(gs.sparsify(gs.top_k(0.25)),
                                             every_k_steps=0),
                      lambda: gs.cost_model.network_from_gbit("10"),
                      lambda: gs.compressor_from_ratio("nope", 0.1)):
    with pytest.raises(ValueError):
      wrong_value()


# --------------------------------------------------------------------------
# Chunked Top-k: a budget per chunk of fixed size (SparseLoCo's selection).
# --------------------------------------------------------------------------


def _chunked_select(chunk, ratio):
  """NumPy: each chunk's max(1, round(ratio * len)) largest, dense."""
  def select(a, step, worker):
    out = np.zeros_like(a)
    for start in range(0, a.size, chunk):
      part = a[start:start + chunk]
      keep = references.top_k_indices(part, max(1, round(ratio * part.size)))
      out[start + keep] = part[keep]
    return out
  return select


@pytest.mark.parametrize("d, chunk", [(250, 64), (256, 64), (30, 64)])
def test_chunked_top_k_with_ef_matches_numpy(d, chunk):
  compressor = gs.top_k(0.05, chunk=chunk)
  whole, rest = divmod(d, chunk)
  assert compressor.budget(d) == whole * round(0.05 * chunk) + (
      max(1, round(0.05 * rest)) if rest else 0)
  rng = np.random.default_rng(d)
  grads = rng.normal(size=(4, 3, d)).astype(np.float32)  # steps, workers, d
  tx = gs.sparsify(compressor, axis_name="w")
  state = jax.vmap(lambda _: tx.init(jnp.zeros(d)))(jnp.arange(3))
  step = jax.jit(jax.vmap(tx.update, axis_name="w"))
  outputs = []
  for g in grads:
    out, state = step(jnp.asarray(g), state)
    outputs.append(np.asarray(out[0]))
  run = references.feedback_run(grads, references.per_worker(
      _chunked_select(chunk, 0.05)), dtype=np.float32)
  np.testing.assert_allclose(np.stack(outputs), run.outputs, rtol=1e-6,
                             atol=1e-7)
  assert gs.comm_stats(state)["sent_values"] == 4 * compressor.budget(d)


@pytest.mark.parametrize("chunk", [0, -3, 2.5, "64"])
def test_chunk_must_be_a_positive_int(chunk):
  with pytest.raises(ValueError, match="`chunk`"):
    gs.top_k(0.01, chunk=chunk)
