"""Pieces the example scripts share: the digits data, the MLP, figures."""

from __future__ import annotations

import contextlib
import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import gsparse_jax as gs


class MLP(nn.Module):
  """Two hidden ReLU layers and 10 logits (the digits classifier)."""
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def digits_split(seed: int, train_size: int = 1400):
  """scikit-learn's bundled 8x8 digits, shuffled: ((x, y) train, test)."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


def classifier_loss(params, model, x, y):
  """Mean softmax cross-entropy of ``model`` on integer labels."""
  logits = model.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def sharded_training(model, params, tx, mesh, axis: str,
                     inner_axes: tuple = ()):
  """The data-parallel `shard_map` training step of the README, for a model.

  Args:
    model: a Flax module; ``params`` its (replicated) parameters.
    tx: the optimizer, with ``gs.sparsify(..., axis_name=axis,
      inner_axes=inner_axes)`` inside.
    mesh: the device mesh.
    axis: the compressed axis (the workers').
    inner_axes: two-level data parallelism: the axes inside a worker the
      batch is split over too (the gradient is reduced densely over them).

  Returns:
    ``(opt_state, step)``: the state initialized over the mesh (per-worker
    error memory sharded over ``axis``), and the jitted
    ``step(params, opt_state, x, y) -> (params, opt_state, mean loss)``
    taking batches sharded over ``(axis, *inner_axes)`` (params and state
    are donated).
  """
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), axis)
  opt_state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                                    out_specs=specs))(params)
  data_axes = (axis, *inner_axes)
  batch = P(data_axes)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(), specs, batch, batch),
                     out_specs=(P(), specs, P()))
  def step(params, opt_state, x, y):
    # The local gradient: plain jax.grad here would all-reduce it densely
    # (over every data axis; two-level wants that inside the slice only).
    loss, grads = gs.local_value_and_grad(classifier_loss, axis)(
        params, model, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            jax.lax.pmean(loss, data_axes))

  return opt_state, step


def sent_by(compressor):
  """``a -> what one worker sends for its accumulated vector a`` (dense).

  `gs.sparsify` with no feedback on a single worker returns exactly what the
  compressor selected; the studies that need each worker's accumulated
  vector and error write error feedback out around it.
  """
  tx = gs.sparsify(compressor, feedback="none")
  return lambda a: tx.update(a, tx.init(a))[0]


def write_outputs(out: str, result, json_name: str, plots: dict) -> None:
  """Writes ``result`` to ``out/json_name`` and each ``plots[png](path)``."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, json_name), "w") as f:
    json.dump(result, f)
  for name, draw in plots.items():
    draw(os.path.join(out, name))
  print(f"wrote {json_name} and {', '.join(plots)} in {out}")


@contextlib.contextmanager
def figure(path: str, dpi: int = 120, **subplots_kwargs):
  """Yields (fig, axes) of `plt.subplots` and saves a PNG to ``path``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: no display on servers and in CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(**subplots_kwargs)
  try:
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
  finally:
    plt.close(fig)
