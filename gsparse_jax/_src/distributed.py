"""Helpers for training steps under `shard_map`: state specs, local gradients."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
from jax.sharding import PartitionSpec as P

from gsparse_jax._src import axes
from gsparse_jax._src import transform


def state_partition_specs(opt_state: Any, axis_name: str) -> Any:
  """PartitionSpecs for a (chained) optimizer state under `shard_map`.

  Per-worker leaves of every `SparsifyState` (error memory, compressor state,
  statistics) are sharded over the workers' axis, ``P(axis_name)``: each has
  a leading worker axis of local size 1. Everything else (the step count,
  EF21's shared estimate, and the rest of the chain, e.g. Adam's moments,
  which see identical aggregated updates on every worker) is replicated,
  ``P()``.

  Args:
    opt_state: the optimizer state, or its abstract shape
      (``jax.eval_shape(tx.init, params)``).
    axis_name: the mesh axis of the workers.

  Returns:
    A pytree of `PartitionSpec` with the structure of ``opt_state``, for the
    ``in_specs``/``out_specs`` of `jax.shard_map`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gsparse_jax as gs
    >>> tx = optax.chain(gs.sparsify(gs.top_k(0.5), axis_name="data"),
    ...                  optax.sgd(0.1))
    >>> specs = gs.state_partition_specs(tx.init(jnp.zeros(4)), "data")
    >>> specs[0].memory, specs[0].count
    ((P('data',),), P())
  """
  sharded, replicated = P(axis_name), P()

  def spec_for(node):
    if isinstance(node, transform.SparsifyState):
      return transform.SparsifyState(**{
          field: jax.tree.map(
              lambda _: sharded if field in transform.PER_WORKER_FIELDS
              else replicated, getattr(node, field))
          for field in transform.SparsifyState._fields
      })
    return replicated

  return jax.tree.map(
      spec_for, opt_state,
      is_leaf=lambda node: isinstance(node, transform.SparsifyState))


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
