"""`sparsify`: gradient compression + aggregation as an optax transformation.

The transformation takes this worker's gradient pytree and returns the mean
over workers of what they sent, dense, with the input's structure, shapes and
dtypes, identical on every worker. Its state holds the error memory and
compressor state of this worker (leading worker axis of local size 1, so a
`shard_map` can shard it over the mesh and checkpoints hold every worker's),
the step count, and the communication statistics.

One step is a short pipeline: check the input against the state, flatten the
float leaves into segments (`plan`), then, per segment, feedback `prepare` ->
compressor `agree`/`select` -> compressor `aggregate` -> feedback `finish` ->
compressor `update`; a non-finite step is skipped by selecting the old state
and zero outputs (a select, not a `lax.cond`: see `_keep_state_if_skipped`).
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

import dataclasses
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from gsparse_jax._src import axes
from gsparse_jax._src import compressors
from gsparse_jax._src import feedback as feedback_lib
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import stats as stats_lib
from gsparse_jax._src import validation
from gsparse_jax._src import wire
from gsparse_jax._src import workers as workers_lib

GRANULARITIES = ("global", "layer")
NONFINITE = ("skip", "raise", "ignore")
MEMORY_DTYPES = ("float32", "bfloat16", "float16", "float64")


class SparsifyState(NamedTuple):
  """State of `sparsify`.

  Per-worker fields (every leaf has a leading worker axis, of size 1 inside
  the step): ``memory``, ``compressor_state``, ``stats``. Fields identical on
  every worker: ``count``, ``shared_memory``, ``structure``. On a mesh with
  several axes, the memory, compressor state and shared memory of a segment
  whose leaves are sharded over other axes are those of this device's
  shards (and differ across those axes).

  Attributes:
    count: int32 scalar, steps applied (skipped steps excluded); seeds the
      per-step randomness shared by all workers.
    memory: per segment, the worker's feedback memory (EF's ``e``, EF21's
      ``h_i``, EF21M's ``(v_i, h_i)``), at ``memory_dtype``.
    compressor_state: per segment, the compressor's worker state.
    shared_memory: per segment, memory identical on all workers (EF21's
      ``h``), at ``memory_dtype``.
    stats: `CommStats`, cumulative, per worker.
    structure: the gradient pytree's structure, with each leaf's size as a
      scalar: int32 for a compressed leaf, uint32 for a leaf passed through
      (non-float or empty); every update checks its input against it.
  """

  count: jax.Array
  memory: tuple
  compressor_state: tuple
  shared_memory: tuple
  stats: stats_lib.CommStats
  structure: Any


PER_WORKER_FIELDS = ("memory", "compressor_state", "stats")


@dataclasses.dataclass(frozen=True)
class Segment:
  """A flat vector compressed as one: float leaves concatenated in order.

  Attributes:
    leaf_ids: positions of its leaves in the flattened gradient.
    size: its length.
    wire_dtype: the dtype its values travel in (the leaves' common dtype).
    compressor: the compressor for it (specialized to the leaf's shape
      under layer granularity).
    axes: the mesh axes besides the workers' that its leaves vary over
      (sorted; ``()`` for replicated leaves and outside `shard_map`).
  """

  leaf_ids: tuple[int, ...]
  size: int
  wire_dtype: Any
  compressor: compressors.Compressor
  axes: tuple[str, ...] = ()

  def wire(self) -> tuple[wire.Collective, ...]:
    return self.compressor.wire(self.size, self.wire_dtype)


class StepOutcome(NamedTuple):
  """What one step (applied or skipped) produces, per segment."""

  outputs: list
  memory: tuple
  compressor_state: tuple
  shared_memory: tuple
  sent_values: jax.Array
  overflow: jax.Array


def _leaf_size(leaf) -> int:
  return int(np.prod(leaf.shape))


def _is_compressible(leaf) -> bool:
  return jnp.issubdtype(leaf.dtype, jnp.floating) and _leaf_size(leaf) > 0


def group_leaves(ids, keys, granularity: str) -> list[list[int]]:
  """Which leaves are compressed together: the one rule, shared with
  `distributed.state_partition_specs`.

  Args:
    ids: positions of the compressed leaves, in order.
    keys: per leaf position, the mesh axes it varies over besides the
      workers' (`axes.sharded_axes`).
    granularity: ``"layer"`` (a segment per leaf) or ``"global"`` (a segment
      per distinct key, in order of first appearance: one budget over all
      leaves sharded alike, never mixing a replicated leaf with the shard of
      a sharded one).

  Returns:
    The segments' leaf positions.
  """
  if granularity == "layer":
    return [[i] for i in ids]
  groups: dict[Any, list[int]] = {}
  for i in ids:
    groups.setdefault(keys[i], []).append(i)
  return list(groups.values())


def plan(leaves, granularity: str, compressor: compressors.Compressor,
         axis_name: Optional[str] = None) -> list[Segment]:
  """How the float leaves are grouped into compressed segments (static)."""
  keys = [axes.sharded_axes(leaf, axis_name) for leaf in leaves]
  ids = [i for i, leaf in enumerate(leaves) if _is_compressible(leaf)]
  return [
      Segment(tuple(group),
              sum(_leaf_size(leaves[i]) for i in group),
              _common_dtype([leaves[i].dtype for i in group]),
              compressor.for_shape(tuple(leaves[group[0]].shape))
              if granularity == "layer" else compressor,
              keys[group[0]])
      for group in group_leaves(ids, keys, granularity)
  ]


def _common_dtype(dtypes) -> Any:
  """The dtype values of mixed-dtype leaves travel in (standard promotion:
  bfloat16 with float32 gives float32), whatever promotion mode is set."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def segment_key(count: jax.Array, segment_index: int) -> jax.Array:
  """The PRNG key of one step and segment, identical on every worker."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), count),
                            segment_index)


def _check_nonfinite_raise(bad):
  if bad:
    raise FloatingPointError(
        "gsparse_jax.sparsify: non-finite gradient (nonfinite='raise').")


def sparsify(compressor: compressors.Compressor, *, feedback: str = "ef",
             axis_name: Optional[str] = None, granularity: str = "global",
             nonfinite: str = "skip", momentum: float = 0.9,
             memory_dtype: Any = jnp.float32, inner_axes: Any = (),
             warmup_steps: int = 0) -> optax.GradientTransformation:
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
  inner_axes = _check_inner_axes(inner_axes, axis_name)
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
    _check_leaves(params, "params")
    leaves = jax.tree.leaves(params)
    # Inside shard_map the parameters' types say how they are sharded.
    segments = plan(leaves, granularity, compressor, axis_name)
    memories = [rule.init(s.size) for s in segments]
    store = lambda tree: jax.tree.map(lambda m: m.astype(memory_dtype), tree)
    return SparsifyState(
        count=jnp.zeros([], jnp.int32),
        memory=_per_worker(store(tuple(m for m, _ in memories))),
        compressor_state=_per_worker(
            tuple(s.compressor.init(s.size) for s in segments)),
        shared_memory=store(tuple(shared for _, shared in memories)),
        stats=stats_lib.init_stats(),
        structure=jax.tree.map(_structure_leaf, params),
    )

  def update_fn(updates, state, params=None):
    del params
    _check_leaves(updates, "updates")
    _check_state(updates, state)
    leaves, treedef = jax.tree.flatten(updates)
    if axis_name is None:
      _warn_if_already_reduced(leaves)
    segments = plan(leaves, granularity, compressor, axis_name)
    _check_segments(state, segments, updates, axis_name)
    # The gradient is the sum over the inner devices: make it their mean.
    inner_scale = 1.0 / axes.num_workers(inner_axes)
    grads = _segment_vectors(leaves, segments, inner_scale)
    operands = (state.count, grads, _local(state.memory),
                _local(state.compressor_state), state.shared_memory)
    # The check reads the leaves, not the segments: a reduction over a
    # concatenated segment makes XLA materialize the concatenation.
    applied = _all_finite([leaves[i] for s in segments for i in s.leaf_ids],
                          (axis_name, *inner_axes), nonfinite)
    compressed = lambda *ops: _step_segments(segments, rule, workers,
                                             memory_dtype, *ops)
    warm = None
    if warmup_steps:
      warm = state.count < warmup_steps
      outcome = axes.cond(
          warm, lambda *ops: _dense_step(segments, workers, *ops),
          compressed, *operands)
    else:
      outcome = compressed(*operands)
    if nonfinite != "ignore":
      outcome = _keep_state_if_skipped(outcome, applied, operands)
    new_state = state._replace(
        count=state.count + applied.astype(jnp.int32),
        memory=_per_worker(outcome.memory),
        compressor_state=_per_worker(outcome.compressor_state),
        shared_memory=outcome.shared_memory,
        stats=_record(state.stats, segments, applied, outcome,
                      bool(inner_axes), warm, workers.size))
    outputs = _unflatten(outcome.outputs, leaves, segments, treedef)
    if nonfinite != "ignore":
      outputs = _zero_if_skipped(outputs, segments, applied)
    return outputs, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _segment_vectors(leaves, segments, scale: float) -> list:
  """Each segment's flat float32 vector: its leaves concatenated in order
  (times ``scale``, the inner devices' mean under two-level parallelism)."""
  grads = [jnp.concatenate([leaves[i].reshape(-1).astype(jnp.float32)
                            for i in s.leaf_ids]) for s in segments]
  return grads if scale == 1.0 else [g * scale for g in grads]


def _step_segments(segments, rule: feedback_lib.FeedbackRule,
                   workers: workers_lib.Workers, memory_dtype, count, grads,
                   memory, comp_state, shared_memory) -> StepOutcome:
  """Every segment's step: feedback `prepare`, compressor `agree`/`select`
  and `aggregate`, feedback `finish`, compressor `update`."""
  as_f32 = lambda tree: jax.tree.map(lambda m: m.astype(jnp.float32), tree)
  stored = lambda tree: jax.tree.map(lambda m: m.astype(memory_dtype), tree)
  outs, new_memory, new_comp, new_shared = [], [], [], []
  sent_values = overflow = jnp.zeros([], jnp.int32)
  for index, (segment, grad) in enumerate(zip(segments, grads)):
    c = segment.compressor
    x, worker_mem = rule.prepare(grad, as_f32(memory[index]))
    sent = compressors.compress(c, x, comp_state[index],
                                segment_key(count, index), workers.axis_name,
                                segment.wire_dtype)
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


def _dense_step(segments, workers: workers_lib.Workers, count, grads,
                memory, comp_state, shared_memory) -> StepOutcome:
  """A warm-up step: every segment all-reduced densely (as `dense()` sends
  it, at its wire dtype), memories and compressor state as they were."""
  del count
  dense = compressors.dense()
  outs = [dense.aggregate(payload_lib.dense_payload(g, s.wire_dtype),
                          workers).mean for s, g in zip(segments, grads)]
  return StepOutcome(outs, memory, comp_state, shared_memory,
                     jnp.asarray(sum(s.size for s in segments), jnp.int32),
                     jnp.zeros([], jnp.int32))


def _keep_state_if_skipped(outcome: StepOutcome, applied: jax.Array,
                           operands) -> StepOutcome:
  """The step's outcome, or (``applied`` false) the state as it was, bit for
  bit (the outputs are zeroed leaf by leaf, `_zero_if_skipped`).

  A select on the results, not a `lax.cond` around the step: XLA fuses each
  select into the computation of its result (the old value is read there
  anyway), while a conditional materializes its operands and results
  around the branch computations (on XLA:CPU several full copies of the
  gradient). ``applied`` is the same on every worker.
  """
  _, _, memory, comp_state, shared_memory = operands
  keep = lambda new, old: jnp.where(applied, new, old)
  return StepOutcome(
      outputs=outcome.outputs,
      memory=jax.tree.map(keep, outcome.memory, memory),
      compressor_state=jax.tree.map(keep, outcome.compressor_state,
                                    comp_state),
      shared_memory=jax.tree.map(keep, outcome.shared_memory, shared_memory),
      sent_values=jnp.where(applied, outcome.sent_values, 0),
      overflow=jnp.where(applied, outcome.overflow, 0))


def _zero_if_skipped(outputs, segments, applied):
  """Zeros for the compressed leaves of a skipped step.

  Leaf by leaf, after the segments are cut back into leaves: a select over
  a whole segment would make XLA materialize its concatenation, which it
  otherwise folds away (a slice of a concatenate is the leaf itself).
  """
  leaves, treedef = jax.tree.flatten(outputs)
  for segment in segments:
    for i in segment.leaf_ids:
      leaves[i] = jnp.where(applied, leaves[i], jnp.zeros_like(leaves[i]))
  return jax.tree.unflatten(treedef, leaves)


def _per_worker(tree):
  """Adds the leading worker axis (local size 1) to every leaf."""
  return jax.tree.map(lambda x: x[None], tree)


def _local(tree):
  """Drops the leading worker axis."""
  return jax.tree.map(lambda x: x[0], tree)


def _structure_leaf(leaf) -> jax.Array:
  """A leaf of `SparsifyState.structure`: its size; the dtype says whether
  it is compressed (read by `distributed.state_partition_specs`)."""
  dtype = jnp.int32 if _is_compressible(leaf) else jnp.uint32
  return jnp.asarray(_leaf_size(leaf), dtype)


def is_compressed_structure_leaf(leaf) -> bool:
  """Whether a `SparsifyState.structure` leaf stands for a compressed leaf."""
  return jnp.dtype(leaf.dtype) == jnp.int32


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


def _record(stats, segments, applied, outcome, two_level: bool, warm,
            num_workers: int) -> stats_lib.CommStats:
  """The statistics after this step; the byte figures are static, except
  that a warm-up step (``warm``) sends the dense bytes."""
  dense_bytes = sum(s.size * jnp.dtype(s.wire_dtype).itemsize
                    for s in segments)
  sent_bytes = sum(wire.total_bytes(s.wire()) for s in segments)
  if warm is not None:
    sent_bytes = jnp.where(warm, dense_bytes, sent_bytes)
  return stats_lib.record_step(
      stats, applied=applied, sent_values=outcome.sent_values,
      sent_bytes=sent_bytes,
      dense_values=sum(s.size for s in segments),
      dense_bytes=dense_bytes,
      overflow_values=outcome.overflow,
      # The dense gradient crossed the slice's links in JAX's all-reduce.
      inner_dense_bytes=dense_bytes if two_level else 0,
      workers=num_workers)


def _unflatten(outputs, leaves, segments, treedef):
  """The output pytree: segments cut back into leaves, in their dtypes."""
  new_leaves = list(leaves)
  for segment, out in zip(segments, outputs):
    offset = 0
    for i in segment.leaf_ids:
      leaf = leaves[i]
      n = _leaf_size(leaf)
      new_leaves[i] = out[offset:offset + n].reshape(leaf.shape).astype(
          leaf.dtype)
      offset += n
  return jax.tree.unflatten(treedef, new_leaves)


def _all_finite(grads, axis_names, nonfinite) -> jax.Array:
  """Whether every device's gradient is finite (the same answer everywhere).

  Summed over the workers' and inner axes and every other axis a shard
  varies over: a NaN in one tensor-parallel shard skips the step on every
  device, so replicated leaves stay identical.
  """
  if nonfinite == "ignore" or not grads:
    return jnp.asarray(True)
  # sum(g - g) is NaN iff g holds a NaN or inf (and never overflows); an
  # arithmetic reduction is faster on XLA:CPU than counting a comparison,
  # and unlike `g * 0.0` it does not make XLA:CPU materialize a broadcast
  # zero operand of the gradient's size.
  bad = sum((~jnp.isfinite(jnp.sum(g - g))).astype(jnp.int32)
            for g in grads)
  bad = axes.sum_everywhere(bad, [a for a in axis_names if a is not None])
  if nonfinite == "raise":
    jax.debug.callback(_check_nonfinite_raise, bad > 0)
  return bad == 0


def _warn_if_already_reduced(leaves) -> None:
  """Warns when a gradient is a global array over a multi-device mesh.

  Under `jax.jit` with an explicit mesh (``jax.set_mesh``) the gradient of
  a batch sharded over the mesh arrives already all-reduced by XLA, densely:
  compressing it afterwards saves nothing, although the statistics would
  count compression. Outside `shard_map` nothing else can be seen.
  """
  for leaf in leaves:
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()):
      continue
    manual = set(getattr(mesh, "manual_axes", ()))
    if any(size > 1 and name not in manual
           for name, size in zip(mesh.axis_names, mesh.axis_sizes)):
      warnings.warn(
          "gsparse_jax.sparsify(axis_name=None) got a gradient that is a "
          f"global array over a {mesh.size}-device mesh: XLA has already "
          "all-reduced it densely, so compressing it saves no traffic. Put "
          "the step in gs.data_parallel(loss_fn, tx, mesh=...) with "
          "sparsify(..., axis_name='data') to compress the workers' local "
          "gradients.", UserWarning, stacklevel=3)
      return


def _check_inner_axes(inner_axes, axis_name) -> tuple[str, ...]:
  names = (inner_axes,) if isinstance(inner_axes, str) else inner_axes
  try:
    names = tuple(names or ())
  except TypeError:
    names = None
  if names is None or not all(isinstance(a, str) for a in names):
    raise ValueError("`inner_axes` must be a mesh axis name or a tuple of "
                     f"names; got {inner_axes!r}.")
  if axis_name in names:
    raise ValueError(f"`inner_axes` {names} must not contain the workers' "
                     f"axis `axis_name`={axis_name!r}.")
  return names


def _path_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _check_leaves(tree, name: str) -> None:
  """Every leaf of ``tree`` (the argument ``name``) is a real array."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
      raise TypeError(
          f"sparsify: `{name}` leaf {_path_name(path)} is a "
          f"{type(leaf).__name__}, not an array; pass a pytree of arrays.")
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"sparsify: `{name}` leaf {_path_name(path)} has complex dtype "
          f"{dtype}; only real float leaves are compressed (split complex "
          "gradients into real and imaginary parts).")


def _check_state(updates, state) -> None:
  """The state is a `SparsifyState` made for a pytree of this structure."""
  if not isinstance(state, SparsifyState):
    raise ValueError("sparsify's update got a `state` that is not a "
                     f"SparsifyState: {type(state).__name__}.")
  expected = jax.tree.structure(state.structure)
  got = jax.tree.structure(updates)
  if expected != got:
    raise ValueError(
        "sparsify: the structure of `updates` differs from the one the "
        f"state was initialized with: expected {expected}, got {got}. Call "
        "init with parameters of the same structure as the gradients.")
  sizes = jax.tree.leaves(state.structure)
  for (path, leaf), size in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0], sizes):
    if not isinstance(size, jax.core.Tracer) and _leaf_size(leaf) != int(
        np.asarray(size)):
      raise ValueError(
          f"sparsify: `updates` leaf {_path_name(path)} has {_leaf_size(leaf)} "
          f"entries (shape {tuple(leaf.shape)}); the state was initialized "
          f"for {int(np.asarray(size))}.")


def per_worker_spec(axis_name: str, segment_axes=()) -> P:
  """The `PartitionSpec` of a per-worker state leaf of a segment.

  Its leading axis (local size 1) is sharded over the workers' axis and
  the segment's other axes, worker-major: globally one entry per device of
  the group of devices that hold different state (a worker's tensor-parallel
  shards), so checkpoints hold all of them.
  """
  return P((axis_name, *segment_axes)) if segment_axes else P(axis_name)


def shared_spec(segment_axes=()) -> P:
  """The `PartitionSpec` of a segment's shared (worker-identical) memory:
  its flat axis sharded over the segment's axes, replicated otherwise."""
  return P(tuple(segment_axes)) if segment_axes else P()


def _check_segments(state, segments, updates, axis_name) -> None:
  """Per-worker state holds exactly one worker's segments of these sizes,
  sharded over the axes the gradient's leaves vary over."""
  if len(state.memory) != len(segments) or len(state.compressor_state) != len(
      segments):
    hint = ""
    if any(s.axes for s in segments):
      hint = (" The gradient's leaves are sharded over other mesh axes "
              f"({sorted({a for s in segments for a in s.axes})}): build the "
              "state's specs with gs.state_partition_specs(opt_state, "
              "axis_name, param_specs) and call init inside shard_map with "
              "the parameters' in_specs.")
    raise ValueError(
        f"sparsify: the state holds {len(state.memory)} compressed segments, "
        f"the gradient has {len(segments)}. Call init with parameters of the "
        f"same structure and dtypes as the gradients.{hint}")
  for field in PER_WORKER_FIELDS:
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        getattr(state, field))[0]:
      if leaf.ndim == 0 or leaf.shape[0] != 1:
        raise ValueError(
            f"sparsify: state leaf {field}{_path_name(path)} has shape "
            f"{tuple(leaf.shape)}, expected a leading worker axis of size 1 "
            "inside the step. Under shard_map, shard per-worker state over "
            "the workers' axis: in_specs/out_specs from "
            "gs.state_partition_specs(opt_state, axis_name); under vmap/pmap "
            "map the state over the workers.")
  for index, (segment, memory) in enumerate(zip(segments, state.memory)):
    for leaf in jax.tree.leaves(memory):
      if leaf.shape[-1] != segment.size:
        raise ValueError(
            f"sparsify: segment {index} of the gradient has {segment.size} "
            f"entries, its state memory has {leaf.shape[-1]}. Call init with "
            "parameters of the same structure as the gradients (inside "
            "shard_map: with the same in_specs as the step's parameters).")
  if axis_name is not None and axes.is_varying(state.stats.steps, axis_name):
    _check_sharding(state, segments, updates, axis_name)


