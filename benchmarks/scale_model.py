"""Projected step time and speedup over dense at scales not runnable here.

Measures the selection cost of the threshold top-k kernel on this machine
(seconds per gradient entry at one size), then feeds it to the alpha-beta
model of `gs.cost_model` over a grid of 8..4096 workers, 1e6..1e10
parameters and 1..400 Gbit/s links, for one compressor of each layout, priced
from the collectives it declares (`Compressor.wire`): dense (`gs.dense()`,
ring all-reduce), sparse (`gs.top_k`, all-gather of value+index pairs),
aligned (shared-seed `gs.rand_k`, all-reduce of k values) and arc
(`gs.arc_top_k`, sketch all-reduce + the chosen rows' all-reduce). The
figure shows which layout is fastest where, and its speedup over dense.

A second section projects two-level data parallelism
(`sparsify(..., axis_name="slice", inner_axes="data")`): slices of 8 devices
on fast links (2400 Gbit/s, NVLink-class) joined by slow ones (10-100
Gbit/s per device), dense inside each slice and each layout across slices,
against the hierarchical dense all-reduce (`cost_model.project_two_level`),
once with the selection time measured here and once with communication only
(selection free: the bound an accelerator's selection approaches).

The selection cost is assumed linear in d; on accelerators it is far lower
than on this CPU, which only widens the region where compression wins.

Run: python -m benchmarks.scale_model --out DIR [--quick]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import gsparse_jax as gs
from benchmarks import _common
from gsparse_jax._src import cost_model
from gsparse_jax._src import selection

WORKERS = tuple(2**i for i in range(3, 13))  # 8 .. 4096
PARAMS = (1e6, 1e7, 1e8, 1e9, 1e10)
GBITS = (1.0, 10.0, 25.0, 100.0, 400.0)
# Two-level: slices of DEVICES_PER_SLICE devices.
SLICES = (2, 4, 8, 16, 32, 64)
TWO_LEVEL_PARAMS = (1e7, 1e8, 1e9, 1e10)
OUTER_GBITS = (10.0, 25.0, 100.0)
DEVICES_PER_SLICE = 8
LAYOUT_COLORS = {"dense": "#bbbbbb", "sparse": "#1f77b4",
                 "aligned": "#2ca02c", "arc": "#d62728"}
LAYOUTS = tuple(LAYOUT_COLORS)


def layout_compressors(ratio: float) -> dict:
  """One compressor per layout of the grid, by the layout's label."""
  return {"dense": gs.dense(), "sparse": gs.top_k(ratio),
          "aligned": gs.rand_k(ratio), "arc": gs.arc_top_k(ratio)}


def _selection(selection_s_per_element: float) -> dict:
  """The measured selection time for every layout but dense (which sends
  the gradient as it is)."""
  return {name: 0.0 if name == "dense" else selection_s_per_element
          for name in LAYOUTS}


def measure_selection(size: int, ratio: float, repeats: int) -> dict:
  """Seconds of the threshold top-k kernel at one size, and per entry."""
  k = max(1, int(round(ratio * size)))
  x = jax.random.normal(jax.random.key(0), (size,), jnp.float32)
  select = jax.jit(functools.partial(selection.top_k_abs, k=k,
                                     method="threshold"))
  read_write = jax.jit(lambda v: v * 2.0)
  seconds = _common.time_interleaved(
      {"threshold": lambda: select(x), "read_write": lambda: read_write(x)},
      repeats=repeats)
  return {"size": size, "k": k, "seconds": seconds["threshold"],
          "read_write_seconds": seconds["read_write"],
          "seconds_per_element": seconds["threshold"] / size}


def project_grid(selection_s_per_element: float, ratio: float,
                 latency_s: float, bytes_per_value: int, workers, params,
                 gbits) -> list:
  """Every layout at every grid point, and the fastest one."""
  points = []
  compressors = layout_compressors(ratio)
  for gbit in gbits:
    network = cost_model.network_from_gbit(gbit, latency_s)
    for num_params in params:
      for num_workers in workers:
        costs = cost_model.project_compressors(
            compressors, num_params, num_workers, network,
            bytes_per_value=bytes_per_value,
            selection_s_per_element=_selection(selection_s_per_element))
        best_name, best = min(costs.items(), key=lambda c: c[1].total_s)
        points.append({
            "gbit_per_s": gbit, "params": num_params,
            "workers": num_workers, "dense_s": best.dense_s,
            "best": best_name,
            "best_speedup_over_dense": best.speedup_over_dense,
            "layouts": {name: {"total_s": c.total_s,
                               "communication_s": c.communication_s,
                               "selection_s": c.selection_s,
                               "speedup_over_dense": c.speedup_over_dense}
                        for name, c in costs.items()}})
  return points


