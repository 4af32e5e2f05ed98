"""`nnx_local_value_and_grad`: a Flax NNX model's gradient, local to this
worker, with the model's other state kept identical on every worker.

Inside `jax.shard_map`, differentiating replicated parameters makes JAX
all-reduce the gradient densely; like `gsparse_jax.local_value_and_grad`
this casts them to per-worker first. BatchNorm statistics are averaged over
the workers and RNG streams draw per worker (keys folded with the worker's
index). Flax is imported when the helper is called.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from gsparse_jax._src import axes
from gsparse_jax._src import distributed


def _worker_index(axis_name: str):
  """This worker's index along ``axis_name``; None outside a mapped axis."""
  try:
    return jax.lax.axis_index(axis_name)
  except NameError:
    return None


def _over_variables(function, *states):
  """``function(variable, *others)`` on every variable of NNX states."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return jax.tree.map(function, *states,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _per_worker_keys(state, index):
  """RNG keys folded with the worker's index (None: unchanged)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if index is None:
    return state
  return _over_variables(
      lambda v: v.replace(jax.random.fold_in(v.get_value(), index))
      if isinstance(v, nnx.RngKey) else v, state)


def _shared_state(new, old, axis_name: str):
  """The non-differentiated state after the loss, the same on every worker.

  RNG keys go back to the shared ones (only their counters advance, alike
  on every worker); floating-point state the loss changed (BatchNorm's
  running statistics) is averaged over the workers; other state is kept.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  bound = _worker_index(axis_name) is not None
  manual = axis_name in getattr(jax.sharding.get_abstract_mesh(),
                                "manual_axes", ())

  def reduce(variable, before):
    if isinstance(variable, nnx.RngKey):
      return variable.replace(before.get_value())
    value = variable.get_value()
    if (not bound or not jnp.issubdtype(value.dtype, jnp.inexact)
        or (manual and not axes.is_varying(value, axis_name))):
      return variable
    return variable.replace(jax.lax.pmean(value, axis_name))

  return _over_variables(reduce, new, old)


def nnx_local_value_and_grad(fun: Callable, axis_name: str, *,
                             wrt: Any = None, has_aux: bool = False
                             ) -> Callable:
  """`nnx.value_and_grad` with respect to the model, LOCAL to this worker.

  Like `gsparse_jax.local_value_and_grad`: inside `jax.shard_map` the
  replicated parameters are cast to per-worker before differentiating, so
  JAX does not all-reduce the gradient densely behind `sparsify`'s back.

  State the loss changes is written back, as `nnx.value_and_grad` does, and
  kept identical on every worker (so it stays replicated, ``P()``):

  * the model's other variables (not ``wrt``), e.g. BatchNorm's running
    mean and variance computed on this worker's batch slice, are AVERAGED
    over ``axis_name`` (`jax.lax.pmean`) when floating point; integer
    variables are kept as the loss left them;
  * NNX objects among the arguments (``nnx.Rngs``, other modules) are
    passed through the same way;
  * every RNG stream (in the model, e.g. ``nnx.Dropout``'s, or in an
    ``nnx.Rngs`` argument) draws with its key folded with the worker's
    index, ``jax.random.fold_in(key, jax.lax.axis_index(axis_name))``, so
    each worker gets its own dropout mask; the streams' keys stay shared
    and their counters advance alike.

  Outside a mapped ``axis_name`` it is `nnx.value_and_grad` (no folding, no
  averaging).

  Args:
    fun: ``fun(model, *args) -> loss`` (or ``(loss, aux)`` with has_aux).
    axis_name: the workers' axis.
    wrt: the NNX filter of the differentiated variables (default
      ``nnx.Param``), as given to ``nnx.Optimizer(..., wrt=...)``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(model, *args) -> (value, grads)`` where ``value`` is ``loss``
    or ``(loss, aux)`` and ``grads`` the `nnx.State` of the ``wrt``
    variables, ready for ``optimizer.update(model, grads)``. Both are this
    worker's own (reduce the loss yourself, e.g. `jax.lax.pmean`).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  wrt = nnx.Param if wrt is None else wrt

  def grad_fn(model, *args, **kwargs):
    index = _worker_index(axis_name)
    graphdef, params, rest = nnx.split(model, wrt, ...)
    nodes = {i: nnx.split(a) for i, a in enumerate(args)
             if nnx.graph.is_graph_node(a)}
    node_states = {i: state for i, (_, state) in nodes.items()}

    def loss(params, rest, node_states):
      inner = nnx.merge(graphdef, params, _per_worker_keys(rest, index),
                        copy=True)
      call_args = list(args)
      for i, (node_def, _) in nodes.items():
        call_args[i] = nnx.merge(
            node_def, _per_worker_keys(node_states[i], index), copy=True)
      out = fun(inner, *call_args, **kwargs)
      value, aux = out if has_aux else (out, None)
      changed = (nnx.state(inner, nnx.Not(wrt)),
                 {i: nnx.state(call_args[i]) for i in nodes})
      return value, (aux, changed)

    (value, (aux, (new_rest, new_nodes))), grads = (
        distributed.local_value_and_grad(loss, axis_name, has_aux=True)(
            params, rest, node_states))
    nnx.update(model, _shared_state(new_rest, rest, axis_name))
    for i in nodes:
      nnx.update(args[i], _shared_state(new_nodes[i], node_states[i],
                                        axis_name))
    return ((value, aux) if has_aux else value), grads

  return grad_fn
