"""Projected step time of any compressor, from the collectives it declares.

A compressor declares the collectives one worker joins in a step for a
vector of `d` values, with its bytes in each (`Compressor.wire`: the same
figures `comm_stats` counts). `project_compressor` times each of them on an
alpha-beta `Network` (`gsparse_jax._src.alpha_beta`) and adds the measured
selection time, to project where compression pays off at scales that cannot
be run here. Nothing here knows which compressor it prices: a new one,
whatever its collectives, needs no change here.

`project_two_level` projects what ``sparsify(..., axis_name="slice",
inner_axes="data")`` does on a `TwoLevelNetwork` (a dense all-reduce inside
each slice, the compressor's collectives across slices), against the
hierarchical dense all-reduce.

The model ignores compute/communication overlap and congestion: read its
output as a first-order estimate.

Example:
  >>> import gsparse_jax as gs
  >>> from gsparse_jax._src import alpha_beta
  >>> net = alpha_beta.network_from_gbit(100.0, latency_s=5e-6)
  >>> dense = project_compressor(gs.dense(), 1e9, 64, net)
  >>> sparse = project_compressor(gs.top_k(0.001), 1e9, 64, net,
  ...                             selection_s_per_element=1e-10)
  >>> round(dense.total_s, 3), round(sparse.total_s, 3)
  (0.631, 0.141)
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Union

import numpy as np

from gsparse_jax._src import alpha_beta
from gsparse_jax._src import validation
from gsparse_jax._src import wire

# Bytes of one value on the wire -> the dtype a compressor's `wire` is asked
# about.
VALUE_DTYPES = {4: np.float32, 2: np.float16}


class StepCost(NamedTuple):
  """Projected per-step cost of one compressor.

  Attributes:
    layout: the compressor's own `layout` (``"sparse"``, ``"aligned"``,
      ``"dense"`` or a format of its own).
    communication_s: time in collectives.
    selection_s: time choosing what to send.
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


