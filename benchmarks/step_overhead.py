"""Step time of `sparsify(...) + sgd` vs a plain `sgd` step, side by side.

Two settings, each timed in the same run with medians of repeats, for every
compressor of the registry (`gs.compressor_names()`, at ratio 0.01 where it
takes one) plus Top-k with the full sort:
* single device: a jitted update on one ``d / 1000 x 1000`` matrix parameter
  (d = 1e6..1e8), `sparsify(c) + sgd` vs `sgd`;
* 8-device `shard_map`: a training step of an MLP (~1e6 parameters), with
  the plain step all-reducing the dense gradient (what `jax.grad` does by
  itself there) vs local gradient + `sparsify(c)` + sgd.

Compression is per tensor (``granularity="layer"``) so that PowerSGD sees
matrices; with one leaf that is the same as global granularity.

Run: python -m benchmarks.step_overhead --out DIR [--quick]
     [--sizes 1e7] [--compressors top_k power_sgd ...]
"""

from __future__ import annotations

import argparse
import functools
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gsparse_jax as gs  # noqa: E402
from benchmarks import _common  # noqa: E402

AXIS = "data"
double = jax.jit(lambda x: x * 2.0)


RATIO = 0.01
COLUMNS = 1000  # the single-device parameter is a (d / 1000, 1000) matrix


def compressors(quick: bool, names=None):
  """Label -> compressor: the registry's (or ``names``), + Top-k by sort."""
  names = names or (("top_k", "dense") if quick else gs.compressor_names())
  table = {name: gs.compressor_from_ratio(name, RATIO) for name in names
           if name != "hard_threshold"}
  if "hard_threshold" in names:  # calibrated on the gradient's distribution
    table["hard_threshold"] = gs.hard_threshold(2.5, capacity_ratio=0.02)
  if "top_k" in table and not quick:
    table["top_k (sort)"] = gs.top_k(RATIO, method="sort")
  return table


def single_device(size: int, repeats: int, table: dict) -> dict:
  """Jitted optimizer update on one matrix: ratio to plain sgd.

  The full sort (`top_k(..., method="sort")`) is timed up to d = 1e7 only:
  at 1e8 one call takes tens of seconds here.
  """
  shape = (size // COLUMNS, COLUMNS)
  params = jnp.zeros(shape, jnp.float32)
  grads = jax.random.normal(jax.random.key(0), shape, jnp.float32)

  def timed(tx):
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    carry = [params.copy(), state]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1], grads)
      return carry[0]

    return _common.time_fn(run, repeats=repeats)

  base = timed(optax.sgd(0.1))
  rows = {"sgd": base}
  # The update alone against the read+write floor (`x * 2.0`, a fresh
  # output like the dense update's), state donated as in a training step.
  tx = gs.sparsify(gs.top_k(RATIO))
  update = jax.jit(tx.update, donate_argnums=(1,))
  update_state = [tx.init(params)]

  def run_update():
    out, update_state[0] = update(grads, update_state[0])
    return out

  floors = _common.time_interleaved(
      {"update": run_update, "read_write": lambda: double(grads)},
      repeats=repeats)
  for name, c in table.items():
    if name.endswith("(sort)") and size > 10_000_000:
      continue
    rows[name] = timed(optax.chain(gs.sparsify(c, granularity="layer"),
                                   optax.sgd(0.1)))
  result = {name: {"seconds": t, "ratio_to_sgd": t / base}
            for name, t in rows.items()}
  result["sparsify(top_k(0.01)) update"] = {
      "seconds": floors["update"], "read_write_s": floors["read_write"],
      "ratio_to_read_write": floors["update"] / floors["read_write"]}
  return result


def mlp_init(key, sizes):
  params = []
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    key, sub = jax.random.split(key)
    params.append({"w": jax.random.normal(sub, (fan_in, fan_out)) /
                        np.sqrt(fan_in), "b": jnp.zeros((fan_out,))})
  return params