def _check_sharding(state, segments, updates, axis_name) -> None:
  """The state came through shard_map specs that match the gradient's axes.

  Without this, a spec that forgets an axis the gradient varies over (a
  tensor-parallel leaf with ``P(axis_name)`` state) fails later in JAX or
  XLA with an error about shapes or types far from its cause.
  """
  paths = [_path_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(updates)[0]]
  for index, segment in enumerate(segments):
    leaf_names = ", ".join(paths[i] for i in segment.leaf_ids)
    fields = (("memory", state.memory[index], True),
              ("compressor_state", state.compressor_state[index], True),
              ("shared_memory", state.shared_memory[index], False))
    for field, tree, per_worker in fields:
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = f"{field}[{index}]{jax.tree_util.keystr(path)}"
        got = axes.sharded_axes(leaf, axis_name)
        if got == segment.axes:
          continue
        spec = (per_worker_spec(axis_name, got) if per_worker
                else shared_spec(got))
        expected = (per_worker_spec(axis_name, segment.axes) if per_worker
                    else shared_spec(segment.axes))
        missing = sorted(set(segment.axes) - set(got))
        extra = sorted(set(got) - set(segment.axes))
        reason = (f"the gradient leaves {leaf_names} vary over mesh axis "
                  f"{missing[0]!r} (their parameters are sharded over it)"
                  if missing else
                  f"the gradient leaves {leaf_names} do not vary over mesh "
                  f"axis {extra[0]!r} (their parameters are replicated over "
                  "it)")
        raise ValueError(
            f"sparsify: state leaf {where} is sharded as {spec}, but "
            f"{reason}; it must be {expected}. Build the state's specs with "
            f"gs.state_partition_specs(opt_state, {axis_name!r}, "
            "param_specs) from the same parameter specs the "
            "step gives shard_map, and use them for init's out_specs and the "
            "step's in_specs/out_specs.")