def project_two_level_grid(selection_s_per_element: float, ratio: float,
                           network_args: dict, bytes_per_value: int,
                           devices_per_slice: int) -> list:
  """Every layout across slices at every two-level grid point.

  Args:
    selection_s_per_element: measured selection seconds per entry.
    ratio: the kept fraction.
    network_args: ``inner_gbit``, ``inner_latency_s``, ``outer_latency_s``.
    bytes_per_value: 4 for float32.
    devices_per_slice: devices in each slice.

  Returns:
    Points with the fastest layout and its speedup over the hierarchical
    dense all-reduce (``"workers"`` holds the number of slices).
  """
  points = []
  # None: the hierarchical dense all-reduce, the baseline.
  compressors = {**layout_compressors(ratio), "dense": None}
  selection_s = _selection(selection_s_per_element)
  inner = cost_model.network_from_gbit(network_args["inner_gbit"],
                                       network_args["inner_latency_s"])
  for gbit in OUTER_GBITS:
    network = cost_model.TwoLevelNetwork(inner, cost_model.network_from_gbit(
        gbit, network_args["outer_latency_s"]))
    for num_params in TWO_LEVEL_PARAMS:
      for slices in SLICES:
        costs = {
            name: cost_model.project_two_level(
                compressor, num_params, slices, devices_per_slice, network,
                bytes_per_value=bytes_per_value,
                selection_s_per_element=selection_s[name])
            for name, compressor in compressors.items()}
        best_name, best = min(costs.items(), key=lambda c: c[1].total_s)
        points.append({
            "gbit_per_s": gbit, "params": num_params, "workers": slices,
            "devices_per_slice": devices_per_slice, "dense_s": best.dense_s,
            "best": best_name,
            "best_speedup_over_dense": best.speedup_over_dense,
            "layouts": {name: c._asdict() for name, c in costs.items()}})
  return points


def two_level_table(points) -> str:
  """Markdown: per (outer link, parameters, slices), the fastest layout and
  its speedup, and the speedup of the sparse layout (Top-k)."""
  lines = ["| outer Gbit/s | params | " + " | ".join(
      f"{s} slices" for s in SLICES) + " |",
           "| --- | --- |" + " --- |" * len(SLICES)]
  for gbit in OUTER_GBITS:
    for num_params in TWO_LEVEL_PARAMS:
      row = {p["workers"]: p for p in points
             if p["gbit_per_s"] == gbit and p["params"] == num_params}
      lines.append(f"| {gbit:g} | {num_params:.0e} | " + " | ".join(
          f"{row[s]['best']} {row[s]['best_speedup_over_dense']:.1f}x, "
          "sparse "
          f"{row[s]['layouts']['sparse']['speedup_over_dense']:.1f}x"
          for s in SLICES) + " |")
  return "\n".join(lines)


