"""Step time of `sparsify(...) + sgd` vs a plain `sgd` step, side by side.

Two settings, each timed in the same run with medians of repeats, for every
compressor of the registry (`gs.compressor_names()`, at ratio 0.01 where it
takes one) plus Top-k with the full sort:
* single device: a jitted update on one ``d / 1000 x 1000`` matrix parameter
  (d = 1e6..1e8), `sparsify(c) + sgd` vs `sgd`;
* 8 data-parallel devices: a training step of an MLP (~1e6 parameters), with
  the plain step a `jax.jit` over the sharded batch (XLA all-reduces the
  gradient densely) vs `gs.data_parallel`'s step (local gradients +
  `sparsify(c)` + sgd) under the same `jax.jit`.

Compression is per tensor (``granularity="layer"``) so that PowerSGD sees
matrices; with one leaf that is the same as global granularity.

``--model transformer`` times instead, on one device, a transformer-shaped
pytree (embedding 8192x512 and 8 blocks of qkv 512x1536, o 512x512, up
512x2048, down 2048x512 and three vectors of 512: 29.4M float32 parameters
in 57 leaves; ``--scale 4`` doubles the width and the vocabulary: 117.5M
parameters, same leaves): for every compressor x granularity {global,
layer} x nonfinite {skip, ignore}, the jitted ``update + apply_updates`` of
``sparsify(c, ...) + sgd(0.1)`` against plain ``sgd(0.1)``, plain
``adam(1e-3)`` and the read+write floor (``m2 = g + m; out = m2 * 0.01`` per
leaf), params and state donated, interleaved round-robin per compressor.
``--model charlm`` times the whole training step (forward, backward,
update) of the ``charlm`` task of ``gsparse compare`` on one device: plain
adam vs ``sparsify(dense())`` and ``sparsify(top_k(0.01))`` in front of it.

Run: python -m benchmarks.step_overhead --out DIR [--quick]
     [--sizes 1e7] [--compressors top_k power_sgd ...]
     [--model matrix|transformer|charlm] [--scale 4]
"""

from __future__ import annotations

import argparse
import functools
import math
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


def compressors(quick: bool, names=None, sort=True):
  """Label -> compressor: the registry's (or ``names``), + Top-k by sort."""
  names = names or (("top_k", "dense") if quick else gs.compressor_names())
  table = {name: gs.compressor_from_ratio(name, RATIO) for name in names
           if name != "hard_threshold"}
  if "hard_threshold" in names:  # calibrated on the gradient's distribution
    table["hard_threshold"] = gs.hard_threshold(2.5, capacity_ratio=0.02)
  if "top_k" in table and not quick and sort:
    table["top_k (sort)"] = gs.top_k(RATIO, method="sort")
  return table


def donated_stepper(tx, params, grads):
  """A runner of ``tx``'s jitted ``update + apply_updates`` on ``grads``,
  from a copy of ``params`` and a fresh state, both donated each step."""
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  carry = [jax.tree.map(jnp.copy, params), state]
  compiled = step.lower(carry[0], carry[1], grads).compile()

  def run():
    carry[0], carry[1] = compiled(carry[0], carry[1], grads)
    return carry[0]

  # XLA's temporaries of one step, in one block allocated per execution:
  # with glibc's malloc a block over its 32 MiB mmap ceiling is mapped and
  # page-faulted afresh on every step (see benchmarks/README.md).
  run.temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
  return run


