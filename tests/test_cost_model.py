"""Tests for `gs.cost_model` (the alpha-beta model and the projections)
against hand-computed numbers."""

import dataclasses
import doctest
import math

import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
from gsparse_jax._src import alpha_beta
from gsparse_jax._src import cost_model as cm
from gsparse_jax._src import projection
from gsparse_jax._src import wire

# alpha = 10 us, beta = 1 GB/s: easy arithmetic.
NET = cm.Network(latency_s=1e-5, bandwidth_bytes_per_s=1e9)


def test_network_from_gbit():
  net = cm.network_from_gbit(100.0, latency_s=2e-6)
  assert net.bandwidth_bytes_per_s == pytest.approx(12.5e9)
  assert net.latency_s == 2e-6


def test_ring_all_reduce():
  # 2 * 3/4 * 1e6 / 1e9 + 2 * 3 * 1e-5 = 1.5e-3 + 6e-5
  assert cm.ring_all_reduce_seconds(1e6, 4, NET) == pytest.approx(1.56e-3)
  # One worker communicates nothing.
  assert cm.ring_all_reduce_seconds(1e6, 1, NET) == 0.0


def test_all_gather():
  # 3 * 1e5 / 1e9 + 3 * 1e-5 = 3e-4 + 3e-5
  assert cm.all_gather_seconds(1e5, 4, NET) == pytest.approx(3.3e-4)
  assert cm.all_gather_seconds(1e5, 1, NET) == 0.0


def _project(compressor, d=1e6, n=4, **kwargs):
  return cm.project_compressor(compressor, d, n, NET, **kwargs)


def test_dense():
  cost = _project(gs.dense())
  # 2 * 3/4 * 4e6 / 1e9 + 6e-5
  assert cost.layout == "dense"
  assert cost.communication_s == pytest.approx(6.06e-3)
  assert cost.selection_s == 0.0
  assert cost.bytes_per_worker == 4e6
  assert cost.speedup_over_dense == pytest.approx(1.0)


def test_sparse_all_gather():
  cost = _project(gs.top_k(0.01), selection_s_per_element=2e-9)
  # k = 1e4 pairs of 4 + 4 bytes: 3 * 8e4 / 1e9 + 3e-5 = 2.7e-4
  assert cost.layout == "sparse"
  assert cost.bytes_per_worker == 8e4
  assert cost.communication_s == pytest.approx(2.7e-4)
  assert cost.selection_s == pytest.approx(2e-3)
  assert cost.total_s == pytest.approx(2.27e-3)
  assert cost.speedup_over_dense == pytest.approx(6.06e-3 / 2.27e-3)


def test_aligned_all_reduce_half_precision():
  cost = _project(gs.rand_k(0.01), bytes_per_value=2)
  # all-reduce of 1e4 * 2 bytes: 2 * 3/4 * 2e4 / 1e9 + 6e-5 = 9e-5
  assert cost.layout == "aligned"
  assert cost.communication_s == pytest.approx(9e-5)
  # dense half precision: 2 * 3/4 * 2e6 / 1e9 + 6e-5 = 3.06e-3
  assert cost.dense_s == pytest.approx(3.06e-3)
  assert cost.speedup_over_dense == pytest.approx(3.06e-3 / 9e-5)


def test_arc_top_k_sketch_and_rows():
  cost = _project(gs.arc_top_k(0.01))  # rank 4, rows of ~sqrt(d) = 1000
  # sketch: 1000 rows * 4 * 4 bytes = 16e3 -> 2 * .75 * 16e3 / 1e9 + 6e-5
  # rows:   10 rows of 1000 * 4 bytes = 4e4 -> 2 * .75 * 4e4 / 1e9 + 6e-5
  sketch_s = 1.5 * 16e3 / 1e9 + 6e-5
  rows_s = 1.5 * 4e4 / 1e9 + 6e-5
  assert cost.bytes_per_worker == 16e3 + 4e4
  assert cost.communication_s == pytest.approx(sketch_s + rows_s)


