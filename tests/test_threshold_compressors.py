"""hard_threshold, gaussian_k, calibrate_threshold and approx_top_k."""

import functools
import statistics

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
import references
import runners

WORKERS = 8


@functools.lru_cache(maxsize=None)
def _jitted_compress(compressor):
  return jax.jit(lambda x: gs.compress(compressor, x,
                                       compressor.init(x.shape[0]),
                                       jax.random.key(0)))


def _compress(compressor, x):
  """One worker's payload (jitted once per compressor and shape: fast)."""
  return _jitted_compress(compressor)(jnp.asarray(x, jnp.float32))


def _sent_dense(payload):
  dense = np.zeros(payload.size)
  idx = np.asarray(payload.indices)
  real = idx < payload.size
  dense[idx[real]] = np.asarray(payload.values)[real]
  return dense


# --------------------------------------------------------------- hard threshold


def test_hard_threshold_sends_everything_at_or_above_lambda_when_it_fits():
  x = np.array([0.5, -2.0, 1.0, 0.1, -1.0, 0.99, 3.0, 0.0])
  c = gs.hard_threshold(1.0, capacity_ratio=0.75)  # 6 slots
  p = _compress(c, x)
  assert p.capacity == 6
  passing = np.abs(x) >= 1.0  # the boundary |x| == lambda passes
  np.testing.assert_array_equal(_sent_dense(p), np.where(passing, x, 0.0))
  assert int(p.count) == passing.sum() == 4
  assert int(p.overflow) == 0
  # Padding slots point past the end and carry 0.
  pad = np.asarray(p.indices) == x.size
  assert pad.sum() == 2 and not np.asarray(p.values)[pad].any()


def test_hard_threshold_overflow_keeps_the_largest_and_counts_the_rest():
  x = np.array([5.0, -1.5, 4.0, 2.0, -3.0, 0.5, 0.2, 1.1, 0.0, 0.3])
  c = gs.hard_threshold(1.0, capacity_ratio=0.3)  # 3 slots, 6 pass
  p = _compress(c, x)
  assert sorted(np.asarray(p.indices).tolist()) == [0, 2, 4]
  assert int(p.count) == 3 and int(p.overflow) == 3


def test_hard_threshold_error_feedback_keeps_overflow_in_memory():
  """sent + new memory == old memory + grad; overflow entries stay whole."""
  d, threshold = 40, 1.0
  tx = gs.sparsify(gs.hard_threshold(threshold, capacity_ratio=0.1))  # 4
  state = tx.init(jnp.zeros(d))
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  total_overflow = 0
  for _ in range(5):
    grad = rng.normal(size=d).astype(np.float32)
    old_memory = np.asarray(state.memory[0][0])
    accumulated = old_memory + grad
    sent, state = update(jnp.asarray(grad), state)
    sent, new_memory = np.asarray(sent), np.asarray(state.memory[0][0])
    np.testing.assert_allclose(sent + new_memory, accumulated, atol=1e-6)
    passing = np.abs(accumulated) >= threshold
    # What was sent all passed; whatever passed but was not sent is intact.
    assert (np.abs(sent[sent != 0]) >= threshold).all()
    left = passing & (sent == 0)
    np.testing.assert_array_equal(new_memory[left], accumulated[left])
    assert np.count_nonzero(sent) == min(passing.sum(), 4)
    total_overflow += max(passing.sum() - 4, 0)
  assert total_overflow > 0
  assert gs.comm_stats(state)["overflow_values"] == total_overflow


def test_hard_threshold_shapes_fixed_no_retrace():
  """Counts from 0 to over capacity: one trace, same payload shapes."""
  c = gs.hard_threshold(1.0, capacity_ratio=0.25)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def select(x):
    p = gs.compress(c, x, c.init(16), jax.random.key(0))
    return p.indices, p.values, p.count, p.overflow

  chex.clear_trace_counter()
  counts = []
  for scale in (0.0, 0.5, 1.0, 3.0, 10.0):
    x = jnp.asarray(np.random.default_rng(1).normal(size=16) * scale,
                    jnp.float32)
    indices, values, count, overflow = select(x)
    assert indices.shape == values.shape == (4,)
    counts.append((int(count), int(overflow)))
  assert counts[0] == (0, 0) and counts[-1][1] > 0


