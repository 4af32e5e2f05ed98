"""Alpha-beta model of the time of one collective on a network.

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
A two-level network (fast inside a node or slice, slow across) is one
`Network` per level (`TwoLevelNetwork`). The model ignores congestion; read
its output as a first-order estimate. `gsparse_jax._src.projection` prices
compressors' collectives with it; `gs.cost_model` exports both.

Reference for the ring costs: Thakur, Rabenseifner, Gropp, "Optimization of
Collective Communication Operations in MPICH", IJHPCA 19(1), 2005.

Example:
  >>> net = network_from_gbit(100.0, latency_s=5e-6)
  >>> round(ring_all_reduce_seconds(4e9, 64, net), 3)  # 1e9 float32 values
  0.631
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterable, NamedTuple, Optional

import numpy as np

from gsparse_jax._src import validation
from gsparse_jax._src import wire

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
  n = check_workers(num_workers)
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


def _check_topology(topology) -> str:
  return validation.choice(topology, "topology", TOPOLOGIES)


def check_workers(num_workers, name: str = "num_workers") -> int:
  return validation.count(num_workers, name)


# Two-level networks: fast links inside a slice (NVLink, TPU ICI), slow links
# between slices (data-center network).


class TwoLevelNetwork(NamedTuple):
  """Links inside a slice and between slices.

  Attributes:
    inner: the `Network` between the devices of one slice (fast).
    outer: the `Network` from a device to the other slices (slow); every
      device has its own link, so the devices of a slice send in parallel.
  """

  inner: Network
  outer: Network


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
  p = check_workers(devices_per_slice, "devices_per_slice")
  return (ring_all_reduce_seconds(num_bytes, p, network.inner)
          + ring_all_reduce_seconds(num_bytes / p, num_slices, network.outer))
