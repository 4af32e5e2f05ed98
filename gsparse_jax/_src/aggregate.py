"""Aggregation of payloads across workers: the mean of what they sent.

Three wire patterns, chosen by the payload's layout (SPEC "What aggregate
means"):

* sparse: all-gather every worker's ``capacity`` (int32 index, value) pairs
  and scatter-add them into a zero vector;
* aligned: indices are identical on every worker, so one psum of the values;
* dense: one psum of the whole vector.

The result is dense float32, identical on every worker (and typed so under
`shard_map`: it is built on an invariant zero base).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from gsparse_jax._src import axes
from gsparse_jax._src import payload as payload_lib


def aggregate(payload: payload_lib.Payload,
              axis_name: Optional[str]) -> jax.Array:
  """Mean over workers of the dense vectors the payloads stand for.

  Args:
    payload: this worker's `Payload` (from `gsparse_jax.compress`).
    axis_name: the workers' mapped axis (`vmap`, `pmap` or `shard_map`), or
      None for a single worker (no collective).

  Returns:
    A float32 ``[payload.size]`` vector, identical on every worker.

  Example:
    >>> import jax, jax.numpy as jnp, gsparse_jax as gs
    >>> c = gs.top_k(k=1)
    >>> def worker(x):
    ...   p = gs.compress(c, x, c.init(3), jax.random.key(0))
    ...   return gs.aggregate(p, "data")
    >>> jax.vmap(worker, axis_name="data")(jnp.eye(3))[0].tolist()
    [0.3333333432674408, 0.3333333432674408, 0.3333333432674408]
  """
  if axis_name is None:
    return payload_lib.decompress(payload, jnp.float32)
  n = axes.num_workers(axis_name)
  if payload.layout == payload_lib.DENSE:
    return jax.lax.psum(payload.values, axis_name).astype(jnp.float32) / n
  base = jnp.zeros((payload.size,), jnp.float32)
  if payload.layout == payload_lib.ALIGNED:
    total = jax.lax.psum(payload.values, axis_name).astype(jnp.float32)
    return base.at[payload.indices].add(total / n, mode="drop")
  indices = axes.all_gather_replicated(payload.indices, axis_name)
  values = axes.all_gather_replicated(payload.values, axis_name)
  total = base.at[indices.reshape(-1)].add(
      values.reshape(-1).astype(jnp.float32), mode="drop")
  return total / n
