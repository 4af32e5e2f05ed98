"""RegTop-k vs Top-k on heterogeneous distributed linear regression.

From "Regularized Top-k: A Bayesian Framework for Gradient Sparsification"
(Bereyhi et al., arXiv 2501.05633; reference code `LinearRegression.py`;
the rule: docs/algorithms.md, RegTop-k): 20 workers,
``d = 100``, 500 samples each, drawn around a different ground truth per
worker (``x_i = m_i 1 + N(0, I)``, ``m_i ~ N(0, 5)``), so the workers'
gradients disagree even at the optimum ``x*`` (the least-squares solution
over everyone's data) and cancel in the aggregate. Each worker computes its
full-batch MSE gradient, `gsparse_jax.sparsify` compresses it (error
feedback) and averages, and SGD (lr 0.01) moves the shared model.

The workers are simulated with ``jax.vmap(axis_name="workers")`` and the
whole run of each method is one jitted `lax.scan`. Methods: dense SGD,
Top-k, RegTop-k, hard-threshold (``lambda`` calibrated to the same density on
the first gradients, capacity = Top-k's budget) and Gaussian-k, all with EF.

Run:
  python examples/regtopk_linear_regression.py --out /tmp/regtopk_lr
  python examples/regtopk_linear_regression.py --sweep --out /tmp/regtopk_lr
  python examples/regtopk_linear_regression.py --reject-sweep --out DIR

Writes ``results.json`` (``{"method": {"final_log10_dist": ...,
"rounds_to_1e-2": ..., "curve": [log10 ||x_t - x*||^2 for t = 0..rounds]}}``)
and ``distance.png``; ``--sweep`` also writes ``sweep.json`` and
``sweep.png`` (final distance vs ratio for Top-k and RegTop-k at each mu);
``--reject-sweep`` writes ``reject_sweep.json`` and ``reject_sweep.png``
(Top-k, RegTop-k and RegTop-k with the rejection, ratios 0.3-0.7,
``--seeds`` seeds, float32 and float64).

``--reject-steps`` applies the reference script's rule to RegTop-k, as the
script does (not to the other methods): a step whose squared displacement
is at least ``--reject-factor`` (100) times the last accepted one is undone
(the error memories keep what was sent).

What to expect (5 seeds, 2500 rounds; docs/reproductions.md has the
tables): dense SGD reaches float32 precision (log10 distance -9.9); every
compressed method stalls at a plateau after ~300 rounds. RegTop-k (mu 4)
matches Top-k at ratio 0.3, is 0.3 decades lower at 0.4 (-2.7 vs -2.4, no
convergence) and 2 decades lower at 0.5 (-4.6 vs -2.6). At 0.6-0.7 it sits
near -7.5 but bursts back to about -3.5; the rejection rule never fires up
to 0.5, and at 0.6-0.7 it undoes 24-69% of the steps and freezes the
iterate at about -10 (float32) or -11 to -12 (float64).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import gsparse_jax as gs

AXIS = "workers"
# The reference's first bound on the squared displacement (then 100x the
# last accepted displacement).
FIRST_DISPLACEMENT_BOUND = 1e5


def make_data(workers: int, dim: int, samples: int, seed: int,
              dtype=np.float32):
  """Heterogeneous least squares: ``(A [n, m, d], y [n, m], x*, x0)``.

  ``x*`` is solved in float64 and returned so; the rest is in ``dtype``.
  """
  rng = np.random.default_rng(seed)
  means = math.sqrt(5.0) * rng.standard_normal(workers)  # m_i ~ N(0, 5)
  truths = means[:, None] + rng.standard_normal((workers, dim))
  a = rng.standard_normal((workers, samples, dim))
  noise = math.sqrt(0.5) * rng.standard_normal((workers, samples))
  y = np.einsum("nmd,nd->nm", a, truths) + noise
  x_star = np.linalg.lstsq(a.reshape(-1, dim), y.reshape(-1), rcond=None)[0]
  # torch.nn.Linear's default init, as in the reference script.
  bound = 1.0 / math.sqrt(dim)
  x0 = rng.uniform(-bound, bound, dim)
  cast = lambda v: np.asarray(v, dtype)
  return cast(a), cast(y), x_star, cast(x0)


def mse_grad(x, a, y):
  """Full-batch gradient of ``mean((A x - y)^2)``: ``(2/m) A^T (A x - y)``."""
  return (2.0 / a.shape[0]) * (a.T @ (a @ x - y))


def gram_form(data):
  """``(G, b, x*, x0)`` with ``G = (2/m) A^T A``, ``b = (2/m) A^T y`` per
  worker, so that `gram_grad` is `mse_grad` at a tenth of the work (the
  same gradient; rounding differs, so use it where rounding is not what is
  studied: float64)."""
  a, y, x_star, x0 = data
  scale = 2.0 / a.shape[1]
  gram = scale * np.einsum("nmd,nme->nde", a, a)
  return gram.astype(a.dtype), (scale * np.einsum("nmd,nm->nd", a, y)
                                ).astype(a.dtype), x_star, x0


def gram_grad(x, gram, b):
  """`mse_grad` from `gram_form`'s ``(G, b)``: ``G x - b``."""
  return gram @ x - b


