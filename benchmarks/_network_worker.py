"""One process of `benchmarks.network` (not run by hand).

Started by `benchmarks.network.run_group` as

  python -m benchmarks._network_worker --process-id I --num-processes P \\
      --coordinator 127.0.0.1:PORT --plan PLAN.json

Every process owns one CPU device; together they form a 1-D ("data",) mesh
whose collectives go over TCP between the processes (gloo). Process 0 speaks
a line protocol on stdout/stdin with the launcher:

- ``RATE i``: "shape the link to ``plan["rates"][i]``"; the launcher answers
  ``GO`` on stdin once it has, and every process meets at a barrier;
- ``SAMPLE {json}``: one timed collective, for `gs.cost_model.calibrate`;
- ``ROW {json}``: one timed training step.

Timings are medians over repeats after one warm-up call. The repeat count is
bounded (``min_repeats`` .. ``max_repeats``, fewer when a call is slow
against ``cell_budget_s``) and process 0's choice is broadcast, so every
process runs the same number of collectives.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import signal
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
from benchmarks.step_overhead import mlp_init
from benchmarks.step_overhead import mlp_loss

AXIS = "data"
LAUNCHER_PID_ENV = "GSPARSE_NETWORK_LAUNCHER_PID"
# 4 B (the latency), then 64 KiB .. 64 MiB by factors of 2 (the bandwidth).
CALIBRATION_BYTES = (4,) + tuple(2**p for p in range(16, 27))


def mlp_shapes(widths) -> list[tuple[int, ...]]:
  """The shapes of the MLP's parameter leaves, in `jax.tree.leaves` order."""
  shapes = []
  for fan_in, fan_out in zip(widths[:-1], widths[1:]):
    shapes += [(fan_out,), (fan_in, fan_out)]  # "b" sorts before "w"
  return shapes


def mlp_params(widths) -> int:
  return sum(int(np.prod(shape)) for shape in mlp_shapes(widths))


class Timer:
  """Bounded, repeat-consistent timing of a zero-argument call."""

  def __init__(self, plan):
    self.min_repeats = plan["min_repeats"]
    self.max_repeats = plan["max_repeats"]
    self.budget_s = plan["cell_budget_s"]

  def median(self, call, *, collective: bool) -> float:
    """Median seconds of ``call()`` after a warm-up call.

    Args:
      call: runs one step and returns something to block on.
      collective: the call talks to the other processes, so all of them
        must run it equally often: process 0's repeat count is used.
    """
    warmup = _seconds(call)  # compilation, first touch of buffers
    samples = [_seconds(call)]
    count = int(np.clip(self.budget_s // max(samples[0], 1e-9),
                        self.min_repeats, self.max_repeats))
    if collective:
      count = int(multihost_utils.broadcast_one_to_all(np.int32(count)))
    for _ in range(count - 1):
      samples.append(_seconds(call))
    log(f"  warm-up {warmup:.3f} s, {count} timed: "
        + " ".join(f"{t:.4f}" for t in samples))
    return statistics.median(samples)


def _seconds(call) -> float:
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


