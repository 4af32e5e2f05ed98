"""Gaussian-k on real gradients: achieved density, recall, selection time.

Shi, Chu, Cheung, See, "Understanding Top-k sparsification in distributed
deep learning" (arXiv 1911.08772) propose Gaussian-k: a threshold from a
normal fit of the accumulated gradient instead of an exact Top-k, cheap on
GPUs. This study measures, on the digits MLP (8 workers, error feedback,
SGD; `probe_training`), every step of training:

* the density the rule passes (``#{|a| > tau} / d``) and the density sent
  (at most the capacity, `gs.gaussian_k`'s default ``2k``);
* the recall of what worker 0 sends against the exact Top-k of the same
  accumulated vector;
* the final test accuracy, against Top-k with error feedback at the same k;

and, in one run, the time of Gaussian-k's selection against the exact
kernels (`gs.top_k` with ``method="sort"`` and ``"threshold"``).

Run:  python examples/gaussiank_study.py [--seeds 5] [--steps 300] [--out DIR]
Writes ``gaussiank.json`` and ``gaussiank_recall.png``,
``gaussiank_time.png``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import common
import gsparse_jax as gs
import probe_training

# benchmarks/ sits next to examples/ in the repository.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _common as bench  # noqa: E402


@functools.lru_cache(maxsize=None)
def passing_count(compressor):
  """``a -> #{|a| > tau}``: what the Gaussian-k rule passes, uncapped."""
  return lambda a: jnp.sum(jnp.abs(a) > compressor.threshold(a))


def synthetic_vectors(size: int, seed: int) -> dict:
  """Normal, Student-t(2) and 90%-zero (normal elsewhere) float32 vectors."""
  rng = np.random.default_rng(seed)
  vectors = {"normal": rng.normal(size=size),
             "student-t(2)": rng.standard_t(2, size=size),
             "90% zeros": rng.normal(size=size) * (rng.random(size) < 0.1)}
  return {name: v.astype(np.float32) for name, v in vectors.items()}


def count_study(sizes, ratios, draws: int) -> list:
  """What the rule passes, in units of k, on synthetic vectors.

  Returns:
    rows ``{"d", "ratio", "k", "capacity", "vector", "counts": [draws]}``
    (each count ``#{|a| > tau} / k``).
  """
  rows = []
  for size in sizes:
    for ratio in ratios:
      compressor = gs.gaussian_k(ratio)
      count = jax.jit(passing_count(compressor))
      k = compressor.budget(size)
      per_vector = {}
      for draw in range(draws):
        for name, x in synthetic_vectors(size, draw).items():
          per_vector.setdefault(name, []).append(int(count(x)) / k)
      rows.extend({"d": size, "ratio": ratio, "k": k,
                   "capacity": compressor.capacity(size), "vector": name,
                   "counts": counts} for name, counts in per_vector.items())
  return rows


def recall_study(ratios, seeds, *, steps: int, lr: float = 0.1) -> dict:
  """Gaussian-k and Top-k trainings per ratio; the per-step probes."""
  result = {}
  for ratio in ratios:
    rows = {"gaussian_k": [], "top_k": []}
    for seed in seeds:
      problem = probe_training.digits_problem(seed)
      size = problem.x0.shape[0]
      gaussian = gs.gaussian_k(ratio)
      k = gaussian.budget(size)
      rows["gaussian_k"].append(probe_training.ef_trajectory(
          problem, gaussian, steps=steps, lr=lr, seed=seed,
          rule=passing_count(gaussian), probe_k=k))
      rows["top_k"].append(probe_training.ef_trajectory(
          problem, gs.top_k(k=k), steps=steps, lr=lr, seed=seed))
    g = rows["gaussian_k"]
    result[str(ratio)] = {
        "d": size, "k": k, "capacity": gs.gaussian_k(ratio).capacity(size),
        # [seeds, steps], averaged over workers
        "passed_density": [(r["passed"].mean(1) / size).tolist() for r in g],
        "sent_density": [(r["sent"].mean(1) / size).tolist() for r in g],
        "recall": [r["recall"].tolist() for r in g],
        "accuracy": {name: [float(r["eval"][-1]) for r in runs]
                     for name, runs in rows.items()},
        # fraction of worker-steps whose passing set did not fit
        "overflow_steps": [float(np.mean(r["passed"] > r["sent"]))
                           for r in g],
    }
  return result


