"""RegTop-k's motivating example: two workers whose big entries cancel.

From "Regularized Top-k: A Bayesian Framework for Gradient Sparsification"
(Bereyhi et al., arXiv 2501.05633; reference code `Toy_Example.py`): logistic
regression with two weights and two workers holding one sample each,
``x_1 = (100, 1)`` and ``x_2 = (-100, 1)``, both labelled 1, from
``w = (0, 1)``. Each worker may send ``k = 1`` entry per step (with error
feedback). The first coordinates of the two gradients are large and cancel
in the aggregate, so Top-k keeps sending them and the model does not move
until the bias entry's error memory outgrows them; RegTop-k (``mu = 1``)
sees the cancellation in the aggregate it received (``S/s = 0``, score 0),
sends the bias instead and follows dense SGD.

Run:
  python examples/regtopk_toy.py --out /tmp/regtopk_toy

Writes ``results.json`` (``{"method": {"loss": [...]}}``, the loss before
each of the ``--steps`` updates and after the last) and ``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import gsparse_jax as gs

AXIS = "workers"
SAMPLES = np.array([[100.0, 1.0], [-100.0, 1.0]], np.float32)  # one per worker
LABELS = np.array([1.0, 1.0], np.float32)
W0 = np.array([0.0, 1.0], np.float32)


def logistic_loss(w, x, y):
  """Cross-entropy of ``sigmoid(w . x)`` against label ``y`` (stable form)."""
  z = jnp.dot(w, x)
  return y * jax.nn.softplus(-z) + (1.0 - y) * jax.nn.softplus(z)


def mean_loss(w):
  return jnp.mean(jax.vmap(logistic_loss, (None, 0, 0))(
      w, jnp.asarray(SAMPLES), jnp.asarray(LABELS)))


def compressors_for(mu: float) -> dict[str, gs.Compressor]:
  return {
      "dense": gs.dense(),
      "top_k": gs.top_k(k=1),
      "reg_top_k": gs.reg_top_k(0.5, mu=mu),  # k = round(0.5 * 2) = 1
  }


def run(compressor: gs.Compressor, *, steps: int, lr: float) -> np.ndarray:
  """Losses ``[steps + 1]`` of the two-worker run (one jitted `lax.scan`)."""
  feedback = "none" if compressor == gs.dense() else "ef"
  tx = optax.chain(gs.sparsify(compressor, feedback=feedback, axis_name=AXIS),
                   optax.sgd(lr))
  workers = SAMPLES.shape[0]

  @jax.jit
  def train(w):
    opt_state = jax.vmap(lambda _: tx.init(w))(jnp.arange(workers))

    def step(carry, _):
      w, opt_state = carry
      grads = jax.vmap(jax.grad(logistic_loss), (None, 0, 0))(
          w, jnp.asarray(SAMPLES), jnp.asarray(LABELS))
      updates, opt_state = jax.vmap(tx.update, axis_name=AXIS)(
          grads, opt_state)
      w = w + updates[0]  # the aggregate is identical on every worker
      return (w, opt_state), mean_loss(w)

    _, losses = jax.lax.scan(step, (w, opt_state), None, length=steps)
    return jnp.concatenate([mean_loss(w)[None], losses])

  return np.asarray(train(jnp.asarray(W0)))


def plot(results: dict, path: str, dpi: int = 120) -> None:
  labels = {"dense": "dense SGD", "top_k": "Top-k + EF",
            "reg_top_k": "RegTop-k + EF"}
  # Dense and RegTop-k nearly coincide: draw dense wide, RegTop-k dashed.
  styles = {"dense": dict(color="0.6", linewidth=4),
            "reg_top_k": dict(linestyle="--")}
  with common.figure(path, dpi=dpi, figsize=(6, 4)) as (_, ax):
    for name, result in results.items():
      ax.plot(result["loss"], label=labels.get(name, name),
              **styles.get(name, {}))
    ax.set_xlabel("step")
    ax.set_ylabel("logistic loss")
    ax.set_yscale("log")
    ax.set_title("Two workers with cancelling gradients (k = 1)")
    ax.legend()


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--lr", type=float, default=0.9)
  parser.add_argument("--mu", type=float, default=1.0)
  parser.add_argument("--out", default=None,
                      help="directory for results.json and loss.png")
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  results = {name: {"loss": run(c, steps=args.steps, lr=args.lr).tolist()}
             for name, c in compressors_for(args.mu).items()}
  elapsed = time.perf_counter() - start

  probes = [s for s in (0, 10, 50, 100, args.steps) if s <= args.steps]
  print(f"{'step':>6}" + "".join(f"{n:>12}" for n in results))
  for s in probes:
    print(f"{s:>6}" + "".join(f"{r['loss'][s]:>12.4f}"
                              for r in results.values()))
  print(f"({elapsed:.1f} s)")

  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f)
    if not args.no_plot:
      plot(results, os.path.join(args.out, "loss.png"))
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