def die_with_parent() -> None:
  """SIGKILL this process when its launcher dies (Linux), so that no worker
  outlives it. Called by the child itself, not between fork and exec (which
  is unsafe in a parent running JAX's threads); the launcher's pid comes in
  `LAUNCHER_PID_ENV`, to catch a launcher that died before this call."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: the launcher still kills
    return
  launcher = os.environ.get(LAUNCHER_PID_ENV)
  if launcher is not None and os.getppid() != int(launcher):
    os._exit(1)


def log(message: str) -> None:
  """Progress to stderr (the launcher's log file), for diagnosing a hang."""
  print(f"{time.strftime('%H:%M:%S')} p{jax.process_index()}: {message}",
        file=sys.stderr, flush=True)


def emit(kind: str, record: dict) -> None:
  if jax.process_index() == 0:
    print(f"{kind} {json.dumps(record)}", flush=True)


def set_rate(index: int) -> None:
  """Asks the launcher to shape the link, then meets the other processes."""
  if jax.process_index() == 0:
    print(f"RATE {index}", flush=True)
    answer = sys.stdin.readline().strip()
    if answer != "GO":
      raise RuntimeError(f"launcher answered {answer!r} to RATE {index}")
  multihost_utils.sync_global_devices(f"rate {index}")


def calibration_bytes(rate_gbit, num_processes: int, budget_s: float,
                      max_bytes: int):
  """Buffer sizes whose collective fits the time budget at a rate."""
  sizes = tuple(b for b in CALIBRATION_BYTES if b <= max_bytes)
  if rate_gbit is None:
    return sizes
  # A shared link carries 2 (n - 1) B for an all-reduce of B, n (n - 1) b for
  # an all-gather of b: keep the larger under budget_s / 4 per call.
  ceiling = budget_s / 4 * rate_gbit * 1e9 / 8 / (
      num_processes * (num_processes - 1))
  fitting = tuple(b for b in sizes if b <= ceiling)
  return fitting if len(fitting) >= 2 else sizes[:2]


def time_collectives(mesh, timer, rate, num_processes, plan) -> None:
  """Times a psum and an all-gather at several sizes: calibration samples."""
  sharding = NamedSharding(mesh, P(AXIS))
  ops = {
      "all_reduce": lambda x: jax.lax.psum(x, AXIS),
      "all_gather": lambda x: jax.lax.all_gather(x, AXIS, tiled=True),
  }
  for collective, op in ops.items():
    fn = jax.jit(jax.shard_map(op, mesh=mesh, in_specs=P(AXIS),
                               out_specs=P(), check_vma=False))
    for num_bytes in calibration_bytes(rate, num_processes,
                                       plan["cell_budget_s"],
                                       plan["calibration_max_bytes"]):
      log(f"{collective} of {num_bytes} B at {rate} Gbit/s")
      count = num_bytes // 4
      x = jax.make_array_from_process_local_data(
          sharding, np.ones((count,), np.float32))
      seconds = timer.median(lambda: fn(x), collective=True)
      emit("SAMPLE", {"processes": num_processes, "rate_gbit": rate,
                      "collective": collective, "num_bytes": num_bytes,
                      "seconds": seconds})


def local_stats(opt_state) -> dict:
  """`gs.comm_stats` of this process's workers (its shards of the state)."""
  local = jax.tree.map(
      lambda a: np.concatenate([np.asarray(s.data)
                                for s in a.addressable_shards]),
      opt_state[0].stats)
  return gs.comm_stats(local)


class SizeBench:
  """The steps of one model size: compute only, local and global per compressor."""

  def __init__(self, plan, widths, mesh, local_mesh):
    self.plan, self.mesh, self.local_mesh = plan, mesh, local_mesh
    self.widths = widths
    self.params = mlp_init(jax.random.key(plan["seed"]), widths)
    self.num_params = mlp_params(widths)
    batch = plan["batch_per_worker"]
    rng = np.random.default_rng(plan["seed"] + 1 + jax.process_index())
    x = rng.normal(size=(batch, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], size=(batch,)).astype(np.int32)
    self.local_batch = (jnp.asarray(x), jnp.asarray(y))
    sharding = NamedSharding(mesh, P(AXIS))
    self.global_batch = tuple(
        jax.make_array_from_process_local_data(sharding, a) for a in (x, y))
    # The same first gradient on every process: hard-threshold's calibration.
    sample_rng = np.random.default_rng(plan["seed"])
    sample_x = sample_rng.normal(size=(batch, widths[0])).astype(np.float32)
    sample_y = sample_rng.integers(0, widths[-1], size=(batch,))
    self.sample_grad = jax.jit(jax.grad(mlp_loss))(
        self.params, jnp.asarray(sample_x), jnp.asarray(sample_y))
    self.compressors = {
        name: gs.compressor_from_ratio(name, plan["ratio"], self.sample_grad)
        for name in plan["compressors"]}
    self.compute_step = self._compute_step()
    self.steps = {}

  def _compute_step(self):
    """Forward, backward and SGD on this process's batch: no collective."""
    lr = self.plan["lr"]

    @functools.partial(jax.jit, donate_argnums=0)
    def step(params, x, y):
      loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)
      return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

    return step

  def _sparsified_step(self, name, mesh):
    tx = optax.chain(
        gs.sparsify(self.compressors[name], feedback="ef", axis_name=AXIS,
                    granularity=self.plan["granularity"]),
        optax.sgd(self.plan["lr"]))
    specs = gs.state_partition_specs(jax.eval_shape(tx.init, self.params),
                                     AXIS)
    init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(),
                                 out_specs=specs))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    @functools.partial(jax.shard_map, mesh=mesh,
                       in_specs=(P(), specs, P(AXIS), P(AXIS)),
                       out_specs=(P(), specs, P(AXIS)))
    def step(params, opt_state, x, y):
      loss, grads = gs.local_value_and_grad(mlp_loss, AXIS)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      # Each worker's own loss: no collective beyond the compressor's.
      return optax.apply_updates(params, updates), opt_state, loss[None]

    return init, step

  def fresh_params(self, mesh):
    """A copy of the initial parameters, replicated over ``mesh``'s devices.

    Committed with the sharding the step returns, so the step compiles once
    (an uncommitted first input would compile a second variant).
    """
    replicated = NamedSharding(mesh, P())
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                   out_shardings=replicated)(self.params)

  def time_compute(self, timer) -> float:
    state = {"params": self.fresh_params(self.local_mesh)}

    def call():
      state["params"], loss = self.compute_step(state["params"],
                                                *self.local_batch)
      return loss

    return timer.median(call, collective=False)

  def time_step(self, name, timer, *, local: bool):
    """Median step seconds of compressor ``name`` and its bytes per worker."""
    key = (name, local)
    if key not in self.steps:
      mesh = self.local_mesh if local else self.mesh
      self.steps[key] = self._sparsified_step(name, mesh)
    init, step = self.steps[key]
    params = self.fresh_params(self.local_mesh if local else self.mesh)
    state = {"params": params, "opt": init(params)}
    batch = self.local_batch if local else self.global_batch

    def call():
      state["params"], state["opt"], loss = step(state["params"],
                                                 state["opt"], *batch)
      return loss

    seconds = timer.median(call, collective=not local)
    figures = local_stats(state["opt"])
    return seconds, figures["sent_bytes"] / max(figures["steps"], 1)


