"""`sparsify`: gradient compression + aggregation as an optax transformation.

The transformation takes this worker's gradient pytree and returns the mean
over workers of what they sent, dense, with the input's structure, shapes and
dtypes, identical on every worker. Its state holds the error memory and
compressor state of this worker (leading worker axis of local size 1, so a
`shard_map` can shard it over the mesh and checkpoints hold every worker's),
the step count, and the communication statistics.

One step is a short pipeline (`update_fn`): `_checked_input` checks the
gradient against the state's segment plan (`segments.segment_plan`, worked
out once by `init`); `nonfinite.all_finite` decides whether the step is
applied; `_step` runs, per segment, feedback `prepare` (on the segment's
leaves as `pieces.Pieces`, never a materialized concatenation) -> compressor
`agree`/`select` -> compressor `aggregate` -> feedback `finish` -> compressor
`update`; `_record` counts it and `_unflatten` cuts the outputs back into
leaves. A skipped (non-finite) step runs the same code: its payloads are
masked to stand for nothing, so the memories come out as they went in,
and only small results are kept by selects (selects, not a `lax.cond`:
see `nonfinite`).
The generic code here knows compressors and feedback rules only through
their contracts (`compressors.Compressor`, `feedback.FeedbackRule`).

Meshes with several axes (under `jax.shard_map`): ``axis_name`` is the axis
compressed over. A leaf may also vary over other mesh axes (the shard of a
tensor-parallel parameter varies over ``"model"``); each device compresses
its own shard, and leaves are grouped into segments only with leaves that
vary over the same axes, so a replicated leaf gets the same update on every
device. The per-worker state of such a segment varies over those axes too
(`distributed.state_partition_specs` shards it accordingly). With
``inner_axes`` (two-level data parallelism) the gradient arrives summed
densely over the devices of a slice and is divided by their number first.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gsparse_jax._src import axes
from gsparse_jax._src import compressors
from gsparse_jax._src import feedback as feedback_lib
from gsparse_jax._src import layout
from gsparse_jax._src import nonfinite as nonfinite_lib
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import pieces as pieces_lib
from gsparse_jax._src import segments as segments_lib
from gsparse_jax._src import state_checks as checks
from gsparse_jax._src import stats as stats_lib
from gsparse_jax._src import validation
from gsparse_jax._src import workers as workers_lib

GRANULARITIES = segments_lib.GRANULARITIES
NONFINITE = nonfinite_lib.NONFINITE
MEMORY_DTYPES = ("float32", "bfloat16", "float16", "float64")


class SparsifyState(NamedTuple):
  """State of `sparsify`.

  Per-worker fields (every leaf has a leading worker axis, of size 1 inside
  the step): ``memory``, ``compressor_state``, ``stats``. Fields identical on
  every worker: ``count``, ``shared_memory``, ``plan``. On a mesh with
  several axes, the memory, compressor state and shared memory of a segment
  whose leaves are sharded over other axes are those of this device's
  shards (and differ across those axes).

  Attributes:
    count: int32 scalar, steps applied (skipped steps excluded); seeds the
      per-step randomness shared by all workers.
    memory: per segment, the worker's feedback memory (EF's ``e``, EF21's
      ``h_i``, EF21M's ``(v_i, h_i)``), at ``memory_dtype``; ``()`` for a
      segment kept dense.
    compressor_state: per segment, the compressor's worker state.
    shared_memory: per segment, memory identical on all workers (EF21's
      ``h``), at ``memory_dtype``.
    stats: `CommStats`, cumulative, per worker.
    plan: the `SegmentPlan` (static metadata, no array leaves): the
      gradient's structure, shapes and dtypes and how its leaves are
      grouped into segments, worked out once by `init`.
  """

  count: jax.Array
  memory: tuple
  compressor_state: tuple
  shared_memory: tuple
  stats: stats_lib.CommStats
  plan: segments_lib.SegmentPlan


class StepInputs(NamedTuple):
  """What one step reads: the count, whether the step is applied (false:
  a non-finite gradient somewhere, the step is skipped), the segments'
  gradients (`pieces.Pieces`) and this worker's state (without its worker
  axis)."""

  count: jax.Array
  applied: jax.Array
  grads: list
  memory: tuple
  compressor_state: tuple
  shared_memory: tuple


class StepOutcome(NamedTuple):
  """What one step (applied or skipped) produces, per segment."""

  outputs: list
  memory: tuple
  compressor_state: tuple
  shared_memory: tuple
  sent_values: jax.Array
  overflow: jax.Array


def segment_key(count: jax.Array, segment_index: int) -> jax.Array:
  """The PRNG key of one step and segment, identical on every worker."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), count),
                            segment_index)