def test_sparse_payload_grows_with_workers_but_aligned_does_not():
  net = cm.Network(latency_s=0.0, bandwidth_bytes_per_s=1.25e9)
  sparse = [cm.project_compressor(gs.top_k(0.01), 1e8, n, net)
            for n in (8, 4096)]
  aligned = [cm.project_compressor(gs.rand_k(0.01), 1e8, n, net)
             for n in (8, 4096)]
  assert sparse[1].communication_s > 100 * sparse[0].communication_s
  assert aligned[1].communication_s < 1.2 * aligned[0].communication_s
  # At 4096 workers the sparse all-gather is slower than dense.
  assert sparse[1].speedup_over_dense < 1.0


def test_best_layout():
  slow = cm.network_from_gbit(1.0)
  compressors = {"dense": gs.dense(), "top_k": gs.top_k(0.001),
                 "rand_k": gs.rand_k(0.001), "arc_top_k": gs.arc_top_k(0.001)}
  selection = {name: 0.0 if name == "dense" else 1e-9 for name in compressors}
  name, best = cm.best_layout(compressors, 1e9, 16, slow,
                              selection_s_per_element=selection)
  costs = cm.project_compressors(compressors, 1e9, 16, slow,
                                 selection_s_per_element=selection)
  assert name == "rand_k"  # the fewest bytes in one all-reduce
  assert best == costs["rand_k"] == min(costs.values(),
                                        key=lambda c: c.total_s)
  # With one worker nothing is sent, so selection only adds time.
  assert cm.best_layout(compressors, 1e9, 1, slow,
                        selection_s_per_element=selection)[0] == "dense"
  # Ties go to the first listed.
  assert cm.best_layout({"a": gs.dense(), "b": gs.dense()}, 1e6, 4,
                        slow)[0] == "a"


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(num_workers=0), "`num_workers` must be an integer >= 1"),
     (dict(num_workers=2.5), "`num_workers` must be an integer >= 1"),
     (dict(num_params=0), "`num_params` must be a finite number >= 1"),
     (dict(bytes_per_value=8), "`bytes_per_value` must be one of 4, 2"),
     (dict(selection_s_per_element=-1.0), "`selection_s_per_element`")])
def test_invalid_arguments_raise(kwargs, message):
  args = dict(compressor=gs.top_k(0.01), num_params=1e6, num_workers=4,
              network=NET)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    cm.project_compressor(**args)


def test_network_validation():
  with pytest.raises(ValueError, match="`gbit_per_s` must be a number > 0"):
    cm.network_from_gbit(0.0)
  with pytest.raises(ValueError,
                     match="`latency_s` must be a finite number >= 0"):
    cm.network_from_gbit(1.0, latency_s=-1.0)


# Topology, overhead and calibration.

SHARED = cm.Network(1e-5, 1e9, 0.0, "shared")


def test_shared_link_carries_every_workers_bytes():
  # All-reduce of 1e6 B over 4 workers: each sends 2 * 3/4 * 1e6 = 1.5e6 B;
  # on one shared link 4 * 1.5e6 = 6e6 B -> 6e-3 s, plus 6 steps of 1e-5.
  assert cm.ring_all_reduce_seconds(1e6, 4, SHARED) == pytest.approx(6.06e-3)
  # All-gather of 1e5 B each: each sends 3e5 B, the link 1.2e6 B.
  assert cm.all_gather_seconds(1e5, 4, SHARED) == pytest.approx(1.23e-3)
  # A link per worker: the classic ring figures (test_ring_all_reduce).
  per_worker = SHARED._replace(topology="per_worker")
  assert cm.ring_all_reduce_seconds(1e6, 4, per_worker) == pytest.approx(
      1.56e-3)


def test_per_byte_overhead_is_charged_on_bytes_sent():
  net = cm.Network(0.0, math.inf, 2e-9, "shared")
  # 1.5e6 B sent per worker * 2 ns, whatever the topology or bandwidth.
  assert cm.ring_all_reduce_seconds(1e6, 4, net) == pytest.approx(3e-3)
  assert cm.all_gather_seconds(1e5, 4, net) == pytest.approx(6e-4)


def _exact_samples(true, workers=(2, 4), sizes=(4.0, 1e5, 1e6, 1e7)):
  return [cm.Sample(b, n, cm.collective_seconds(c, b, n, true), c)
          for c in cm.COLLECTIVES for n in workers for b in sizes]


