"""DiLoCo with compressed pseudo-gradients on the `charlm` task, 8 workers.

Eight simulated workers (``jax.vmap(axis_name="workers")``; the training is
jitted `lax.scan` chunks) each draw their own batches of the character
language model task of `gsparse compare` (a 2-layer causal transformer on
Python's standard-library source). Methods, all with AdamW as the local
optimizer and the same data and steps:

* ``dp``: data parallelism, the dense mean gradient every step
  (``optax.chain(gs.sparsify(gs.dense()), adamw)``);
* ``diloco H=.. dense``: `gs.diloco`, a dense pseudo-gradient every H steps,
  outer SGD(0.7, Nesterov momentum 0.9) as in DiLoCo;
* ``diloco H=.. top1%+ef``: Top-1% of the pseudo-gradient with error
  feedback;
* ``diloco H=.. top1%+2bit``: the same with the values at 2 bits and a
  scale per 64 (`gs.quantized_top_k`, SparseLoCo's payload);
* ``diloco H=.. top1%+2bit sgd1``: that payload with outer SGD(1.0) and no
  momentum, as SparseLoCo runs it (its error feedback plays the momentum).

Reported per method: the held-out loss of the model (the anchor for DiLoCo)
and the bytes each worker sent (`gs.comm_stats`), at every evaluation.

Run:  python examples/diloco_charlm.py [--steps 300] [--seeds 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(EXAMPLES))

import gsparse_jax as gs  # noqa: E402  pylint: disable=g-import-not-at-top
from gsparse_jax._src.cli import tasks  # noqa: E402  pylint: disable=g-import-not-at-top

AXIS = "workers"
WORKERS = 8
RATIO = 0.01
OUTER = dict(learning_rate=0.7, momentum=0.9, nesterov=True)


def method_names(sync_every=(10, 50)) -> list[str]:
  names = ["dp"]
  for h in sync_every:
    names += [f"diloco H={h} dense", f"diloco H={h} top1%+ef",
              f"diloco H={h} top1%+2bit", f"diloco H={h} top1%+2bit sgd1"]
  return names


def make_tx(name: str, lr: float) -> optax.GradientTransformation:
  inner = optax.adamw(lr, weight_decay=0.0)
  if name == "dp":
    return optax.chain(gs.sparsify(gs.dense(), feedback="none",
                                   axis_name=AXIS), inner)
  _, h, payload, *outer = name.split()
  compressor = {"dense": gs.dense(), "top1%+ef": gs.top_k(RATIO),
                "top1%+2bit": gs.quantized_top_k(RATIO, bits=2)}[payload]
  # "sgd1": outer SGD(1.0) without momentum, SparseLoCo's choice (its error
  # feedback takes the momentum's place).
  outer = optax.sgd(1.0) if outer == ["sgd1"] else optax.sgd(**OUTER)
  return gs.diloco(inner, outer, sync_every=int(h[2:]),
                   compressor=compressor, axis_name=AXIS)


def _evaluated_params(name, params, state):
  """The model to evaluate: DiLoCo's anchor (worker 0's copy), else worker
  0's parameters."""
  if name == "dp":
    return jax.tree.map(lambda p: p[0], params)
  return jax.tree.map(lambda p: p[0], state.anchor)