def sparsify(compressor: compressors.Compressor, *, feedback: str = "ef",
             axis_name: Optional[str] = None, granularity: str = "global",
             nonfinite: str = "skip", momentum: float = 0.9,
             memory_dtype: Any = jnp.float32, inner_axes: Any = (),
             warmup_steps: int = 0,
             keep_dense: segments_lib.KeepDense = None
             ) -> optax.GradientTransformation:
  """Compresses each worker's gradient and returns the workers' mean.

  Args:
    compressor: what each worker sends, e.g. `top_k(0.01)`, `rand_k(0.01)`,
      `dense()`.
    feedback: ``"none"``, ``"ef"`` (error feedback, default), ``"ef21"`` or
      ``"ef21m"`` (EF21 with momentum).
    axis_name: the mapped axis of workers (`vmap`, `pmap`, `shard_map`);
      None for one worker and no collective. On a mesh with several axes,
      the axis compressed over: the gradient of a parameter sharded over
      other axes (tensor parallel) is compressed shard by shard, each
      device with the same ratio (``k = max(1, round(ratio * shard
      size))``), and aggregated over ``axis_name`` only.
    granularity: ``"global"`` (one budget over all float leaves,
      concatenated) or ``"layer"`` (a budget per leaf).
    nonfinite: ``"skip"`` (default): if any worker's gradient has a NaN/inf,
      every worker outputs zeros and keeps its state (the skip is counted in
      ``skipped_steps``); ``"raise"``: raise `FloatingPointError` on the host;
      ``"ignore"``: no check.
    momentum: EF21M's momentum ``beta`` in ``v <- beta v + (1 - beta) g``.
    memory_dtype: the dtype the feedback memories are stored in (float32 by
      default; bfloat16 halves the error memory of a large model). The
      arithmetic is float32 either way.
    inner_axes: two-level data parallelism: the mesh axes (a name or a
      tuple) inside a worker over which the batch is split too, e.g.
      ``"data"`` with ``axis_name="slice"``. The gradient must arrive SUMMED
      over them, as JAX's implicit dense all-reduce makes it inside
      `shard_map` for parameters replicated over them (use
      ``gs.local_value_and_grad(fun, axis_name)``); it is divided by their
      size, so with `dense()` the output is the mean over all data-parallel
      devices. Their dense traffic is counted in ``inner_dense_bytes``.
    warmup_steps: the first ``warmup_steps`` applied steps all-reduce the
      gradient densely (the workers' mean, counted as dense bytes; memory
      and compressor state untouched), as PowerSGD's
      ``start_powerSGD_iter``; then the compressor takes over. The switch
      is a `lax.cond` on the step count, so only the taken branch
      communicates.
    keep_dense: leaves all-reduced densely in the same transformation,
      without compression or feedback memory (their bytes counted as dense
      bytes): None, a ``(path, leaf) -> bool`` predicate, e.g.
      ``gs.small_or_vector_leaves(4096)`` for biases, norms and small
      tables, or a pytree (or tree prefix) of bools like the parameters.
      Under data parallelism this is the way to leave leaves uncompressed:
      ``optax.masked`` would skip their aggregation altogether.

  Returns:
    An `optax.GradientTransformation` whose state is a `SparsifyState`.
    Non-float and zero-size leaves pass through unchanged.

  Example:
    >>> import jax.numpy as jnp, optax, gsparse_jax as gs
    >>> tx = optax.chain(gs.sparsify(gs.top_k(k=1)), optax.sgd(1.0))
    >>> params = {"w": jnp.zeros(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([1.0, -5.0, 2.0])}, state)
    >>> updates["w"].tolist()
    [-0.0, 5.0, -0.0]

  Reference: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", 2018
  (arXiv 1809.07599).
  """
  if not isinstance(compressor, compressors.Compressor):
    raise TypeError("`compressor` must be a gsparse_jax Compressor (e.g. "
                    f"gs.top_k(0.01)); got {compressor!r}.")
  validation.choice(feedback, "feedback", feedback_lib.FEEDBACKS)
  validation.choice(granularity, "granularity", GRANULARITIES)
  validation.choice(nonfinite, "nonfinite", NONFINITE)
  momentum = validation.in_interval(momentum, "momentum", 0.0, 1.0)
  if axis_name is not None and not isinstance(axis_name, str):
    raise TypeError(f"`axis_name` must be a string or None, got "
                    f"{axis_name!r}.")
  memory_dtype = validation.dtype(memory_dtype, "memory_dtype", MEMORY_DTYPES)
  inner_axes = checks.check_inner_axes(inner_axes, axis_name)
  keep_dense = segments_lib.check_keep_dense(keep_dense)
  warmup_steps = validation.count(warmup_steps, "warmup_steps", minimum=0)
  if granularity == "global" and compressor.needs_shape:
    warnings.warn(
        f"gsparse_jax.sparsify: {compressor!r} compresses a tensor of known "
        "shape only; with granularity='global' every segment would be sent "
        "dense (density 1.0). Use granularity='layer'.", UserWarning,
        stacklevel=2)
  rule = feedback_lib.rule(feedback, momentum)
  workers = workers_lib.Workers(axis_name)

  def init_fn(params):
    checks.check_leaves(params, "params")
    # Inside shard_map the parameters' types say how they are sharded.
    plan = segments_lib.segment_plan(params, compressor,
                                     granularity=granularity,
                                     axis_name=axis_name,
                                     keep_dense=keep_dense)
    memories = [((), ()) if s.kept_dense else rule.init(s.size)
                for s in plan.segments]
    store = lambda tree: jax.tree.map(lambda m: m.astype(memory_dtype), tree)
    return SparsifyState(
        count=jnp.zeros([], jnp.int32),
        memory=layout.per_worker(store(tuple(m for m, _ in memories))),
        compressor_state=layout.per_worker(
            tuple(s.compressor.init(s.size) for s in plan.segments)),
        shared_memory=store(tuple(shared for _, shared in memories)),
        stats=stats_lib.init_stats(),
        plan=plan,
    )

  def update_fn(updates, state, params=None):
    del params
    plan, leaves, treedef = _checked_input(updates, state, axis_name)
    segments = plan.segments
    leaf_ids = [i for s in segments for i in s.leaf_ids]
    # The check reads the leaves, not the segments: a reduction over a
    # concatenated segment makes XLA materialize the concatenation.
    applied = nonfinite_lib.all_finite([leaves[i] for i in leaf_ids],
                                       (axis_name, *inner_axes), nonfinite)
    # The gradient is the sum over the inner devices: make it their mean.
    inner_scale = 1.0 / axes.num_workers(inner_axes)
    inputs = StepInputs(
        state.count, applied,
        [pieces_lib.of_leaves(leaves, s.leaf_ids, inner_scale)
         for s in segments],
        layout.local(state.memory), layout.local(state.compressor_state),
        state.shared_memory)
    warm = None
    if warmup_steps:
      warm = state.count < warmup_steps
      if not rule.skip_by_arithmetic:
        # Concatenated before the warm-up's cond, as this rule computes on
        # the vector: inside a branch XLA:CPU fuses the concatenation into
        # the arithmetic and rounds the last bit of some entries otherwise.
        inputs = inputs._replace(grads=[
            pieces_lib.Pieces((g.vector(),)) for g in inputs.grads])
    outcome = _step(segments, rule, workers, memory_dtype, warm, inputs)
    new_state = state._replace(
        count=state.count + applied.astype(jnp.int32),
        memory=layout.per_worker(outcome.memory),
        compressor_state=layout.per_worker(outcome.compressor_state),
        shared_memory=outcome.shared_memory,
        stats=_record(state.stats, plan, applied, outcome,
                      bool(inner_axes), warm, workers.size))
    outputs = _unflatten(outcome.outputs, leaves, segments, treedef)
    return nonfinite_lib.zero_if_skipped(outputs, leaf_ids,
                                         applied), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _checked_input(updates, state, axis_name):
  """(the state's segment plan, the gradient's leaves, its treedef), after
  checking the gradient and the state against each other."""
  checks.check_leaves(updates, "updates")
  if not isinstance(state, SparsifyState):
    raise TypeError("sparsify's update got a `state` that is not a "
                    f"SparsifyState: {type(state).__name__}.")
  plan = checks.plan_for_update(updates, state.plan, axis_name)
  leaves, treedef = jax.tree.flatten(updates)
  if axis_name is None:
    checks.warn_if_already_reduced(leaves)
  checks.check_segments(state, plan.segments, updates, axis_name)
  return plan, leaves, treedef


