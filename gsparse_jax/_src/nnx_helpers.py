"""Flax NNX under `jax.shard_map`: split, shard and differentiate locally.

An `nnx.Optimizer` whose ``tx`` chains `gsparse_jax.sparsify` holds one error
memory per worker. To train data-parallel under `jax.shard_map`, the NNX
objects are split into a graph definition and a state pytree whose
per-worker leaves are sharded over the workers' axis and whose other leaves
(parameters, Adam's moments, counters) are replicated; inside the step, the
gradient must stay local so that `sparsify` compresses it. Four helpers:

* `nnx_partition_specs`: the `PartitionSpec` of every leaf of
  ``nnx.state(node)``;
* `nnx_shard`: ``nnx.split`` plus those specs plus the state placed on the
  mesh (each worker gets its own slice of the per-worker leaves);
* `nnx_local_value_and_grad` (in `nnx_grad`): `nnx.value_and_grad` that
  returns this worker's local gradient (see
  `gsparse_jax.local_value_and_grad`);
* `nnx_data_parallel`: all of it as one step for `nnx.jit`, which updates
  the model and optimizer in place (the NNX form of
  `gsparse_jax.data_parallel`).

A step is then (``examples/flax_nnx.py`` is a complete loop)::

  graphdef, state, specs = gs.nnx_shard((model, optimizer), mesh, "data")

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(specs, P("data"), P("data")),
                     out_specs=(specs, P()))
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = gs.nnx_local_value_and_grad(loss_fn, "data")(model, x, y)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), jax.lax.pmean(loss, "data")

Flax is an optional dependency: it is imported when a helper is called.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gsparse_jax._src import data_parallel as data_parallel_lib
from gsparse_jax._src import distributed
from gsparse_jax._src.nnx_grad import nnx_local_value_and_grad


def _path_entry(key) -> Any:
  """A `jax.tree_util` key as the plain entry of an NNX state path."""
  for attribute in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
    if hasattr(key, attribute):
      return getattr(key, attribute)
  raise TypeError(f"unexpected pytree key {key!r}")


def _optimizers(node) -> list:
  """``(path, optimizer)`` of every `nnx.Optimizer` in ``node``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return [(tuple(prefix), child) for prefix, child in nnx.iter_graph(node)
          if isinstance(child, nnx.Optimizer)]


def _parameter_specs(node, optimizer):
  """``(module, specs)``: the module whose parameters ``optimizer`` updates
  and their sharding annotations (a pure `PartitionSpec` tree), or None
  when none is annotated.

  The parameters are those of a module in ``node`` whose ``wrt`` state has
  the structure the optimizer's `sparsify` state was planned for.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  plans = [state.plan for state in distributed.sparsify_states(
      nnx.as_pure(optimizer.opt_state))]
  if not plans:
    return None
  for _, module in nnx.iter_graph(node):
    if not isinstance(module, nnx.Module):
      continue
    params = nnx.as_pure(nnx.state(module, optimizer.wrt))
    if not plans[0].matches(jax.tree.structure(params)):
      continue
    specs = nnx.as_pure(nnx.get_partition_spec(nnx.state(module,
                                                         optimizer.wrt)))
    specs = jax.tree.map(lambda s: s if isinstance(s, P) else P(), specs,
                         is_leaf=lambda s: isinstance(s, P) or s is None)
    if all(all(e is None for e in spec) for spec in jax.tree.leaves(
        specs, is_leaf=lambda s: isinstance(s, P))):
      return None
    return module, specs
  return None


def _optimizer_specs(node, axis_name: str) -> dict[tuple, P]:
  """Specs of the non-replicated leaves of every `nnx.Optimizer` state in
  ``node``: per-worker leaves over the workers' axis (and, for tensor
  parallel parameters, their other axes), parameter-shaped state (Adam's
  moments) as the parameters' annotations."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  found = {}
  for prefix, optimizer in _optimizers(node):
    # NNX keeps the optax state's structure in `opt_state` and stores it in
    # the flat state under the same entries (NamedTuple fields by name).
    annotated = _parameter_specs(node, optimizer)
    specs = distributed.state_partition_specs(
        nnx.as_pure(optimizer.opt_state), axis_name,
        None if annotated is None else annotated[1])
    for path, spec in jax.tree_util.tree_flatten_with_path(specs)[0]:
      if spec != P():
        found[prefix + ("opt_state",)
              + tuple(_path_entry(k) for k in path)] = spec
  return found


