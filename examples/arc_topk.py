"""ARC-Top-K vs Top-k at equal bytes: a Flax MLP on scikit-learn digits.

8 simulated workers (``jax.vmap(axis_name="workers")``, the whole training
one jitted `lax.scan`) each draw their own minibatch, compute their local
gradient, and `gsparse_jax.sparsify` compresses and averages it; SGD moves
the shared model. Methods:

* dense all-reduce (the baseline);
* Top-k with EF14 error feedback, and Top-k with EF21-SGDM (``"ef21m"``):
  each worker sends ``k`` (int32 index, value) pairs, all-gathered;
* ARC-Top-K with EF21-SGDM: an ``m x r`` sketch and ``q`` whole rows, both
  all-reduced, no indices;
* shared-seed Rand-k with EF21-SGDM: ``k`` values all-reduced, no indices.

The compressed methods get the same bytes per step and worker: Top-k's
ratio (``--ratio``) fixes the budget; ARC-Top-K's row ratio and Rand-k's
ratio are then chosen so that `gsparse_jax.comm_stats` counts (nearly) the
same ``sent_bytes`` per step. All use ``granularity="global"`` (one budget
over the model; ARC views it as rows of about ``sqrt(d)`` entries).

Measured here (defaults: 400 steps, 8 workers x 16 samples, SGD lr 0.1,
26,122 parameters, one test split of 397 digits, seed 0):

  method            ratio   bytes/step/worker   test accuracy
  dense             1.0         104,488          0.975
  top_k+ef          0.05         10,448          0.972
  top_k+ef21m       0.05         10,448          0.977
  arc_top_k+ef21m   12/162 rows  10,368          0.960   (2,592 B of sketch)
  rand_k+ef21m      0.10         10,448          0.884

Bytes are what each worker puts on the wire; Top-k's all-gather makes each
worker RECEIVE 8 x 10,448 B, while ARC-Top-K's and Rand-k's all-reduces do
not grow with the number of workers. (On this small i.i.d. problem ARC-Top-K
is a little noisier than Top-k; one test image is 0.25%.)

Run:  python examples/arc_topk.py [--steps 400] [--ratio 0.05] [--out DIR]
Writes ``results.json`` (``{"config": {...}, "methods": {name: {"accuracy",
"sent_bytes_per_step", "ratio", "curve": {"step", "bytes", "accuracy"}}}}``)
and ``accuracy_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import functools
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


# Cached: several methods train on the same split.
load_data = functools.lru_cache(maxsize=None)(common.digits_split)


def sent_bytes_per_step(compressor: gs.Compressor, size: int) -> int:
  """Bytes one worker sends per step for a ``size`` vector.

  The compressor's declared wire cost, the same count `sparsify` adds to
  ``gs.comm_stats(...)["sent_bytes"]``: static, so a search over ratios is
  instant.
  """
  return sum(c.bytes for c in compressor.wire(size, jnp.float32))


def matched_ratio(make, ratios, target_bytes: float, size: int) -> float:
  """The ratio among sorted ``ratios`` whose bytes are closest to the target.

  Bytes grow with the ratio: bisect, then take the nearer neighbour.
  """
  cost = lambda i: sent_bytes_per_step(make(ratios[i]), size)
  low, high = 0, len(ratios) - 1  # first index with cost >= target
  while low < high:
    mid = (low + high) // 2
    if cost(mid) < target_bytes:
      low = mid + 1
    else:
      high = mid
  nearest = [i for i in (low - 1, low) if 0 <= i < len(ratios)]
  return ratios[min(nearest, key=lambda i: abs(cost(i) - target_bytes))]


def methods_at_budget(top_k_ratio: float, size: int) -> dict:
  """{name: (compressor, feedback)} with equal bytes per step and worker."""
  budget = sent_bytes_per_step(gs.top_k(top_k_ratio), size)
  # ARC keeps q of its m rows (plus the m x r sketch): search q.
  rows = gs.arc_top_k(1.0).grid(size)[0]
  arc_ratio = matched_ratio(gs.arc_top_k,
                            [q / rows for q in range(1, rows + 1)], budget,
                            size)
  # Rand-k (shared seed) sends values only, no indices.
  rand_ratio = matched_ratio(
      gs.rand_k, [k / size for k in range(1, size + 1)], budget, size)
  return {
      "dense": (gs.dense(), "ef"),
      "top_k+ef": (gs.top_k(top_k_ratio), "ef"),
      "top_k+ef21m": (gs.top_k(top_k_ratio), "ef21m"),
      "arc_top_k+ef21m": (gs.arc_top_k(arc_ratio), "ef21m"),
      "rand_k+ef21m": (gs.rand_k(rand_ratio), "ef21m"),
  }


def train(compressor, feedback, *, workers, steps, batch_per_worker, lr,
          momentum, eval_every, seed):
  """Trains one method; returns accuracy curve and communication figures."""
  (x_train, y_train), (x_test, y_test) = load_data(seed)
  model = common.MLP()
  params = model.init(jax.random.key(seed), jnp.ones((1, 64)))
  tx = optax.chain(
      gs.sparsify(compressor, feedback=feedback, axis_name=AXIS,
                  momentum=momentum), optax.sgd(lr))
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def worker_step(params, opt_state, key):
    rows = jax.random.randint(key, (batch_per_worker,), 0, x_train.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, x_train[rows],
                                              y_train[rows])
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  workers_step = jax.vmap(worker_step, in_axes=(None, 0, 0),
                          axis_name=AXIS)

  def accuracy(params):
    logits = model.apply(params, x_test)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  def chunk(carry, key):
    """``eval_every`` steps, then the test accuracy."""
    def one(carry, key):
      params, opt_state = carry
      new_params, opt_state, loss = workers_step(
          params, opt_state, jax.random.split(key, workers))
      # The aggregate is identical on every worker: keep one copy.
      params = jax.tree.map(lambda p: p[0], new_params)
      return (params, opt_state), jnp.mean(loss)

    carry, losses = jax.lax.scan(one, carry,
                                 jax.random.split(key, eval_every))
    return carry, (accuracy(carry[0]), losses[-1])

  @jax.jit
  def run(params, key):
    opt_state = jax.vmap(lambda _: tx.init(params))(jnp.arange(workers))
    (params, opt_state), (accs, losses) = jax.lax.scan(
        chunk, (params, opt_state),
        jax.random.split(key, steps // eval_every))
    return params, opt_state, accs, losses

  start = time.perf_counter()
  params, opt_state, accs, losses = jax.block_until_ready(
      run(params, jax.random.key(seed + 1)))
  seconds = time.perf_counter() - start
  stats = gs.comm_stats(opt_state)
  per_step = stats["sent_bytes"] / stats["steps"]
  chunks = np.arange(1, steps // eval_every + 1) * eval_every
  return {
      "accuracy": float(accs[-1]), "final_loss": float(losses[-1]),
      "sent_bytes_per_step": per_step,
      "dense_bytes_per_step": stats["dense_bytes"] / stats["steps"],
      "density": stats["density"], "workers": stats["workers"],
      "seconds": seconds,
      "curve": {"step": chunks.tolist(),
                "bytes": (chunks * per_step).tolist(),
                "accuracy": np.asarray(accs).tolist()},
  }


def plot(results: dict, path: str, title: str, dpi: int = 120) -> None:
  with common.figure(path, dpi=dpi, figsize=(6.5, 4.2)) as (_, ax):
    for name, r in results.items():
      ax.plot(np.asarray(r["curve"]["bytes"]) / 1e6, r["curve"]["accuracy"],
              label=f"{name} ({r['sent_bytes_per_step'] / 1e3:.1f} kB/step)")
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per worker (cumulative)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--ratio", type=float, default=0.05,
                      help="Top-k's ratio; fixes the byte budget")
  parser.add_argument("--workers", type=int, default=8)
  parser.add_argument("--batch-per-worker", type=int, default=16)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--momentum", type=float, default=0.9,
                      help="EF21-SGDM's beta")
  parser.add_argument("--eval-every", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None,
                      help="directory for results.json and the PNG")
  args = parser.parse_args(argv)
  eval_every = max(1, min(args.eval_every, args.steps))
  steps = max(eval_every, args.steps // eval_every * eval_every)

  params = common.MLP().init(jax.random.key(args.seed), jnp.ones((1, 64)))
  size = sum(leaf.size for leaf in jax.tree.leaves(params))
  methods = methods_at_budget(args.ratio, size)
  print(f"{args.workers} workers, {steps} steps, MLP with {size} params on "
        f"digits; budget = Top-k({args.ratio})'s bytes")
  print(f"{'method':<18}{'ratio':>8}{'bytes/step/worker':>19}"
        f"{'MB sent':>9}{'test acc':>10}{'seconds':>9}")
  results = {}
  for name, (compressor, feedback) in methods.items():
    r = train(compressor, feedback, workers=args.workers, steps=steps,
              batch_per_worker=args.batch_per_worker, lr=args.lr,
              momentum=args.momentum, eval_every=eval_every, seed=args.seed)
    r["compressor"] = repr(compressor)
    r["feedback"] = feedback
    r["ratio"] = getattr(compressor, "ratio", 1.0) or 1.0
    results[name] = r
    print(f"{name:<18}{r['ratio']:>8.4f}{r['sent_bytes_per_step']:>19.0f}"
          f"{r['curve']['bytes'][-1] / 1e6:>9.2f}{r['accuracy']:>10.3f}"
          f"{r['seconds']:>9.1f}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    config.update(steps=steps, eval_every=eval_every, params=size)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump({"config": config, "methods": results}, f, indent=1)
    plot(results, os.path.join(args.out, "accuracy_vs_bytes.png"),
         f"digits MLP, {args.workers} workers, equal bytes per step")
    print(f"wrote {args.out}/results.json and accuracy_vs_bytes.png")
  return results


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