def _step(segments, rule, workers, memory_dtype, warm,
          inputs: StepInputs) -> StepOutcome:
  """The step, applied or skipped: compressed, or during the warm-up
  (``warm`` true) dense; a skipped step's outcome keeps the state.

  The selects that keep the state run on what is small (compressor state,
  counts) or what must stay (EF21's shared memory); the worker memories of
  segments whose payload can stand for nothing are kept by the arithmetic
  itself (`feedback`), so that XLA updates them in place.
  """
  compressed = lambda ins: _step_segments(segments, rule, workers,
                                          memory_dtype, ins)
  if warm is None:
    outcome = compressed(inputs)
  else:
    outcome = axes.cond(
        warm, lambda ins: _dense_step(segments, workers, ins), compressed,
        inputs)
  applied = inputs.applied
  memory = tuple(
      new if _memory_kept_by_arithmetic(segment, rule)
      else _memory_kept_by_select(applied, new, old)
      for segment, new, old in zip(segments, outcome.memory, inputs.memory))
  compressor_state, shared_memory = nonfinite_lib.keep_if_skipped(
      applied, [outcome.compressor_state, outcome.shared_memory],
      [inputs.compressor_state, inputs.shared_memory])
  return outcome._replace(
      memory=memory, compressor_state=compressor_state,
      shared_memory=shared_memory,
      sent_values=jnp.where(applied, outcome.sent_values, 0),
      overflow=jnp.where(applied, outcome.overflow, 0))