def test_calibrate_recovers_known_constants_on_a_shared_link():
  true = cm.Network(3e-4, 1.25e8, 4e-9, "shared")
  fitted = cm.calibrate(_exact_samples(true), "shared")
  assert fitted.topology == "shared"
  assert fitted.latency_s == pytest.approx(3e-4, rel=1e-6)
  assert fitted.bandwidth_bytes_per_s == pytest.approx(1.25e8, rel=1e-6)
  assert fitted.overhead_s_per_byte == pytest.approx(4e-9, rel=1e-6)


def test_calibrate_with_a_known_bandwidth_fits_latency_and_overhead():
  true = cm.Network(5e-5, 1e9, 1e-9, "per_worker")
  fitted = cm.calibrate(_exact_samples(true), bandwidth_bytes_per_s=1e9)
  assert fitted.bandwidth_bytes_per_s == 1e9
  assert fitted.latency_s == pytest.approx(5e-5, rel=1e-6)
  assert fitted.overhead_s_per_byte == pytest.approx(1e-9, rel=1e-6)


def test_calibrate_keeps_constants_non_negative_and_fits_relative_error():
  # Times proportional to the bytes but the small one a little faster than
  # that: unconstrained least squares would give a negative latency. With
  # alpha = gamma = 0 the relative residuals are c * r_i - 1 with
  # r_i = link_bytes_i / t_i, minimized by c = sum(r) / sum(r^2).
  # (With 2 workers only, bandwidth and overhead cannot be told apart: the
  # fit puts the cost on the bandwidth.)
  times = [0.9e-3, 1e-2, 1e-1]
  samples = [(b, 2, t) for b, t in zip((1e6, 1e7, 1e8), times)]
  link = [2e6, 2e7, 2e8]  # shared: 2 workers * (2 * 1/2 * B) each
  r = np.array(link) / np.array(times)
  inverse_beta = r.sum() / (r ** 2).sum()
  fitted = cm.calibrate(samples, "shared")
  assert fitted.latency_s == 0.0
  assert fitted.overhead_s_per_byte == 0.0
  assert fitted.bandwidth_bytes_per_s == pytest.approx(1 / inverse_beta)


def test_calibrate_with_no_bandwidth_term_gives_an_infinite_bandwidth():
  true = cm.Network(1e-4, math.inf, 2e-9, "shared")
  fitted = cm.calibrate(_exact_samples(true), "shared")
  assert math.isinf(fitted.bandwidth_bytes_per_s)
  assert fitted.overhead_s_per_byte == pytest.approx(2e-9, rel=1e-6)


@pytest.mark.parametrize("samples,kwargs,message", [
    ([(1e6, 2, 1e-3)], {}, "`the number of samples` must be an integer >= 3"),
    ([(1e6, 1, 1e-3)] * 3, {}, "`num_workers of sample .*` must be an "
                               "integer >= 2"),
    ([(1e6, 2, 0.0)] * 3, {}, "`seconds of sample .*` must be a finite "
                              "number > 0"),
    ([(1e6, 2, 1e-3)] * 3, {"topology": "ring"}, "`topology` must be one of"),
    ([(1e6, 2, 1e-3, "broadcast")] * 3, {}, "`collective` must be one of"),
])
def test_calibrate_rejects_bad_input(samples, kwargs, message):
  with pytest.raises(ValueError, match=message):
    cm.calibrate(samples, **kwargs)