class TwoLevelCost(NamedTuple):
  """Projected per-step cost of one compressor on a `TwoLevelNetwork`.

  Attributes:
    layout: the compressor's `layout`, or ``"dense"`` for the hierarchical
      dense all-reduce (`alpha_beta.hierarchical_all_reduce_seconds`).
    inner_s: time in collectives inside the slices.
    outer_s: time in collectives across slices.
    selection_s: time choosing what to send (0 for the dense baseline).
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


def _speedup(dense_s: float, total_s: float) -> float:
  return dense_s / total_s if total_s > 0 else 1.0


def project_compressor(compressor: Any, num_params: float, num_workers: int,
                       network: alpha_beta.Network, *,
                       bytes_per_value: int = 4,
                       selection_s_per_element: float = 0.0) -> StepCost:
  """Projects one step of any `gsparse_jax` compressor from its `wire`.

  Each collective the compressor declares for a vector of `d` values
  (`Compressor.wire`) is timed with `alpha_beta.collective_seconds`; the
  selection time is `selection_s_per_element * d`.

  Args:
    compressor: a `gsparse_jax` compressor (anything with `wire` and
      `layout`); for one tensor under layer granularity, pass
      ``compressor.for_shape(shape)``.
    num_params: gradient size `d`.
    num_workers: `n >= 1`.
    network: the `Network`.
    bytes_per_value: 4 (float32 values on the wire) or 2 (half precision).
    selection_s_per_element: measured selection time per gradient entry
      (0 for the dense baseline, which sends the gradient as it is).

  Returns:
    A `StepCost`.

  Raises:
    ValueError: on a bad size, worker count, value width or selection time.

  Example:
    >>> import gsparse_jax as gs
    >>> net = alpha_beta.Network(0.0, 1e9)
    >>> project_compressor(gs.top_k(0.01), 1e6, 4, net).bytes_per_worker
    80000.0
  """
  validation.at_least(num_params, "num_params", 1)
  n = alpha_beta.check_workers(num_workers)
  validation.choice(bytes_per_value, "bytes_per_value", tuple(VALUE_DTYPES))
  validation.finite_nonnegative(selection_s_per_element,
                                "selection_s_per_element")
  d = int(num_params)
  collectives = compressor.wire(d, VALUE_DTYPES[bytes_per_value])
  communication_s = sum(
      alpha_beta.collective_seconds(c.kind, c.bytes, n, network)
      for c in collectives)
  selection_s = selection_s_per_element * d
  dense_s = alpha_beta.ring_all_reduce_seconds(d * bytes_per_value, n,
                                               network)
  total_s = communication_s + selection_s
  return StepCost(compressor.layout, communication_s, selection_s, total_s,
                  float(wire.total_bytes(collectives)), dense_s,
                  _speedup(dense_s, total_s))


def _per_name(value: Union[float, Mapping[str, float]], name: str) -> float:
  return value[name] if isinstance(value, Mapping) else value


def project_compressors(
    compressors: Mapping[str, Any], num_params: float, num_workers: int,
    network: alpha_beta.Network, *, bytes_per_value: int = 4,
    selection_s_per_element: Union[float, Mapping[str, float]] = 0.0,
) -> dict[str, StepCost]:
  """`project_compressor` of each of ``compressors``, by name.

  Args:
    compressors: name -> compressor.
    num_params, num_workers, network, bytes_per_value: as for
      `project_compressor`.
    selection_s_per_element: one figure for every compressor, or one per
      name (e.g. 0 for the dense baseline).

  Returns:
    name -> `StepCost`, in the order of ``compressors``.
  """
  return {name: project_compressor(
      compressor, num_params, num_workers, network,
      bytes_per_value=bytes_per_value,
      selection_s_per_element=_per_name(selection_s_per_element, name))
          for name, compressor in compressors.items()}


def best_layout(compressors: Mapping[str, Any], num_params: float,
                num_workers: int, network: alpha_beta.Network,
                **kwargs) -> tuple[str, StepCost]:
  """The fastest of ``compressors`` (their collectives, priced as declared).

  Args:
    compressors: name -> compressor (include ``gs.dense()`` for the
      baseline).
    num_params: gradient size `d`.
    num_workers: `n >= 1`.
    network: the `Network`.
    **kwargs: `project_compressors`' keyword arguments.

  Returns:
    ``(name, StepCost)`` with the smallest `total_s`; the first listed wins
    ties.

  Example:
    >>> import gsparse_jax as gs
    >>> slow = alpha_beta.network_from_gbit(1.0)
    >>> best_layout({"dense": gs.dense(), "top_k": gs.top_k(0.001)}, 1e9,
    ...             16, slow, selection_s_per_element={"dense": 0.0,
    ...                                                "top_k": 1e-9})[0]
    'top_k'
  """
  costs = project_compressors(compressors, num_params, num_workers, network,
                              **kwargs)
  return min(costs.items(), key=lambda item: item[1].total_s)


def project_two_level(
    compressor: Any,
    num_params: float,
    num_slices: int,
    devices_per_slice: int,
    network: alpha_beta.TwoLevelNetwork,
    *,
    bytes_per_value: int = 4,
    selection_s_per_element: float = 0.0,
) -> TwoLevelCost:
  """Projects one step of two-level data parallelism.

  With a compressor: what ``sparsify(..., axis_name="slice",
  inner_axes="data")`` does: a dense ring all-reduce of the whole gradient
  inside each slice, then every device compresses the slice's (identical)
  gradient and joins the compressor's collectives across the `S` slices
  with the whole payload (`project_compressor` with `S` workers on the
  outer links). With None: the hierarchical dense all-reduce, the baseline
  (`alpha_beta.hierarchical_all_reduce_seconds`).

  Example:
    >>> import gsparse_jax as gs
    >>> net = alpha_beta.TwoLevelNetwork(
    ...     alpha_beta.network_from_gbit(2400.0, 2e-6),
    ...     alpha_beta.network_from_gbit(25.0, 10e-6))
    >>> cost = project_two_level(gs.top_k(0.001), 1e9, 16, 8, net)
    >>> round(cost.speedup_over_dense, 1)
    5.2

  Args:
    compressor: a `gsparse_jax` compressor, or None for the hierarchical
      dense all-reduce.
    num_params: gradient size `d`.
    num_slices: `S >= 1`.
    devices_per_slice: `p >= 1`.
    network: the `TwoLevelNetwork`.
    bytes_per_value, selection_s_per_element: as for `project_compressor`
      (no selection for the dense baseline).

  Returns:
    A `TwoLevelCost`.

  Raises:
    ValueError: as `project_compressor`, and for a bad slice or device
      count.
  """
  p = alpha_beta.check_workers(devices_per_slice, "devices_per_slice")
  dense_bytes = num_params * bytes_per_value
  dense_s = alpha_beta.hierarchical_all_reduce_seconds(
      dense_bytes, num_slices, p, network)
  # Inside the slice, both reduce the whole gradient densely (the
  # hierarchical schedule as reduce-scatter + all-gather: the same time).
  inner_s = alpha_beta.ring_all_reduce_seconds(dense_bytes, p, network.inner)
  if compressor is None:  # each device carries its 1/p shard across
    alpha_beta.check_workers(num_slices, "num_slices")
    layout, selection_s = "dense", 0.0
    outer_s, outer_bytes = dense_s - inner_s, dense_bytes / p
  else:
    across = project_compressor(
        compressor, num_params, num_slices, network.outer,
        bytes_per_value=bytes_per_value,
        selection_s_per_element=selection_s_per_element)
    layout, selection_s = across.layout, across.selection_s
    outer_s, outer_bytes = across.communication_s, across.bytes_per_worker
  total_s = inner_s + outer_s + selection_s
  return TwoLevelCost(layout, inner_s, outer_s, selection_s, total_s,
                      float(dense_bytes), float(outer_bytes), dense_s,
                      _speedup(dense_s, total_s))