def _memory_kept_by_select(applied, new, old):
  """``new`` or (a skipped step) ``old`` worker memory, selected at the
  stored per-worker shape ``[1, size]``.

  So XLA writes the select into the donated memory's buffer. Selected on
  the local ``[size]`` view (a bitcast of the stored array), it computed the
  select into a temporary and copied that into the buffer: one full copy of
  the memory per step (cast, sign, PowerSGD, QSGD, ...; see
  ``benchmarks/README.md``).
  """
  return layout.local(nonfinite_lib.keep_if_skipped(
      applied, layout.per_worker(new), layout.per_worker(old)))


def _memory_kept_by_arithmetic(segment, rule) -> bool:
  """Whether a skipped step leaves the segment's worker memory as it was
  without a select: its payload can be masked to stand for nothing and the
  rule keeps its memory given such a payload (`feedback`)."""
  return (not segment.kept_dense and rule.skip_by_arithmetic
          and segment.compressor.layout in payload_lib.MASKABLE_LAYOUTS)


def _step_segments(segments, rule: feedback_lib.FeedbackRule,
                   workers: workers_lib.Workers, memory_dtype,
                   inputs: StepInputs) -> StepOutcome:
  """Every segment's step: feedback `prepare`, compressor `agree`/`select`
  and `aggregate`, feedback `finish`, compressor `update` (a segment kept
  dense: its workers' mean)."""
  count, applied, grads, memory, comp_state, shared_memory = inputs
  as_f32 = lambda tree: jax.tree.map(lambda m: m.astype(jnp.float32), tree)
  stored = lambda tree: jax.tree.map(lambda m: m.astype(memory_dtype), tree)
  outs, new_memory, new_comp, new_shared = [], [], [], []
  sent_values = overflow = jnp.zeros([], jnp.int32)
  for index, (segment, grad) in enumerate(zip(segments, grads)):
    c = segment.compressor
    if segment.kept_dense:
      outs.append(_dense_mean(segment, grad.vector(), workers))
      new_memory.append(memory[index])
      new_comp.append(comp_state[index])
      new_shared.append(shared_memory[index])
      sent_values = sent_values + segment.size
      continue
    x, worker_mem = rule.prepare(grad, as_f32(memory[index]), applied)
    sent = compressors.compress(c, x, comp_state[index],
                                segment_key(count, index), workers.axis_name,
                                segment.wire_dtype)
    if _memory_kept_by_arithmetic(segment, rule):
      sent = payload_lib.masked(sent, applied)
    received = c.aggregate(sent, workers)
    out, worker_mem, shared = rule.finish(
        x, c, sent, received.mean, worker_mem, as_f32(shared_memory[index]))
    new_comp.append(c.update(comp_state[index], sent, received))
    outs.append(out)
    new_memory.append(stored(worker_mem))
    new_shared.append(stored(shared))
    sent_values = sent_values + _per_worker_count(sent.count, segment.axes)
    overflow = overflow + _per_worker_count(sent.overflow, segment.axes)
  return StepOutcome(outs, tuple(new_memory), tuple(new_comp),
                     tuple(new_shared), sent_values, overflow)