def run(args) -> None:
  die_with_parent()
  with open(args.plan) as f:
    plan = json.load(f)
  jax.config.update("jax_num_cpu_devices", 1)
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes,
                             process_id=args.process_id)
  mesh = jax.make_mesh((args.num_processes,), (AXIS,))
  local_mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), (AXIS,))
  timer = Timer(plan)
  rates = plan["rates"]
  if plan["calibrate"]:
    for index, rate in enumerate(rates):
      set_rate(index)
      time_collectives(mesh, timer, rate, args.num_processes, plan)
  for widths in plan["widths"]:
    bench = SizeBench(plan, widths, mesh, local_mesh)
    for index, rate in enumerate(rates):
      set_rate(index)
      # Compute-only and local steps run on every process at once, as the
      # training step does: the same CPU contention.
      log(f"{bench.num_params} params at {rate} Gbit/s: compute only")
      compute_s = bench.time_compute(timer)
      for name in plan["compressors"]:
        log(f"{name}: one worker, then {args.num_processes}")
        local_s, _ = bench.time_step(name, timer, local=True)
        multihost_utils.sync_global_devices(f"{name} {rate}")
        step_s, sent = bench.time_step(name, timer, local=False)
        emit("ROW", {"compressor": name, "processes": args.num_processes,
                     "rate_gbit": rate, "params": bench.num_params,
                     "widths": widths, "granularity": plan["granularity"],
                     "step_s": step_s,
                     "compute_s": compute_s, "local_s": local_s,
                     "bytes_per_worker": sent})
  jax.distributed.shutdown()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--plan", required=True)
  run(parser.parse_args(argv))


if __name__ == "__main__":
  main()
