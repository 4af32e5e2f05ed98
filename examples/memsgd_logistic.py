"""Mem-SGD: sparsified SGD with memory converges at the rate of SGD.

Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory" (arXiv 1809.07599):
with error memory, SGD whose update is compressed to ``k`` of ``d`` entries
(Top-k or Rand-k) converges at the same rate as plain SGD, the compression
adding only a delay term of order ``d/k``. Their experiments: L2-regularized
logistic regression on epsilon and RCV1, one sample per step.

Setup here: a synthetic epsilon-like problem (``n`` unit-norm dense samples
in ``d`` dimensions, labels from a random linear teacher with 10% flipped),
``lambda = 1/n``, one sample per step, and the paper's form of the memory
(the step size is applied BEFORE compression):

    v_t = C(m_t + eta_t g_t);  m_{t+1} = m_t + eta_t g_t - v_t;  x -= v_t

which is `optax.scale_by_schedule(eta)` then `gs.sparsify(C, feedback="ef")`.
``eta_t = eta_0 / (1 + t / t_0)``; the same for every method. The
suboptimality ``f(x_t) - f*`` is tracked (``f*`` by L-BFGS in float64).

Run:  python examples/memsgd_logistic.py [--seeds 5] [--out DIR]
Writes ``memsgd.json`` and ``memsgd.png``.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

import common
import gsparse_jax as gs


def make_data(seed: int, samples: int, dim: int):
  """Unit-norm Gaussian samples, labels +-1 of a teacher, 10% flipped."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((samples, dim))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y = np.sign(x @ rng.standard_normal(dim))
  y[rng.random(samples) < 0.1] *= -1
  return x.astype(np.float32), y.astype(np.float32)


def objective(w, x, y, reg):
  """``mean log(1 + exp(-y x.w)) + reg/2 ||w||^2`` (NumPy or JAX arrays)."""
  margins = y * (x @ w)
  return jnp.mean(jnp.logaddexp(0.0, -margins)) + 0.5 * reg * jnp.sum(w * w)


def optimum(x, y, reg) -> float:
  """``f*`` by L-BFGS in float64."""
  x, y = x.astype(np.float64), y.astype(np.float64)

  def value_and_grad(w):
    margins = y * (x @ w)
    value = np.mean(np.logaddexp(0.0, -margins)) + 0.5 * reg * w @ w
    weights = -y * np.exp(-np.logaddexp(0.0, margins))  # -y sigmoid(-m)
    return value, x.T @ weights / len(y) + reg * w

  result = optimize.minimize(value_and_grad, np.zeros(x.shape[1]), jac=True,
                             method="L-BFGS-B",
                             options={"gtol": 1e-12, "ftol": 1e-15,
                                      "maxiter": 10_000})
  return float(result.fun)


COMPRESSORS = {"top_k": lambda k, dim: gs.top_k(k=k),
               "rand_k": lambda k, dim: gs.rand_k(k / dim)}


def methods(dim: int, ratios, kinds=tuple(COMPRESSORS)) -> dict:
  """``{name: (compressor, feedback)}``: SGD, then per ratio each kind with
  memory, and (at the first ratio) without it."""
  table = {"sgd": (gs.dense(), "none")}
  for i, ratio in enumerate(ratios):
    k = max(1, round(ratio * dim))
    for kind in kinds:
      table[f"{kind}+mem k={k}"] = (COMPRESSORS[kind](k, dim), "ef")
    if i == 0:
      for kind in kinds:
        table[f"{kind} no mem k={k}"] = (COMPRESSORS[kind](k, dim), "none")
  return table


@functools.lru_cache(maxsize=None)
def _trainer(compressor, feedback, steps: int, eval_every: int, eta0: float,
             t0: float, reg: float):
  schedule = lambda t: eta0 / (1.0 + t.astype(jnp.float32) / t0)
  tx = optax.chain(optax.scale_by_schedule(schedule),
                   gs.sparsify(compressor, feedback=feedback),
                   optax.scale(-1.0))
  loss = lambda w, xi, yi: objective(w, xi[None], yi[None], reg)

  @jax.jit
  def train(x, y, key):
    w = jnp.zeros(x.shape[1], jnp.float32)

    def one(carry, key):
      w, state = carry
      i = jax.random.randint(key, (), 0, x.shape[0])
      updates, state = tx.update(jax.grad(loss)(w, x[i], y[i]), state, w)
      return (optax.apply_updates(w, updates), state), None

    def chunk(carry, key):
      carry, _ = jax.lax.scan(one, carry, jax.random.split(key, eval_every))
      return carry, objective(carry[0], x, y, reg)

    _, values = jax.lax.scan(chunk, (w, tx.init(w)),
                             jax.random.split(key, steps // eval_every))
    return values

  return train


def run(*, seeds, samples: int = 5000, dim: int = 1000, steps: int = 30000,
        eval_every: int = 500, eta0: float = 2.0, t0: float = 1000.0,
        ratios=(0.01, 0.001), kinds=tuple(COMPRESSORS)) -> dict:
  """Every method on every seed; suboptimality curves ``[seeds, evals]``."""
  reg = 1.0 / samples
  table = methods(dim, ratios, kinds)
  curves = {name: [] for name in table}
  for seed in seeds:
    x, y = make_data(seed, samples, dim)
    best = optimum(x, y, reg)
    for name, (compressor, feedback) in table.items():
      train = _trainer(compressor, feedback, steps, eval_every, eta0, t0, reg)
      values = np.asarray(train(jnp.asarray(x), jnp.asarray(y),
                                jax.random.key(seed)), np.float64)
      curves[name].append((values - best).tolist())
  return {"config": {"samples": samples, "dim": dim, "steps": steps,
                     "eval_every": eval_every, "eta0": eta0, "t0": t0,
                     "reg": reg, "ratios": list(ratios),
                     "seeds": list(seeds)},
          "suboptimality": curves}


def plot(result: dict, path: str, dpi: int = 80) -> None:
  config = result["config"]
  steps = np.arange(1, config["steps"] // config["eval_every"] + 1) * config[
      "eval_every"]
  with common.figure(path, dpi=dpi, figsize=(7, 4.2)) as (_, ax):
    for name, runs in result["suboptimality"].items():
      runs = np.maximum(np.asarray(runs), 1e-12)
      style = ("k-" if name == "sgd" else ":" if "no mem" in name else "-")
      line, = ax.loglog(steps, runs.mean(0), style, label=name)
      ax.fill_between(steps, runs.min(0), runs.max(0), alpha=0.15,
                      color=line.get_color())
    ax.set_xlabel("step (one sample each)")
    ax.set_ylabel(r"$f(x_t) - f^*$")
    ax.set_title(f"logistic regression, d = {config['dim']}, "
                 f"n = {config['samples']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=30000)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  result = run(seeds=range(args.seeds), steps=args.steps)
  print(f"{'method':<22}{'final f - f*':>14}{'spread':>10}")
  for name, runs in result["suboptimality"].items():
    final = np.asarray(runs)[:, -1]
    print(f"{name:<22}{final.mean():>14.3e}{final.std():>10.1e}")
  if args.out:
    common.write_outputs(args.out, result, "memsgd.json",
                         {"memsgd.png": lambda p: plot(result, p)})
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
