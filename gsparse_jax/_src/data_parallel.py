"""`data_parallel`: a compressed data-parallel step for the user's `jax.jit`.

Most JAX training today is a `jax.jit` step over global arrays with
shardings: the batch is split over a mesh axis and XLA inserts the gradient
all-reduce. That all-reduce is dense, and it happens before any optax
transformation sees the gradient, so `sparsify` would compress a gradient
that was already averaged. `data_parallel` keeps the jit style and moves the
aggregation into `sparsify`: its ``step`` is a pure function over global
arrays whose body is one `jax.shard_map`, in which each worker differentiates
its slice of the batch LOCALLY (`local_value_and_grad`) and `tx` (a chain
with `sparsify(..., axis_name=axis_name)`) compresses and averages what the
workers send.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsparse_jax._src import distributed
from gsparse_jax._src import validation


class DataParallel(NamedTuple):
  """What `data_parallel` returns.

  Attributes:
    init: ``init(params) -> opt_state``, the optimizer state laid out on the
      mesh as `gsparse_jax.state_partition_specs` says (per-worker leaves
      sharded over the workers' axis).
    step: ``step(params, opt_state, *batch) -> (params, opt_state, loss)``,
      or ``(params, opt_state, loss, aux)`` with ``has_aux``; pure, for the
      caller's `jax.jit`. ``loss`` and ``aux`` are averaged over workers.
    param_specs: the parameters' `PartitionSpec` tree (``P()`` for
      replicated parameters).
    worker_params: ``worker_params(params) -> params`` laid out as ``step``
      takes them: placed as ``param_specs`` says, or, when ``tx`` keeps
      per-worker parameters (`gsparse_jax.diloco`: the workers' parameters
      differ between syncs), one copy per worker along a leading axis
      sharded over the workers' axis (index it, e.g. ``p[0]``, for one
      worker's parameters).
  """

  init: Callable[..., Any]
  step: Callable[..., Any]
  param_specs: Any
  worker_params: Callable[..., Any] = None


def _is_explicit(mesh) -> bool:
  return any(t == jax.sharding.AxisType.Explicit
             for t in getattr(mesh, "axis_types", ()))


def lay_out(tree, specs, mesh):
  """Constrains every leaf of ``tree`` to its spec (inside a trace).

  Under an Explicit mesh the arrays' types carry their sharding and
  `jax.shard_map` refuses a mismatch: `jax.reshard` them. Under an Auto mesh
  a sharding constraint suffices. Leaves already laid out cost nothing.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    if _is_explicit(mesh):
      return jax.tree.map(lambda x, s: jax.reshard(x, s), tree, specs)
    constrain = lambda x, s: jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, s))
    return jax.tree.map(constrain, tree, specs)


