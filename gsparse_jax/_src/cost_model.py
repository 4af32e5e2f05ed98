"""Alpha-beta model of the communication time of one training step.

A message of `B` bytes between two workers costs `alpha + B / beta`: a fixed
latency `alpha` (seconds) and a bandwidth `beta` (bytes per second). With `n`
workers on a ring (the bandwidth-optimal schedules that NCCL, Gloo and XLA
use for large messages):

- all-reduce of `B` bytes (reduce-scatter + all-gather, each `n - 1` steps of
  `B / n` bytes): `2 (n - 1) / n * B / beta + 2 (n - 1) alpha`;
- all-gather of `b` bytes per worker (`n - 1` steps of `b` bytes):
  `(n - 1) * b / beta + (n - 1) alpha`.

`project_step` applies these to the payload layouts of `gsparse_jax`
(docs/algorithms.md, "Aggregation") and adds the measured selection time, to
project where compression pays off at scales that cannot be run here. The
model ignores compute/communication overlap, congestion and the
hierarchical (intra-node vs inter-node) structure of real clusters: read
its output as a first-order estimate.

Example:
  >>> net = network_from_gbit(100.0, latency_s=5e-6)
  >>> dense = project_step(1e9, 64, net, "dense")
  >>> sparse = project_step(1e9, 64, net, "sparse", ratio=0.001,
  ...                       selection_s_per_element=1e-10)
  >>> round(dense.total_s, 3), round(sparse.total_s, 3)
  (0.631, 0.141)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from gsparse_jax._src import wire

LAYOUTS = ("dense", "sparse", "aligned", "arc")


class Network(NamedTuple):
  """Alpha-beta parameters of the links between workers.

  Attributes:
    latency_s: alpha, the fixed cost of one message step in seconds.
    bandwidth_bytes_per_s: beta, bytes per second of one link.
  """

  latency_s: float
  bandwidth_bytes_per_s: float


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


def network_from_gbit(gbit_per_s: float, latency_s: float = 5e-6) -> Network:
  """A `Network` from a link speed in Gbit/s.

  Args:
    gbit_per_s: link bandwidth in gigabits (1e9 bits) per second.
    latency_s: per-message latency in seconds (5 us: a fast datacenter
      fabric; 50 us is more typical of TCP over Ethernet).

  Returns:
    A `Network`.
  """
  if not gbit_per_s > 0:
    raise ValueError(f"gbit_per_s must be > 0, got {gbit_per_s}.")
  if not latency_s >= 0:
    raise ValueError(f"latency_s must be >= 0, got {latency_s}.")
  return Network(latency_s, gbit_per_s * 1e9 / 8)


def ring_all_reduce_seconds(num_bytes: float, num_workers: int,
                            network: Network) -> float:
  """Time of a ring all-reduce of `num_bytes` bytes per worker.

  Args:
    num_bytes: size of the reduced buffer, the same on every worker.
    num_workers: `n >= 1`; one worker communicates nothing.
    network: the `Network`.

  Returns:
    `2 (n - 1) / n * B / beta + 2 (n - 1) alpha` seconds.
  """
  n = _check_workers(num_workers)
  steps = n - 1
  return (2 * steps / n * num_bytes / network.bandwidth_bytes_per_s
          + 2 * steps * network.latency_s)


def all_gather_seconds(bytes_per_worker: float, num_workers: int,
                       network: Network) -> float:
  """Time of a ring all-gather where each worker contributes `b` bytes.

  Args:
    bytes_per_worker: each worker's payload in bytes.
    num_workers: `n >= 1`.
    network: the `Network`.

  Returns:
    `(n - 1) * b / beta + (n - 1) alpha` seconds.
  """
  n = _check_workers(num_workers)
  steps = n - 1
  return (steps * bytes_per_worker / network.bandwidth_bytes_per_s
          + steps * network.latency_s)


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
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
  if not 0 < ratio <= 1:
    raise ValueError(f"ratio must satisfy 0 < ratio <= 1, got {ratio}.")
  if not num_params >= 1:
    raise ValueError(f"num_params must be >= 1, got {num_params}.")
  if not selection_s_per_element >= 0:
    raise ValueError("selection_s_per_element must be >= 0, got "
                     f"{selection_s_per_element}.")
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


def _check_workers(num_workers) -> int:
  if isinstance(num_workers, bool) or int(num_workers) != num_workers or (
      num_workers < 1):
    raise ValueError(f"num_workers must be an int >= 1, got {num_workers}.")
  return int(num_workers)


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
  p = _check_workers(devices_per_slice)
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
  p = _check_workers(devices_per_slice)
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
