"""Helpers for training steps under `shard_map`: state specs, local gradients."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import optax
from jax.sharding import PartitionSpec as P

from gsparse_jax._src import axes
from gsparse_jax._src import layout
from gsparse_jax._src import transform


def state_partition_specs(opt_state: Any, axis_name: str,
                          param_specs: Any = None) -> Any:
  """PartitionSpecs for a (chained) optimizer state under `shard_map`.

  Per-worker leaves of every `SparsifyState` (error memory, compressor state,
  statistics) are sharded over the workers' axis, ``P(axis_name)``: each has
  a leading worker axis of local size 1. Everything else (the step count,
  EF21's shared estimate, and the rest of the chain, e.g. Adam's moments,
  which see identical aggregated updates on every worker) is replicated,
  ``P()``.

  With ``param_specs`` (the parameters' specs as given to `shard_map`, on a
  mesh with several axes), the state follows the parameters' sharding:

  * a segment whose parameters are sharded over other axes (tensor
    parallel, e.g. ``P(None, "model")``) holds each device's own shard
    state: its per-worker leaves get ``P((axis_name, "model"))``, the
    leading axis holding one entry per device, worker-major; its shared
    memory (EF21's estimate) gets ``P("model")`` on its flat axis;
  * every parameter-shaped part of the chain (momentum, Adam's moments: a
    subtree with the parameters' tree structure) gets ``param_specs``;
  * under ``granularity="global"``, leaves sharded differently are
    compressed as separate segments (`gs.segment_plan`), so the specs
    describe the state as `init` builds it inside `shard_map`: given
    ``jax.eval_shape(tx.init, params)`` (one segment, the parameters'
    sharding unknown there) the returned tree has one entry per segment.
    The state's `SegmentPlan` (static, without array leaves) stays in
    the specs, as the plan of parameters laid out as ``param_specs``.

  The statistics stay ``P(axis_name)``: per worker, the same on all of its
  devices.

  Args:
    opt_state: the optimizer state, or its abstract shape
      (``jax.eval_shape(tx.init, params)``).
    axis_name: the mesh axis of the workers (the compressed axis).
    param_specs: None, or the pytree (or a tree prefix) of `PartitionSpec`
      of the parameters. They must not shard over ``axis_name``: every
      worker holds all of its shards.

  Returns:
    A pytree of `PartitionSpec` for the ``in_specs``/``out_specs`` of
    `jax.shard_map`: init's ``out_specs`` and the step's state specs.

  Raises:
    ValueError: when ``param_specs`` does not fit the parameters or shards
      a parameter over ``axis_name``; when a `sparsify` state sits inside
      ``optax.MultiSteps`` or ``optax.apply_if_finite``, whose per-worker
      decisions and accumulators cannot run under `shard_map` (use
      `gsparse_jax.multi_steps`, and sparsify's ``nonfinite="skip"``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsparse_jax as gs
    >>> from jax.sharding import PartitionSpec as P
    >>> tx = optax.chain(gs.sparsify(gs.top_k(0.5), axis_name="data"),
    ...                  optax.sgd(0.1))
    >>> specs = gs.state_partition_specs(tx.init(jnp.zeros(4)), "data")
    >>> specs[0].memory, specs[0].count
    ((P('data',),), P())
    >>> specs = gs.state_partition_specs(
    ...     tx.init({"w": jnp.zeros((4, 2))}), "data", {"w": P(None, "model")})
    >>> specs[0].memory
    (P(('data', 'model'),),)
  """
  _check_wrappers(opt_state)
  param_trees = []  # (treedef, full spec tree) of each parameter structure
  if param_specs is not None:
    for state in sparsify_states(opt_state):
      full = full_param_specs(param_specs, _params_like(state.plan))
      param_trees.append((state.plan.treedef, full))

  def parameter_shaped(node):
    for treedef, full in param_trees:
      if jax.tree.structure(node) == treedef and all(
          getattr(leaf, "ndim", 0) >= len(spec) for leaf, spec in
          zip(jax.tree.leaves(node), jax.tree.leaves(full, is_leaf=_is_spec))):
        return full
    return None

  def is_node(node):
    return isinstance(node, transform.SparsifyState) or _has_per_worker(
        node) or (bool(param_trees) and parameter_shaped(node) is not None)

  def spec_for(node):
    if isinstance(node, transform.SparsifyState):
      return _sparsify_specs(node, axis_name, param_specs)
    if _has_per_worker(node):
      # Another state with per-worker fields (e.g. `multi_steps`' gradient
      # accumulators, `diloco`'s inner optimizer state: a leading worker
      # axis on every leaf); its fields may hold a whole chain.
      specs = lambda tree: jax.tree.map(spec_for, tree, is_leaf=is_node)
      per_worker = lambda tree: jax.tree.map(
          lambda spec: P(axis_name, *spec), specs(tree), is_leaf=_is_spec)
      return node._replace(**{
          field: (per_worker if field in node.per_worker_fields else specs)(
              getattr(node, field)) for field in node._fields})
    full = parameter_shaped(node) if param_trees else None
    return P() if full is None else full

  return jax.tree.map(spec_for, opt_state, is_leaf=is_node)


# optax wrappers that cannot hold a `sparsify` state under data parallelism
# (checked with optax 0.2.8), and what to use instead.
_UNSUPPORTED_WRAPPERS = {
    optax.MultiStepsState: (
        "optax.MultiSteps",
        "it calls the inner update (compression and collectives) on every "
        "micro-step and keeps its state only on the k-th: k times the "
        "traffic, 1/k of it counted in comm_stats. Use gs.multi_steps(tx, "
        "every_k_steps=k), which communicates once per k micro-steps"),
    optax.ApplyIfFiniteState: (
        "optax.apply_if_finite",
        "it decides per worker (on the local gradient) whether to run the "
        "inner update, so workers disagree: under shard_map JAX rejects "
        "the cond, under pmap the workers that run it wait for the others' "
        "collectives forever, under vmap its counters differ per worker. "
        "sparsify(..., nonfinite='skip') (the default) already skips a step "
        "on every worker when any worker's gradient is not finite"),
}


def _check_wrappers(opt_state) -> None:
  """Refuses optax wrappers that break with a `sparsify` state inside."""
  wrappers = tuple(_UNSUPPORTED_WRAPPERS)
  for node in jax.tree.leaves(opt_state,
                              is_leaf=lambda n: isinstance(n, wrappers)):
    if isinstance(node, wrappers) and sparsify_states(tuple(node)):
      wrapper, why = _UNSUPPORTED_WRAPPERS[type(node)]
      raise ValueError(
          f"state_partition_specs: the state holds a gsparse_jax.sparsify "
          f"state inside {wrapper}, which does not work under data "
          f"parallelism: {why}.")


def keeps_per_worker_params(opt_state: Any) -> bool:
  """Whether a state holds a transformation whose parameters differ per
  worker (its NamedTuple declares ``per_worker_params = True``, as
  `diloco`'s does): `data_parallel` then keeps a copy per worker."""
  marked = lambda node: getattr(node, "per_worker_params", False) is True
  return any(marked(node)
             for node in jax.tree.leaves(opt_state, is_leaf=marked))


def _has_per_worker(node) -> bool:
  """A NamedTuple state declaring ``per_worker_fields``."""
  return isinstance(node, tuple) and hasattr(node, "_fields") and hasattr(
      node, "per_worker_fields")


def _is_spec(x) -> bool:
  return isinstance(x, P)


def sparsify_states(tree) -> list:
  return [node for node in jax.tree.leaves(
      tree, is_leaf=lambda n: isinstance(n, transform.SparsifyState))
          if isinstance(node, transform.SparsifyState)]


def full_param_specs(param_specs, structure):
  """``param_specs`` broadcast to the parameters' full tree."""
  try:
    full = jax.tree.broadcast(param_specs, structure,
                              is_leaf=lambda x: _is_spec(x) or x is None)
  except (ValueError, TypeError) as error:
    raise ValueError(
        "state_partition_specs: `param_specs` must be a PartitionSpec tree "
        "(or tree prefix) of the parameters, whose structure is "
        f"{jax.tree.structure(structure)}; got {param_specs!r} ({error})."
        ) from None
  for path, spec in jax.tree_util.tree_flatten_with_path(
      full, is_leaf=lambda x: _is_spec(x) or x is None)[0]:
    if not _is_spec(spec):
      raise ValueError(
          f"state_partition_specs: param_specs for leaf "
          f"{jax.tree_util.keystr(path)} is {spec!r}, not a PartitionSpec.")
  return full


def spec_axes(spec: P) -> set[str]:
  names = set()
  for entry in spec:
    names.update((entry,) if isinstance(entry, str) else
                 (a for a in (entry or ()) if isinstance(a, str)))
  return names


def needs_sharded_init(opt_state, axis_name: str, param_specs) -> bool:
  """Whether a `sparsify` state in ``opt_state`` was planned without the
  sharding ``param_specs`` gives its parameters (built outside
  `shard_map`): its segments then differ from those `init` makes inside."""
  return any(_plan_under_specs(state, axis_name, param_specs).leaf_axes
             != state.plan.leaf_axes for state in sparsify_states(opt_state))


def _params_like(plan):
  """A pytree with the parameters' structure (placeholder leaves)."""
  return jax.tree.unflatten(plan.treedef, [0] * len(plan.shapes))


def _plan_under_specs(state, axis_name, param_specs):
  """The plan `init` makes inside `shard_map` for parameters laid out as
  ``param_specs`` (the state's own plan without them)."""
  if param_specs is None:
    return state.plan
  full = full_param_specs(param_specs, _params_like(state.plan))
  leaf_axes = []
  for (path, spec) in jax.tree_util.tree_flatten_with_path(
      full, is_leaf=_is_spec)[0]:
    names = spec_axes(spec)
    if axis_name in names:
      raise ValueError(
          f"state_partition_specs: param_specs shards leaf "
          f"{jax.tree_util.keystr(path)} as {spec} over the workers' axis "
          f"{axis_name!r}. Compression runs over {axis_name!r}, so every "
          "worker must hold the whole parameter (its shards over other axes "
          f"at most): replicate it over {axis_name!r}.")
    leaf_axes.append(tuple(sorted(names)))
  return state.plan.with_leaf_axes(leaf_axes)


def _sparsify_specs(state, axis_name, param_specs):
  """The specs of one `SparsifyState` (see `state_partition_specs`).

  Per segment of the plan under ``param_specs``, the specs follow the form
  of the state's matching segment: the same one when the segments
  correspond one to one, else the first of the same kind (kept dense or
  compressed): outside shard_map, init cannot see the sharding and builds
  one global segment; inside, one per sharding.
  """
  plan = _plan_under_specs(state, axis_name, param_specs)
  built = state.plan.segments
  same = len(built) == len(plan.segments)

  def source(index, segment):
    if same:
      return index
    return next(i for i, s in enumerate(built)
                if s.kept_dense == segment.kept_dense)

  def per_segment(field, spec):
    return tuple(
        jax.tree.map(lambda _, s=spec(segment.axes): s,
                     getattr(state, field)[source(index, segment)])
        for index, segment in enumerate(plan.segments))

  return transform.SparsifyState(
      count=P(),
      memory=per_segment(
          "memory", lambda a: layout.per_worker_spec(axis_name, a)),
      compressor_state=per_segment(
          "compressor_state", lambda a: layout.per_worker_spec(axis_name, a)),
      shared_memory=per_segment("shared_memory", layout.shared_spec),
      stats=jax.tree.map(lambda _: P(axis_name), state.stats),
      plan=plan)


def local_value_and_grad(fun: Callable, axis_name: str,
                         argnums: Union[int, Sequence[int]] = 0,
                         **kwargs) -> Callable:
  """`jax.value_and_grad` that returns this worker's LOCAL gradient.

  Inside `jax.shard_map` (default ``check_vma=True``), differentiating with
  respect to replicated parameters (``in_specs=P()``) makes JAX all-reduce
  the gradient densely by itself, which silently defeats compression. This
  wrapper first casts the differentiated arguments to varying over
  ``axis_name``, so the gradient stays local and `sparsify` can compress it.
  Under `vmap`/`pmap` (where gradients are already local) it is plain
  `jax.value_and_grad`.

  On a mesh with several axes only ``axis_name`` is cast: over the other
  axes JAX keeps its own rules. For parameters replicated over an axis the
  batch is also split over (two-level data parallelism: ``"data"`` inside
  each ``"slice"``), the gradient comes back SUMMED over that axis by one
  dense all-reduce, which is what ``sparsify(..., inner_axes="data")``
  expects; tensor-parallel shards get their own shard's gradient.

  Args:
    fun: the loss function.
    axis_name: the workers' axis.
    argnums: which positional arguments to differentiate (as in JAX).
    **kwargs: passed to `jax.value_and_grad` (e.g. ``has_aux=True``).

  Returns:
    A function with `jax.value_and_grad`'s signature and outputs.

  Example:
    >>> import jax, jax.numpy as jnp, gsparse_jax as gs
    >>> loss = lambda w, x: jnp.sum(w * x)
    >>> grad_fn = gs.local_value_and_grad(loss, "data")
    >>> jax.vmap(grad_fn, in_axes=(None, 0), axis_name="data")(
    ...     jnp.ones(2), jnp.eye(2))[1].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
  """
  value_and_grad = jax.value_and_grad(fun, argnums=argnums, **kwargs)
  positions = (argnums,) if isinstance(argnums, int) else tuple(argnums)

  def wrapped(*args, **fun_kwargs):
    args = list(args)
    for position in positions:
      args[position] = axes.to_varying(args[position], axis_name)
    return value_and_grad(*args, **fun_kwargs)

  return wrapped


def local_grad(fun: Callable, axis_name: str,
               argnums: Union[int, Sequence[int]] = 0, **kwargs) -> Callable:
  """`jax.grad` counterpart of `local_value_and_grad` (same casting)."""
  value_and_grad = local_value_and_grad(fun, axis_name, argnums, **kwargs)
  has_aux = kwargs.get("has_aux", False)

  def wrapped(*args, **fun_kwargs):
    value, grads = value_and_grad(*args, **fun_kwargs)
    return (grads, value[1]) if has_aux else grads

  return wrapped