def trajectory_fn(compressor: gs.Compressor, *, rounds: int, lr: float,
                  feedback: str = "ef",
                  reject_factor: Optional[float] = None, grad_fn=mse_grad):
  """``train(x0, a, y, x_star) -> (curve, opt_state, rejected)`` (jittable).

  The whole run of one method as one `lax.scan`, in the dtype of ``x0``.
  ``curve`` holds ``log10 ||x_t - x*||^2`` for ``t = 0..rounds``;
  ``rejected`` counts the steps undone by the rejection rule (the reference
  script's: a step whose squared displacement is at least ``reject_factor``
  times the last accepted one is not applied; what was sent stays sent).
  ``grad_fn(x, a, y)`` is each worker's gradient (`mse_grad` or
  `gram_grad` on `gram_form` data).
  """
  tx = optax.chain(gs.sparsify(compressor, feedback=feedback, axis_name=AXIS),
                   optax.sgd(lr))

  def train(x0, a, y, x_star):
    workers = a.shape[0]
    x_star = x_star.astype(x0.dtype)
    log_dist = lambda x: jnp.log10(jnp.sum((x - x_star) ** 2))
    opt_state = jax.vmap(lambda _: tx.init(x0))(jnp.arange(workers))

    def step(carry, _):
      x, opt_state, bound, rejected = carry
      grads = jax.vmap(grad_fn, (None, 0, 0))(x, a, y)
      updates, opt_state = jax.vmap(tx.update, axis_name=AXIS)(
          grads, opt_state)
      step_vec = updates[0]  # the aggregate is identical on every worker
      if reject_factor is None:
        x = x + step_vec
      else:
        displacement = jnp.sum(step_vec ** 2)
        accept = displacement < bound
        x = jnp.where(accept, x + step_vec, x)
        bound = jnp.where(accept, reject_factor * displacement, bound)
        rejected = rejected + (1 - accept.astype(jnp.int32))
      return (x, opt_state, bound, rejected), log_dist(x)

    carry = (x0, opt_state, jnp.asarray(FIRST_DISPLACEMENT_BOUND, x0.dtype),
             jnp.zeros([], jnp.int32))
    (_, opt_state, _, rejected), curve = jax.lax.scan(
        step, carry, None, length=rounds)
    return jnp.concatenate([log_dist(x0)[None], curve]), opt_state, rejected

  return train


