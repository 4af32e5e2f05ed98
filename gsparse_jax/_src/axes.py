"""The one place that knows how JAX types values across mapped axes.

The same step runs under `jax.vmap(axis_name=...)`, `jax.pmap` and
`jax.shard_map`. Only `shard_map` (with its default ``check_vma=True``) tracks
whether a value varies across the axis, and its casts raise elsewhere
(checked with jax 0.10.2). Everything version-sensitive about that is here.
"""

from __future__ import annotations

from typing import Optional

import jax


def num_workers(axis_name: Optional[str]) -> int:
  """Size of the workers' axis (1 without one)."""
  if axis_name is None:
    return 1
  try:
    return jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"`axis_name` {axis_name!r} is not a mapped axis here: call inside "
        "jax.vmap(..., axis_name=...), jax.pmap or jax.shard_map over that "
        "axis, or pass axis_name=None for one worker.") from None


def is_varying(x: jax.Array, axis_name: str) -> bool:
  """Whether ``x`` is typed as varying across ``axis_name`` (shard_map only)."""
  axis_type = getattr(jax.typeof(x), "manual_axis_type", None)
  return axis_type is not None and axis_name in axis_type.varying


def _is_manual_axis(axis_name: str) -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return axis_name in getattr(mesh, "manual_axes", ())


def to_varying(x, axis_name: Optional[str]):
  """Casts a pytree to varying across ``axis_name`` where JAX tracks that.

  Under `shard_map` a replicated value must be cast before it is mixed with
  per-worker data in a way JAX should treat as local (for example before
  `jax.grad`, which otherwise all-reduces the gradient of replicated
  parameters). Under `vmap` and `pmap` this is the identity.
  """
  if axis_name is None or not _is_manual_axis(axis_name):
    return x

  def cast(leaf):
    if is_varying(leaf, axis_name):
      return leaf
    try:
      return jax.lax.pcast(leaf, axis_name, to="varying")
    except ValueError:  # not under shard_map after all (e.g. vmap in pmap)
      return leaf

  return jax.tree.map(cast, x)


def all_gather_replicated(x: jax.Array, axis_name: str) -> jax.Array:
  """`all_gather` whose result is typed identical on every worker."""
  if is_varying(x, axis_name):
    return jax.lax.all_gather(x, axis_name, to="invarying")
  return jax.lax.all_gather(x, axis_name)
