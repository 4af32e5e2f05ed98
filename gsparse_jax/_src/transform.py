"""`sparsify`: gradient compression + aggregation as an optax transformation.

The transformation takes this worker's gradient pytree and returns the mean
over workers of what they sent, dense, with the input's structure, shapes and
dtypes, identical on every worker. Its state holds the error memory and
compressor state of this worker (leading worker axis of local size 1, so a
`shard_map` can shard it over the mesh and checkpoints hold every worker's),
the step count, and the communication statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsparse_jax._src import aggregate as aggregate_lib
from gsparse_jax._src import axes
from gsparse_jax._src import compressors
from gsparse_jax._src import feedback as feedback_lib
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import stats as stats_lib

GRANULARITIES = ("global", "layer")
NONFINITE = ("skip", "raise", "ignore")


class SparsifyState(NamedTuple):
  """State of `sparsify`.

  Per-worker fields (every leaf has a leading worker axis, of size 1 inside
  the step): ``memory``, ``compressor_state``, ``stats``. Fields identical on
  every worker: ``count``, ``shared_memory``.

  Attributes:
    count: int32 scalar, steps applied (skipped steps excluded); seeds the
      per-step randomness shared by all workers.
    memory: per segment, the worker's feedback memory (EF's ``e``, EF21's
      ``h_i``, EF21M's ``(v_i, h_i)``), float32.
    compressor_state: per segment, the compressor's worker state.
    shared_memory: per segment, memory identical on all workers (EF21's
      ``h``).
    stats: `CommStats`, cumulative, per worker.
  """

  count: jax.Array
  memory: tuple
  compressor_state: tuple
  shared_memory: tuple
  stats: stats_lib.CommStats


PER_WORKER_FIELDS = ("memory", "compressor_state", "stats")


@dataclasses.dataclass(frozen=True)
class _Segment:
  """A flat vector compressed as one: leaves concatenated in order."""
  leaf_ids: tuple[int, ...]
  size: int
  wire_dtype: Any
  shape: Optional[tuple[int, ...]] = None  # the leaf's, if layer-wise

  def compressor_for(self, compressor: compressors.Compressor
                     ) -> compressors.Compressor:
    """`compressor` specialized to this segment's tensor shape, if any."""
    return compressor if self.shape is None else compressor.for_shape(
        self.shape)


def _is_compressible(leaf) -> bool:
  return (jnp.issubdtype(leaf.dtype, jnp.floating)
          and int(np.prod(leaf.shape)) > 0)


def _plan(leaves, granularity: str) -> list[_Segment]:
  """How the float leaves are grouped into compressed segments (static)."""
  ids = [i for i, leaf in enumerate(leaves) if _is_compressible(leaf)]
  groups = [ids] if granularity == "global" and ids else [[i] for i in ids]
  return [
      _Segment(tuple(group),
               sum(int(np.prod(leaves[i].shape)) for i in group),
               jnp.result_type(*(leaves[i].dtype for i in group)),
               tuple(leaves[group[0]].shape) if granularity == "layer"
               else None)
      for group in groups
  ]