def run_method(compressor: gs.Compressor, a, y, x_star, x0, *, rounds: int,
               lr: float, feedback: str = "ef", reject_factor: Optional[float]
               = None) -> dict:
  """One method's whole run (one jitted `lax.scan`).

  Returns:
    ``{"curve": log10 ||x_t - x*||^2 for t = 0..rounds, "comm": comm_stats,
    "rejected": steps undone by the rejection rule}``.
  """
  train = jax.jit(trajectory_fn(compressor, rounds=rounds, lr=lr,
                                feedback=feedback,
                                reject_factor=reject_factor))
  curve, opt_state, rejected = train(*map(jnp.asarray, (x0, a, y, x_star)))
  curve = np.asarray(curve, np.float64)
  stats = gs.comm_stats(opt_state)
  return {"curve": curve, "density": stats["density"],
          "overflow_values": stats["overflow_values"],
          "rejected": int(rejected)}


def run_seeds(compressor: gs.Compressor, datasets, *, rounds: int, lr: float,
              reject_factor: Optional[float] = None,
              grad_fn=mse_grad) -> dict:
  """One method on several datasets at once (seeds batched with `vmap`).

  Args:
    compressor: the compressor (with error feedback).
    datasets: a list of `make_data` (or `gram_form`) results of equal
      shapes and dtype.
    rounds, lr, reject_factor, grad_fn: as in `trajectory_fn`.

  Returns:
    ``{"curves": [seeds, rounds + 1], "rejected": [seeds]}`` (NumPy).
  """
  train = trajectory_fn(compressor, rounds=rounds, lr=lr,
                        reject_factor=reject_factor, grad_fn=grad_fn)
  stacked = [jnp.asarray(np.stack(parts)) for parts in zip(*datasets)]
  a, y, x_star, x0 = stacked
  curves, _, rejected = jax.jit(jax.vmap(train))(x0, a, y, x_star)
  return {"curves": np.asarray(curves, np.float64),
          "rejected": np.asarray(rejected)}


def rounds_to_fraction(curve: np.ndarray, fraction: float = 1e-2
                       ) -> Optional[int]:
  """First round whose distance is ``<= fraction`` of the initial one."""
  hits = np.nonzero(curve <= curve[0] + math.log10(fraction))[0]
  return int(hits[0]) if hits.size else None


def methods_for(ratio: float, mu: float, threshold: float
                ) -> dict[str, tuple[gs.Compressor, str]]:
  return {
      "dense": (gs.dense(), "none"),
      "top_k": (gs.top_k(ratio), "ef"),
      "reg_top_k": (gs.reg_top_k(ratio, mu=mu), "ef"),
      "hard_threshold": (gs.hard_threshold(threshold, capacity_ratio=ratio),
                         "ef"),
      "gaussian_k": (gs.gaussian_k(ratio), "ef"),
  }


def compare(args, data) -> dict:
  a, y, x_star, x0 = data
  # lambda: the density `ratio` on the workers' first gradients.
  threshold = gs.calibrate_threshold(
      np.asarray(jax.vmap(mse_grad, (None, 0, 0))(x0, a, y)), args.ratio)
  results = {}
  for name, (compressor, feedback) in methods_for(
      args.ratio, args.mu, threshold).items():
    # The reference script rejects RegTop-k's steps only.
    reject = (args.reject_factor if args.reject_steps and name == "reg_top_k"
              else None)
    run = run_method(compressor, a, y, x_star, x0, rounds=args.rounds,
                     lr=args.lr, feedback=feedback, reject_factor=reject)
    results[name] = {
        "final_log10_dist": float(run["curve"][-1]),
        "rounds_to_1e-2": rounds_to_fraction(run["curve"]),
        "density": run["density"],
        "overflow_values": run["overflow_values"],
        "rejected_steps": run["rejected"],
        "curve": run["curve"].tolist(),
    }
  results["hard_threshold"]["threshold"] = threshold
  return results


def print_table(results: dict) -> None:
  print(f"{'method':<16}{'final log10 dist':>18}{'rounds to 1e-2':>16}"
        f"{'density':>10}{'overflow/step':>15}{'rejected':>10}")
  rounds = len(next(iter(results.values()))["curve"]) - 1
  for name, r in results.items():
    reach = r["rounds_to_1e-2"]
    print(f"{name:<16}{r['final_log10_dist']:>18.3f}"
          f"{'never' if reach is None else reach:>16}{r['density']:>10.3f}"
          f"{r['overflow_values'] / rounds:>15.2f}{r['rejected_steps']:>10}")