def _check_replicated(params, axis_name: str) -> None:
  """Parameters sharded on the mesh need ``param_specs`` (else JAX fails)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    if spec is not None and any(entry is not None for entry in spec):
      raise ValueError(
          f"data_parallel: parameter {jax.tree_util.keystr(path)} is sharded "
          f"as {spec}, but param_specs is None (replicated parameters). Pass "
          "param_specs=<the parameters' PartitionSpec tree>, e.g. "
          "jax.tree.map(lambda x: x.sharding.spec, params), or replicate the "
          f"parameters (they must not be sharded over {axis_name!r}).")


def data_parallel(loss_fn: Callable, tx: optax.GradientTransformation, *,
                  mesh: jax.sharding.Mesh, axis_name: str = "data",
                  param_specs: Any = None, has_aux: bool = False
                  ) -> DataParallel:
  """A data-parallel training step with compressed gradients, jit style.

  ``step`` takes and returns global arrays, so it goes inside the caller's
  own `jax.jit` (with donation, shardings, ... as usual). Its body is one
  `jax.shard_map` over ``mesh``: each worker computes the gradient of
  ``loss_fn`` on its slice of the batch (split over ``axis_name``) without
  JAX's implicit dense all-reduce (see `gsparse_jax.local_value_and_grad`),
  then ``tx`` runs and `optax.apply_updates` applies its output. ``tx``
  must aggregate over ``axis_name`` itself, i.e. contain
  ``gs.sparsify(..., axis_name=axis_name)`` (before the optimizer);
  otherwise each worker would apply its own gradient.

  Inputs are laid out as the step needs them (a batch that is not yet split
  over ``axis_name`` is resharded; put it on the mesh sharded over
  ``axis_name`` to avoid that copy).

  Args:
    loss_fn: ``loss_fn(params, *batch) -> loss`` (a scalar), or
      ``(loss, aux)`` with ``has_aux``, written for one worker's batch
      slice. With tensor-parallel ``param_specs`` it sees this device's
      parameter shards and does its own collectives over the other axes.
    tx: the optax transformation, e.g.
      ``optax.chain(gs.sparsify(gs.top_k(0.01), axis_name="data"),
      optax.adam(1e-3))``.
    mesh: the device mesh.
    axis_name: the mesh axis of the data-parallel workers (the compressed
      axis); every batch argument is split over it along its first axis.
    param_specs: None (parameters replicated on every device), or the
      parameters' `PartitionSpec` tree (or tree prefix) on a mesh with
      several axes; it must not shard over ``axis_name``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A `DataParallel` with ``init(params) -> opt_state`` and
    ``step(params, opt_state, *batch) -> (params, opt_state, loss[, aux])``;
    ``loss`` and every ``aux`` leaf are the mean over workers (so return
    per-worker means, e.g. an accuracy, not per-example arrays).

  Raises:
    ValueError: at ``init``, when a parameter is sharded on the mesh but
      ``param_specs`` is None, or ``param_specs`` does not fit.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsparse_jax as gs
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> tx = optax.chain(gs.sparsify(gs.top_k(k=1), axis_name="data"),
    ...                  optax.sgd(0.5))
    >>> loss = lambda w, x: jnp.mean((x * w - x) ** 2)
    >>> dp = gs.data_parallel(loss, tx, mesh=mesh)
    >>> w = jnp.zeros(2)
    >>> opt_state = dp.init(w)
    >>> step = jax.jit(dp.step)
    >>> w, opt_state, value = step(w, opt_state, jnp.ones((8, 2)))
    >>> float(value), gs.comm_stats(opt_state)["workers"] == mesh.size
    (1.0, True)
  """
  if not callable(loss_fn):
    raise TypeError(f"data_parallel: `loss_fn` must be callable, got "
                    f"{loss_fn!r}.")
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError("data_parallel: `tx` must be an "
                    f"optax.GradientTransformation, got {tx!r}.")
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"data_parallel: `mesh` must be a jax.sharding.Mesh "
                    f"(jax.make_mesh), got {mesh!r}.")
  validation.choice(axis_name, "axis_name", tuple(mesh.axis_names))
  has_aux = validation.boolean(has_aux, "has_aux")
  given_specs = param_specs
  pspecs = P() if param_specs is None else param_specs
  # Whether tx's state says the parameters differ per worker (diloco).
  per_worker_state = distributed.keeps_per_worker_params

  def full_specs(params):
    return distributed.full_param_specs(pspecs, params)

  def step_specs(params, per_worker):
    """The parameters' specs as the step takes them (per worker: a leading
    worker axis in front)."""
    specs = distributed.full_param_specs(
        pspecs, params)
    if not per_worker:
      return specs
    return jax.tree.map(lambda spec: P(axis_name, *spec), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def state_specs(opt_state):
    return distributed.state_partition_specs(opt_state, axis_name, given_specs)

  def place(params, specs):
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(
        mesh, s)), params, specs)

  def init(params):
    if given_specs is None:
      _check_replicated(params, axis_name)
    specs = full_specs(params)
    params = place(params, specs)
    out_specs = state_specs(jax.eval_shape(tx.init, params))
    return jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=(specs,),
                                 out_specs=out_specs))(params)

  def worker_params(params):
    if given_specs is None:
      _check_replicated(params, axis_name)
    if not per_worker_state(jax.eval_shape(tx.init, params)):
      return place(params, full_specs(params))
    workers = mesh.shape[axis_name]
    copies = jax.tree.map(
        lambda x: jax.numpy.broadcast_to(x, (workers,) + x.shape), params)
    return place(copies, step_specs(copies, True))

  grad_fn = distributed.local_value_and_grad(loss_fn, axis_name,
                                             has_aux=has_aux)

  def local_step(per_worker, params, opt_state, *batch):
    if per_worker:
      params = jax.tree.map(lambda x: x[0], params)
    value, grads = grad_fn(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if per_worker:
      params = jax.tree.map(lambda x: x[None], params)
    mean = functools.partial(jax.lax.pmean, axis_name=axis_name)
    if has_aux:
      loss, aux = value
      return params, opt_state, mean(loss), jax.tree.map(mean, aux)
    return params, opt_state, mean(value)

  def step(params, opt_state, *batch):
    per_worker = per_worker_state(opt_state)
    specs, opt_specs = step_specs(params, per_worker), state_specs(opt_state)
    batch_specs = tuple(jax.tree.map(lambda _: P(axis_name), b)
                        for b in batch)
    params, opt_state, batch = lay_out((params, opt_state, batch),
                                        (specs, opt_specs, batch_specs), mesh)
    outputs = (specs, opt_specs, P()) + ((P(),) if has_aux else ())
    return jax.shard_map(functools.partial(local_step, per_worker), mesh=mesh,
                         in_specs=(specs, opt_specs) + batch_specs,
                         out_specs=outputs)(params, opt_state, *batch)

  return DataParallel(init=init, step=step, param_specs=pspecs,
                      worker_params=worker_params)