def timing_study(vectors: dict, ratios, repeats: int = 7) -> list:
  """Selection time of Gaussian-k vs the exact kernels, interleaved."""
  rows = []
  for name, x in vectors.items():
    size = x.shape[0]
    for ratio in ratios:
      candidates = {
          "gaussian_k": gs.gaussian_k(ratio),
          "top_k sort": gs.top_k(ratio, method="sort"),
          "top_k threshold": gs.top_k(ratio, method="threshold"),
      }
      fns = {}
      for label, c in candidates.items():
        select = jax.jit(functools.partial(
            gs.compress, c, state=c.init(size), key=jax.random.key(0)))
        fns[label] = functools.partial(select, x)
      seconds = bench.time_interleaved(fns, repeats=repeats)
      rows.append({"vector": name, "d": size, "ratio": ratio,
                   "seconds": seconds})
  return rows


def timing_vectors(seed: int = 0, sizes=(10**6, 10**7)) -> dict:
  """A digits-MLP gradient (d = 26,122) and normal vectors of ``sizes``."""
  problem = probe_training.digits_problem(seed)
  mlp = problem.grads(problem.x0, problem.data, jax.random.key(seed))[0]
  vectors = {"digits MLP gradient": mlp}
  for size in sizes:
    vectors[f"normal, d={size:.0e}"] = jax.random.normal(
        jax.random.key(seed), (size,), jnp.float32)
  return vectors


def band(ax, steps, runs, label, **style):
  """Mean over seeds with a min-max band."""
  runs = np.asarray(runs)
  line, = ax.plot(steps, runs.mean(0), label=label, **style)
  ax.fill_between(steps, runs.min(0), runs.max(0), alpha=0.2,
                  color=line.get_color())


def plot_recall(result: dict, path: str, dpi: int = 80) -> None:
  ratios = list(result)
  with common.figure(path, dpi=dpi, nrows=1, ncols=2,
                     figsize=(10, 3.8)) as (_, (left, right)):
    for ratio in ratios:
      r = result[ratio]
      steps = np.arange(1, len(r["recall"][0]) + 1)
      band(left, steps, np.asarray(r["passed_density"]) / float(ratio),
           f"passes, ratio {ratio}")
      band(left, steps, np.asarray(r["sent_density"]) / float(ratio),
           f"sent (cap {r['capacity']}), ratio {ratio}", linestyle="--")
      band(right, steps, r["recall"], f"ratio {ratio}")
    left.axhline(1.0, color="k", linewidth=0.8)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("density / target ratio")
    left.legend(fontsize=7)
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("recall of exact Top-k (worker 0)")
    right.legend(fontsize=7)


def plot_timing(rows: list, path: str, dpi: int = 80) -> None:
  labels = [f"{r['vector']}\nratio {r['ratio']}" for r in rows]
  methods = list(rows[0]["seconds"])
  with common.figure(path, dpi=dpi, figsize=(8, 3.8)) as (_, ax):
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
      ax.bar(np.arange(len(rows)) + j * width,
             [r["seconds"][method] * 1e3 for r in rows], width, label=method)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(rows)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms per selection (median)")
    ax.legend(fontsize=8)


def run(*, seeds, steps: int, ratios=(0.001, 0.01), timing_sizes=(10**6,
                                                                  10**7),
        repeats: int = 7, count_sizes=(10**4, 10**6),
        count_ratios=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
        draws: int = 5) -> dict:
  """The three studies; ``timing_sizes=None`` skips the timing."""
  return {"counts": count_study(count_sizes, count_ratios, draws),
          "recall": recall_study(ratios, seeds, steps=steps),
          "timing": (timing_study(timing_vectors(sizes=timing_sizes), ratios,
                                  repeats) if timing_sizes is not None
                     else []),
          "machine": bench.machine_description()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  result = run(seeds=range(args.seeds), steps=args.steps)
  for ratio, r in result["recall"].items():
    print(f"ratio {ratio}: k = {r['k']} of {r['d']}, rule passes "
          f"{np.mean(r['passed_density']) / float(ratio):.2f}x target, sends "
          f"{np.mean(r['sent_density']) / float(ratio):.2f}x, recall "
          f"{np.mean(r['recall']):.3f}; accuracy gaussian_k "
          f"{np.mean(r['accuracy']['gaussian_k']):.3f} top_k "
          f"{np.mean(r['accuracy']['top_k']):.3f}")
  for row in result["timing"]:
    print(row["vector"], row["ratio"], {k: f"{v * 1e3:.2f} ms"
                                        for k, v in row["seconds"].items()})
  if args.out:
    plots = {"gaussiank_recall.png":
             lambda p: plot_recall(result["recall"], p)}
    if result["timing"]:
      plots["gaussiank_time.png"] = lambda p: plot_timing(result["timing"], p)
    common.write_outputs(args.out, result, "gaussiank.json", plots)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