def test_hard_threshold_comm_stats_hand_checked():
  """Two steps, d = 10, 3 slots, lambda = 1 (figures worked out by hand).

  Step 1: 5 entries pass (5, 4, 3, 2, 1.5): 5, 4, 3 sent, 2 overflow (kept
  in memory). Step 2, zero gradient: the memory's 2 and 1.5 pass and fit.
  Totals per worker: 5 values sent, 2 overflow, 20 dense values, density
  0.25; bytes: 2 steps x 3 slots x (4 value + 4 index) = 48 of 80 dense.
  """
  tx = gs.sparsify(gs.hard_threshold(1.0, capacity_ratio=0.3))
  grad = jnp.array([5.0, 0.5, 4.0, 3.0, 0, 2.0, 0, 1.5, 0.2, 0])
  update = jax.jit(tx.update)
  out1, state = update(grad, tx.init(grad))
  out2, state = update(jnp.zeros(10), state)
  np.testing.assert_array_equal(out1, [5, 0, 4, 3, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out2, [0, 0, 0, 0, 0, 2, 0, 1.5, 0, 0])
  np.testing.assert_allclose(state.memory[0][0],
                             [0, 0.5, 0, 0, 0, 0, 0, 0, 0.2, 0], rtol=1e-7)
  stats = gs.comm_stats(state)
  assert stats["sent_values"] == 5 and stats["overflow_values"] == 2
  assert stats["dense_values"] == 20 and stats["density"] == 0.25
  assert stats["sent_bytes"] == 48 and stats["dense_bytes"] == 80


def _threshold_select(threshold, capacity):
  """NumPy hard-threshold selection with a capacity, dense."""
  def select(a, step, worker):
    del step, worker
    passing = np.nonzero(np.abs(a) >= threshold)[0]
    if passing.size > capacity:
      passing = np.argsort(-np.abs(a), kind="stable")[:capacity]
    return references.sparse.keep(a, passing)
  return select


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
def test_hard_threshold_workers_match_reference(context, mesh):
  d, threshold = 24, 1.2
  c = gs.hard_threshold(threshold, capacity_ratio=0.25)  # 6 slots
  tx = gs.sparsify(c, axis_name=runners.AXIS)
  grads = np.random.default_rng(2).normal(size=(4, WORKERS, d)).astype(
      np.float32)
  outputs, state = runners.run_steps(tx, jnp.zeros(d), jnp.asarray(grads),
                                     context, mesh)
  expected, memory, _, _ = references.feedback_run(
      grads.astype(np.float64),
      references.per_worker(_threshold_select(threshold, 6)))
  for worker in range(WORKERS):
    np.testing.assert_allclose(outputs[:, worker], expected, rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(runners.worker_rows(state.memory[0], WORKERS),
                             memory, rtol=1e-5, atol=1e-6)


def test_calibrate_threshold_hits_the_target_density():
  rng = np.random.default_rng(3)
  grads = {"w": rng.normal(size=(30, 20)), "b": rng.standard_t(2, size=200),
           "step": np.arange(5)}  # ints are ignored
  threshold = gs.calibrate_threshold(grads, 0.05)
  flat = np.concatenate([grads["w"].ravel(), grads["b"]])
  assert (np.abs(flat) >= threshold).sum() == round(0.05 * 800)
  assert isinstance(threshold, float)
  # Usable as it is (hashable compressor).
  c = gs.hard_threshold(threshold, capacity_ratio=0.1)
  assert hash(c) == hash(gs.hard_threshold(threshold, capacity_ratio=0.1))


@pytest.mark.parametrize("call,name", [
    (lambda: gs.hard_threshold(-0.1, capacity_ratio=0.1), "threshold"),
    (lambda: gs.hard_threshold(float("nan"), capacity_ratio=0.1),
     "threshold"),
    (lambda: gs.hard_threshold(1.0, capacity_ratio=0.0), "capacity_ratio"),
    (lambda: gs.hard_threshold(1.0, capacity_ratio=1.5), "capacity_ratio"),
    (lambda: gs.gaussian_k(0.0), "ratio"),
    (lambda: gs.gaussian_k(0.1, capacity_ratio=0.05), "capacity_ratio"),
    (lambda: gs.gaussian_k(0.1, capacity_ratio=2.0), "capacity_ratio"),
    (lambda: gs.approx_top_k(1.1), "ratio"),
    (lambda: gs.approx_top_k(0.1, recall_target=0.0), "recall_target"),
    (lambda: gs.calibrate_threshold(np.ones(4), 0.0), "target_density"),
])
def test_validation_names_the_argument(call, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    call()


# ------------------------------------------------------------------- gaussian-k


def gaussian_k_reference(u, ratio):
  """The selection of the authors' `GaussianCompressor.compress`, in NumPy.

  A port of hclhkbu/GaussianK-SGD `compression.py`: the signed mean and the
  d-1 standard deviation of ``u``, the two-sided quantile of ``ratio``
  itself, ``k = max(int(ratio * d), 1)``, and `while loops < 3` counting
  ``|u| > tau``; the indices counted last are sent (all of them).
  """
  u = np.asarray(u, np.float32)
  k = max(int(u.size * ratio), 1)
  u64 = u.astype(np.float64)
  tau = u64.mean() + statistics.NormalDist().inv_cdf(1 - ratio / 2) * u64.std(
      ddof=1)
  magnitude = np.abs(u)
  loops = 0
  while loops < 3:
    indices = np.nonzero(magnitude > np.float32(tau))[0]
    if indices.size < 2 * k / 3:
      tau *= 0.5
    elif indices.size > 4 * k / 3:
      tau *= 1.5
    else:
      break
    loops += 1
  return indices


def _gaussian_k_inputs(size, seed):
  rng = np.random.default_rng(seed)
  return {"normal": rng.normal(size=size),
          "student_t2": rng.standard_t(2, size=size),
          "zero90": rng.normal(size=size) * (rng.random(size) < 0.1)}


def _check_against_reference(c, x):
  """Sends the reference's set if it fits, else its largest ``capacity``.

  Returns whether the reference's set fitted.
  """
  p = _compress(c, x)
  expected = gaussian_k_reference(x, c.ratio)
  sent = np.asarray(p.indices)[:int(p.count)]
  capacity = c.capacity(x.size)
  assert int(p.count) + int(p.overflow) == expected.size
  if expected.size <= capacity:
    np.testing.assert_array_equal(np.sort(sent), expected)
    np.testing.assert_array_equal(_sent_dense(p)[expected], x[expected])
    return True
  # Overflow: the largest magnitudes of the reference's set are sent.
  assert int(p.count) == capacity
  assert set(sent.tolist()) <= set(expected.tolist())
  left = np.setdiff1d(expected, sent)
  assert np.abs(x[sent]).min() >= np.abs(x[left]).max()
  return False


@pytest.mark.parametrize("size,ratios,seeds", [
    # small d: the d-1 divisor and the quantile of `ratio` (not k/d) matter
    (100, (0.015, 0.05, 0.1), range(40)),
    (10_000, (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1), range(3)),
    (1_000_000, (0.001, 0.01), range(1)),
])
def test_gaussian_k_sends_the_reference_set(size, ratios, seeds):
  fitted = []
  for ratio in ratios:
    c = gs.gaussian_k(ratio)
    for seed in seeds:
      for x in _gaussian_k_inputs(size, seed).values():
        fitted.append(_check_against_reference(c, x.astype(np.float32)))
  # The default capacity holds the rule's set in most cases here.
  assert np.mean(fitted) > 0.8


def test_gaussian_k_uncapped_sends_the_reference_set_always():
  """``capacity_ratio=1`` reproduces the reference, even where it overshoots.

  On normal data with k = 10 (d = 1e4, ratio 0.001) one halving can let
  ~100 entries through, far over the default capacity.
  """
  overflows = 0
  c = gs.gaussian_k(0.001, capacity_ratio=1.0)
  for seed in range(12):
    for x in _gaussian_k_inputs(10_000, seed).values():
      x = x.astype(np.float32)
      assert _check_against_reference(c, x)
      overflows += (gaussian_k_reference(x, 0.001).size
                    > gs.gaussian_k(0.001).capacity(x.size))
  assert overflows > 0  # cases the default capacity would cut


def test_gaussian_k_count_in_band_on_gaussian_data():
  for ratio in (0.01, 0.05, 0.2):
    c = gs.gaussian_k(ratio)
    k = int(ratio * 4096)
    for seed in range(3):
      x = np.random.default_rng(seed).normal(loc=0.3, scale=2.0, size=4096)
      p = _compress(c, x)
      assert 2 * k / 3 <= int(p.count) <= 4 * k / 3
      assert int(p.overflow) == 0
      assert p.capacity == 2 * k


def test_gaussian_k_overflow_counted_by_sparsify():
  """A refinement that runs out overflows; the stats report it.

  d = 1000, ratio 0.01: k = 10, band [6.7, 13.3], 20 slots. Four 8s and
  sixty 3s, the rest 0: mean 0.212, std 0.867, tau = 2.45 (64 pass), x1.5
  = 3.67 (4 pass), x0.5 = 1.83 (64 pass): the loop ends and those 64 are
  the set. The 8s and the first sixteen 3s fit; 44 stay in memory.
  """
  x = np.zeros(1000, np.float32)
  x[:4], x[4:64] = 8.0, 3.0
  assert gaussian_k_reference(x, 0.01).tolist() == list(range(64))
  tx = gs.sparsify(gs.gaussian_k(0.01))
  out, state = jax.jit(tx.update)(jnp.asarray(x), tx.init(jnp.zeros(1000)))
  stats = gs.comm_stats(state)
  assert stats["sent_values"] == 20
  assert stats["overflow_values"] == 44
  assert stats["density"] == 20 / 1000
  np.testing.assert_array_equal(np.nonzero(np.asarray(out))[0], np.arange(20))
  assert float(state.memory[0].sum()) == 44 * 3.0


def test_gaussian_k_capacity_ratio():
  c = gs.gaussian_k(0.03, capacity_ratio=0.1)
  assert c.budget(100) == 3 and c.capacity(100) == 10
  assert gs.gaussian_k(0.03).capacity(100) == 6  # 2k
  assert gs.gaussian_k(0.029).budget(100) == 2  # int(2.9), as the reference
  assert gs.gaussian_k(1.0).capacity(7) == 7  # never more than d


def test_gaussian_k_workers_vmap_identical_aggregate():
  grads = jnp.asarray(np.random.default_rng(5).normal(size=(2, WORKERS, 300)),
                      jnp.float32)
  tx = gs.sparsify(gs.gaussian_k(0.05), axis_name=runners.AXIS)
  outputs, state = runners.run_steps(tx, jnp.zeros(300), grads, "vmap")
  np.testing.assert_array_equal(outputs, np.broadcast_to(
      outputs[:, :1], outputs.shape))
  density = gs.comm_stats(state)["density"]
  assert 2 / 3 * 0.05 <= density <= 4 / 3 * 0.05


# ----------------------------------------------------------------- approx top-k


def test_approx_top_k_recall():
  rng = np.random.default_rng(6)
  x = rng.normal(size=5000).astype(np.float32)
  c = gs.approx_top_k(0.02, recall_target=0.9)
  k = c.budget(5000)
  p = _compress(c, x)
  idx = np.asarray(p.indices)
  assert idx.shape == (k,) and len(set(idx.tolist())) == k
  assert int(p.count) == k
  np.testing.assert_array_equal(np.asarray(p.values), x[idx])
  exact = set(np.argsort(-np.abs(x), kind="stable")[:k].tolist())
  recall = len(exact & set(idx.tolist())) / k
  assert recall >= 0.9  # exact on CPU/GPU; >= target on average on TPU


def test_approx_top_k_in_sparsify_with_workers():
  # approx_max_k is exact off TPU, so with error feedback the run equals the
  # NumPy Top-k + EF reference: outputs on every worker and final memories.
  grads = np.random.default_rng(7).normal(size=(3, WORKERS, 64)).astype(
      np.float32)
  tx = gs.sparsify(gs.approx_top_k(0.125), axis_name=runners.AXIS)
  outputs, state = runners.run_steps(tx, jnp.zeros(64), jnp.asarray(grads),
                                     "vmap")
  expected, memory, _, _ = references.feedback_run(
      grads.astype(np.float64),
      references.per_worker(references.top_k_select(8)))
  for worker in range(WORKERS):
    np.testing.assert_allclose(outputs[:, worker], expected, rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(runners.worker_rows(state.memory[0], WORKERS),
                             memory, rtol=1e-5, atol=1e-6)
  assert gs.comm_stats(state)["sent_values"] == 3 * 8
