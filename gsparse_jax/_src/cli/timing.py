"""Time to accuracy for `gsparse compare`: projected step time and target.

What a user decides on is how long training takes to reach a quality on
their link, against the baseline real jobs use (Agarwal et al., "On the
Utility of Gradient Compression in Distributed Training Systems", MLSys
2022, arXiv 2103.00543; "Beyond Throughput and Compression Ratios",
arXiv 2407.01378). A run's projected step is its measured compute plus the
communication `gs.cost_model` projects for its compressor at a bandwidth and
worker count (added: no overlap, unless overlap is assumed, then the larger
of the two); its time to target is the first held-out evaluation that
reaches the target, times the projected step.
"""

from __future__ import annotations

from typing import Optional, Sequence

# The default target: within this fraction of dense's final metric.
DEFAULT_TARGET_FRACTION = 0.95
BASELINE = "cast"  # what the verdict compares against


def comm_seconds(compressor, param_leaves, granularity: str, workers: int,
                 network, keep_dense=None) -> float:
  """Projected communication time of one step of ``compressor``.

  Every compressed segment of the model (one under ``granularity="global"``,
  one per leaf under ``"layer"``: the segments `sparsify` compresses) is
  priced by `gs.cost_model.project_compressor` from the collectives the
  compressor declares; the times add up.

  Args:
    compressor: the `gs.Compressor` of the run.
    param_leaves: the parameter leaves (arrays or `jax.ShapeDtypeStruct`).
    granularity: ``"global"`` or ``"layer"``.
    workers: the number of workers.
    network: a `gs.cost_model.Network`.
    keep_dense: sparsify's ``keep_dense`` (those leaves priced dense).

  Returns:
    Seconds.
  """
  from gsparse_jax import cost_model  # pylint: disable=g-import-not-at-top
  from gsparse_jax import segment_plan  # pylint: disable=g-import-not-at-top

  return sum(
      cost_model.project_compressor(
          segment.compressor, segment.size, workers, network,
          bytes_per_value=2 if _itemsize(segment.wire_dtype) == 2 else 4
      ).communication_s
      for segment in segment_plan(
          param_leaves, compressor, granularity=granularity,
          keep_dense=keep_dense).segments)


def mean_comm_seconds(compressor, param_leaves, granularity: str,
                      workers: int, network, *, keep_dense=None,
                      dense_rounds: int = 0, rounds: int = 1) -> float:
  """`comm_seconds` averaged over a run of ``rounds`` communication rounds
  whose first ``dense_rounds`` (sparsify's warm-up) send the dense
  gradient."""
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top

  compressed = comm_seconds(compressor, param_leaves, granularity, workers,
                            network, keep_dense)
  if not dense_rounds:
    return compressed
  dense = comm_seconds(gs.dense(), param_leaves, granularity, workers,
                       network)
  return (dense_rounds * dense + (rounds - dense_rounds) * compressed) / rounds


def _itemsize(dtype) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.dtype(dtype).itemsize


def projected_step_seconds(compute_s: float, comm_s: float,
                           overlap: bool = False) -> float:
  """``compute_s + comm_s``, or ``max(compute_s, comm_s)`` with overlap."""
  return max(compute_s, comm_s) if overlap else compute_s + comm_s


def higher_is_better(metric: str) -> bool:
  """Accuracy rises to the target; a loss falls to it."""
  return metric != "loss"


def reaches(value: float, target: float, metric: str) -> bool:
  """Whether a held-out ``value`` of ``metric`` meets ``target``."""
  return value >= target if higher_is_better(metric) else value <= target


def default_target(runs: Sequence[dict], metric: str) -> float:
  """Within 5% of dense's final metric: 0.95 x its accuracy, or 1.05 x its
  loss (dense's final metric, or the best run's when dense did not run)."""
  key = f"final_{metric}"
  finals = [run[key] for run in runs if run["compressor"] == "dense"] or [
      (max if higher_is_better(metric) else min)(run[key] for run in runs)]
  if higher_is_better(metric):
    return DEFAULT_TARGET_FRACTION * finals[0]
  return (2.0 - DEFAULT_TARGET_FRACTION) * finals[0]


def steps_to_target(eval_steps: Sequence[int], values: Sequence[float],
                    target: float, metric: str) -> Optional[int]:
  """The first evaluated step whose held-out value reaches ``target``
  (None when none does)."""
  for step, value in zip(eval_steps, values):
    if reaches(value, target, metric):
      return int(step)
  return None


def time_to_target(eval_steps: Sequence[int], values: Sequence[float],
                   target: float, metric: str,
                   step_s: float) -> Optional[float]:
  """Projected seconds to reach ``target``: `steps_to_target` times the
  projected step ``step_s`` (None when the target is never reached).

  Example:
    >>> time_to_target([10, 20, 30], [0.5, 0.9, 0.95], 0.9, "accuracy", 0.1)
    2.0
  """
  steps = steps_to_target(eval_steps, values, target, metric)
  return None if steps is None else steps * step_s


def verdict(runs: Sequence[dict], describe: str) -> str:
  """One line: the fastest run to the target and how it compares with
  `BASELINE` (``cast``).

  Args:
    runs: the runs of results.json (``compressor`` and ``time_to_target_s``).
    describe: the target and link, e.g. ``"accuracy >= 0.933 at 1 Gbit/s,
      8 workers"``.
  """
  reached = [run for run in runs if run["time_to_target_s"] is not None]
  if not reached:
    return f"no compressor reached {describe}"
  best = min(reached, key=lambda run: run["time_to_target_s"])
  line = (f"fastest to {describe}: {best['compressor']} "
          f"({_seconds(best['time_to_target_s'])})")
  baseline = [run for run in runs if run["compressor"] == BASELINE]
  if best["compressor"] == BASELINE:
    return line + ", the baseline itself"
  if not baseline:
    return line + f"; {BASELINE} not run"
  cast_s = baseline[0]["time_to_target_s"]
  if cast_s is None:
    return line + f"; {BASELINE} never reached it"
  ratio = cast_s / best["time_to_target_s"]
  return line + f", {ratio:.2f}x faster than {BASELINE} ({_seconds(cast_s)})"


def _seconds(seconds: float) -> str:
  return f"{seconds:.3g} s"