def sweep(args, data) -> dict:
  """Final distance of Top-k and RegTop-k (several mu) for ratios 0.1-0.5."""
  a, y, x_star, x0 = data
  reject = args.reject_factor if args.reject_steps else None
  final = lambda c, reject=None: float(run_method(
      c, a, y, x_star, x0, rounds=args.rounds, lr=args.lr,
      reject_factor=reject)["curve"][-1])
  ratios = [float(r) for r in args.sweep_ratios]
  mus = [float(m) for m in args.sweep_mus]
  result = {"ratios": ratios, "mus": mus,
            "top_k": [final(gs.top_k(r)) for r in ratios],
            "reg_top_k": {str(mu): [final(gs.reg_top_k(r, mu=mu), reject)
                                    for r in ratios] for mu in mus}}
  print("final log10 ||x - x*||^2")
  print(f"{'ratio':>7}{'top_k':>9}" + "".join(f"{'mu=' + str(m):>9}"
                                              for m in mus))
  for i, r in enumerate(ratios):
    print(f"{r:>7.2f}{result['top_k'][i]:>9.2f}" + "".join(
        f"{result['reg_top_k'][str(m)][i]:>9.2f}" for m in mus))
  return result


REJECT_METHODS = ("top_k", "reg_top_k", "reg_top_k+reject")