def single_device(size: int, repeats: int, table: dict) -> dict:
  """Jitted optimizer update on one matrix: ratio to plain sgd.

  The full sort (`top_k(..., method="sort")`) is timed up to d = 1e7 only:
  at 1e8 one call takes tens of seconds here.
  """
  shape = (size // COLUMNS, COLUMNS)
  params = jnp.zeros(shape, jnp.float32)
  grads = jax.random.normal(jax.random.key(0), shape, jnp.float32)

  timed = lambda tx: _common.time_fn(donated_stepper(tx, params, grads),
                                     repeats=repeats)

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
  """Step time of 8 data-parallel workers: ratio to the dense sgd step.

  The plain step is a `jax.jit` over the batch sharded on the mesh (XLA
  all-reduces the gradient densely); the compressed one is
  `gs.data_parallel`'s step (one `jax.shard_map`, local gradients,
  `sparsify(c, axis_name=...)` aggregating) under the same `jax.jit`.
  """
  # Auto axes: XLA partitions the plain step and inserts its all-reduce.
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))
  params = mlp_init(jax.random.key(0), sizes)
  batch = mesh.size * batch_per_worker
  sharding = NamedSharding(mesh, P(AXIS))
  x = jax.device_put(jax.random.normal(jax.random.key(1), (batch, sizes[0])),
                     sharding)
  y = jax.device_put(jax.random.randint(jax.random.key(2), (batch,), 0,
                                        sizes[-1]), sharding)

  def timed(step, state):
    step = jax.jit(step)
    carry = [params, state]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1], x, y)[:2]
      return carry[0]

    return _common.time_fn(run, repeats=repeats)

  sgd = optax.sgd(0.1)

  def dense_step(params, state, x, y):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  base = timed(dense_step, sgd.init(params))
  rows = {"sgd (dense all-reduce)": base}
  for name, c in table.items():
    tx = optax.chain(gs.sparsify(c, axis_name=AXIS, granularity="layer"),
                     optax.sgd(0.1))
    dp = gs.data_parallel(mlp_loss, tx, mesh=mesh, axis_name=AXIS)
    rows[name] = timed(dp.step, dp.init(params))
  parameters = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
  return {"parameters": parameters, "workers": mesh.size,
          "steps": {name: {"seconds": t, "ratio_to_sgd": t / base}
                    for name, t in rows.items()}}


GRANULARITIES = ("global", "layer")
NONFINITE = ("skip", "ignore")


def transformer_shapes(scale: float = 1.0) -> dict:
  """The transformer-shaped pytree's leaf shapes (name -> shape).

  ``scale`` multiplies the parameter count: the width and the vocabulary
  both grow by ``sqrt(scale)`` (57 leaves at any scale).
  """
  grow = math.sqrt(scale)
  width = max(8, int(round(512 * grow)))
  vocab = max(8, int(round(8192 * grow)))
  shapes = {"embedding": (vocab, width)}
  for i in range(8):
    shapes[f"block{i}"] = {
        "qkv": (width, 3 * width), "o": (width, width),
        "up": (width, 4 * width), "down": (4 * width, width),
        "norm1": (width,), "norm2": (width,), "bias": (width,)}
  return shapes


def _interleaved_group(fns: dict, repeats: int) -> dict:
  """Median seconds of ``fns`` timed round-robin, and the error of any
  that failed to compile or run (those are left out of the timing)."""
  ok, errors = {}, {}
  for name, fn in fns.items():
    try:
      jax.block_until_ready(fn())  # compiles; the warm-up round follows
      ok[name] = fn
    except Exception as e:  # pylint: disable=broad-except
      errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return _common.time_interleaved(ok, repeats=repeats), errors


