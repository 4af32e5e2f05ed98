"""The one place that knows how JAX types values across mapped axes.

The same step runs under `jax.vmap(axis_name=...)`, `jax.pmap` and
`jax.shard_map`. Only `shard_map` (with its default ``check_vma=True``) tracks
the set of mesh axes a value varies over, and its casts raise elsewhere
(checked with jax 0.10.2). Everything version-sensitive about that is here.

On a mesh with several axes the workers' axis is one of them; a value may
also vary over the others (a shard of a tensor-parallel parameter, and so
its gradient, varies over ``"model"``). Those other axes are what
`sharded_axes` reports.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import jax

AxisNames = Union[None, str, Iterable[str]]



def _names(axis_names: AxisNames) -> tuple[str, ...]:
  if axis_names is None:
    return ()
  if isinstance(axis_names, str):
    return (axis_names,)
  return tuple(axis_names)


def num_workers(axis_name: AxisNames) -> int:
  """Number of devices along ``axis_name`` (a name, several, or None: 1)."""
  size = 1
  for name in _names(axis_name):
    try:
      size *= jax.lax.axis_size(name)
    except NameError:
      raise ValueError(
          f"axis {name!r} is not a mapped axis here: call inside "
          "jax.vmap(..., axis_name=...), jax.pmap or jax.shard_map over that "
          "axis, or pass axis_name=None for one worker.") from None
  return size


def varying_axes(x: jax.Array) -> frozenset[str]:
  """The mesh axes ``x`` is typed as varying over (empty where untracked)."""
  axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(axis_type.varying) if axis_type is not None else frozenset()


def is_varying(x: jax.Array, axis_name: str) -> bool:
  """Whether ``x`` is typed as varying across ``axis_name`` (shard_map only)."""
  return axis_name in varying_axes(x)


def sharded_axes(x: jax.Array, axis_name: Optional[str]) -> tuple[str, ...]:
  """The axes other than the workers' that ``x`` varies over, by name.

  Under `shard_map` these are the axes a parameter shard (and its gradient)
  is split over, e.g. ``("model",)`` for a tensor-parallel weight; ``()``
  for a replicated leaf, and everywhere under `vmap`/`pmap`.
  """
  return tuple(sorted(varying_axes(x) - {axis_name}))


def _is_manual_axis(axis_name: str) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return axis_name in getattr(mesh, "manual_axes", ())


def to_varying(x, axis_names: AxisNames):
  """Casts a pytree to varying across ``axis_names`` where JAX tracks that.

  Under `shard_map` a replicated value must be cast before it is mixed with
  per-worker data in a way JAX should treat as local (for example before
  `jax.grad`, which otherwise all-reduces the gradient of replicated
  parameters). Under `vmap` and `pmap` this is the identity.
  """
  names = tuple(a for a in _names(axis_names) if _is_manual_axis(a))
  if not names:
    return x

  def cast(leaf):
    missing = tuple(a for a in names if not is_varying(leaf, a))
    if not missing:
      return leaf
    try:
      return jax.lax.pcast(leaf, missing, to="varying")
    except ValueError:  # not under shard_map after all (e.g. vmap in pmap)
      return leaf

  return jax.tree.map(cast, x)


def sum_everywhere(x: jax.Array, axis_names: AxisNames) -> jax.Array:
  """Sums ``x`` over ``axis_names`` and every axis it varies over.

  The result is the same on every device of the mesh, whatever the axes
  the summands came from (a check every device must agree on).
  """
  # One psum over the axes x is typed varying over (shard_map refuses a mix
  # of varying and invariant axes in one psum), then one per other named
  # axis: under pmap (or check_vma=False) nothing is typed varying, and an
  # invariant value is merely scaled, which a test for > 0 does not mind.
  varying = varying_axes(x)
  if varying:
    x = jax.lax.psum(x, tuple(sorted(varying)))
  for name in _names(axis_names):
    if name not in varying:
      x = jax.lax.psum(x, name)
  return x


def all_gather_replicated(x: jax.Array, axis_name: str) -> jax.Array:
  """`all_gather` whose result is typed identical on every worker."""
  if is_varying(x, axis_name):
    return jax.lax.all_gather(x, axis_name, to="invarying")
  return jax.lax.all_gather(x, axis_name)


def _out_varying(fun, operands) -> list[frozenset[str]]:
  """Per result leaf of ``fun(*operands)``, the axes it is typed varying
  over (traced, not run)."""
  avals = jax.make_jaxpr(fun)(*operands).out_avals
  return [frozenset(getattr(getattr(a, "manual_axis_type", None), "varying",
                            ())) for a in avals]


def cond(pred: jax.Array, true_fun, false_fun, *operands):
  """`jax.lax.cond` whose branches may differ in what their results vary
  over under `shard_map` (one branch all-reduces a value the other passes
  through): each result is cast to varying over the union of the two.
  Elsewhere it is `jax.lax.cond` itself.
  """
  if not getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):
    return jax.lax.cond(pred, true_fun, false_fun, *operands)
  union = [a | b for a, b in zip(_out_varying(true_fun, operands),
                                 _out_varying(false_fun, operands))]

  def matched(fun):
    def run(*args):
      leaves, treedef = jax.tree.flatten(fun(*args))
      leaves = [to_varying(leaf, tuple(sorted(axes - varying_axes(leaf))))
                for leaf, axes in zip(leaves, union)]
      return jax.tree.unflatten(treedef, leaves)
    return run

  return jax.lax.cond(pred, matched(true_fun), matched(false_fun), *operands)