def _shard_optimizers(node, mesh, axis_name: str) -> None:
  """Rebuilds, inside `jax.shard_map`, the state of every optimizer whose
  parameters are annotated (tensor parallel) and whose `sparsify` state
  was planned without their sharding (as `nnx.Optimizer` builds it,
  outside): each device then holds its own shards' error memory."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.nnx.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top

  for _, optimizer in _optimizers(node):
    annotated = _parameter_specs(node, optimizer)
    if annotated is None:
      continue
    module, param_specs = annotated
    pure = nnx.as_pure(optimizer.opt_state)
    if not distributed.needs_sharded_init(pure, axis_name, param_specs):
      continue
    params = jax.tree.map(
        lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)),
        nnx.as_pure(nnx.state(module, optimizer.wrt)), param_specs)
    out_specs = distributed.state_partition_specs(
        jax.eval_shape(optimizer.tx.init, params), axis_name, param_specs)
    state = jax.jit(jax.shard_map(optimizer.tx.init, mesh=mesh,
                                  in_specs=(param_specs,),
                                  out_specs=out_specs))(params)
    optimizer.opt_state = nnx.data(optimizer_lib.to_opt_state(state))


def _annotated_specs(node, axis_name: str) -> dict[tuple, P]:
  """The sharding annotations of the variables outside optimizers."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  annotated = {}
  flat = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(node)))
  optimizers = [tuple(prefix) for prefix, child in nnx.iter_graph(node)
                if isinstance(child, nnx.Optimizer)]
  for path, variable in flat:
    spec = variable.get_value()
    path = tuple(path)
    if (not isinstance(spec, P) or spec == P()
        or all(entry is None for entry in spec)
        or any(path[:len(o)] == o for o in optimizers)):
      continue
    if axis_name in distributed.spec_axes(spec):
      raise ValueError(
          f"nnx_partition_specs: variable {path} is annotated {spec}, sharded "
          f"over the workers' axis {axis_name!r}; every worker must hold "
          f"the whole parameter: annotate it over other axes only.")
    annotated[path] = spec
  return annotated


def nnx_partition_specs(node: Any, axis_name: str) -> Any:
  """PartitionSpecs of ``nnx.state(node)`` for data parallelism.

  The per-worker leaves of the optimizer state of every `nnx.Optimizer` in
  ``node`` (as `gsparse_jax.state_partition_specs` and `multi_steps` define
  them: error memory, compressor state, statistics, accumulators) get
  ``P(axis_name)``; a variable with a sharding annotation (e.g. from
  ``nnx.with_partitioning``) keeps its ``PartitionSpec`` (tensor
  parallelism over other mesh axes), and the optimizer state follows it as
  `state_partition_specs` does with ``param_specs`` (per-shard error
  memory ``P((axis_name, "model"))``, Adam's moments as annotated); every
  other leaf (replicated parameters, the rest of the optimizer state,
  other variables) gets ``P()``.

  Args:
    node: NNX objects, e.g. ``(model, optimizer)``.
    axis_name: the mesh axis of the workers.

  Returns:
    An `nnx.State` with the structure of ``nnx.state(node)`` holding a
    `PartitionSpec` per leaf, for the ``in_specs``/``out_specs`` of
    `jax.shard_map`.

  Raises:
    ValueError: when an annotation shards over ``axis_name``.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  optimizer_specs = _optimizer_specs(node, axis_name)
  annotated = _annotated_specs(node, axis_name)
  flat = nnx.to_flat_state(nnx.state(node))

  def spec(path):
    path = tuple(path)
    if path in optimizer_specs:
      return optimizer_specs[path]
    return annotated.get(path, P())

  return nnx.from_flat_state([(path, variable.replace(spec(path)))
                              for path, variable in flat])


def nnx_shard(node: Any, mesh: jax.sharding.Mesh, axis_name: str
              ) -> tuple[Any, Any, Any]:
  """Splits NNX objects into a graph definition and a sharded state.

  Per-worker leaves (see `nnx_partition_specs`) are laid out with a leading
  axis of one slice per worker and sharded over ``axis_name``; a leaf that
  still has the single slice ``tx.init`` gives (every worker starts from the
  same state) is copied to each worker. Annotated variables are sharded as
  annotated (tensor parallel); other leaves are replicated. An optimizer
  whose parameters are annotated has its state rebuilt first, inside
  `jax.shard_map` (``nnx.Optimizer`` builds it outside, where the sharding
  is unknown), so each device holds its own shards' error memory; a state
  already built so (a second call) is kept.

  Args:
    node: NNX objects, e.g. ``(model, optimizer)``.
    mesh: the device mesh.
    axis_name: the mesh axis of the workers.

  Returns:
    ``(graphdef, state, specs)``: ``nnx.merge(graphdef, state)`` rebuilds
    ``node`` inside the step, and ``specs`` are the ``in_specs`` and
    ``out_specs`` of ``state`` for `jax.shard_map`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  _shard_optimizers(node, mesh, axis_name)
  specs = nnx_partition_specs(node, axis_name)
  graphdef, state = nnx.split(node)
  workers = mesh.shape[axis_name]

  def place(leaf, spec):
    sharding = NamedSharding(mesh, spec)
    if spec != P(axis_name) or leaf.shape[0] == workers:
      return jax.device_put(leaf, sharding)
    if leaf.shape[0] != 1:
      raise ValueError(
          f"nnx_shard: a per-worker leaf has leading size {leaf.shape[0]}; "
          f"expected 1 (as tx.init makes it) or {workers} workers.")
    one = np.asarray(leaf)
    # Each device receives its own copy: no [workers, ...] array on one device.
    return jax.make_array_from_callback((workers,) + one.shape[1:], sharding,
                                        lambda index: one)

  return graphdef, jax.tree.map(place, state, specs), specs


