"""`Workers`: the collectives a compressor may use, over one mapped axis.

Compressors never call `jax.lax` collectives themselves: the step hands them
a `Workers` for the workers' axis (or for no axis: one worker, identity
operations), so the same compressor runs under `jax.vmap(axis_name=...)`,
`jax.pmap` and `jax.shard_map`, and results come back typed identical on
every worker where JAX tracks that (`axes`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from gsparse_jax._src.workers import Workers
  >>> jax.vmap(lambda x: Workers("w").mean(x), axis_name="w")(
  ...     jnp.arange(4.0)).tolist()
  [1.5, 1.5, 1.5, 1.5]
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from gsparse_jax._src import axes


@dataclasses.dataclass(frozen=True)
class Workers:
  """The workers of one mapped axis.

  Attributes:
    axis_name: the mapped axis, or None for a single worker.
  """

  axis_name: Optional[str] = None

  @property
  def size(self) -> int:
    """Number of workers (static)."""
    return axes.num_workers(self.axis_name)

  def index(self) -> jax.Array:
    """This worker's index along the axis (0 for a single worker)."""
    if self.axis_name is None:
      return jnp.zeros([], jnp.int32)
    return jax.lax.axis_index(self.axis_name)

  def sum(self, x):
    """Sum over workers, identical everywhere (a psum)."""
    if self.axis_name is None:
      return x
    return jax.lax.psum(x, self.axis_name)

  def mean(self, x):
    """Mean over workers, identical everywhere."""
    if self.axis_name is None:
      return x
    return jax.tree.map(lambda s: s / self.size, self.sum(x))

  def all_gather(self, x: jax.Array) -> jax.Array:
    """``[workers, ...]`` every worker's ``x``, identical everywhere."""
    if self.axis_name is None:
      return x[None]
    return axes.all_gather_replicated(x, self.axis_name)

  def to_varying(self, x):
    """``x`` typed as varying across the workers (see `axes.to_varying`)."""
    return axes.to_varying(x, self.axis_name)
