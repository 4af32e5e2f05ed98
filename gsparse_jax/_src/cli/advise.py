"""`gsparse advise`: should this job compress its gradients, and with what?

Projects the communication + selection time of one step for dense and every
compressor of the registry (`gs.cost_model.project_compressor`, from the
collectives each compressor declares), names the winner, and finds by
bisection the bandwidth below which compression beats the dense all-reduce.
The forward and backward passes cost the same whatever the compressor, so
they are left out: add your compute time to every row.

Selection cost (the time a worker spends choosing what to send) is measured
here, per compressor, on a vector of up to 2**20 values and taken as linear
in the number of parameters, unless ``--selection-ns-per-element`` gives it.
Compressors that calibrate on a sample gradient (hard-threshold) are listed
as skipped.
"""

from __future__ import annotations

import math
import statistics
import time

from gsparse_jax._src import cost_model
from gsparse_jax._src.cli import common

NAME = "advise"
HELP = ("projected step time of dense and each compressor for a model size, "
        "worker count and link speed; the winner and the break-even "
        "bandwidth")

SELECTION_SIZE = 2**20  # entries timed when measuring selection here
SELECTION_REPEATS = 15  # timed calls (median), cheap at SELECTION_SIZE
BISECTION_GBIT = (1e-4, 1e5)  # bandwidths searched for the break-even


def configure(parser) -> None:
  parser.add_argument("--params", type=common.bounded(float, 1), required=True,
                      help="gradient size d (parameters), e.g. 1e9")
  parser.add_argument("--workers", type=common.bounded(int, 1), required=True,
                      help="data-parallel workers n")
  parser.add_argument("--bandwidth-gbit", required=True,
                      type=common.bounded(float, 0, low_open=True),
                      help="link bandwidth in Gbit/s")
  parser.add_argument("--latency-us", type=common.bounded(float, 0),
                      default=cost_model.DEFAULT_LATENCY_S * 1e6,
                      help="per-message latency in microseconds "
                      "(default %(default)s: a datacenter fabric; TCP over "
                      "Ethernet is nearer 50)")
  parser.add_argument("--selection-ns-per-element",
                      type=common.bounded(float, 0), default=None,
                      help="selection cost per gradient entry, for every "
                      "compressor (default: measured on this machine)")
  common.add_ratio_option(parser)
  parser.add_argument("--topology", choices=cost_model.TOPOLOGIES,
                      default="per_worker", help="a link per worker "
                      "(default) or one link shared by all workers")
  parser.add_argument("--overhead-ns-per-byte", type=common.bounded(float, 0),
                      default=0.0, help="host time per byte sent, whatever "
                      "the link (default 0; `benchmarks.network` fits it)")


def requires(args) -> tuple[str, ...]:
  del args
  return ()  # the core dependencies only


def matrix_shape(num_params: int) -> tuple[int, int]:
  """The most square ``(rows, cols)`` with ``rows * cols == d``.

  The gradient as one matrix, for compressors that read a tensor's shape
  (e.g. ARC-Top-K's rows); a prime ``d`` gives ``(1, d)``.

  Example:
    >>> matrix_shape(10**9), matrix_shape(12), matrix_shape(7)
    ((31250, 32000), (3, 4), (1, 7))
  """
  rows = math.isqrt(int(num_params))
  while num_params % rows:
    rows -= 1
  return rows, int(num_params) // rows


def measure_selection(compressor, size: int,
                      repeats: int = SELECTION_REPEATS) -> float:
  """Seconds per entry of ``gs.compress`` (jitted) on ``size`` normal values."""
  import jax  # pylint: disable=import-outside-toplevel
  import gsparse_jax as gs  # pylint: disable=import-outside-toplevel

  x = jax.random.normal(jax.random.key(0), (size,))
  state = compressor.init(size)
  select = jax.jit(lambda x, state, key: gs.compress(compressor, x, state,
                                                     key))
  key = jax.random.key(1)
  jax.block_until_ready(select(x, state, key))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(select(x, state, key))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples) / size


def break_even_gbit(compressor, num_params, num_workers, network, **kwargs):
  """Bandwidth (Gbit/s) where ``compressor`` and the dense all-reduce tie.

  Args:
    compressor, num_params, num_workers, network, **kwargs: as for
      `gs.cost_model.project_compressor`.

  Returns:
    ``(gbit, side)``: ``side`` is ``"below"`` when the compressor wins at
    lower bandwidths (the usual case), ``"above"`` when it wins at higher
    ones, ``"always"`` or ``"never"`` when it wins everywhere or nowhere in
    `BISECTION_GBIT` (``gbit`` is then None).
  """
  def gap(log_gbit):  # > 0: dense is faster
    net = network._replace(bandwidth_bytes_per_s=10 ** log_gbit * 1e9 / 8)
    cost = cost_model.project_compressor(compressor, num_params, num_workers,
                                         net, **kwargs)
    return cost.total_s - cost.dense_s

  low, high = (math.log10(g) for g in BISECTION_GBIT)
  at_low, at_high = gap(low), gap(high)
  if (at_low < 0) == (at_high < 0):
    return None, "always" if at_low < 0 else "never"
  side = "below" if at_low < 0 else "above"
  for _ in range(100):
    middle = (low + high) / 2
    if (gap(middle) < 0) == (at_low < 0):
      low = middle
    else:
      high = middle
  return 10 ** ((low + high) / 2), side