def plot_grid(points, workers, params, gbits, xlabel="workers"):
  """One panel per bandwidth: best layout (color) and its speedup (text)."""
  from matplotlib.colors import ListedColormap  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  layouts = list(LAYOUT_COLORS)
  cmap = ListedColormap([LAYOUT_COLORS[name] for name in layouts])

  def draw(axes):
    flat = axes.reshape(-1)
    for col, gbit in enumerate(gbits):
      ax = flat[col]
      grid = np.zeros((len(params), len(workers)))
      for point in points:
        if point["gbit_per_s"] != gbit:
          continue
        i = params.index(point["params"])
        j = workers.index(point["workers"])
        grid[i, j] = layouts.index(point["best"])
        ax.text(j, i, f"{point['best_speedup_over_dense']:.1f}",
                ha="center", va="center", fontsize=6)
      ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(layouts) - 0.5,
                origin="lower", aspect="auto")
      ax.set_xticks(range(len(workers)), [str(w) for w in workers],
                    rotation=90, fontsize=7)
      ax.set_yticks(range(len(params)), [f"{p:.0e}" for p in params],
                    fontsize=7)
      ax.set_xlabel(xlabel)
      ax.set_ylabel("parameters")
      ax.set_title(f"{gbit:g} Gbit/s")
    for ax in flat[len(gbits):]:
      ax.axis("off")
    flat[-1].legend(
        handles=[Patch(color=LAYOUT_COLORS[n], label=n) for n in layouts],
        loc="center", title="fastest layout\n(number: speedup over dense)",
        fontsize=8)

  return draw


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--quick", action="store_true",
                      help="small selection measurement (seconds)")
  parser.add_argument("--ratio", type=float, default=0.01)
  parser.add_argument("--latency-us", type=float, default=5.0)
  parser.add_argument("--bytes-per-value", type=int, default=4)
  parser.add_argument("--selection-size", type=float, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--inner-gbit", type=float, default=2400.0,
                      help="two-level: link speed inside a slice")
  parser.add_argument("--inner-latency-us", type=float, default=2.0)
  parser.add_argument("--outer-latency-us", type=float, default=10.0)
  parser.add_argument("--devices-per-slice", type=int,
                      default=DEVICES_PER_SLICE)
  args = parser.parse_args(argv)

  size = int(args.selection_size or (1e5 if args.quick else 1e7))
  repeats = args.repeats or (3 if args.quick else 9)
  measured = measure_selection(size, args.ratio, repeats)
  latency_s = args.latency_us * 1e-6
  points = project_grid(measured["seconds_per_element"], args.ratio,
                        latency_s, args.bytes_per_value, WORKERS, PARAMS,
                        GBITS)
  wins = {layout: sum(p["best"] == layout for p in points)
          for layout in LAYOUTS}
  network_args = {"inner_gbit": args.inner_gbit,
                  "inner_latency_s": args.inner_latency_us * 1e-6,
                  "outer_latency_s": args.outer_latency_us * 1e-6}
  two_level = {
      name: project_two_level_grid(seconds, args.ratio, network_args,
                                   args.bytes_per_value,
                                   args.devices_per_slice)
      for name, seconds in (("measured_selection",
                             measured["seconds_per_element"]),
                            ("communication_only", 0.0))}
  result = {
      "machine": _common.machine_description(),
      "selection": measured,
      "model": {"ratio": args.ratio, "latency_s": latency_s,
                "bytes_per_value": args.bytes_per_value,
                "layouts": list(LAYOUTS),
                "assumption": "selection time linear in d; no overlap of "
                              "communication and compute; flat ring"},
      "grid": {"workers": list(WORKERS), "params": list(PARAMS),
               "gbit_per_s": list(GBITS)},
      "wins": wins,
      "points": points,
      "two_level": {
          "network": {**network_args,
                      "outer_gbit_per_s": list(OUTER_GBITS),
                      "devices_per_slice": args.devices_per_slice,
                      "baseline": "hierarchical dense all-reduce"},
          "grid": {"slices": list(SLICES),
                   "params": list(TWO_LEVEL_PARAMS)},
          "points": two_level},  # by selection assumption
  }
  _common.write_json(args.out, "scale_model", result)
  _common.write_plot(
      args.out, "scale_model", plot_grid(points, WORKERS, PARAMS, GBITS),
      nrows=2, ncols=3, figsize=(13.0, 8.0),
      title=(f"fastest layout and its speedup over dense\n(ratio "
             f"{args.ratio:g}, selection "
             f"{measured['seconds_per_element'] * 1e9:.2f} ns/entry measured "
             f"at d={size:.0e}, latency {args.latency_us:g} us)"))
  print(f"selection at d={size:.0e}, k={measured['k']}: "
        f"{measured['seconds'] * 1e3:.2f} ms "
        f"({measured['seconds_per_element'] * 1e9:.3f} ns/entry, "
        f"{measured['seconds'] / measured['read_write_seconds']:.2f}x the "
        "read+write pass)")
  _common.write_plot(
      args.out, "scale_model_two_level",
      plot_grid(two_level["communication_only"], list(SLICES),
                list(TWO_LEVEL_PARAMS),
                list(OUTER_GBITS), xlabel="slices"),
      nrows=2, ncols=2, figsize=(10.0, 8.0),
      title=(f"two-level, communication only: {args.devices_per_slice} "
             f"devices per slice at {args.inner_gbit:g} Gbit/s, dense "
             "inside,\nthe fastest layout across (number: speedup over the "
             "hierarchical dense all-reduce;\npanel: Gbit/s per device "
             f"across slices; ratio {args.ratio:g})"))
  print("grid points won per layout:", wins)
  for name, grid in two_level.items():
    print(f"two-level, {name.replace('_', ' ')} (fastest layout across "
          "slices, speedup over the hierarchical dense all-reduce):")
    print(two_level_table(grid))
  return result


if __name__ == "__main__":
  main()