def transformer_pytree(scale: float, repeats: int, table: dict) -> dict:
  """Jitted step on the transformer-shaped pytree, ratios to sgd and adam.

  One interleaved group per compressor (its 4 variants with plain sgd,
  plain adam and the floor), so that only a few copies of the pytree are
  alive at once; the baselines are re-timed in every group and each
  variant's ratios are to the baselines of its own group.
  """
  shapes = transformer_shapes(scale)
  is_shape = lambda x: isinstance(x, tuple)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  grads = jax.tree.unflatten(treedef, [
      jax.random.normal(k, shape, jnp.float32)
      for k, shape in zip(keys, leaves)])
  params0 = jax.tree.map(jnp.zeros_like, grads)
  n_params = sum(math.prod(shape) for shape in leaves)

  stepper = lambda tx: donated_stepper(tx, params0, grads)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def floor(memory, grads):
    # Reads gradient and memory, writes memory and the output: the passes
    # an error-feedback update cannot avoid.
    memory = jax.tree.map(lambda g, m: g + m, grads, memory)
    return memory, jax.tree.map(lambda m: m * 0.01, memory)

  def floor_runner():
    carry = [jax.tree.map(jnp.zeros_like, grads)]

    def run():
      carry[0], out = floor(carry[0], grads)
      return out

    return run

  groups = {}
  for name, c in table.items():
    fns = {"sgd": stepper(optax.sgd(0.1)), "adam": stepper(optax.adam(1e-3)),
           "floor": floor_runner()}
    for granularity in GRANULARITIES:
      for nonfinite in NONFINITE:
        tx = optax.chain(gs.sparsify(c, granularity=granularity,
                                     nonfinite=nonfinite), optax.sgd(0.1))
        try:
          fns[f"{granularity}/{nonfinite}"] = stepper(tx)
        except Exception as e:  # pylint: disable=broad-except
          fns[f"{granularity}/{nonfinite}"] = functools.partial(
              _raise, e)
    times, errors = _interleaved_group(fns, repeats)
    base = {k: times[k] for k in ("sgd", "adam", "floor")}
    variants = {}
    for key in fns:
      if key in base:
        continue
      if key in errors:
        variants[key] = {"error": errors[key]}
        continue
      t = times[key]
      variants[key] = {"seconds": t, "ratio_to_sgd": t / base["sgd"],
                       "ratio_to_adam": t / base["adam"],
                       "ratio_to_floor": t / base["floor"],
                       "temp_bytes": fns[key].temp_bytes,
                       "minor_faults_per_step": _common.minor_faults(
                           fns[key])}
    groups[name] = {"baselines": base, "variants": variants}
    print(f"{name}: " + ", ".join(
        f"{k} {v['seconds'] * 1e3:.1f} ms ({v['ratio_to_sgd']:.2f}x sgd)"
        if "seconds" in v else f"{k} failed" for k, v in variants.items()),
          flush=True)
    del fns
  return {"model": {"name": "transformer", "scale": scale,
                    "parameters": n_params, "leaves": len(leaves),
                    "shapes": shapes},
          "repeats": repeats, "groups": groups}


def _raise(error):
  raise error


