"""Hard-threshold vs Top-k: total error and model quality per byte sent.

Sahu, Dutta, Abdelmoniem, Banerjee, Canini, Kalnis, "Rethinking gradient
sparsification as total error minimization" (arXiv 2108.00951) argue that
with error feedback the quantity to minimize is the TOTAL error over
training, ``sum_t ||a_t - C(a_t)||^2``, and that a constant hard threshold
``lambda`` (send every ``|a_j| >= lambda``) does so better than Top-k for the
same total communication.

For several ``lambda`` (calibrated with `gs.calibrate_threshold` on the
first gradients to target densities), this study trains with hard-threshold
and then with Top-k at the density hard-threshold actually achieved (mean
over seeds), both with error feedback written out (`probe_training`), and
compares, per worker: the total error, the total bytes (8 per value: value
and int32 index), and the final test accuracy (digits MLP) or distance to
the optimum (the RegTop-k paper's linear regression).

Bytes are counted three ways for hard-threshold: each worker's own count
(a variable-length message), the authors' `ThreshReducer` (every worker
padded to the step's largest count), and this library's fixed capacity
(``capacity_ratio``); it is also reported which capacity the runs needed:
`gs.hard_threshold` reproduces `ThreshReducer` only while no worker's count
exceeds it.

Run:  python examples/hard_threshold_study.py [--seeds 5] [--out DIR]
Writes ``hard_threshold.json`` and ``hard_threshold.png``.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import common
import gsparse_jax as gs
import probe_training

VALUE_AND_INDEX_BYTES = 8  # float32 value + int32 index

PROBLEMS = {
    # name: (problem factory, steps, lr, calibration densities)
    "digits MLP": (probe_training.digits_problem, 300, 0.1,
                   (0.0002, 0.001, 0.003, 0.01)),
    "linear regression": (probe_training.regression_problem, 1000, 0.01,
                          (0.1, 0.2, 0.3, 0.4)),
}


@functools.lru_cache(maxsize=None)
def passing_count(threshold: float):
  """``a -> #{|a| >= threshold}``: what hard-threshold passes, uncapped."""
  return lambda a: jnp.sum(jnp.abs(a) >= threshold)


# Capacities (in units of the calibration target) whose overflow is
# reported: 1x as in examples/regtopk_linear_regression.py, 2x as the
# registry's `compressor_from_ratio("hard_threshold", ...)`.
CAPACITY_MULTIPLES = (1, 2)


def overflow_fraction(runs, capacity: int) -> float:
  """Share of the passing entries a ``capacity`` would have left in memory."""
  passed = np.stack([r["passed"] for r in runs])
  return float(np.maximum(passed - capacity, 0).sum() / max(passed.sum(), 1))


def summarize(run: dict, size: int) -> dict:
  """Per-worker totals of one run (means over workers)."""
  passed = run["passed"]  # [steps, workers]
  return {
      "total_error": float(run["error"].sum(0).mean()),
      "bytes": float(passed.sum(0).mean() * VALUE_AND_INDEX_BYTES),
      "bytes_padded": float(passed.max(1).sum() * VALUE_AND_INDEX_BYTES),
      "density": float(passed.mean() / size),
      "max_worker_density": float(passed.max() / size),
      "final": float(run["eval"][-1]),
  }


def compare(name: str, seeds, *, steps=None, densities=None) -> dict:
  """Hard-threshold at each calibrated lambda, then Top-k at its density."""
  factory, default_steps, lr, default_densities = PROBLEMS[name]
  steps = steps or default_steps
  densities = densities or default_densities
  problems = [factory(seed) for seed in seeds]
  size = problems[0].x0.shape[0]
  rows = []
  # One lambda per target (one compilation for all seeds): calibrated on
  # the first gradients of every seed's workers together.
  first = [np.asarray(p.grads(p.x0, p.data, jax.random.key(seed)))
           for seed, p in zip(seeds, problems)]
  for target in densities:
    threshold = gs.calibrate_threshold(first, target)
    # Capacity d: nothing overflows, the selection is ThreshReducer's.
    compressor = gs.hard_threshold(threshold, capacity_ratio=1.0)
    threshold_runs = [probe_training.ef_trajectory(
        problem, compressor, steps=steps, lr=lr, seed=seed,
        rule=passing_count(threshold))
                      for seed, problem in zip(seeds, problems)]
    hard = [summarize(r, size) for r in threshold_runs]
    density = float(np.mean([h["density"] for h in hard]))
    k = max(1, round(density * size))
    top = [summarize(probe_training.ef_trajectory(
        problem, gs.top_k(k=k), steps=steps, lr=lr, seed=seed), size)
           for seed, problem in zip(seeds, problems)]
    rows.append({"target_density": target, "threshold": threshold,
                 "top_k_k": k, "hard_threshold": hard, "top_k": top,
                 "overflow": {str(m): overflow_fraction(
                     threshold_runs, max(1, round(m * target * size)))
                              for m in CAPACITY_MULTIPLES}})
  return {"problem": name, "d": size, "steps": steps, "lr": lr,
          "workers": problems[0].workers, "seeds": list(seeds),
          "rows": rows}


def _stat(runs, key):
  values = np.asarray([r[key] for r in runs])
  return values.mean(), values.std()


def plot(results: list, path: str, dpi: int = 80) -> None:
  with common.figure(path, dpi=dpi, nrows=len(results), ncols=2,
                     figsize=(10, 3.6 * len(results)),
                     squeeze=False) as (_, axes):
    for (left, right), result in zip(axes, results):
      for method, style in (("hard_threshold", "o-"), ("top_k", "s--")):
        for ax, key in ((left, "total_error"), (right, "final")):
          xs = [_stat(r[method], "bytes")[0] / 1e6 for r in result["rows"]]
          stats = [_stat(r[method], key) for r in result["rows"]]
          ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats],
                      fmt=style, capsize=3, label=method)
      left.set_yscale("log")
      left.set_ylabel(r"total error $\sum_t \|a_t - s_t\|^2$")
      right.set_ylabel("final test accuracy"
                       if result["problem"] == "digits MLP"
                       else r"final $\log_{10}\|x - x^*\|^2$")
      for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("MB sent per worker (values + indices)")
        ax.set_title(f"{result['problem']}, {result['workers']} workers",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)


def main(argv=None) -> list:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  results = [compare(name, range(args.seeds)) for name in PROBLEMS]
  for result in results:
    print(result["problem"])
    print(f"{'target':>8}{'density':>9}{'HT error':>12}{'TopK error':>12}"
          f"{'HT MB':>8}{'TopK MB':>8}{'HT final':>10}{'TopK final':>11}")
    for row in result["rows"]:
      h = {k: _stat(row["hard_threshold"], k)[0]
           for k in ("density", "total_error", "bytes", "final")}
      t = {k: _stat(row["top_k"], k)[0]
           for k in ("total_error", "bytes", "final")}
      print(f"{row['target_density']:>8}{h['density']:>9.4f}"
            f"{h['total_error']:>12.4g}{t['total_error']:>12.4g}"
            f"{h['bytes'] / 1e6:>8.3f}{t['bytes'] / 1e6:>8.3f}"
            f"{h['final']:>10.3f}{t['final']:>11.3f}")
  if args.out:
    common.write_outputs(args.out, results, "hard_threshold.json",
                         {"hard_threshold.png": lambda p: plot(results, p)})
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