@dataclasses.dataclass(frozen=True)
class TwoAlignedCollectives(gs.Compressor):
  """A test-only compressor of a format of its own, known to the cost model
  only by its `wire`: two aligned all-reduces (1% of the values, then 50
  more), like a sketch and the entries it picks."""

  @property
  def layout(self):
    return "two_aligned"

  def budget(self, size):
    return size // 100 + 50

  def wire(self, size, value_dtype):
    value_bytes = np.dtype(value_dtype).itemsize
    return (wire.all_reduce(size // 100 * value_bytes),
            wire.all_reduce(50 * value_bytes))

  def select(self, x, state, context):
    raise NotImplementedError  # never run: the cost model reads `wire` only


def test_a_compressor_with_two_aligned_collectives_is_priced_from_its_wire():
  cost = cm.project_compressor(TwoAlignedCollectives(), 1e6, 4, NET,
                               selection_s_per_element=1e-9)
  # Two ring all-reduces on 4 workers, each 2 * 3 steps of 1e-5 s and
  # 2 * 3/4 of its bytes: 1.5 * (4e4 + 200) / 1e9 + 2 * 6 * 1e-5.
  assert cost.layout == "two_aligned"
  assert cost.communication_s == pytest.approx(1.5 * 40200 / 1e9 + 1.2e-4)
  assert cost.selection_s == pytest.approx(1e-3)
  assert cost.bytes_per_worker == 40200
  half = cm.project_compressor(TwoAlignedCollectives(), 1e6, 4, NET,
                               bytes_per_value=2)
  assert half.bytes_per_worker == 20100
  two_level = cm.project_two_level(TwoAlignedCollectives(), 1e6, 4, 2,
                                   TWO_LEVEL)
  assert two_level.outer_s == pytest.approx(cost.communication_s)
  assert two_level.layout == "two_aligned"


SAMPLE = np.random.default_rng(0).normal(size=(2000,)).astype(np.float32)


@pytest.mark.parametrize("name", ["dense", "top_k", "rand_k", "arc_top_k",
                                  "hard_threshold", "gaussian_k"])
def test_projected_bytes_match_the_libraries_statistics(name):
  # What the model charges per worker = what `comm_stats` counts for one
  # step of the real transformation on a vector of the same size.
  d = SAMPLE.size
  compressor = gs.compressor_from_ratio(name, 0.01, SAMPLE)
  tx = gs.sparsify(compressor)
  _, state = tx.update(jnp.asarray(SAMPLE), tx.init(jnp.zeros(d)))
  counted = gs.comm_stats(state)["sent_bytes"]
  assert cm.project_compressor(compressor, d, 4, NET).bytes_per_worker == (
      counted)


@pytest.mark.parametrize("module", [cm, alpha_beta, projection])
def test_docstring_examples(module):
  assert doctest.testmod(module).failed == 0


# Two-level: inner links alpha = 1 us, beta = 10 GB/s; outer links as NET.
TWO_LEVEL = cm.TwoLevelNetwork(inner=cm.Network(1e-6, 1e10), outer=NET)


def test_hierarchical_all_reduce():
  # Inside (p = 2): 2 * 1/2 * 1e6 / 1e10 + 2 * 1e-6 = 1.02e-4.
  # Across (S = 4) on each device's 5e5-byte shard:
  # 2 * 3/4 * 5e5 / 1e9 + 6 * 1e-5 = 8.1e-4.
  assert cm.hierarchical_all_reduce_seconds(1e6, 4, 2, TWO_LEVEL) == (
      pytest.approx(9.12e-4))


def test_two_level_sparse_against_hand_computed():
  # d = 2.5e5 float32 (1e6 bytes); k = 2500 pairs of 8 bytes = 2e4 bytes.
  cost = cm.project_two_level(gs.top_k(0.01), 2.5e5, 4, 2, TWO_LEVEL)
  assert cost.inner_s == pytest.approx(1.02e-4)  # the dense in-slice ring
  assert cost.outer_s == pytest.approx(3 * 2e4 / 1e9 + 3 * 1e-5)
  assert cost.outer_bytes_per_device == 2e4
  assert cost.inner_bytes_per_device == 1e6
  assert cost.dense_s == pytest.approx(9.12e-4)
  assert cost.total_s == pytest.approx(1.02e-4 + 9e-5)
  assert cost.speedup_over_dense == pytest.approx(9.12e-4 / 1.92e-4)


def test_two_level_dense_is_the_baseline_and_one_slice_sends_nothing_across():
  dense = cm.project_two_level(None, 2.5e5, 4, 2, TWO_LEVEL)
  assert dense.total_s == pytest.approx(dense.dense_s)
  assert dense.outer_bytes_per_device == 5e5  # each device's 1/p shard
  assert dense.speedup_over_dense == pytest.approx(1.0)
  alone = cm.project_two_level(gs.top_k(0.01), 2.5e5, 1, 2, TWO_LEVEL,
                               selection_s_per_element=1e-9)
  assert alone.outer_s == 0.0
  assert alone.total_s == pytest.approx(1.02e-4 + 2.5e-4)
  with pytest.raises(ValueError, match="`devices_per_slice`"):
    cm.project_two_level(gs.top_k(0.01), 2.5e5, 4, 0, TWO_LEVEL)