def _format_break_even(gbit, side) -> str:
  if gbit is None:
    return f"{side} (1e-4..1e5 Gbit/s)"
  return f"{side} {gbit:.4g} Gbit/s"


def run(args) -> int:
  import gsparse_jax as gs  # pylint: disable=import-outside-toplevel

  num_params = int(round(args.params))
  network = cost_model.network_from_gbit(
      args.bandwidth_gbit, args.latency_us * 1e-6,
      overhead_s_per_byte=args.overhead_ns_per_byte * 1e-9,
      topology=args.topology)
  skipped = {}
  shape = matrix_shape(num_params)
  bases = {}
  for name, entry in gs.COMPRESSORS.items():
    if entry.needs_sample:  # there is no gradient to calibrate on here
      skipped[name] = ("it calibrates on a sample gradient (gsparse compare "
                       "measures it on a model)")
      continue
    bases[name] = gs.compressor_from_ratio(name, args.ratio)
  compressors = {name: c.for_shape(shape) for name, c in bases.items()}
  dense = gs.dense()  # the baseline: sends the gradient as it is, no selection

  if args.selection_ns_per_element is not None:
    given = args.selection_ns_per_element * 1e-9
    selection = {name: 0.0 if bases[name] == dense else given
                 for name in compressors}
    selection_note = (f"given: {args.selection_ns_per_element:g} ns per "
                      "entry for every compressor")
  else:
    size = min(num_params, SELECTION_SIZE)
    selection = {}
    for name in list(compressors):
      if bases[name] == dense:
        selection[name] = 0.0
        continue
      try:
        selection[name] = measure_selection(
            bases[name].for_shape(matrix_shape(size)), size)
      except Exception as error:  # pylint: disable=broad-except
        # One compressor that fails to run must not hide the others' advice.
        del compressors[name]
        skipped[name] = (f"its selection failed to run here "
                         f"({type(error).__name__}: "
                         f"{str(error).splitlines()[0]})")
    selection_note = (f"measured on this machine: jitted gs.compress of "
                      f"{size:,} float32 values, median of "
                      f"{SELECTION_REPEATS}, taken as linear in the "
                      "parameters")

  print(f"gsparse advise: {num_params:,} parameters, {args.workers} workers, "
        f"{args.bandwidth_gbit:g} Gbit/s links ({args.topology}), "
        f"{args.latency_us:g} us latency, {args.overhead_ns_per_byte:g} ns/B "
        f"host overhead, ratio {args.ratio:g}, float32 values, ring "
        "collectives")
  print(f"selection cost: {selection_note}")
  print(f"tensor shape: compressors that use one (arc_top_k's rows, low-rank "
        f"factors) see the gradient as one {shape[0]:,} x {shape[1]:,} "
        "matrix")
  print("step time = communication + selection; the forward and backward "
        "passes are not included (the same for every row)")
  print()
  header = (f"{'compressor':<16}{'layout':<10}{'MB/worker':>12}"
            f"{'comm ms':>12}{'select ms':>12}{'step ms':>12}"
            f"{'vs dense':>10}  compression wins")
  print(header)
  print("-" * len(header))
  costs, break_even = {}, {}
  for name, compressor in compressors.items():
    cost = cost_model.project_compressor(
        compressor, num_params, args.workers, network,
        selection_s_per_element=selection[name])
    costs[name] = cost
    if bases[name] != dense:
      break_even[name] = break_even_gbit(
          compressor, num_params, args.workers, network,
          selection_s_per_element=selection[name])
    wins = _format_break_even(*break_even[name]) if name in break_even else ""
    print(f"{name:<16}{cost.layout:<10}{cost.bytes_per_worker / 1e6:>12.4f}"
          f"{cost.communication_s * 1e3:>12.3f}"
          f"{cost.selection_s * 1e3:>12.3f}{cost.total_s * 1e3:>12.3f}"
          f"{cost.speedup_over_dense:>9.2f}x  {wins}")
  print()
  winner = min(costs, key=lambda name: costs[name].total_s)
  print(f"winner: {winner} ({costs[winner].speedup_over_dense:.2f}x the "
        f"dense step's speed at {args.bandwidth_gbit:g} Gbit/s)")
  below = [(gbit, name) for name, (gbit, side) in break_even.items()
           if side == "below"]
  if below:
    gbit, name = max(below)
    print(f"break-even: compression wins below {gbit:.4g} Gbit/s ({name}); "
          "dense wins above")
  else:
    print("break-even: no compressor wins below a bandwidth in "
          "1e-4..1e5 Gbit/s (see the last column)")
  for name, reason in skipped.items():
    print(f"skipped {name}: {reason}")
  return 0
