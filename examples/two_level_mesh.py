"""Two-level data parallelism: dense inside slices, compressed across them.

Clusters are slices of devices on fast links (NVLink, TPU ICI) joined by a
slow network: the slow links are where compression pays. The same Flax MLP
on scikit-learn digits is trained over 8 (simulated CPU) devices twice:

* on a 1-D mesh ``("data",)``: every device is a worker and compresses its
  own gradient, all of it exchanged over the (slow) network;
* on a ``(2, 4)`` ``("slice", "data")`` mesh: the gradient is all-reduced
  densely inside each slice (4 devices), and only Top-k payloads cross
  between the 2 slices: ``gs.sparsify(..., axis_name="slice",
  inner_axes="data")`` with ``gs.local_value_and_grad(loss, "slice")``.

For each it prints the test accuracy and, per device and step, the bytes sent
over the compressed axis (the slow links for two-level) and the dense bytes
reduced inside the slice (fast links), from `gs.comm_stats`. With
`gs.dense()` both meshes compute the same mean over all 8 devices.

Run:  python examples/two_level_mesh.py [--steps 200] [--ratio 0.01]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import common  # noqa: E402
import gsparse_jax as gs  # noqa: E402

SLICES = 2
# name -> (mesh shape, mesh axes, compressed axis, inner axes)
MESHES = {
    "1-D (8 workers)": ((8,), ("data",), "data", ()),
    "two-level (2 slices x 4)": ((SLICES, 4), ("slice", "data"), "slice",
                                 ("data",)),
}


def train(mesh_name: str, compressor, *, steps: int, batch_per_device: int,
          seed: int, lr: float):
  """Trains on one of `MESHES`; returns accuracy, bytes and parameters."""
  shape, names, axis, inner = MESHES[mesh_name]
  mesh = jax.make_mesh(shape, names)
  (x_train, y_train), (x_test, y_test) = common.digits_split(seed)
  model = common.MLP()
  params = model.init(jax.random.key(seed), jnp.ones((1, 64)))
  tx = optax.chain(
      gs.sparsify(compressor, axis_name=axis, inner_axes=inner),
      optax.adam(lr))
  opt_state, step = common.sharded_training(model, params, tx, mesh, axis,
                                            inner)
  rng = np.random.default_rng(seed)
  sharding = NamedSharding(mesh, P((axis, *inner)))
  for _ in range(steps):
    rows = rng.integers(0, len(x_train), mesh.size * batch_per_device)
    x = jax.device_put(x_train[rows], sharding)
    y = jax.device_put(y_train[rows], sharding)
    params, opt_state, loss = step(params, opt_state, x, y)
    loss = float(loss)  # block: 8 virtual CPU devices share few cores
  logits = jax.jit(model.apply)(params, x_test)
  stats = gs.comm_stats(opt_state)
  return {
      "accuracy": float((np.argmax(logits, -1) == y_test).mean()),
      "final_loss": loss,
      "workers": stats["workers"],
      "compressed_bytes_per_step": stats["sent_bytes"] / steps,
      "dense_bytes_per_step": stats["dense_bytes"] / steps,
      "inner_dense_bytes_per_step": stats["inner_dense_bytes"] / steps,
      "params": jax.tree.map(np.asarray, params),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--ratio", type=float, default=0.01)
  parser.add_argument("--batch-per-device", type=int, default=16)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  compressors = {"dense": gs.dense(), f"top_k({args.ratio})": gs.top_k(
      args.ratio)}
  print(f"Flax MLP on digits, {args.steps} steps, 8 devices; bytes per "
        "device and step")
  print(f"{'mesh':<26}{'compressor':<14}{'workers':>8}{'test acc':>9}"
        f"{'compressed axis':>16}{'inside slice':>14}")
  results = {}
  for mesh_name in MESHES:
    for name, compressor in compressors.items():
      r = train(mesh_name, compressor, steps=args.steps,
                batch_per_device=args.batch_per_device, seed=args.seed,
                lr=args.lr)
      results[(mesh_name, name)] = r
      print(f"{mesh_name:<26}{name:<14}{r['workers']:>8}"
            f"{r['accuracy']:>9.3f}{r['compressed_bytes_per_step']:>16.0f}"
            f"{r['inner_dense_bytes_per_step']:>14.0f}")
  return results


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
