"""The quick start's training step on several hosts with `jax.distributed`.

On a real cluster run one process per host:

  python examples/multihost.py --coordinator HOST0:1234 \\
      --num-processes N --process-id I

Every process builds the same global mesh over all hosts' devices; the step
is the same `shard_map` step as on one host (local gradients, `gs.sparsify`,
Adam), and each process holds the error memory of its own workers.

To try it on one machine, `--launch-local 2` starts 2 processes on
127.0.0.1 with 4 CPU devices each (8 workers in all).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import common
import gsparse_jax as gs

AXIS = "data"


def train(args) -> None:
  jax.config.update("jax_num_cpu_devices", args.local_devices)
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes,
                             process_id=args.process_id)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  (x_train, y_train), (x_test, y_test) = common.digits_split(args.seed)
  model = common.MLP()
  params = model.init(jax.random.key(args.seed), jnp.ones((1, 64)))
  tx = optax.chain(gs.sparsify(gs.top_k(args.ratio), axis_name=AXIS),
                   optax.adam(args.lr))
  opt_state, step = common.sharded_training(model, params, tx, mesh, AXIS)

  # Every process draws the same global batch; each device keeps its rows.
  rng = np.random.default_rng(args.seed)
  sharding = NamedSharding(mesh, P(AXIS))
  batch = mesh.size * args.batch_per_worker
  for _ in range(args.steps):
    rows = rng.integers(0, len(x_train), batch)
    x, y = (jax.make_array_from_callback(a.shape, sharding,
                                         lambda i, a=a: a[i])
            for a in (x_train[rows], y_train[rows]))
    params, opt_state, loss = step(params, opt_state, x, y)
    jax.block_until_ready(loss)

  local = lambda a: np.asarray(a.addressable_shards[0].data)
  logits = model.apply(jax.tree.map(local, params), x_test)
  accuracy = float((np.argmax(logits, -1) == y_test).mean())
  stats = jax.tree.map(
      lambda a: np.concatenate([np.asarray(s.data)
                                for s in a.addressable_shards]),
      opt_state[0].stats)
  figures = gs.comm_stats(stats)
  print(f"process {args.process_id}/{args.num_processes}: {mesh.size} "
        f"workers, {args.steps} steps, loss {float(local(loss)):.3f}, test "
        f"accuracy {accuracy:.3f}, this process's {figures['workers']} "
        f"workers sent {figures['sent_bytes'] / args.steps:.0f} B/step each "
        f"({figures['compression']:.0f}x less than dense)", flush=True)
  jax.distributed.shutdown()


def launch_local(args) -> int:
  """Starts the processes on 127.0.0.1 and waits for them."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  common_args = [sys.argv[0], "--coordinator", f"127.0.0.1:{port}",
                 "--num-processes", str(args.launch_local),
                 "--local-devices", str(8 // args.launch_local),
                 "--steps", str(args.steps), "--ratio", str(args.ratio)]
  procs = [subprocess.Popen([sys.executable, *common_args, "--process-id",
                             str(i)]) for i in range(args.launch_local)]
  return max(p.wait() for p in procs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--coordinator", default="127.0.0.1:1234")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--local-devices", type=int, default=8)
  parser.add_argument("--launch-local", type=int, default=0,
                      help="start this many processes on 127.0.0.1")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--ratio", type=float, default=0.01)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--batch-per-worker", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.launch_local:
    return launch_local(args)
  train(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