def _dense_step(segments, workers: workers_lib.Workers,
                inputs: StepInputs) -> StepOutcome:
  """A warm-up step: every segment all-reduced densely (as `dense()` sends
  it, at its wire dtype), memories and compressor state as they were."""
  outs = [_dense_mean(s, g.vector(), workers)
          for s, g in zip(segments, inputs.grads)]
  return StepOutcome(outs, inputs.memory, inputs.compressor_state,
                     inputs.shared_memory,
                     jnp.asarray(sum(s.size for s in segments), jnp.int32),
                     jnp.zeros([], jnp.int32))


def _dense_mean(segment, grad, workers: workers_lib.Workers) -> jax.Array:
  """The workers' mean of a segment, all-reduced as `dense()` sends it."""
  return compressors.dense().aggregate(
      payload_lib.dense_payload(grad, segment.wire_dtype), workers).mean


def _per_worker_count(count: jax.Array, segment_axes) -> jax.Array:
  """A device's count, made the same on every device of its worker.

  Shards of one worker may count differently (data-dependent payloads); the
  statistics are per worker, so they keep the shards' mean (rounded). Counts
  that are the same everywhere (static budgets) cost no collective.
  """
  varying = tuple(a for a in segment_axes if axes.is_varying(count, a))
  if not varying:
    return count
  shards = axes.num_workers(varying)
  return (jax.lax.psum(count, varying) + shards // 2) // shards


def _record(stats, plan, applied, outcome, two_level: bool, warm,
            num_workers: int) -> stats_lib.CommStats:
  """The statistics after this step; the byte figures are static, except
  that a warm-up step (``warm``) sends the dense bytes."""
  sent_bytes = plan.sent_bytes
  if warm is not None:
    sent_bytes = jnp.where(warm, plan.dense_bytes, sent_bytes)
  return stats_lib.record_step(
      stats, applied=applied, sent_values=outcome.sent_values,
      sent_bytes=sent_bytes,
      dense_values=plan.dense_values,
      dense_bytes=plan.dense_bytes,
      overflow_values=outcome.overflow,
      # The dense gradient crossed the slice's links in JAX's all-reduce.
      inner_dense_bytes=plan.dense_bytes if two_level else 0,
      workers=num_workers)


def _unflatten(outputs, leaves, segments, treedef):
  """The output pytree: segments cut back into leaves, in their dtypes."""
  new_leaves = list(leaves)
  for segment, out in zip(segments, outputs):
    offset = 0
    for i in segment.leaf_ids:
      leaf = leaves[i]
      n = segments_lib.leaf_size(leaf.shape)
      new_leaves[i] = out[offset:offset + n].reshape(leaf.shape).astype(
          leaf.dtype)
      offset += n
  return jax.tree.unflatten(treedef, new_leaves)



#END