def reject_study(*, ratios, seeds, dtypes=("float32", "float64"),
                 rounds: int = 2500, lr: float = 0.01, mu: float = 4.0,
                 reject_factor: float = 100.0, workers: int = 20,
                 dim: int = 100, samples: int = 500,
                 curve_every: int = 5) -> dict:
  """Top-k, RegTop-k and RegTop-k with the step rejection, per ratio.

  Every seed draws its own data. float32 runs the reference's computation
  (residual form); float64 enables JAX's 64-bit mode for the data, the
  gradients and the iterate (`gram_form`: the same gradient, a tenth of
  the work). The library keeps the error memory and the payload in float32
  in both.

  Returns:
    ``{"ratios", "seeds", "rounds", dtype: {method: [per ratio: {"final",
    "best", "tail_max", "rejected_fraction": [seeds], "curve": seed 0's
    curve every ``curve_every`` rounds}]}}``.
  """
  result = {"ratios": list(ratios), "seeds": list(seeds), "rounds": rounds,
            "mu": mu, "reject_factor": reject_factor,
            "curve_every": curve_every}
  tail = max(1, rounds // 5)
  for dtype in dtypes:
    wide = np.dtype(dtype) == np.float64
    with jax.enable_x64(wide):
      datasets = [make_data(workers, dim, samples, seed, np.dtype(dtype))
                  for seed in seeds]
      grad_fn = mse_grad
      if wide:
        datasets, grad_fn = [gram_form(d) for d in datasets], gram_grad
      rows = {name: [] for name in REJECT_METHODS}
      for ratio in ratios:
        for name in REJECT_METHODS:
          compressor = (gs.top_k(ratio) if name == "top_k"
                        else gs.reg_top_k(ratio, mu=mu))
          run = run_seeds(compressor, datasets, rounds=rounds, lr=lr,
                          reject_factor=(reject_factor if "reject" in name
                                         else None), grad_fn=grad_fn)
          curves = run["curves"]
          rows[name].append({
              "final": curves[:, -1].tolist(),
              "best": curves.min(1).tolist(),
              "tail_max": curves[:, -tail:].max(1).tolist(),
              "rejected_fraction": (run["rejected"] / rounds).tolist(),
              "curve": curves[0, ::curve_every].tolist()})
    result[dtype] = rows
  return result


def print_reject_study(result: dict) -> None:
  for dtype in (d for d in ("float32", "float64") if d in result):
    print(f"{dtype}: final log10 ||x - x*||^2, mean (min..max) over "
          f"{len(result['seeds'])} seeds; rejected fraction")
    print(f"{'ratio':>6}" + "".join(f"{m:>26}" for m in REJECT_METHODS)
          + f"{'rejected':>10}")
    for i, ratio in enumerate(result["ratios"]):
      cells = []
      for name in REJECT_METHODS:
        final = np.asarray(result[dtype][name][i]["final"])
        cells.append(f"{final.mean():>8.2f} ({final.min():.2f}.."
                     f"{final.max():.2f})")
      rejected = np.mean(result[dtype]["reg_top_k+reject"][i][
          "rejected_fraction"])
      print(f"{ratio:>6.2f}" + "".join(f"{c:>26}" for c in cells)
            + f"{rejected:>10.2f}")


def plot_reject_study(result: dict, path: str, dpi: int = 80) -> None:
  """Final distance vs ratio (mean, min-max bars), one panel per dtype."""
  dtypes = [d for d in ("float32", "float64") if d in result]
  styles = {"top_k": dict(fmt="o-", color="k"),
            "reg_top_k": dict(fmt="s-", color="tab:blue"),
            "reg_top_k+reject": dict(fmt="^--", color="tab:orange")}
  ratios = np.asarray(result["ratios"])
  with common.figure(path, dpi=dpi, nrows=1, ncols=len(dtypes),
                     figsize=(5 * len(dtypes), 4), sharey=True,
                     squeeze=False) as (_, axes):
    for ax, dtype in zip(axes[0], dtypes):
      for j, name in enumerate(REJECT_METHODS):
        finals = np.asarray([r["final"] for r in result[dtype][name]])
        mean = finals.mean(1)
        shift = (j - 1) * 0.008  # keep the bars apart
        ax.errorbar(ratios + shift, mean,
                    yerr=[mean - finals.min(1), finals.max(1) - mean],
                    capsize=3, label=name, **styles[name])
      worst = np.asarray([r["tail_max"] for r in result[dtype]["reg_top_k"]])
      ax.plot(ratios, worst.max(1), ":", color="tab:blue",
              label="reg_top_k worst of last 20%")
      for ratio, row in zip(ratios, result[dtype]["reg_top_k+reject"]):
        ax.annotate(f"{np.mean(row['rejected_fraction']):.0%}",
                    (ratio, np.mean(row["final"])), fontsize=7,
                    color="tab:orange", textcoords="offset points",
                    xytext=(4, -10))
      ax.set_title(f"{dtype}: final distance ({len(result['seeds'])} seeds;"
                   " % = steps rejected)", fontsize=9)
      ax.set_xlabel("ratio k/d")
      ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(r"final $\log_{10}\|x - x^*\|^2$")
    axes[0][0].legend(fontsize=7)


def plot_reject_curves(result: dict, ratio: float, path: str,
                       dpi: int = 80) -> None:
  """Seed 0's curves at one ratio, one panel per dtype."""
  dtypes = [d for d in ("float32", "float64") if d in result]
  i = result["ratios"].index(ratio)
  with common.figure(path, dpi=dpi, nrows=1, ncols=len(dtypes),
                     figsize=(5 * len(dtypes), 3.6), sharey=True,
                     squeeze=False) as (_, axes):
    for ax, dtype in zip(axes[0], dtypes):
      for name in REJECT_METHODS:
        curve = result[dtype][name][i]["curve"]
        ax.plot(np.arange(len(curve)) * result["curve_every"], curve,
                label=name, linewidth=1)
      ax.set_title(f"{dtype}, ratio {ratio}, seed {result['seeds'][0]}",
                   fontsize=9)
      ax.set_xlabel("round")
      ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(r"$\log_{10}\|x_t - x^*\|^2$")
    axes[0][0].legend(fontsize=7)


def plot_curves(results: dict, path: str, title: str) -> None:
  with common.figure(path, figsize=(7, 4.5)) as (_, ax):
    for name, r in results.items():
      ax.plot(r["curve"], label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(r"$\log_{10}\|x_t - x^*\|^2$")
    ax.set_title(title)
    ax.legend()


def plot_sweep(result: dict, path: str) -> None:
  with common.figure(path, figsize=(6, 4.5)) as (_, ax):
    ax.plot(result["ratios"], result["top_k"], "o-k", label="Top-k")
    for mu, finals in result["reg_top_k"].items():
      ax.plot(result["ratios"], finals, "s--", label=f"RegTop-k mu={mu}")
    ax.set_xlabel("ratio k/d")
    ax.set_ylabel(r"final $\log_{10}\|x - x^*\|^2$")
    ax.legend()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2500)
  parser.add_argument("--ratio", type=float, default=0.4)
  parser.add_argument("--mu", type=float, default=4.0)
  parser.add_argument("--workers", type=int, default=20)
  parser.add_argument("--dim", type=int, default=100)
  parser.add_argument("--samples", type=int, default=500)
  parser.add_argument("--lr", type=float, default=0.01)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reject-steps", action="store_true",
                      help="undo steps >= reject-factor x the last accepted "
                      "squared displacement (the reference script's rule)")
  parser.add_argument("--reject-factor", type=float, default=100.0)
  parser.add_argument("--sweep", action="store_true",
                      help="also sweep ratio and mu (Top-k vs RegTop-k)")
  parser.add_argument("--sweep-ratios", nargs="+",
                      default=["0.1", "0.2", "0.3", "0.4", "0.5"])
  parser.add_argument("--sweep-mus", nargs="+", default=["1", "4", "16"])
  parser.add_argument("--reject-sweep", action="store_true",
                      help="also run Top-k, RegTop-k and RegTop-k with the "
                      "step rejection over --reject-ratios, --seeds seeds, "
                      "float32 and float64")
  parser.add_argument("--reject-ratios", nargs="+",
                      default=["0.3", "0.4", "0.5", "0.6", "0.7"])
  parser.add_argument("--seeds", type=int, default=5,
                      help="seeds of --reject-sweep (0..N-1)")
  parser.add_argument("--out", default=None,
                      help="directory for results.json and the plots")
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)

  data = make_data(args.workers, args.dim, args.samples, args.seed)
  start = time.perf_counter()
  results = compare(args, data)
  print(f"{args.workers} workers, d={args.dim}, ratio={args.ratio}, "
        f"mu={args.mu}, {args.rounds} rounds, reject_steps="
        f"{args.reject_steps}")
  print_table(results)
  print(f"({time.perf_counter() - start:.1f} s)")
  sweep_result = None
  if args.sweep:
    start = time.perf_counter()
    sweep_result = sweep(args, data)
    print(f"(sweep {time.perf_counter() - start:.1f} s)")
  reject_result = None
  if args.reject_sweep:
    start = time.perf_counter()
    reject_result = reject_study(
        ratios=[float(r) for r in args.reject_ratios],
        seeds=range(args.seeds), rounds=args.rounds, lr=args.lr, mu=args.mu,
        reject_factor=args.reject_factor, workers=args.workers,
        dim=args.dim, samples=args.samples)
    print_reject_study(reject_result)
    print(f"(reject sweep {time.perf_counter() - start:.1f} s)")

  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f)
    if not args.no_plot:
      plot_curves(results, os.path.join(args.out, "distance.png"),
                  f"{args.workers} workers, ratio {args.ratio}, mu {args.mu}")
    if sweep_result is not None:
      with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(sweep_result, f)
      if not args.no_plot:
        plot_sweep(sweep_result, os.path.join(args.out, "sweep.png"))
    if reject_result is not None:
      with open(os.path.join(args.out, "reject_sweep.json"), "w") as f:
        json.dump(reject_result, f)
      if not args.no_plot:
        plot_reject_study(reject_result,
                          os.path.join(args.out, "reject_sweep.png"))
  return {"results": results, "sweep": sweep_result,
          "reject_sweep": reject_result}


if __name__ == "__main__":
  main(sys.argv[1:])
