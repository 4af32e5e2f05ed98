"""One process of the 2-process test in test_multihost.py (not a test file).

Usage: python multihost_worker.py PROCESS_ID PORT OUT_DIR
Each process owns 4 CPU devices of an 8-device ("data",) mesh; together they
train the linear model of test_distributed.py for a few steps with
Top-k + error feedback, and each writes what it can address to OUT_DIR.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
import runners  # this script's folder, tests/, is on sys.path

AXIS = "data"
STEPS, LR, RATIO = 5, 0.1, 0.1


def loss_fn(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def main(process_id, port, out_dir):
  # Before any computation initializes a backend: 4 devices per process.
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=2, process_id=process_id)
  data = np.load(os.path.join(out_dir, "data.npz"))
  mesh = jax.make_mesh((8,), (AXIS,))
  sharding = NamedSharding(mesh, P(AXIS))
  # Every process holds the whole batch here; each device takes its rows.
  x, y = (jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i])
          for a in (data["x"], data["y"]))
  params = {"w": jnp.zeros((x.shape[1], y.shape[1])),
            "b": jnp.zeros((y.shape[1],))}
  tx = optax.chain(gs.sparsify(gs.top_k(RATIO), axis_name=AXIS),
                   optax.sgd(LR))
  step, opt_state = runners.shard_map_training_step(
      tx, params, mesh,
      lambda p, x, y: gs.local_value_and_grad(loss_fn, AXIS)(p, x, y)[1])

  for _ in range(STEPS):
    params, opt_state = step(params, opt_state, x, y)
    jax.block_until_ready(params)

  local = lambda a: np.asarray(a.addressable_shards[0].data)
  memory = opt_state[0].memory[0]
  rows = {shard.index[0].start: np.asarray(shard.data)
          for shard in memory.addressable_shards}
  np.savez(os.path.join(out_dir, f"process{process_id}.npz"),
           w=local(params["w"]), b=local(params["b"]),
           memory_rows=np.array(sorted(rows)),
           memory=np.concatenate([rows[r] for r in sorted(rows)]),
           sent_bytes=gs.comm_stats(
               jax.tree.map(lambda a: np.concatenate(
                   [np.asarray(s.data) for s in a.addressable_shards]),
                   opt_state[0].stats))["sent_bytes"])
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