class NNXDataParallel(NamedTuple):
  """What `nnx_data_parallel` returns.

  Attributes:
    init: ``init(model, optimizer)``: lays the NNX objects' state out on the
      mesh, in place (see `nnx_shard`); call it once, outside `nnx.jit`.
    step: ``step(model, optimizer, *batch) -> loss`` (``(loss, aux)`` with
      ``has_aux``): one training step that updates ``model`` and
      ``optimizer`` in place, for the caller's `nnx.jit`. ``loss`` and
      ``aux`` are averaged over workers.
  """

  init: Callable[..., None]
  step: Callable[..., Any]


def nnx_data_parallel(loss_fn: Callable, *, mesh: jax.sharding.Mesh,
                      axis_name: str = "data", has_aux: bool = False
                      ) -> NNXDataParallel:
  """`gsparse_jax.data_parallel` for an ``nnx.Optimizer``, in the NNX style.

  The optimizer is ``nnx.Optimizer(model, tx, wrt=...)`` with ``tx`` a
  chain containing ``gs.sparsify(..., axis_name=axis_name)``; the model's
  parameters are replicated. ``step`` splits ``(model, optimizer)``, runs
  one `jax.shard_map` in which each worker differentiates ``loss_fn`` on its
  slice of the batch locally (`nnx_local_value_and_grad`) and calls
  ``optimizer.update``, then writes the new state back into the objects.

  Args:
    loss_fn: ``loss_fn(model, *batch) -> loss`` (or ``(loss, aux)``).
    mesh: the device mesh.
    axis_name: the workers' mesh axis; the batch is split over it.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    An `NNXDataParallel` with ``init(model, optimizer)`` and
    ``step(model, optimizer, *batch)``.

  Example::

    dp = gs.nnx_data_parallel(loss_fn, mesh=mesh)
    dp.init(model, optimizer)
    train_step = nnx.jit(dp.step)
    loss = train_step(model, optimizer, images, labels)
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def init(model, optimizer):
    _, state, _ = nnx_shard((model, optimizer), mesh, axis_name)
    nnx.update((model, optimizer), state)

  def local_step(graphdef, state, *batch):
    model, optimizer = nnx.merge(graphdef, state)
    value, grads = nnx_local_value_and_grad(
        loss_fn, axis_name, wrt=optimizer.wrt, has_aux=has_aux)(model, *batch)
    optimizer.update(model, grads)
    mean = lambda tree: jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name), tree)
    return nnx.state((model, optimizer)), mean(value)

  def step(model, optimizer, *batch):
    specs = nnx_partition_specs((model, optimizer), axis_name)
    graphdef, state = nnx.split((model, optimizer))
    batch_specs = tuple(jax.tree.map(lambda _: P(axis_name), b)
                        for b in batch)
    state, batch = data_parallel_lib.lay_out((state, batch),
                                             (specs, batch_specs), mesh)
    state, value = jax.shard_map(
        functools.partial(local_step, graphdef), mesh=mesh,
        in_specs=(specs,) + batch_specs, out_specs=(specs, P()))(
            state, *batch)
    nnx.update((model, optimizer), state)
    return value

  return NNXDataParallel(init=init, step=step)
