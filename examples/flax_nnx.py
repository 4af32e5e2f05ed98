"""Flax NNX + gsparse_jax: a CNN on scikit-learn digits over 8 devices.

A complete data-parallel training loop to copy. Each of 8 workers (CPU
devices here; GPUs/TPUs the same) computes its LOCAL gradient inside
`jax.shard_map`; `gs.sparsify` sends the top 1% of each worker's
error-compensated gradient and averages what the workers sent; AdamW applies
the average. The model and optimizer are ordinary Flax NNX objects
(``nnx.Optimizer(model, tx, wrt=nnx.Param)``); three gsparse_jax helpers make
them work under `shard_map`:

* `gs.nnx_shard` splits ``(model, optimizer)`` into a graph definition and
  a state pytree, with the specs that shard each worker's error memory over
  the mesh and replicate the rest;
* `gs.nnx_local_value_and_grad` differentiates the model without JAX's
  implicit dense all-reduce (which would silently undo the compression);
* `gs.comm_stats` reads the bytes sent from the optimizer state.

Run:  python examples/flax_nnx.py [--steps 200] [--ratio 0.01]
"""

from __future__ import annotations

import argparse
import functools
import os

# 8 CPU devices stand in for 8 accelerators; set before JAX starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import common  # noqa: E402  (examples/common.py: the digits data)
import gsparse_jax as gs  # noqa: E402

AXIS = "data"  # the mesh axis of the data-parallel workers


class CNN(nnx.Module):
  """Two 3x3 convolutions and a linear classifier for 8x8 digit images."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)  # -> 4x4
    self.head = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return self.head(x.reshape(x.shape[0], -1))


def loss_fn(model, images, labels):
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--ratio", type=float, default=0.01)
  parser.add_argument("--batch-per-worker", type=int, default=16)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  workers = mesh.shape[AXIS]

  # 1. An NNX model and optimizer, as on one device. `sparsify` goes first
  #    in the chain: it turns each worker's gradient into the mean of what
  #    the workers sent, and AdamW then sees identical updates everywhere.
  model = CNN(nnx.Rngs(args.seed))
  tx = optax.chain(
      gs.sparsify(gs.top_k(args.ratio), feedback="ef", axis_name=AXIS),
      optax.adamw(args.lr, weight_decay=1e-4))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  # 2. Split into graphdef + state for shard_map. `specs` shards the
  #    per-worker error memory (and statistics) over AXIS; parameters and
  #    AdamW's moments are replicated.
  graphdef, state, specs = gs.nnx_shard((model, optimizer), mesh, AXIS)

  # 3. The training step, run by every worker on its slice of the batch.
  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(specs, P(AXIS), P(AXIS)),
                     out_specs=(specs, P()))
  def train_step(state, images, labels):
    model, optimizer = nnx.merge(graphdef, state)
    # This worker's own gradient (a plain nnx.grad would all-reduce it).
    loss, grads = gs.nnx_local_value_and_grad(loss_fn, AXIS)(
        model, images, labels)
    optimizer.update(model, grads)  # compress, aggregate, AdamW, apply
    return nnx.state((model, optimizer)), jax.lax.pmean(loss, AXIS)

  (train_x, train_y), (test_x, test_y) = common.digits_split(args.seed)
  as_images = lambda x: x.reshape(-1, 8, 8, 1)  # NHWC for the convolutions
  train_x, test_x = as_images(train_x), as_images(test_x)
  rng = np.random.default_rng(args.seed)
  batch_sharding = NamedSharding(mesh, P(AXIS))  # batch split over workers
  for step in range(args.steps):
    rows = rng.integers(0, len(train_x), workers * args.batch_per_worker)
    images, labels = jax.device_put((train_x[rows], train_y[rows]),
                                    batch_sharding)
    state, loss = train_step(state, images, labels)
    # Block every step: with 8 virtual CPU devices on few cores, XLA's
    # collectives can stall when many steps are in flight.
    loss = float(loss)
    if (step + 1) % 50 == 0:
      print(f"step {step + 1:4d}  loss {loss:.4f}")

  # 4. Read the model and the statistics back from the state.
  model, optimizer = nnx.merge(graphdef, state)
  stats = gs.comm_stats(nnx.as_pure(optimizer.opt_state))
  test_accuracy = float(jnp.mean(jnp.argmax(model(test_x), -1) == test_y))
  print(f"{workers} workers, test accuracy {test_accuracy:.3f}, "
        f"{stats['sent_bytes'] / stats['steps']:,.0f} bytes sent per step "
        f"per worker ({stats['compression']:.1f}x less than dense)")
  return {"accuracy": test_accuracy, "stats": stats}


if __name__ == "__main__":
  main()