def charlm_step(repeats: int, batch: int, lr: float = 3e-3) -> dict:
  """Whole training step of `gsparse compare --task charlm`, one device.

  Forward + backward + update with plain adam (the task's default
  optimizer, lr 3e-3) vs `sparsify(dense())` and `sparsify(top_k(0.01))`
  (error feedback, global granularity: the CLI's defaults) in front of it,
  and the forward + backward alone; interleaved, params and state donated.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gsparse_jax._src.cli import tasks  # pylint: disable=import-outside-toplevel

  task = tasks.make_task("charlm")
  graphdef, params = nnx.split(task.make_model(0))
  x, y = task.batch(0, 0, (batch,))
  x, y = jnp.asarray(x), jnp.asarray(y)
  n_params = sum(p.size for p in jax.tree.leaves(params))

  def loss(params, x, y):
    return task.loss(nnx.merge(graphdef, params), x, y)

  grad_fn = jax.jit(jax.grad(loss))

  def stepper(tx):
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, x, y):
      grads = jax.grad(loss)(params, x, y)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    carry = [jax.tree.map(jnp.copy, params), state]

    def run():
      carry[0], carry[1] = step(carry[0], carry[1], x, y)
      return carry[0]

    return run

  fns = {"forward+backward": lambda: grad_fn(params, x, y),
         "adam": stepper(optax.adam(lr)),
         "sparsify(dense()) + adam": stepper(optax.chain(
             gs.sparsify(gs.dense()), optax.adam(lr))),
         "sparsify(top_k(0.01)) + adam": stepper(optax.chain(
             gs.sparsify(gs.top_k(0.01)), optax.adam(lr)))}
  times = _common.time_interleaved(fns, repeats=repeats)
  base = times["adam"]
  rows = {}
  for name, t in times.items():
    rows[name] = {"seconds": t, "ratio_to_adam": t / base}
    if name.startswith("sparsify"):
      # The share of the whole step that the transformation costs.
      rows[name]["overhead_share"] = (t - base) / t
  return {"model": {"name": "charlm", "parameters": n_params,
                    "batch": batch, "context": int(x.shape[-1])},
          "repeats": repeats, "steps": rows}


def _plot_transformer(result):
  groups = result["groups"]
  names = list(groups)
  keys = [f"{g}/{n}" for g in GRANULARITIES for n in NONFINITE]

  def plot(ax):
    width = 0.8 / (len(keys) + 1)
    xs = np.arange(len(names))
    for i, key in enumerate(keys):
      ax.bar(xs + i * width, [
          groups[n]["variants"].get(key, {}).get("ratio_to_sgd", np.nan)
          for n in names], width, label=key)
    ax.bar(xs + len(keys) * width,
           [groups[n]["baselines"]["adam"] / groups[n]["baselines"]["sgd"]
            for n in names], width, label="plain adam", color="0.6")
    ax.axhline(1.0, color="k", lw=0.8)
    floor = np.median([g["baselines"]["floor"] / g["baselines"]["sgd"]
                       for g in groups.values()])
    ax.axhline(floor, color="r", lw=0.8, ls="--", label="read+write floor")
    ax.set_xticks(xs + 0.4 - width / 2)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("step time / plain sgd step")
    model = result["model"]
    ax.set_title(f"sparsify(c) + sgd, {model['parameters'] / 1e6:.1f}M "
                 f"params in {model['leaves']} leaves, one device")
    ax.legend(fontsize=7)

  return plot


def _plot_charlm(result):
  steps = result["steps"]

  def plot(ax):
    names = list(steps)
    ax.barh(names, [steps[n]["seconds"] * 1e3 for n in names])
    ax.set_xlabel("ms per step")
    ax.set_title(f"charlm, {result['model']['parameters']:,} params, batch "
                 f"{result['model']['batch']}, one device", fontsize=9)

  return plot


def run_model(args) -> dict:
  """``--model transformer`` or ``charlm``: writes step_overhead_MODEL."""
  repeats = args.repeats or (3 if args.quick else 9)
  result = {"machine": _common.machine_description()}
  if args.model == "transformer":
    names = args.compressors or (("dense", "top_k") if args.quick else None)
    table = compressors(args.quick, names, sort=False)
    result.update(transformer_pytree(args.scale, repeats, table))
    plot = _plot_transformer(result)
    name = "step_overhead_transformer" + (
        "" if args.scale == 1 else f"_x{args.scale:g}")
  else:
    result.update(charlm_step(repeats, args.batch))
    plot = _plot_charlm(result)
    name = "step_overhead_charlm"
  try:
    result["load_average_after"] = list(os.getloadavg())
  except OSError:
    pass
  _common.write_json(args.out, name, result)
  _common.write_plot(args.out, name, plot,
                     figsize=(10, 5) if args.model == "transformer" else (9, 4))
  if args.model == "transformer":
    for cname, group in result["groups"].items():
      b = group["baselines"]
      print(f"{cname:<16} sgd {b['sgd'] * 1e3:7.2f} ms  adam "
            f"{b['adam'] * 1e3:7.2f} ms  floor {b['floor'] * 1e3:7.2f} ms")
      for key, row in group["variants"].items():
        if "seconds" in row:
          print(f"  {key:<14} {row['seconds'] * 1e3:8.2f} ms "
                f"{row['ratio_to_sgd']:6.2f}x sgd {row['ratio_to_adam']:6.2f}x"
                f" adam {row['ratio_to_floor']:6.2f}x floor  temp "
                f"{row['temp_bytes'] / 2**20:6.1f} MiB, "
                f"{row['minor_faults_per_step']} faults/step")
        else:
          print(f"  {key:<14} {row['error']}")
  else:
    for sname, row in result["steps"].items():
      share = (f" overhead {row['overhead_share'] * 100:5.1f}% of the step"
               if "overhead_share" in row else "")
      print(f"{sname:<30} {row['seconds'] * 1e3:8.2f} ms "
            f"{row['ratio_to_adam']:6.2f}x adam{share}")
  return result


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
  parser.add_argument("--model", default="matrix",
                      choices=("matrix", "transformer", "charlm"),
                      help="matrix: the single-device and 8-device tables "
                      "(default); transformer: the 57-leaf pytree; charlm: "
                      "a whole training step of the charlm task")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="--model transformer: parameter count multiplier "
                      "(4: 117.5M parameters)")
  parser.add_argument("--batch", type=int, default=16,
                      help="--model charlm: sequences per step")
  args = parser.parse_args(argv)
  if args.model != "matrix":
    return run_model(args)
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
    ax.set_xlabel("step time / plain sgd step")
    ax.set_title("8 data-parallel devices, MLP of "
                 f"{result['shard_map']['parameters']:,} params", fontsize=9)

  _common.write_plot(args.out, "step_overhead", plot, figsize=(9, 4))
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
