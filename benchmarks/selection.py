"""Speed of top-k selection by magnitude, relative to plain passes over x.

For each size d and ratio k/d, on float32 N(0, 1) data, times (medians of
repeats, warmed up, blocking on the result):

* `gsparse_jax` `top_k_abs` with method "threshold", "sort" and "auto";
* `jax.lax.top_k(|x|, k)`, `jax.lax.approx_max_k(|x|, k, recall 0.95)`,
  `jnp.argsort(-|x|)[:k]`, NumPy `argpartition` and `torch.topk` (if
  importable);
* two floors on the same array in the same run: the read pass
  `jnp.abs(x).sum()` and the read+write pass `x * 2.0` (fresh output).

Every timing is also reported as a ratio to both floors, so results from
noisy or different machines can be compared. Methods too slow at one size
(over `--skip-after` seconds a call) are skipped at larger sizes.

Run: python -m benchmarks.selection --out DIR [--quick] [--sizes 1e6 1e7]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from gsparse_jax._src import selection

RATIOS = (0.001, 0.01, 0.1)
FLOORS = ("read", "read_write")
REFERENCE = "threshold"  # exact (tested); others are compared with it


def method_table(k: int, x: jax.Array, x_host: np.ndarray):
  """name -> zero-argument callable computing the top-k indices of x."""
  abs_top_k = jax.jit(lambda v: jax.lax.top_k(jnp.abs(v), k)[1])
  approx = jax.jit(lambda v: jax.lax.approx_max_k(
      jnp.abs(v), k, recall_target=0.95)[1])
  argsort = jax.jit(lambda v: jnp.argsort(-jnp.abs(v))[:k])
  def library(method):
    return functools.partial(jax.jit(functools.partial(
        selection.top_k_abs, k=k, method=method)), x)

  table = {
      "threshold": library("threshold"),
      "sort": library("sort"),
      "auto": library("auto"),
      "lax.top_k": functools.partial(abs_top_k, x),
      "lax.approx_max_k": functools.partial(approx, x),
      "jnp.argsort": functools.partial(argsort, x),
      "numpy.argpartition": lambda: np.argpartition(
          -np.abs(x_host), k - 1)[:k],
  }
  if importlib.util.find_spec("torch") is not None:
    import torch  # pylint: disable=import-outside-toplevel
    x_torch = torch.from_numpy(x_host)
    table["torch.topk"] = lambda: torch.topk(torch.abs(x_torch), k).indices
  return table


def floor_table(x: jax.Array):
  read = jax.jit(lambda v: jnp.abs(v).sum())
  read_write = jax.jit(lambda v: v * 2.0)
  return {"read": functools.partial(read, x),
          "read_write": functools.partial(read_write, x)}


def to_numpy(indices) -> np.ndarray:
  if hasattr(indices, "numpy") and not isinstance(indices, jax.Array):
    return indices.numpy()  # torch
  return np.asarray(indices)


def measure_size(size: int, ratios, repeats: int, skip_after: float,
                 too_slow: set) -> list:
  """All methods at one size; updates `too_slow` with (method, ratio)."""
  x = jax.random.normal(jax.random.key(0), (size,), jnp.float32)
  x_host = np.asarray(x)
  floors = _common.time_interleaved(floor_table(x), repeats=repeats)
  rows = []
  for ratio in ratios:
    k = max(1, int(round(ratio * size)))
    methods = method_table(k, x, x_host)
    estimates, indices, skipped = {}, {}, {}
    for name, fn in methods.items():
      if (name, ratio) in too_slow:
        skipped[name] = f"over {skip_after} s per call at a smaller size"
        continue
      indices[name] = to_numpy(fn())  # compile and first touch
      start = time.perf_counter()
      jax.block_until_ready(fn())
      estimates[name] = time.perf_counter() - start
    fast = {n: methods[n] for n, t in estimates.items() if t < 0.5}
    # Fast methods are interleaved with the floors, in the same rounds.
    seconds = _common.time_interleaved(
        {**floor_table(x), **fast}, repeats=repeats, warmup=0)
    floors_here = {n: seconds.pop(n) for n in FLOORS}
    for name, estimate in estimates.items():
      if name not in fast:
        runs = max(1, min(repeats, int(2.0 / estimate)))
        seconds[name] = _common.time_fn(methods[name], repeats=runs,
                                        warmup=0)
      if seconds[name] > skip_after:
        too_slow.add((name, ratio))
    reference = np.sort(indices[REFERENCE])
    results = {}
    for name, t in seconds.items():
      found = np.intersect1d(indices[name], reference).size
      results[name] = {
          "seconds": t,
          "ratio_to_read": t / floors_here["read"],
          "ratio_to_read_write": t / floors_here["read_write"],
          "same_set_as_threshold": bool(found == k),
          "recall": found / k,
      }
    rows.append({
        "size": size, "ratio": ratio, "k": k,
        "floors": {"read_s": floors_here["read"],
                   "read_write_s": floors_here["read_write"],
                   "read_s_first": floors["read"],
                   "read_write_s_first": floors["read_write"]},
        "methods": results, "skipped": skipped,
    })
  return rows


def plot_results(rows, ratios):
  """Rows: ratio to the read+write pass, then to the read pass."""

  def draw(axes):
    for col, ratio in enumerate(ratios):
      here = [r for r in rows if r["ratio"] == ratio]
      names = sorted({n for r in here for n in r["methods"]})
      for row, floor in enumerate(("ratio_to_read_write", "ratio_to_read")):
        ax = axes[row, col]
        for name in names:
          points = [(r["size"], r["methods"][name][floor]) for r in here
                    if name in r["methods"]]
          if points:
            sizes, values = zip(*points)
            style = "-o" if name == REFERENCE else "--."
            ax.plot(sizes, values, style, label=name,
                    lw=2.0 if name == REFERENCE else 1.0)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d (entries)")
        what = "read+write pass x*2" if row == 0 else "read pass |x|.sum()"
        ax.set_ylabel(f"time / {what}")
        ax.set_title(f"k = {ratio:g} d")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)

  return draw


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes and few repeats (seconds)")
  parser.add_argument("--sizes", type=float, nargs="*", default=None)
  parser.add_argument("--ratios", type=float, nargs="*", default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--skip-after", type=float, default=None,
                      help="skip a method at larger sizes once one call "
                      "takes longer than this (seconds)")
  args = parser.parse_args(argv)

  sizes = args.sizes or ([1e4, 1e5] if args.quick else [1e5, 1e6, 1e7, 1e8])
  sizes = [int(s) for s in sizes]
  # Each (d, k) compiles its own kernel: --quick keeps to two ratios.
  ratios = tuple(args.ratios or (RATIOS[1:] if args.quick else RATIOS))
  repeats = args.repeats or (3 if args.quick else 9)
  skip_after = args.skip_after or (1.0 if args.quick else 10.0)

  rows, too_slow = [], set()
  for size in sizes:
    rows.extend(measure_size(size, ratios, repeats, skip_after, too_slow))
    for row in rows[-len(ratios):]:
      floors = row["floors"]
      print(f"d={row['size']:.0e} k={row['k']:<9} read "
            f"{floors['read_s'] * 1e3:8.2f} ms  read+write "
            f"{floors['read_write_s'] * 1e3:8.2f} ms")
      for name, m in sorted(row["methods"].items(),
                            key=lambda item: item[1]["seconds"]):
        print(f"    {name:<20} {m['seconds'] * 1e3:10.2f} ms "
              f"{m['ratio_to_read_write']:8.2f}x rw {m['ratio_to_read']:8.2f}"
              f"x read  recall {m['recall']:.3f}")

  result = {
      "machine": _common.machine_description(),
      "config": {"sizes": sizes, "ratios": list(ratios), "repeats": repeats,
                 "dtype": "float32", "data": "normal(0, 1)",
                 "skip_after_s": skip_after, "reference": REFERENCE},
      "results": rows,
  }
  _common.write_json(args.out, "selection", result)
  _common.write_plot(
      args.out, "selection", plot_results(rows, ratios), nrows=2,
      ncols=len(ratios),
      title="top-k by magnitude on " + jax.default_backend().upper())
  return result


if __name__ == "__main__":
  main()