def compress(compressor: compressors.Compressor, x: jax.Array, state: Any,
             key: jax.Array, axis_name: Optional[str] = None,
             wire_dtype: Any = None,
             shape: Optional[tuple[int, ...]] = None) -> payload_lib.Payload:
  """Compresses one worker's flat vector into a `Payload`.

  Args:
    compressor: a `Compressor` (e.g. `gsparse_jax.top_k(0.01)`).
    x: a 1-D float array, this worker's (accumulated) vector.
    state: the compressor's state for this vector (``compressor.init(x.size)``
      on the first step).
    key: a PRNG key, identical on every worker for this step.
    axis_name: the workers' axis, used only by compressors that agree on
      shared indices; None for one worker.
    wire_dtype: dtype of the values on the wire (default ``x.dtype``).
    shape: if ``x`` is one tensor flattened, its shape (compressors that
      view the vector as a matrix, e.g. `arc_top_k`, then use its rows).

  Returns:
    The `Payload` (values, int32 indices, count), ready for `aggregate`.

  Example:
    >>> import jax, jax.numpy as jnp, gsparse_jax as gs
    >>> c = gs.top_k(k=1)
    >>> p = gs.compress(c, jnp.array([1.0, -4.0, 2.0]), c.init(3),
    ...                 jax.random.key(0))
    >>> p.indices.tolist(), p.values.tolist()
    ([1], [-4.0])
  """
  if x.ndim != 1:
    raise ValueError(f"compress takes a 1-D `x`, got shape {x.shape}.")
  if shape is not None:
    if int(np.prod(shape)) != x.shape[0]:
      raise ValueError(f"compress: `shape` {tuple(shape)} does not match "
                       f"the length {x.shape[0]} of `x`.")
    compressor = compressor.for_shape(tuple(shape))
  sent = compressor.select(x, state, key, axis_name)
  if wire_dtype is not None and sent.values.dtype != jnp.dtype(wire_dtype):
    sent = dataclasses.replace(sent, values=sent.values.astype(wire_dtype))
  return sent


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
             nonfinite: str = "skip", momentum: float = 0.9
             ) -> optax.GradientTransformation:
  """Compresses each worker's gradient and returns the workers' mean.

  Args:
    compressor: what each worker sends, e.g. `top_k(0.01)`, `rand_k(0.01)`,
      `dense()`.
    feedback: ``"none"``, ``"ef"`` (error feedback, default), ``"ef21"`` or
      ``"ef21m"`` (EF21 with momentum).
    axis_name: the mapped axis of workers (`vmap`, `pmap`, `shard_map`);
      None for one worker and no collective.
    granularity: ``"global"`` (one budget over all float leaves,
      concatenated) or ``"layer"`` (a budget per leaf).
    nonfinite: ``"skip"`` (default): if any worker's gradient has a NaN/inf,
      every worker outputs zeros and keeps its state (the skip is counted in
      ``skipped_steps``); ``"raise"``: raise `FloatingPointError` on the host;
      ``"ignore"``: no check.
    momentum: EF21M's momentum ``beta`` in ``v <- beta v + (1 - beta) g``.

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

  Reference: Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", 2018.
  """
  if not isinstance(compressor, compressors.Compressor):
    raise ValueError("`compressor` must be a gsparse_jax Compressor (e.g. "
                     f"gs.top_k(0.01)); got {compressor!r}.")
  compressors.check_choice(feedback, "feedback", feedback_lib.FEEDBACKS)
  compressors.check_choice(granularity, "granularity", GRANULARITIES)
  compressors.check_choice(nonfinite, "nonfinite", NONFINITE)
  if not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
  if axis_name is not None and not isinstance(axis_name, str):
    raise ValueError(f"`axis_name` must be a string or None, got "
                     f"{axis_name!r}.")

  per_worker = lambda x: x[None]

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    segments = _plan(leaves, granularity)
    memories = [feedback_lib.init_memory(feedback, s.size) for s in segments]
    return SparsifyState(
        count=jnp.zeros([], jnp.int32),
        memory=jax.tree.map(per_worker, tuple(m for m, _ in memories)),
        compressor_state=jax.tree.map(
            per_worker, tuple(s.compressor_for(compressor).init(s.size)
                              for s in segments)),
        shared_memory=tuple(shared for _, shared in memories),
        stats=stats_lib.init_stats(),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    segments = _plan(leaves, granularity)
    _check_state_matches(state, segments)
    local = lambda tree: jax.tree.map(lambda x: x[0], tree)
    memory, comp_state = local(state.memory), local(state.compressor_state)

    grads = [
        jnp.concatenate([leaves[i].reshape(-1).astype(jnp.float32)
                         for i in s.leaf_ids]) for s in segments
    ]
    # Static per-step figures, filled in while the step is traced.
    wire_bytes = []

    def communicate(grads, memory, comp_state, shared_memory):
      """One step of every segment: compress, aggregate, new memories."""
      outs, new_memory, new_comp, new_shared = [], [], [], []
      sent_values = overflow = jnp.zeros([], jnp.int32)
      wire_bytes.clear()
      for index, (segment, grad) in enumerate(zip(segments, grads)):
        x, worker_mem = feedback_lib.prepare(feedback, grad, memory[index],
                                             momentum)
        segment_compressor = segment.compressor_for(compressor)
        sent = compress(segment_compressor, x, comp_state[index],
                        segment_key(state.count, index), axis_name,
                        segment.wire_dtype)
        mean = aggregate_lib.aggregate(sent, axis_name)
        out, worker_mem, shared = feedback_lib.finish(
            feedback, x, sent, mean, worker_mem, shared_memory[index])
        new_comp.append(segment_compressor.update(
            comp_state[index], sent, mean, axes.num_workers(axis_name)))
        outs.append(out)
        new_memory.append(worker_mem)
        new_shared.append(shared)
        sent_values = sent_values + sent.count
        if sent.overflow is not None:
          overflow = overflow + sent.overflow
        wire_bytes.append(sent.wire_bytes())
      return (outs, tuple(new_memory), tuple(new_comp), tuple(new_shared),
              sent_values, overflow)

    def skip(grads, memory, comp_state, shared_memory):
      zeros = [jnp.zeros((s.size,), jnp.float32) for s in segments]
      none_sent = jnp.zeros([], jnp.int32)
      return (zeros, memory, comp_state, shared_memory, none_sent, none_sent)

    operands = (grads, memory, comp_state, state.shared_memory)
    applied = _all_finite(grads, axis_name, nonfinite)
    if nonfinite == "ignore":
      results = communicate(*operands)
    else:
      # A real branch, not a select: a finite step pays nothing for the
      # check but one read of the gradient, and a skipped step leaves every
      # memory bit-for-bit as it was. `applied` is the same on all workers.
      results = jax.lax.cond(applied,
                             _typed_per_worker(communicate, axis_name),
                             _typed_per_worker(skip, axis_name), *operands)
    outs, new_memory, new_comp, new_shared, sent_values, overflow = results

    new_state = SparsifyState(
        count=state.count + applied.astype(jnp.int32),
        memory=jax.tree.map(per_worker, new_memory),
        compressor_state=jax.tree.map(per_worker, new_comp),
        shared_memory=new_shared,
        stats=stats_lib.record_step(
            state.stats, applied=applied, sent_values=sent_values,
            sent_bytes=sum(wire_bytes),
            dense_values=sum(s.size for s in segments),
            dense_bytes=sum(s.size * jnp.dtype(s.wire_dtype).itemsize
                            for s in segments),
            overflow_values=overflow),
    )
    new_leaves = list(leaves)
    for segment, out in zip(segments, outs):
      offset = 0
      for i in segment.leaf_ids:
        leaf = leaves[i]
        n = int(np.prod(leaf.shape))
        new_leaves[i] = out[offset:offset + n].reshape(leaf.shape).astype(
            leaf.dtype)
        offset += n
    return jax.tree.unflatten(treedef, new_leaves), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _typed_per_worker(branch, axis_name):
  """``branch`` with its per-worker outputs typed varying across workers.

  Both branches of `lax.cond` under `shard_map` must agree on whether each
  output varies across workers; a skipped step returns per-worker state that
  may be typed replicated (e.g. a constant count), so both are cast alike.
  """
  def typed(*args):
    outs, memory, comp_state, shared, sent_values, overflow = branch(*args)
    memory, comp_state, sent_values, overflow = axes.to_varying(
        (memory, comp_state, sent_values, overflow), axis_name)
    return outs, memory, comp_state, shared, sent_values, overflow

  return typed


def _all_finite(grads, axis_name, nonfinite) -> jax.Array:
  """Whether every worker's gradient is finite (the same answer everywhere)."""
  if nonfinite == "ignore" or not grads:
    return jnp.asarray(True)
  # sum(g * 0) is NaN iff g holds a NaN or inf; an arithmetic reduction is
  # several times faster on XLA:CPU than counting a comparison.
  bad = sum((~jnp.isfinite(jnp.sum(g * 0.0))).astype(jnp.int32)
            for g in grads)
  if axis_name is not None:
    bad = jax.lax.psum(bad, axis_name)
  if nonfinite == "raise":
    jax.debug.callback(_check_nonfinite_raise, bad > 0)
  return bad == 0


def _check_state_matches(state, segments) -> None:
  if not isinstance(state, SparsifyState):
    raise ValueError("sparsify's update got a state that is not a "
                     f"SparsifyState: {type(state).__name__}.")
  expected = tuple(s.size for s in segments)
  sizes = tuple(
      jax.tree.leaves(m)[0].shape[-1] if jax.tree.leaves(m) else None
      for m in state.memory)
  if len(state.memory) != len(segments) or any(
      s is not None and s != e for s, e in zip(sizes, expected)):
    raise ValueError(
        "sparsify: the gradient pytree does not match the state it was "
        f"initialized with (compressed segment sizes {expected}, state has "
        f"{sizes}). Call init with parameters of the same structure.")
