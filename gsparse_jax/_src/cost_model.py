"""Alpha-beta model of the communication time of one training step.

A collective is a number of message steps (each paying a fixed latency
`alpha`, seconds) and the bytes every worker sends. With `n` workers on a
ring (the bandwidth-optimal schedules that NCCL, Gloo and XLA use for large
messages):

- all-reduce of `B` bytes (reduce-scatter + all-gather): `2 (n - 1)` steps,
  each worker sending `2 (n - 1) / n * B` bytes;
- all-gather of `b` bytes per worker: `n - 1` steps, each worker sending
  `(n - 1) * b` bytes.

The time of `s` steps in which each worker sends `S` bytes is

  `s * alpha + L(S) / beta + gamma * S`

where `beta` is the bandwidth of one link (bytes per second), `gamma` a
per-byte cost that does not depend on the link (copies, reductions and the
network stack on the host; 0 by default) and `L(S)` the bytes crossing the
busiest link, set by the `Network`'s topology:

- `"per_worker"`: every worker has a link of its own (a switched cluster),
  `L(S) = S`: the classic ring formulas
  `2 (n - 1) / n * B / beta + 2 (n - 1) alpha` and
  `(n - 1) * b / beta + (n - 1) alpha`;
- `"shared"`: all workers share one link (one NIC, one loopback queue),
  `L(S) = n * S`.

`calibrate` fits `alpha`, `beta` and `gamma` to measured collective times.
`project_step` applies the formulas to the payload layouts of
`gsparse_jax` (docs/algorithms.md, "Aggregation") and
`project_compressor` to the collectives a compressor declares (its
`wire`); both add the measured selection time, to project where
compression pays off at scales that cannot be run here. The model ignores
compute/communication overlap and congestion; a two-level network (fast
inside a node or slice, slow across) is the sum of one collective per level,
each on its own `Network` with that level's worker count. Read its output as
a first-order estimate.

Reference for the ring costs: Thakur, Rabenseifner, Gropp, "Optimization of
Collective Communication Operations in MPICH", IJHPCA 19(1), 2005.

Example:
  >>> net = network_from_gbit(100.0, latency_s=5e-6)
  >>> dense = project_step(1e9, 64, net, "dense")
  >>> sparse = project_step(1e9, 64, net, "sparse", ratio=0.001,
  ...                       selection_s_per_element=1e-10)
  >>> round(dense.total_s, 3), round(sparse.total_s, 3)
  (0.631, 0.141)
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, NamedTuple, Optional

import numpy as np

from gsparse_jax._src import validation
from gsparse_jax._src import wire

LAYOUTS = ("dense", "sparse", "aligned", "arc")
TOPOLOGIES = ("per_worker", "shared")
COLLECTIVES = wire.KINDS  # ("all_reduce", "all_gather")
DEFAULT_LATENCY_S = 5e-6  # a fast datacenter fabric


class Network(NamedTuple):
  """Alpha-beta parameters of the links between workers.

  Attributes:
    latency_s: alpha, the fixed cost of one message step in seconds.
    bandwidth_bytes_per_s: beta, bytes per second of one link (`inf` for a
      link that is never the bottleneck).
    overhead_s_per_byte: gamma, host time per byte a worker sends,
      whatever the link (copies, reductions, the network stack).
    topology: one of `TOPOLOGIES`: `"per_worker"` (a link per worker) or
      `"shared"` (every worker's bytes cross one link).
  """

  latency_s: float
  bandwidth_bytes_per_s: float
  overhead_s_per_byte: float = 0.0
  topology: str = "per_worker"


class StepCost(NamedTuple):
  """Projected per-step cost of one layout.

  Attributes:
    layout: one of `LAYOUTS`.
    communication_s: time in collectives.
    selection_s: time choosing what to send (0 for dense).
    total_s: `communication_s + selection_s`.
    bytes_per_worker: bytes each worker puts into the collectives.
    dense_s: time of the dense all-reduce of the same gradient.
    speedup_over_dense: `dense_s / total_s` (above 1: compression pays).
  """

  layout: str
  communication_s: float
  selection_s: float
  total_s: float
  bytes_per_worker: float
  dense_s: float
  speedup_over_dense: float


class Sample(NamedTuple):
  """One measured collective, for `calibrate`.

  Attributes:
    num_bytes: the buffer size: the reduced buffer of an all-reduce, or
      each worker's contribution to an all-gather.
    num_workers: `n`.
    seconds: the measured time.
    collective: one of `COLLECTIVES`.
  """

  num_bytes: float
  num_workers: int
  seconds: float
  collective: str = "all_reduce"


def network_from_gbit(gbit_per_s: float,
                      latency_s: float = DEFAULT_LATENCY_S, *,
                      overhead_s_per_byte: float = 0.0,
                      topology: str = "per_worker") -> Network:
  """A `Network` from a link speed in Gbit/s.

  Args:
    gbit_per_s: link bandwidth in gigabits (1e9 bits) per second.
    latency_s: per-message latency in seconds (5 us: a fast datacenter
      fabric; 50 us is more typical of TCP over Ethernet).
    overhead_s_per_byte: host time per byte sent (see `Network`).
    topology: one of `TOPOLOGIES`.

  Returns:
    A `Network`.
  """
  validation.positive(gbit_per_s, "gbit_per_s")
  validation.finite_nonnegative(latency_s, "latency_s")
  validation.finite_nonnegative(overhead_s_per_byte, "overhead_s_per_byte")
  _check_topology(topology)
  return Network(latency_s, gbit_per_s * 1e9 / 8, overhead_s_per_byte,
                 topology)


def ring_schedule(collective: str, num_bytes: float,
                  num_workers: int) -> tuple[int, float]:
  """Message steps and bytes each worker sends in a ring collective.

  Args:
    collective: `"all_reduce"` (of a `num_bytes` buffer) or `"all_gather"`
      (of `num_bytes` from each worker).
    num_bytes: the buffer size.
    num_workers: `n >= 1`.

  Returns:
    `(steps, bytes_sent_per_worker)`: `(2 (n - 1), 2 (n - 1) / n * B)` for an
    all-reduce, `(n - 1, (n - 1) * b)` for an all-gather.
  """
  n = _check_workers(num_workers)
  validation.choice(collective, "collective", COLLECTIVES)
  if collective == wire.ALL_REDUCE:
    return 2 * (n - 1), 2 * (n - 1) / n * num_bytes
  return n - 1, (n - 1) * num_bytes  # all-gather


def link_bytes(bytes_per_worker: float, num_workers: int,
               topology: str) -> float:
  """Bytes crossing the busiest link when each worker sends `S` bytes.

  `S` with a link per worker; `n * S` when the workers share one link.
  """
  _check_topology(topology)
  return bytes_per_worker * (num_workers if topology == "shared" else 1)


def collective_seconds(collective: str, num_bytes: float, num_workers: int,
                       network: Network) -> float:
  """Time of one ring collective on `network` (see the module docstring).

  Args:
    collective: one of `COLLECTIVES`.
    num_bytes: the buffer size (see `ring_schedule`).
    num_workers: `n >= 1`; one worker communicates nothing.
    network: the `Network`.

  Returns:
    `steps * alpha + L(S) / beta + gamma * S` seconds.
  """
  steps, sent = ring_schedule(collective, num_bytes, num_workers)
  on_link = link_bytes(sent, num_workers, network.topology)
  return (steps * network.latency_s
          + on_link / network.bandwidth_bytes_per_s
          + network.overhead_s_per_byte * sent)


def ring_all_reduce_seconds(num_bytes: float, num_workers: int,
                            network: Network) -> float:
  """Time of a ring all-reduce of `num_bytes` bytes per worker.

  Args:
    num_bytes: size of the reduced buffer, the same on every worker.
    num_workers: `n >= 1`; one worker communicates nothing.
    network: the `Network`.

  Returns:
    `2 (n - 1) / n * B / beta + 2 (n - 1) alpha` seconds on a link per
    worker (plus the overhead and topology terms of `collective_seconds`).
  """
  return collective_seconds("all_reduce", num_bytes, num_workers, network)


def all_gather_seconds(bytes_per_worker: float, num_workers: int,
                       network: Network) -> float:
  """Time of a ring all-gather where each worker contributes `b` bytes.

  Args:
    bytes_per_worker: each worker's payload in bytes.
    num_workers: `n >= 1`.
    network: the `Network`.

  Returns:
    `(n - 1) * b / beta + (n - 1) alpha` seconds on a link per worker (plus
    the overhead and topology terms of `collective_seconds`).
  """
  return collective_seconds("all_gather", bytes_per_worker, num_workers,
                            network)


def calibrate(samples: Iterable[Any], topology: str = "per_worker", *,
              bandwidth_bytes_per_s: Optional[float] = None) -> Network:
  """Fits a `Network` to measured collective times.

  Each sample gives `steps`, `S` (bytes a worker sends) and `L(S)` (bytes on
  the busiest link) from `ring_schedule` and `link_bytes`; the model
  `seconds = steps * alpha + L(S) * (1 / beta) + S * gamma` is linear in
  `(alpha, 1 / beta, gamma)`. They are fitted by non-negative least squares
  on RELATIVE residuals (each equation divided by its measured time, so a
  1 ms and a 10 s collective weigh the same): every subset of the unknowns
  is solved by ordinary least squares and the best fit with no negative
  constant is kept. An unknown fitted to 0 drops out (`1 / beta = 0` gives
  an infinite bandwidth).

  With a link per worker `L(S) = S`, so the bandwidth and the per-byte
  overhead cannot be told apart: the fit puts the per-byte cost on the
  bandwidth unless `bandwidth_bytes_per_s` is given. Samples with 2 and 4
  workers on a shared link separate them.

  Args:
    samples: `Sample`s, or `(num_bytes, num_workers, seconds)` tuples
      (all-reduces), or 4-tuples with the collective last.
    topology: one of `TOPOLOGIES`, the topology the samples ran on.
    bandwidth_bytes_per_s: the link bandwidth when known (e.g. a rate set
      with `tc`): then only `alpha` and `gamma` are fitted.

  Returns:
    The fitted `Network`.

  Raises:
    ValueError: on fewer samples than unknowns, a one-worker sample, or a
      non-positive time.

  Example:
    >>> true = Network(1e-4, 1.25e8, 0.0, "shared")
    >>> samples = [Sample(b, n, collective_seconds("all_reduce", b, n, true))
    ...            for b in (1e5, 1e6, 1e7) for n in (2, 4)]
    >>> fitted = calibrate(samples, "shared")
    >>> round(fitted.latency_s * 1e6), round(fitted.bandwidth_bytes_per_s)
    (100, 125000000)
  """
  _check_topology(topology)
  samples = [Sample(*s) for s in samples]
  rows, times = [], []
  for s in samples:
    validation.finite_positive(s.seconds, f"seconds of sample {s}")
    validation.count(s.num_workers, f"num_workers of sample {s}", minimum=2)
    steps, sent = ring_schedule(s.collective, s.num_bytes, s.num_workers)
    rows.append([steps, link_bytes(sent, s.num_workers, topology), sent])
    times.append(s.seconds)
  a, y = np.asarray(rows, np.float64), np.asarray(times, np.float64)
  unknowns = [0, 1, 2]
  if bandwidth_bytes_per_s is not None:
    validation.positive(bandwidth_bytes_per_s, "bandwidth_bytes_per_s")
    y = y - a[:, 1] / bandwidth_bytes_per_s
    unknowns = [0, 2]
  validation.count(len(samples), "the number of samples",
                   minimum=len(unknowns))
  coef = _nonnegative_least_squares(a, y, unknowns, weights=1.0 / np.asarray(
      times))
  bandwidth = bandwidth_bytes_per_s if bandwidth_bytes_per_s is not None else (
      1.0 / coef[1] if coef[1] > 0 else math.inf)
  return Network(float(coef[0]), float(bandwidth), float(coef[2]), topology)


def _nonnegative_least_squares(a, y, unknowns, weights):
  """Least squares over the columns `unknowns` of `a`, coefficients >= 0.

  Exhaustive over column subsets (there are at most 3 unknowns): the
  non-negative solution with the smallest weighted residual; earlier (larger)
  subsets win ties. Columns outside the chosen subset get 0.
  """
  wa, wy = a * weights[:, None], y * weights
  # Scale the columns to unit norm so the rank test sees bytes and steps alike.
  norms = np.linalg.norm(wa, axis=0)
  norms[norms == 0] = 1.0
  best, best_residual = np.zeros(a.shape[1]), math.inf
  for size in range(len(unknowns), 0, -1):
    for subset in itertools.combinations(unknowns, size):
      cols = list(subset)
      scaled = wa[:, cols] / norms[cols]
      if np.linalg.matrix_rank(scaled) < len(cols):
        continue
      solution = np.linalg.lstsq(scaled, wy, rcond=None)[0] / norms[cols]
      if np.any(solution < 0):
        continue
      residual = float(np.sum((wa[:, cols] @ solution - wy) ** 2))
      if residual < best_residual * (1 - 1e-9):
        best, best_residual = np.zeros(a.shape[1]), residual
        best[cols] = solution
  return best


def budget(num_params: float, ratio: float) -> int:
  """Values kept per worker: `k = max(1, round(ratio * d))`."""
  return wire.budget(ratio, num_params)


def arc_rows(num_params: float, row_size: Optional[int] = None) -> int:
  """Rows `m` of the ARC-Top-K matrix view; rows of ~sqrt(d) by default."""
  return wire.num_rows(num_params, row_size)


def project_step(
    num_params: float,
    num_workers: int,
    network: Network,
    layout: str,
    *,
    ratio: float = 0.01,
    bytes_per_value: int = 4,
    selection_s_per_element: float = 0.0,
    sketch_rank: int = 4,
    row_size: Optional[int] = None,
) -> StepCost:
  """Projects the communication + selection time of one step.

  Layouts (`k = budget(d, ratio)` values per worker):

  - `"dense"`: all-reduce of the `d` gradient values (the baseline).
  - `"sparse"`: all-gather of `k` (value, int32 index) pairs per worker,
    e.g. Top-k; the payload received grows with `n`.
  - `"aligned"`: every worker sends the same `k` positions (shared-seed
    Rand-k), so one all-reduce of `k` values suffices.
  - `"arc"`: ARC-Top-K, an all-reduce of the `m * r` sketch values
    (`m` rows of `row_size`) then an all-reduce of `k` values.

  Args:
    num_params: gradient size `d`.
    num_workers: `n >= 1`.
    network: the `Network`.
    layout: one of `LAYOUTS`.
    ratio: fraction of values kept, `0 < ratio <= 1`.
    bytes_per_value: 4 for float32, 2 for bfloat16 / float16.
    selection_s_per_element: measured selection time per gradient entry
      (e.g. the threshold top-k time at some d divided by d); charged to
      every layout but dense.
    sketch_rank: `r`, columns of the ARC sketch.
    row_size: entries per ARC row; None picks ~sqrt(d).

  Returns:
    A `StepCost`.

  Raises:
    ValueError: on a bad layout, ratio, size or worker count.
  """
  validation.choice(layout, "layout", LAYOUTS)
  validation.ratio(ratio)
  validation.at_least(num_params, "num_params", 1)
  validation.finite_nonnegative(selection_s_per_element,
                                "selection_s_per_element")
  n = _check_workers(num_workers)
  k = budget(num_params, ratio)
  dense_bytes = num_params * bytes_per_value
  dense_s = ring_all_reduce_seconds(dense_bytes, n, network)
  selection_s = 0.0 if layout == "dense" else (
      selection_s_per_element * num_params)

  if layout == "dense":
    sent_bytes = dense_bytes
    communication_s = dense_s
  elif layout == "sparse":
    sent_bytes = k * (bytes_per_value + wire.INDEX_BYTES)
    communication_s = all_gather_seconds(sent_bytes, n, network)
  elif layout == "aligned":
    sent_bytes = k * bytes_per_value
    communication_s = ring_all_reduce_seconds(sent_bytes, n, network)
  else:  # arc
    sketch_bytes = arc_rows(num_params, row_size) * sketch_rank * (
        bytes_per_value)
    rows_bytes = k * bytes_per_value
    sent_bytes = sketch_bytes + rows_bytes
    communication_s = (ring_all_reduce_seconds(sketch_bytes, n, network)
                       + ring_all_reduce_seconds(rows_bytes, n, network))

  total_s = communication_s + selection_s
  speedup = dense_s / total_s if total_s > 0 else 1.0
  return StepCost(layout, communication_s, selection_s, total_s,
                  float(sent_bytes), dense_s, speedup)


def compressor_layout(compressor: Any, num_params: float) -> str:
  """The name under which the model reports a compressor's collectives.

  Its own `layout` (`"dense"`, `"sparse"`, `"aligned"` or a format of its
  own), except that an aligned compressor that also all-reduces something
  else to agree on its indices (a sketch, as ARC-Top-K: more than one
  collective in its `wire`) is `"arc"`.

  Args:
    compressor: a `gsparse_jax` compressor.
    num_params: the gradient size `d`.

  Returns:
    One of `LAYOUTS`, or the compressor's own layout name.

  Example:
    >>> import gsparse_jax as gs
    >>> [compressor_layout(c, 10_000) for c in
    ...  (gs.dense(), gs.top_k(0.01), gs.rand_k(0.01), gs.arc_top_k(0.01))]
    ['dense', 'sparse', 'aligned', 'arc']
  """
  layout = compressor.layout
  if layout == "aligned" and len(compressor.wire(int(num_params),
                                                 np.float32)) > 1:
    return "arc"
  return layout


def project_compressor(compressor: Any, num_params: float, num_workers: int,
                       network: Network, *, bytes_per_value: int = 4,
                       selection_s_per_element: float = 0.0) -> StepCost:
  """Projects one step of any `gsparse_jax` compressor from its `wire`.

  The compressor declares the collectives one worker joins for a vector of
  `d` values and their bytes (`Compressor.wire`, the same figures
  `comm_stats` counts); each is timed with `collective_seconds`, so a new
  compressor needs nothing here. For the standard layouts this is
  `project_step` at the compressor's capacity.

  Args:
    compressor: a `gsparse_jax` compressor.
    num_params: gradient size `d`.
    num_workers: `n >= 1`.
    network: the `Network`.
    bytes_per_value: 4 (float32 values on the wire) or 2 (bfloat16).
    selection_s_per_element: measured selection time per gradient entry
      (0 for the dense baseline, which sends the gradient as it is).

  Returns:
    A `StepCost` (its `layout` from `compressor_layout`).

  Example:
    >>> import gsparse_jax as gs
    >>> net = Network(0.0, 1e9)
    >>> project_compressor(gs.top_k(0.01), 1e6, 4, net).bytes_per_worker
    80000.0
  """
  d = int(num_params)
  n = _check_workers(num_workers)
  validation.finite_nonnegative(selection_s_per_element,
                                "selection_s_per_element")
  value_dtype = {4: np.float32, 2: np.float16}[bytes_per_value]
  collectives = compressor.wire(d, value_dtype)
  communication_s = sum(collective_seconds(c.kind, c.bytes, n, network)
                        for c in collectives)
  layout = compressor_layout(compressor, d)
  selection_s = selection_s_per_element * d
  dense_s = ring_all_reduce_seconds(d * bytes_per_value, n, network)
  total_s = communication_s + selection_s
  return StepCost(layout, communication_s, selection_s, total_s,
                  float(wire.total_bytes(collectives)), dense_s,
                  dense_s / total_s if total_s > 0 else 1.0)


def best_layout(num_params: float, num_workers: int, network: Network,
                **kwargs) -> StepCost:
  """The `StepCost` of the fastest layout (dense included).

  Args:
    num_params: gradient size `d`.
    num_workers: `n >= 1`.
    network: the `Network`.
    **kwargs: passed to `project_step`.

  Returns:
    The `StepCost` with the smallest `total_s`; dense wins ties.
  """
  costs = [project_step(num_params, num_workers, network, layout, **kwargs)
           for layout in LAYOUTS]
  return min(costs, key=lambda cost: cost.total_s)


def _check_topology(topology) -> str:
  return validation.choice(topology, "topology", TOPOLOGIES)


def _check_workers(num_workers, name: str = "num_workers") -> int:
  return validation.count(num_workers, name)


# Two-level networks: fast links inside a slice (NVLink, TPU ICI), slow links
# between slices (data-center network). `sparsify(..., axis_name="slice",
# inner_axes="data")` reduces the gradient densely inside each slice (JAX's
# all-reduce) and compresses only what crosses between slices.


class TwoLevelNetwork(NamedTuple):
  """Links inside a slice and between slices.

  Attributes:
    inner: the `Network` between the devices of one slice (fast).
    outer: the `Network` from a device to the other slices (slow); every
      device has its own link, so the devices of a slice send in parallel.
  """

  inner: Network
  outer: Network


class TwoLevelCost(NamedTuple):
  """Projected per-step cost of one layout on a `TwoLevelNetwork`.

  Attributes:
    layout: one of `LAYOUTS`; ``"dense"`` is the hierarchical dense
      all-reduce (`hierarchical_all_reduce_seconds`), the others a dense
      all-reduce inside each slice and that layout across slices.
    inner_s: time in collectives inside the slices.
    outer_s: time in collectives across slices.
    selection_s: time choosing what to send (0 for dense).
    total_s: ``inner_s + outer_s + selection_s``.
    inner_bytes_per_device: bytes a device puts into collectives inside its
      slice.
    outer_bytes_per_device: bytes a device sends across slices.
    dense_s: time of the hierarchical dense all-reduce (the baseline).
    speedup_over_dense: ``dense_s / total_s`` (above 1: compression pays).
  """

  layout: str
  inner_s: float
  outer_s: float
  selection_s: float
  total_s: float
  inner_bytes_per_device: float
  outer_bytes_per_device: float
  dense_s: float
  speedup_over_dense: float


def hierarchical_all_reduce_seconds(num_bytes: float, num_slices: int,
                                    devices_per_slice: int,
                                    network: TwoLevelNetwork) -> float:
  """Dense all-reduce of `B` bytes, hierarchically (the two-level baseline).

  Reduce-scatter inside each slice, then each device all-reduces its
  `B / p` shard across the slices (the `p` devices of a slice in parallel,
  each on its own link), then all-gather inside the slice: what a
  topology-aware dense all-reduce does.

  Args:
    num_bytes: the gradient's bytes, `B`.
    num_slices: `S >= 1`.
    devices_per_slice: `p >= 1`.
    network: the `TwoLevelNetwork`.

  Returns:
    `ring_all_reduce(B, p, inner) + ring_all_reduce(B / p, S, outer)`
    seconds (reduce-scatter and all-gather cost one ring all-reduce).
  """
  p = _check_workers(devices_per_slice, "devices_per_slice")
  return (ring_all_reduce_seconds(num_bytes, p, network.inner)
          + ring_all_reduce_seconds(num_bytes / p, num_slices, network.outer))


def project_two_level(
    num_params: float,
    num_slices: int,
    devices_per_slice: int,
    network: TwoLevelNetwork,
    layout: str,
    **kwargs,
) -> TwoLevelCost:
  """Projects one step of two-level data parallelism.

  ``"dense"``: the hierarchical dense all-reduce. Other layouts: what
  ``sparsify(..., axis_name="slice", inner_axes="data")`` does: a dense ring
  all-reduce of the whole gradient inside each slice, then every device
  compresses the slice's (identical) gradient and joins that layout's
  collective across the `S` slices with the whole payload (`project_step`
  with `S` workers on the outer links).

  Example:
    >>> net = TwoLevelNetwork(network_from_gbit(2400.0, 2e-6),
    ...                       network_from_gbit(25.0, 10e-6))
    >>> cost = project_two_level(1e9, 16, 8, net, "sparse", ratio=0.001)
    >>> round(cost.speedup_over_dense, 1)
    5.2

  Args:
    num_params: gradient size `d`.
    num_slices: `S >= 1`.
    devices_per_slice: `p >= 1`.
    network: the `TwoLevelNetwork`.
    layout: one of `LAYOUTS`.
    **kwargs: `project_step`'s keyword arguments (``ratio``,
      ``bytes_per_value``, ``selection_s_per_element``, ``sketch_rank``,
      ``row_size``).

  Returns:
    A `TwoLevelCost`.

  Raises:
    ValueError: as `project_step`, and for a bad slice or device count.
  """
  p = _check_workers(devices_per_slice, "devices_per_slice")
  across = project_step(num_params, num_slices, network.outer, layout,
                        **kwargs)
  dense_bytes = num_params * kwargs.get("bytes_per_value", 4)
  dense_s = hierarchical_all_reduce_seconds(dense_bytes, num_slices, p,
                                            network)
  # Inside the slice, both reduce the whole gradient densely (the
  # hierarchical schedule as reduce-scatter + all-gather: the same time).
  inner_s = ring_all_reduce_seconds(dense_bytes, p, network.inner)
  if layout == "dense":  # each device carries its 1/p shard across
    outer_s, outer_bytes = dense_s - inner_s, dense_bytes / p
  else:
    outer_s, outer_bytes = across.communication_s, across.bytes_per_worker
  total_s = inner_s + outer_s + across.selection_s
  return TwoLevelCost(layout, inner_s, outer_s, across.selection_s, total_s,
                      float(dense_bytes), float(outer_bytes), dense_s,
                      dense_s / total_s if total_s > 0 else 1.0)
