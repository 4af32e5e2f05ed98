"""One training run of `gsparse compare`: a compressor on a task, N workers.

The model is a Flax NNX module trained with ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` where ``tx = optax.chain(gs.sparsify(...), optimizer)``
(wrapped in `gs.multi_steps` for gradient accumulation). The workers are the
devices of a mesh under `jax.shard_map`, or, simulated, the entries of a
`jax.vmap` on one device; both keep the same global state layout (per-worker
leaves with a leading axis of one slice per worker), so the Orbax
checkpoints hold every worker's error memory.

The run checkpoints (`checkpoints.Checkpoints`) its whole state, the step
(its data position: batches are a function of the step) and its curves, so
a resumed run ends with the same figures, bit for bit, as one that was
never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
from gsparse_jax._src.cli import tasks as tasks_lib
from gsparse_jax._src.cli.run_settings import AXIS
from gsparse_jax._src.cli.run_settings import make_tx
from gsparse_jax._src.cli.run_settings import Settings

class Curves(NamedTuple):
  """Per-step figures of a run (lists, JSON-ready).

  Attributes:
    step: 1..steps.
    loss: mean training loss of each step (over workers and micro-batches).
    eval_step: the steps at which the held-out data was scored.
    eval_loss, eval_accuracy: the held-out scores there.
    eval_bytes: cumulative bytes one worker had sent by then.
  """

  step: list
  loss: list
  eval_step: list
  eval_loss: list
  eval_accuracy: list
  eval_bytes: list

  @classmethod
  def empty(cls):
    return cls([], [], [], [], [], [])

  def with_eval(self, step, loss, accuracy, sent_bytes) -> "Curves":
    return self._replace(eval_step=self.eval_step + [step],
                         eval_loss=self.eval_loss + [loss],
                         eval_accuracy=self.eval_accuracy + [accuracy],
                         eval_bytes=self.eval_bytes + [sent_bytes])


class Outcome(NamedTuple):
  """The end of a run: final held-out scores, statistics and curves."""

  final_loss: float
  final_accuracy: float
  stats: dict
  curves: Curves
  wall_s: float
  num_params: int


class Progress(NamedTuple):
  """What the run reports after each step (for a progress bar)."""

  step: int
  loss: float
  sent_bytes: float


class Run:
  """A model, its optimizer and the compiled step of one compressor.

  Args:
    task: the `tasks.Task`.
    compressor: the `gs.Compressor` every worker uses.
    settings: the `Settings`.
    devices: the devices of the mesh (shard_map), unused when simulating.
  """

  def __init__(self, task: tasks_lib.Task, compressor: gs.Compressor,
               settings: Settings, devices):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    self.task, self.settings = task, settings
    model = _initial_model(task, settings.seed)
    self.param_leaves = [jax.ShapeDtypeStruct(p.shape, p.dtype)
                         for p in jax.tree.leaves(nnx.state(model, nnx.Param))]
    self.num_params = sum(int(np.prod(p.shape)) for p in self.param_leaves)
    self.model_graphdef, _ = nnx.split(model)
    optimizer = nnx.Optimizer(model, make_tx(compressor, settings),
                              wrt=nnx.Param)
    if settings.simulate:
      # One device; per-worker leaves get one slice per worker, as under
      # shard_map, and everything else stays unbatched (under DiLoCo, where
      # the parameters are per worker, everything else gets a copy per
      # worker: `_mapped_step` maps every leaf).
      self.mesh = None
      self.specs = gs.nnx_partition_specs((model, optimizer), AXIS)
      self.graphdef, state = nnx.split((model, optimizer))
      copies = lambda leaf: jax.numpy.broadcast_to(
          leaf, (settings.workers,) + leaf.shape)
      self.state = jax.tree.map(
          lambda leaf, spec: (
              jax.numpy.repeat(leaf, settings.workers, axis=0)
              if spec != P() else
              copies(leaf) if settings.sync_every is not None else leaf),
          state, self.specs)
    else:
      self.mesh = jax.make_mesh((settings.workers,), (AXIS,),
                                devices=list(devices)[:settings.workers])
      self.graphdef, self.state, self.specs = gs.nnx_shard(
          (model, optimizer), self.mesh, AXIS)
    # The seed changes the data and the initialization, not the step.
    key = (task.name, compressor, dataclasses.replace(settings, seed=0),
           None if self.mesh is None else tuple(self.mesh.devices.flat))
    if key not in _COMPILED:
      _COMPILED[key] = _compile(self.graphdef, self.specs, task, settings,
                                self.mesh)
    self._key, self._jitted = key, _COMPILED[key]
    self._warm = False  # whether the chunk of eval_every steps has run
    # The held-out score does not depend on the compressor or the workers.
    key = (task.name, self.model_graphdef)
    if key not in _EVALUATE:
      _EVALUATE[key] = _compile_evaluate(self.model_graphdef, task)
    self._evaluate = _EVALUATE[key]

  def batch(self, step: int):
    """Host inputs and targets of optimizer step ``step`` (0-based)."""
    s = self.settings
    return self.task.batch(s.seed, step,
                           (s.workers, s.accumulate, s.batch_size))

  def _placed(self, xs, ys):
    """``xs, ys`` (a chunk of batches: steps first, then workers) on the
    workers' devices."""
    if self.settings.simulate:
      return jax.device_put((xs, ys), jax.devices()[0])
    return jax.device_put((xs, ys), NamedSharding(self.mesh, P(None, AXIS)))

  def _placed_chunk(self, start: int, length: int):
    """Steps ``start..start+length-1``'s batches, stacked and placed.

    Lowering and timing the chunk take step 0's through here, so `batch`
    sees the training loop's data positions only.
    """
    s = self.settings
    shape = (s.workers, s.accumulate, s.batch_size)
    batches = [self.task.batch(s.seed, step, shape)
               for step in range(start, start + length)]
    return self._placed(*_stack(batches))

  def optimizer(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.merge(self.graphdef, self.state)[1]

  def stats(self) -> dict:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    # The optimizer's part of the state, without rebuilding the objects.
    return gs.comm_stats(nnx.as_pure(self.state[1]["opt_state"]))

  def evaluate(self) -> tuple[float, float]:
    """Held-out (loss, accuracy) of the current parameters, on one device."""
    # Host copies of the model's part of the state (nnx.split of (model,
    # optimizer)): the score does not depend on how the state is sharded.
    model_state = self.state[0]
    if self.settings.sync_every is not None:
      # DiLoCo: the anchor (the synced parameters, every worker's copy the
      # same), with worker 0's other variables.
      from flax import nnx  # pylint: disable=g-import-not-at-top
      first = lambda tree: jax.tree.map(lambda leaf: leaf[0], tree)
      model_state = nnx.merge_state(
          first(nnx.as_pure(model_state)),
          first(nnx.as_pure(self.state[1]["opt_state"]).anchor))
    loss, accuracy = self._evaluate(jax.device_get(model_state))
    return float(loss), float(accuracy)

  def compile_on(self, pool) -> None:
    """Lowers and compiles the chunk of `Settings.eval_every` steps on
    ``pool`` (a thread pool), so that it compiles while other runs train;
    `train` waits for it.

    Tracing holds Python's lock only part of the time and XLA compiles
    without it, so the compilation and the training loop of another run
    share the cores. The caller's dtype promotion rule (a thread-local JAX
    setting, e.g. ``jax.numpy_dtype_promotion("standard")``) holds in the
    pool's thread too.
    """
    if self._key not in _EXECUTABLES:
      xs, ys = self._placed_chunk(0, self.settings.eval_every)
      state, chunk = self.state, self._jitted.chunk
      promotion = jax.config.jax_numpy_dtype_promotion

      def lower_and_compile():
        with jax.numpy_dtype_promotion(promotion):
          return chunk.lower(state, xs, ys).compile()

      _EXECUTABLES[self._key] = pool.submit(lower_and_compile)

  def _chunk(self, state, xs, ys):
    """``len(xs)`` steps in one call (a `lax.scan`): the executable
    `compile_on` made for `Settings.eval_every` steps, else the jit."""
    future = _EXECUTABLES.get(self._key)
    if len(xs) != self.settings.eval_every:
      return self._jitted.chunk(state, xs, ys)
    self._warm = True
    return (self._jitted.chunk if future is None else future.result())(
        state, xs, ys)

  def time_step(self, steps: int = 30) -> float:
    """Seconds per step of the compiled training, blocking on each call.

    Times calls of the chunk of `Settings.eval_every` steps (the calls the
    training makes) on the current state and the batches from step 0,
    enough of them for ``steps`` steps and at least 3, after a warm-up call
    unless the run has trained in chunks already; returns the median call
    over the chunk's length. Discards their results: the run's state, and
    so its figures, do not change.
    """
    length = self.settings.eval_every
    xs, ys = self._placed_chunk(0, length)
    if not self._warm:
      jax.block_until_ready(self._chunk(self.state, xs, ys))
    seconds = []
    for _ in range(max(3, -(-steps // length))):
      began = time.perf_counter()
      jax.block_until_ready(self._chunk(self.state, xs, ys))
      seconds.append(time.perf_counter() - began)
    return float(np.median(seconds)) / length

  def train(self, steps: int, *, start: int = 0,
            curves: Optional[Curves] = None, wall_s: float = 0.0,
            on_step: Callable[[Progress], None] = lambda p: None,
            checkpoints=None) -> Outcome:
    """Trains from step ``start`` (its state and curves) up to ``steps``,
    saving into ``checkpoints`` (a `checkpoints.Checkpoints`) when given.

    The steps between two evaluations run as one call (`lax.scan`), without
    a host round trip per step; a stretch with a checkpoint inside it, or
    shorter than `Settings.eval_every` (the end of a run, a resume off the
    evaluation grid), one step per call.
    """
    curves = curves or Curves.empty()
    every = self.settings.eval_every
    sent = curves.eval_bytes[-1] if curves.eval_bytes else 0.0
    step = start
    while step < steps:
      began = time.perf_counter()
      end = min((step // every + 1) * every, steps)
      inside = checkpoints is not None and any(
          checkpoints.due(done, steps) for done in range(step + 1, end))
      length = 1 if end - step < every or inside else end - step
      xs, ys = self._placed(*_stack([self.batch(t)
                                     for t in range(step, step + length)]))
      # Blocking on each call keeps XLA:CPU's collectives of 8 virtual
      # devices from stalling on few cores; the losses are needed anyway.
      self.state, losses = self._chunk(self.state, xs, ys)
      losses = np.asarray(losses).tolist()
      done = step + length
      curves.step.extend(range(step + 1, done + 1))
      curves.loss.extend(losses)
      if done % every == 0:
        sent = self.stats()["sent_bytes"]
        curves = curves.with_eval(done, *self.evaluate(), sent)
      wall_s += time.perf_counter() - began
      for offset, loss in enumerate(losses):
        on_step(Progress(step + offset + 1, loss, sent))
      step = done
      if checkpoints is not None and checkpoints.due(done, steps):
        checkpoints.save(done, self.state, curves, wall_s)
    began = time.perf_counter()
    stats = self.stats()
    if curves.eval_step and curves.eval_step[-1] == steps:
      # Scored at the last step already.
      final_loss, final_accuracy = curves.eval_loss[-1], curves.eval_accuracy[-1]
    else:
      # The end of a run whose length is not a multiple of --eval-every.
      final_loss, final_accuracy = self.evaluate()
      curves = curves.with_eval(steps, final_loss, final_accuracy,
                                stats["sent_bytes"])
    wall_s += time.perf_counter() - began
    if checkpoints is not None:
      checkpoints.close()
    return Outcome(final_loss, final_accuracy, stats, curves, wall_s,
                   self.num_params)


def _stack(batches):
  """``[(x, y), ...]`` to ``(xs, ys)``, the steps as the leading axis."""
  return tuple(np.stack(parts) for parts in zip(*batches))


# The jitted step per (task, compressor, settings but the seed, devices): the
# seeds of a compressor, and runs of one configuration in one process
# (tests, notebooks), compile once; the jitted evaluation per task and model.
_COMPILED: dict = {}
_EVALUATE: dict = {}
# The freshly initialized model per (task, seed), copied for each run: the
# compressors of a seed start from one initialization, made once.
_MODELS: dict = {}
# Ahead-of-time compilations of the jitted steps (futures), by the same key.
_EXECUTABLES: dict = {}


def _initial_model(task, seed: int):
  """A copy of ``task.make_model(seed)``, which runs once per task and seed."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  key = (task, seed)
  if key not in _MODELS:
    _MODELS[key] = task.make_model(seed)
  return nnx.clone(_MODELS[key])


def _body(graphdef, task, settings, state, x, y):
  """One optimizer step of one worker on its local micro-batches."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model, optimizer = nnx.merge(graphdef, state)
  grad_fn = gs.nnx_local_value_and_grad(task.loss, AXIS)
  total = 0.0
  for micro in range(settings.accumulate):
    loss, grads = grad_fn(model, x[micro], y[micro])
    optimizer.update(model, grads)  # communicates on the last micro-batch
    total = total + loss
  loss = jax.lax.pmean(total / settings.accumulate, AXIS)
  return nnx.state((model, optimizer)), loss


def _compile_evaluate(model_graphdef, task):
  """The jitted held-out evaluation of a model's state."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return jax.jit(lambda model_state: task.evaluate(
      nnx.merge(model_graphdef, model_state)))


class _Jitted(NamedTuple):
  """The jitted steps of a run: ``chunk(state, xs, ys) -> (state, losses)``
  runs ``len(xs)`` steps (a `lax.scan` over the leading axis of the
  batches)."""

  chunk: Callable


def _compile(graphdef, specs, task, settings, mesh) -> _Jitted:
  """The jitted training steps of a run."""
  step = _mapped_step(graphdef, specs, task, settings, mesh)

  def chunk(state, xs, ys):
    return jax.lax.scan(lambda carry, batch: step(carry, *batch), state,
                        (xs, ys))

  return _Jitted(jax.jit(chunk))


def _mapped_step(graphdef, specs, task, settings, mesh):
  """One step of every worker: ``(state, x, y) -> (state, loss)``."""
  body = functools.partial(_body, graphdef, task, settings)
  if not settings.simulate:
    return jax.shard_map(
        lambda state, x, y: body(state, x[0], y[0]), mesh=mesh,
        in_specs=(specs, P(AXIS), P(AXIS)),
        out_specs=(specs, P()))
  mask = jax.tree.map(lambda spec: spec != P(), specs)
  # Under DiLoCo every leaf has a copy per worker (`Run`).
  everything = settings.sync_every is not None
  axes = jax.tree.map(
      lambda per_worker: 0 if per_worker or everything else None, mask)

  def worker(state, x, y):
    # vmap drops the worker axis; sparsify keeps a local one of size 1.
    state = jax.tree.map(lambda leaf, m: leaf[None] if m else leaf, state,
                         mask)
    state, loss = body(state, x, y)
    return jax.tree.map(lambda leaf, m: leaf[0] if m else leaf, state,
                        mask), loss

  return jax.vmap(worker, in_axes=(axes, 0, 0), out_axes=(axes, None),
                  axis_name=AXIS)