@functools.lru_cache(maxsize=None)
def _model(dim, layers):
  """(task, make_model(seed), graphdef, evaluate(params)): the charlm task
  with its transformer at ``dim`` and ``layers``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  task = tasks.make_task("charlm")
  make_model = functools.partial(tasks._char_transformer, dim=dim,  # pylint: disable=protected-access
                                 layers=layers)
  graphdef, _ = nnx.split(make_model(0))

  @jax.jit
  def evaluate(params):
    return task.evaluate(nnx.merge(graphdef, params))[0]

  return task, make_model, graphdef, evaluate


@functools.lru_cache(maxsize=None)
def _compiled(name, lr, dim, layers):
  """(task, init(seed), run(params, state, xs, ys), evaluate(params))."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  task, make_model, graphdef, evaluate = _model(dim, layers)
  tx = make_tx(name, lr)

  def loss(params, x, y):
    return task.loss(nnx.merge(graphdef, params), x, y)

  def worker_step(params, state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  step = jax.vmap(worker_step, axis_name=AXIS)

  @jax.jit
  def run(params, state, xs, ys):
    def body(carry, batch):
      params, state, value = step(*carry, *batch)
      return (params, state), value.mean()
    (params, state), losses = jax.lax.scan(body, (params, state), (xs, ys))
    return params, state, losses

  def init(seed):
    _, params = nnx.split(make_model(seed))
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (WORKERS,) + p.shape),
                          params)
    state = jax.vmap(tx.init)(params)
    return params, state

  return task, init, run, evaluate


def train(name: str, *, steps: int = 300, seed: int = 0, lr: float = 3e-3,
          batch: int = 8, eval_every: int = 50, dim: int = 64,
          layers: int = 2) -> dict:
  """One run: held-out loss and bytes per worker at every ``eval_every``
  steps (``steps`` a multiple of it; evaluations fall on syncs when it is
  a multiple of H)."""
  if steps % eval_every:
    raise ValueError("`steps` must be a multiple of `eval_every`")
  task, init, run, evaluate = _compiled(name, lr, dim, layers)
  params, state = init(seed)
  curve = {"step": [0], "bytes": [0.0],
           "loss": [float(evaluate(_evaluated_params(name, params, state)))]}
  for start in range(0, steps, eval_every):
    batches = [task.batch(seed, t, (WORKERS, batch))
               for t in range(start, start + eval_every)]
    xs = jnp.asarray(np.stack([b[0] for b in batches]))
    ys = jnp.asarray(np.stack([b[1] for b in batches]))
    params, state, _ = jax.block_until_ready(run(params, state, xs, ys))
    curve["step"].append(start + eval_every)
    curve["bytes"].append(gs.comm_stats(state)["sent_bytes"])
    curve["loss"].append(
        float(evaluate(_evaluated_params(name, params, state))))
  stats = gs.comm_stats(state)
  return {"loss": curve["loss"][-1], "bytes": stats["sent_bytes"],
          "rounds": stats["steps"], "curve": curve,
          "parameters": int(sum(p[0].size for p in jax.tree.leaves(params)))}


def run_all(names, *, seeds, **kwargs) -> dict:
  """``{name: [train(name, seed=seed, **kwargs) per seed]}``."""
  return {name: [train(name, seed=seed, **kwargs) for seed in seeds]
          for name in names}


def plot(results: dict, path: str, dpi: int = 100) -> None:
  """Held-out loss vs bytes sent per worker (log x), mean over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, runs in results.items():
    bytes_ = np.asarray(runs[0]["curve"]["bytes"][1:])
    loss = np.mean([r["curve"]["loss"][1:] for r in runs], axis=0)
    ax.plot(bytes_, loss, marker="o", markersize=3, label=name,
            linestyle="--" if name == "dp" else "-")
  ax.set_xscale("log")
  ax.set_xlabel("bytes sent per worker (cumulative)")
  ax.set_ylabel("held-out loss (nats/char)")
  ax.set_title(f"charlm, {WORKERS} workers: loss vs communication")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=1)
  parser.add_argument("--out", default=".")
  args = parser.parse_args(argv)
  results = run_all(method_names(), steps=args.steps,
                    seeds=range(args.seeds))
  os.makedirs(args.out, exist_ok=True)
  plot(results, os.path.join(args.out, "diloco_charlm.png"))
  with open(os.path.join(args.out, "diloco_charlm.json"), "w") as f:
    json.dump(results, f)
  for name, runs in results.items():
    print(f"{name:24s} loss {np.mean([r['loss'] for r in runs]):.4f} "
          f"bytes/worker {runs[0]['bytes']:,.0f}")


if __name__ == "__main__":
  main(sys.argv[1:])
