"""DiLoCo: local steps, and a compressed outer step every ``sync_every`` calls.

Each worker trains its own copy of the parameters with the ``inner``
optimizer on its local gradients, without communicating. Every
``sync_every``-th call the workers agree on a new anchor (the outer
parameters): each worker's pseudo-gradient ``anchor - local_params`` goes
through `sparsify` (compressor, error feedback, mean over workers: the same
machinery, state and statistics as for gradients, one communication round
per sync), the ``outer`` optimizer applies that mean to the anchor, and
every worker's parameters jump to the new anchor. The inner optimizer's
state is kept across syncs, as in DiLoCo.

The sync is a `jax.lax.cond` on the call count (identical on every worker):
a select would run the sync's collectives on every call, which is the
traffic DiLoCo exists to avoid. Under `jax.vmap` with a batched state JAX
evaluates both branches (simulated workers: same results, the statistics
still count only the syncs).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from gsparse_jax._src import compressors
from gsparse_jax._src import layout
from gsparse_jax._src import transform
from gsparse_jax._src import validation


class DiLoCoState(NamedTuple):
  """State of `diloco`.

  Attributes:
    count: int32 scalar, calls so far (identical on every worker).
    anchor: the outer parameters, identical on every worker.
    inner_state: this worker's inner optimizer state, each leaf with a
      leading worker axis of size 1 (like the per-worker fields of
      `SparsifyState`).
    outer_state: the outer optimizer's state, identical on every worker.
    sync_state: the `SparsifyState` of the pseudo-gradients (error memory,
      statistics: ``gs.comm_stats`` counts one step per sync).
  """

  count: jax.Array
  anchor: Any
  inner_state: Any
  outer_state: Any
  sync_state: transform.SparsifyState

  # Read by `gsparse_jax.state_partition_specs`: sharded over the workers.
  per_worker_fields = ("inner_state",)
  # Read by `gsparse_jax.data_parallel`: the workers' parameters differ
  # between syncs, so it keeps a copy per worker.
  per_worker_params = True


def _check_transformation(tx, name: str) -> None:
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"diloco: `{name}` must be an optax.GradientTransformation "
                    f"(e.g. optax.adamw(1e-3)); got {type(tx).__name__}.")


def diloco(inner: optax.GradientTransformation,
           outer: optax.GradientTransformation, *, sync_every: int,
           compressor: compressors.Compressor = compressors.dense(),
           feedback: str = "ef", axis_name: Optional[str] = None,
           granularity: str = "global", warmup_steps: int = 0
           ) -> optax.GradientTransformation:
  """DiLoCo with compressed pseudo-gradients, as one transformation.

  Each call takes this worker's gradient and its current parameters and
  returns the update to apply to them (``optax.apply_updates``):

  * every call: the ``inner`` update of the local gradient (no
    communication);
  * every ``sync_every``-th call, in addition: with ``local`` the
    parameters after that inner update, the pseudo-gradient
    ``anchor - local`` is compressed with ``feedback`` and averaged over
    the workers (``sparsify(compressor, ...)``); ``outer`` updates the
    anchor with that mean; the returned update is ``new_anchor - params``,
    so every worker's parameters become the new anchor (the same on every
    worker to an ulp).

  With ``sync_every=1``, ``inner=optax.sgd(lr)``, ``outer=optax.sgd(1.0)``
  and `dense()` this is data-parallel SGD.

  Args:
    inner: the local optimizer (DiLoCo uses AdamW), applied to every local
      gradient; its state is per worker and kept across syncs.
    outer: the optimizer of the anchor, fed the mean pseudo-gradient once
      per sync (DiLoCo: ``optax.sgd(0.7, momentum=0.9, nesterov=True)``).
    sync_every: local steps per sync (DiLoCo's H), an integer >= 1.
    compressor: what each worker sends of its pseudo-gradient (default
      `dense()`); e.g. ``gs.top_k(0.01)``.
    feedback: the feedback rule on the pseudo-gradients (`sparsify`'s):
      ``"none"``, ``"ef"`` (default), ``"ef21"``, ``"ef21m"``.
    axis_name: the workers' mapped axis (`vmap`, `pmap`, `shard_map`), None
      for one worker.
    granularity: ``"global"`` or ``"layer"`` budget (`sparsify`'s).
    warmup_steps: the first ``warmup_steps`` syncs send the dense mean of
      the pseudo-gradients, the feedback memory left as it is (`sparsify`'s
      ``warmup_steps``: its steps are the syncs).

  Returns:
    An `optax.GradientTransformation` whose state is a `DiLoCoState`; its
    ``update`` needs ``params`` (this worker's parameters). Under
    `jax.shard_map` the parameters are per worker (e.g. a leading worker
    axis sharded over ``axis_name``, dropped inside the step); call
    ``init`` inside the `shard_map` with the (replicated) initial
    parameters and the specs from ``gs.state_partition_specs``.

  Example:
    >>> import jax.numpy as jnp, optax, gsparse_jax as gs
    >>> tx = gs.diloco(optax.sgd(0.5), optax.sgd(1.0), sync_every=2)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> u, state = tx.update(jnp.array([1.0, 2.0]), state, params)
    >>> params = params + u  # a local step
    >>> u, state = tx.update(jnp.array([1.0, 2.0]), state, params)
    >>> (params + u).tolist()  # synced: the anchor moved by the pseudo-grad
    [-1.0, -2.0]
    >>> int(gs.comm_stats(state)["steps"])
    1

  Reference: Douillard et al., "DiLoCo: Distributed Low-Communication
  Training of Language Models", 2023 (arXiv 2311.08105); compressed
  pseudo-gradients with error feedback as in SparseLoCo (Sarfi et al.,
  arXiv 2508.15706).
  """
  _check_transformation(inner, "inner")
  _check_transformation(outer, "outer")
  sync_every = validation.positive_int(sync_every, "sync_every")
  # The first `warmup_steps` syncs are sparsify's first steps.
  sync = transform.sparsify(compressor, feedback=feedback,
                            axis_name=axis_name, granularity=granularity,
                            warmup_steps=warmup_steps)

  def init_fn(params):
    return DiLoCoState(
        count=jnp.zeros([], jnp.int32),
        anchor=jax.tree.map(lambda p: jnp.asarray(p).copy(), params),
        inner_state=layout.per_worker(inner.init(params)),
        outer_state=outer.init(params),
        sync_state=sync.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("diloco's update needs `params` (this worker's "
                       "parameters): tx.update(grads, state, params).")
    if not isinstance(state, DiLoCoState):
      raise ValueError("diloco's update got a `state` that is not a "
                       f"DiLoCoState: {type(state).__name__}.")
    inner_updates, inner_state = inner.update(
        updates, layout.local(state.inner_state), params)
    count = state.count + 1

    def synchronize(operands):
      anchor, outer_state, sync_state = operands
      local = optax.apply_updates(params, inner_updates)
      pseudo = jax.tree.map(lambda a, p: a - p, anchor, local)
      mean, sync_state = sync.update(pseudo, sync_state)
      outer_updates, outer_state = outer.update(mean, outer_state, anchor)
      anchor = optax.apply_updates(anchor, outer_updates)
      onto_anchor = jax.tree.map(
          lambda a, p, u: (a - p).astype(u.dtype), anchor, params,
          inner_updates)
      return onto_anchor, (anchor, outer_state, sync_state)

    def local_step(operands):
      return inner_updates, operands

    new_updates, (anchor, outer_state, sync_state) = jax.lax.cond(
        count % sync_every == 0, synchronize, local_step,
        (state.anchor, state.outer_state, state.sync_state))
    return new_updates, DiLoCoState(
        count=count, anchor=anchor,
        inner_state=layout.per_worker(inner_state),
        outer_state=outer_state, sync_state=sync_state)

  return optax.GradientTransformation(init_fn, update_fn)

