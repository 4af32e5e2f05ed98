"""Tests for `gsparse_jax._src.selection`: exact top-k by magnitude.

Every method must return the index set of a stable NumPy argsort of -|x|
(largest magnitudes, ties to the lower index), including on the inputs that
send the sampled-threshold kernel down its fallback paths.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsparse_jax._src import selection
from gsparse_jax._src import selection_plan
from gsparse_jax._src import threshold_kernel

SIZE = 5000  # one size for the input-family tests: one compile per k


def reference_top_k(x, k):
  """Sorted indices of the k largest |x|, ties to the lower index."""
  magnitudes = np.abs(np.asarray(x).astype(np.float32))
  return np.sort(np.argsort(-magnitudes, kind="stable")[:k])


def assert_same_set(indices, x, k):
  indices = np.asarray(indices)
  assert indices.shape == (k,)
  assert indices.dtype == np.int32
  np.testing.assert_array_equal(np.sort(indices), reference_top_k(x, k))


def threshold_with_flag(x, plan):
  """(indices, used_fallback) of the threshold kernel for an explicit plan."""
  return threshold_kernel.threshold_kernel(plan)(jnp.asarray(x, jnp.float32))


def make_family(name, size, rng):
  """Inputs that stress the selection in different ways."""
  if name == "normal":
    return rng.standard_normal(size)
  if name == "student_t2":  # heavy tails
    return rng.standard_t(2, size)
  if name == "all_equal":
    return np.full(size, -0.75)
  if name == "all_zero":
    return np.zeros(size)
  if name == "sparse95":
    return rng.standard_normal(size) * (rng.random(size) < 0.05)
  if name == "few_levels":  # many ties at the k-th magnitude
    return rng.integers(-4, 5, size).astype(np.float64)
  if name == "hidden_huge":  # a few huge values among many equal ones
    x = np.ones(size)
    x[rng.choice(size, 7, replace=False)] = 1e6
    return x
  if name == "signed_zeros":
    return np.where(rng.random(size) < 0.5, -0.0, 0.0) * (
        rng.random(size) < 0.9) + (rng.random(size) < 0.1) * 2.0
  raise ValueError(name)


FAMILIES = ("normal", "student_t2", "all_equal", "all_zero", "sparse95",
            "few_levels", "hidden_huge", "signed_zeros")


@pytest.mark.parametrize("k", [1, 700, SIZE - 1, SIZE])
@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_matches_reference_on_input_families(family, k):
  x = make_family(family, SIZE, np.random.default_rng(0)).astype(np.float32)
  assert_same_set(selection.top_k_abs(x, k, method="threshold"), x, k)


@pytest.mark.parametrize("family", ["normal", "few_levels", "hidden_huge"])
def test_sort_and_auto_match_reference(family):
  x = make_family(family, SIZE, np.random.default_rng(1)).astype(np.float32)
  for method in ("sort", "auto"):
    assert_same_set(selection.top_k_abs(x, 700, method=method), x, 700)


@pytest.mark.parametrize("size,k", [(1, 1), (2, 1), (33, 5)])
def test_threshold_on_tiny_and_unaligned_sizes(size, k):
  x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
  assert_same_set(selection.top_k_abs(x, k, method="threshold"), x, k)


def test_fallback_when_the_sample_overestimates_the_threshold():
  # Huge values exactly on the sampled positions push the sampled threshold
  # above the true k-th magnitude: fewer than k candidates pass.
  size, k = 20000, 3000
  plan = selection.threshold_plan(size, k, sample_size=256)
  rng = np.random.default_rng(2)
  x = rng.standard_normal(size).astype(np.float32)
  x[threshold_kernel._sample_positions(plan)] = 1e4 + rng.random(plan.sample_size)
  hidden = np.unique(threshold_kernel._sample_positions(plan)).size
  assert plan.sample_rank <= hidden < k  # so too few candidates pass
  indices, used_fallback = threshold_with_flag(x, plan)
  assert bool(used_fallback)
  assert_same_set(indices, x, k)


def test_fallback_when_ties_overflow_the_buffer():
  size, k = 20000, 3000
  plan = selection.threshold_plan(size, k)
  x = np.ones(size, np.float32)
  x[[3, 1000, 19999]] = 5.0  # three larger values, then the first ties
  indices, used_fallback = threshold_with_flag(x, plan)
  assert bool(used_fallback)
  assert_same_set(indices, x, k)


def test_fallback_bisection_when_too_many_candidates_pass():
  # A plan whose sampled threshold admits ~3x its capacity: on continuous
  # data no ties settle it, so the counting bisection over x runs.
  plan = selection.ThresholdPlan(size=20000, k=2000, sample_size=64,
                                 sample_rank=20, capacity=2048)
  for seed in range(3):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(20000) * rng.standard_t(3, 20000)).astype(
        np.float32)
    indices, used_fallback = threshold_with_flag(x, plan)
    assert bool(used_fallback)
    assert_same_set(indices, x, 2000)


def _boundary_input(plan, num_candidates, seed):
  """Uniform [0, 1) noise and `num_candidates` entries of magnitude 10 placed
  on distinct sampled positions (random signs).

  Every draw of those positions samples 10, and there are at least
  `num_candidates` such draws; when that reaches `plan.sample_rank`, the
  sampled threshold is exactly 10, so exactly `num_candidates` entries pass
  it: the kernel sees that many candidates.
  """
  rng = np.random.default_rng(seed)
  x = rng.random(plan.size).astype(np.float32)
  sampled = np.unique(threshold_kernel._sample_positions(plan))
  big = rng.choice(sampled, num_candidates, replace=False)
  x[big] = np.where(rng.random(num_candidates) < 0.5, -10.0, 10.0)
  return x


# (k, capacity) = (3000, 4096) at d = 20,000; the fast path needs
# k <= candidates <= capacity.
BOUNDARY_SIZE, BOUNDARY_K = 20000, 3000
BOUNDARY_PLAN = selection.threshold_plan(BOUNDARY_SIZE, BOUNDARY_K)


@pytest.mark.parametrize("num_candidates, fallback", [
    (BOUNDARY_K - 1, True),  # one short: the k-th entry is not a candidate
    (BOUNDARY_K, False),
    (BOUNDARY_PLAN.capacity, False),  # a full buffer: ties cut by index
    (BOUNDARY_PLAN.capacity + 1, True),  # one too many for the buffer
])
def test_threshold_kernel_at_its_candidate_boundaries(num_candidates,
                                                      fallback):
  plan = BOUNDARY_PLAN
  assert plan.sample_rank <= BOUNDARY_K - 1 < plan.capacity + 1 <= plan.size
  x = _boundary_input(plan, num_candidates, seed=num_candidates)
  # The premise, in NumPy: the sampled magnitude of rank `sample_rank` is 10
  # and exactly `num_candidates` entries reach it.
  sample = np.sort(np.abs(x[threshold_kernel._sample_positions(plan)]))[::-1]
  assert sample[plan.sample_rank - 1] == 10.0
  assert np.count_nonzero(np.abs(x) >= 10.0) == num_candidates
  indices, used_fallback = threshold_with_flag(x, plan)
  assert bool(used_fallback) == fallback
  assert_same_set(indices, x, BOUNDARY_K)
  # The public entry point runs the same plan.
  assert_same_set(selection.top_k_abs(x, BOUNDARY_K, "threshold"), x,
                  BOUNDARY_K)


# Few distinct (size, k) pairs keep compilation out of the example budget;
# every float dtype shares the float32 kernel of its plan.
PLANS = [(100, 30), (1025, 600), (2000, 3), (4500, 4000)]


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    plan=st.sampled_from(PLANS),
    dtype=st.sampled_from([np.float32, ml_dtypes.bfloat16, np.float16]),
    family=st.sampled_from(FAMILIES),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_threshold_matches_numpy_reference(plan, dtype, family, scale, seed):
  size, k = plan
  x = make_family(family, size, np.random.default_rng(seed)) * scale
  if dtype is np.float16:
    x = np.clip(x, -6e4, 6e4)
  x = x.astype(dtype)
  assert_same_set(selection.top_k_abs(jnp.asarray(x), k, "threshold"), x, k)


def test_sort_on_half_precision_inputs():
  x = np.linspace(-1, 1, 301).astype(ml_dtypes.bfloat16)  # many ties
  assert_same_set(selection.top_k_abs(jnp.asarray(x), 40, "sort"), x, 40)


def test_works_under_vmap_and_grad():
  rows = make_family("few_levels", 3 * SIZE, np.random.default_rng(3))
  x = jnp.asarray(rows.reshape(3, SIZE), jnp.float32)
  x = x.at[1].set(0.0)  # a row that takes the fallback
  select = functools.partial(selection.top_k_abs, k=700, method="threshold")
  for row, indices in zip(np.asarray(x), np.asarray(jax.vmap(select)(x))):
    assert_same_set(indices, row, 700)

  def loss(v):
    return jnp.sum(v[select(v)] ** 2)

  grad = jax.grad(loss)(x[0])
  expected = np.zeros(SIZE, np.float32)
  chosen = reference_top_k(x[0], 700)
  expected[chosen] = 2 * np.asarray(x[0])[chosen]
  np.testing.assert_allclose(grad, expected)


def test_works_inside_shard_map():
  num_devices = jax.device_count()
  mesh = jax.make_mesh((num_devices,), ("data",))
  rng = np.random.default_rng(4)
  x = rng.standard_normal((num_devices, 2048)).astype(np.float32)
  x[0] = 1.0  # a worker on the fallback path

  def local(block):
    return selection.top_k_abs(block[0], 64, method="threshold")[None]

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("data"),
                               out_specs=P("data")))
  out = step(jax.device_put(x, NamedSharding(mesh, P("data"))))
  for row, indices in zip(x, np.asarray(out)):
    assert_same_set(indices, row, 64)


def test_threshold_kernel_stores_no_full_size_temporary():
  # XLA:CPU pays for every fresh temp buffer with page faults on each call;
  # the kernel must keep its temporaries far below the size of x.
  size, k = 1 << 20, 10000
  plan = selection.threshold_plan(size, k)
  compiled = jax.jit(lambda v: threshold_kernel._top_k_abs_threshold(v, plan)).lower(
      jax.ShapeDtypeStruct((size,), jnp.float32)).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  assert temp_bytes < size * 4 // 4


def test_kth_largest_abs():
  x = jnp.array([0.5, -3.0, 1.0, 3.0, -2.0])
  assert float(selection.kth_largest_abs(x, 3, "threshold")) == 2.0
  assert float(selection.kth_largest_abs(x, 3, "sort")) == 2.0


def test_resolve_method():
  assert selection.resolve_method("sort", 10**7, 10) == "sort"
  assert selection.resolve_method("threshold", 100, 10) == "threshold"
  assert selection.resolve_method("auto", 1000, 10) == "sort"
  assert selection.resolve_method("auto", 10**7, 10**5) == "threshold"
  assert selection.resolve_method("auto", 10**7, 1) == "threshold"
  # Only floats of at most 32 bits have a threshold kernel.
  assert selection.resolve_method("threshold", 10**7, 10, jnp.int32) == "sort"


def test_threshold_plan_bounds():
  plan = selection.threshold_plan(10**7, 10**5)
  assert plan.k <= plan.capacity <= 2 * plan.k
  assert plan.capacity % selection_plan._ALIGN == 0
  assert 1 <= plan.sample_rank <= plan.sample_size
  small = selection.threshold_plan(10, 3)
  assert small.capacity >= small.size


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(k=5, method="fast"), "method must be one of"),
     (dict(k=0), "1 <= k <= x.size = 8"),
     (dict(k=9), "1 <= k <= x.size = 8"),
     (dict(k=2.0), "k must be a Python int"),
     (dict(k=True), "k must be a Python int")])
def test_invalid_arguments_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    selection.top_k_abs(jnp.ones(8), **kwargs)


def test_non_flat_input_raises():
  with pytest.raises(ValueError, match="x must be a 1-D array"):
    selection.top_k_abs(jnp.ones((2, 4)), 2)


@hypothesis.settings(max_examples=30, deadline=None)
# Few distinct shapes (each compiles once); unaligned sizes included.
@hypothesis.given(size=st.sampled_from([1, 33, 1024, 3001]),
                  capacity=st.sampled_from([1, 64, 400]),
       quantile=st.floats(0.0, 1.0), strict=st.booleans(),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_count_and_compact_at_least_match_numpy(size, capacity, quantile,
                                                strict, seed, ties):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(2, size=size).astype(np.float32)
  if ties:
    x = np.round(x)  # many entries equal to the threshold
  threshold = np.float32(np.quantile(np.abs(x), quantile))
  passing = np.abs(x) > threshold if strict else np.abs(x) >= threshold
  expected = np.flatnonzero(passing)

  count = selection.count_at_least(jnp.asarray(x), threshold, strict=strict)
  indices, passed = selection.compact_at_least(jnp.asarray(x), threshold,
                                               capacity, strict=strict)
  assert int(count) == int(passed) == expected.size
  kept = min(capacity, expected.size)
  np.testing.assert_array_equal(np.asarray(indices)[:kept], expected[:kept])
  np.testing.assert_array_equal(np.asarray(indices)[kept:], size)


@pytest.mark.parametrize("threshold, strict, expected", [
    (-1.0, False, 4), (-1.0, True, 4), (0.0, False, 4), (0.0, True, 3),
    (float("inf"), False, 0), (2.0, True, 0), (2.0, False, 1)])
def test_count_at_least_edge_thresholds(threshold, strict, expected):
  x = jnp.array([0.0, -2.0, 1.0, 0.5])
  assert int(selection.count_at_least(x, threshold, strict=strict)) == expected