def mlp_loss(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def sharded_training(sizes, batch_per_worker: int, repeats: int,
                     table: dict) -> dict:
  """Step time under an 8-device shard_map: ratio to the dense sgd step."""
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  params = mlp_init(jax.random.key(0), sizes)
  batch = mesh.size * batch_per_worker
  sharding = NamedSharding(mesh, P(AXIS))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, sizes[0])),
                     sharding)
  y = jax.device_put(jax.random.randint(jax.random.key(2), (batch,), 0,
                                        sizes[-1]), sharding)

  def timed(tx, grad_fn):
    specs = gs.state_partition_specs(jax.eval_shape(tx.init, params), AXIS)
    state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                                  out_specs=specs))(params)

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P(), specs, P(AXIS), P(AXIS)),
                       out_specs=(P(), specs))
    def step(params, state, x, y):
      _, grads = grad_fn(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    carry = [params, state]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1], x, y)
      return carry[0]

    return _common.time_fn(run, repeats=repeats)

  def dense_grad(params, x, y):
    # jax.grad of replicated params under shard_map: dense all-reduce (sum).
    loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
    return loss, jax.tree.map(lambda g: g / mesh.size, grads)

  base = timed(optax.sgd(0.1), dense_grad)
  rows = {"sgd (dense all-reduce)": base}
  local = gs.local_value_and_grad(mlp_loss, AXIS)
  for name, c in table.items():
    tx = optax.chain(gs.sparsify(c, axis_name=AXIS, granularity="layer"),
                     optax.sgd(0.1))
    rows[name] = timed(tx, local)
  parameters = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
  return {"parameters": parameters, "workers": mesh.size,
          "steps": {name: {"seconds": t, "ratio_to_sgd": t / base}
                    for name, t in rows.items()}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--sizes", type=float, nargs="+", default=None,
                      help="single-device sizes d (multiples of 1000)")
  parser.add_argument("--compressors", nargs="+", default=None,
                      choices=gs.compressor_names(),
                      help="registry names (default: all)")
  args = parser.parse_args(argv)
  repeats = args.repeats or (3 if args.quick else 15)
  sizes = ([int(s) for s in args.sizes] if args.sizes else
           [10_000] if args.quick else [1_000_000, 10_000_000, 100_000_000])
  if any(size % COLUMNS or size < COLUMNS for size in sizes):
    parser.error(f"--sizes must be multiples of {COLUMNS}")
  mlp = [64, 64, 10] if args.quick else [64, 1000, 1000, 10]
  table = compressors(args.quick, args.compressors)

  result = {"machine": _common.machine_description(), "single_device": {},
            "shard_map": sharded_training(mlp, 32, repeats, table)}
  for size in sizes:
    result["single_device"][str(size)] = single_device(size, repeats, table)
  _common.write_json(args.out, "step_overhead", result)

  def plot(ax):
    names = list(result["shard_map"]["steps"])
    ax.barh(names, [result["shard_map"]["steps"][n]["ratio_to_sgd"]
                    for n in names])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("step time / plain sgd step (8-device shard_map, MLP "
                  f"{result['shard_map']['parameters']:,} params)")

  _common.write_plot(args.out, "step_overhead", plot)
  for name, row in result["shard_map"]["steps"].items():
    print(f"shard_map {name:<26} {row['seconds'] * 1e3:8.2f} ms "
          f"{row['ratio_to_sgd']:6.2f}x")
  for size, rows in result["single_device"].items():
    for name, row in rows.items():
      ratio = row.get("ratio_to_sgd", row.get("ratio_to_read_write"))
      unit = "sgd" if "ratio_to_sgd" in row else "read+write pass"
      print(f"d={size:<10} {name:<30} {row['seconds'] * 1e3:8.2f} ms "
            f"{ratio:6.2f}x {unit}")
  return result


if __name__ == "__main__":
  main()
