"""Aggregation of standard-layout payloads: the mean of what workers sent.

Three wire patterns, chosen by the payload's layout:

* sparse: all-gather every worker's ``capacity`` (int32 index, value) pairs
  and scatter-add them into a zero vector;
* aligned: indices are identical on every worker, so one psum of the values;
* dense: one psum of the whole vector.

The result is dense float32, identical on every worker (and typed so under
`shard_map`: it is built on an invariant zero base). Compressors with their
own wire format aggregate in their own `Compressor.aggregate`.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import workers as workers_lib


def aggregate(payload: payload_lib.Payload,
              axis_name: Union[Optional[str], workers_lib.Workers]
              ) -> jax.Array:
  """Mean over workers of the dense vectors the payloads stand for.

  Args:
    payload: this worker's `Payload` (from `gsparse_jax.compress`), of a
      standard layout (``"sparse"``, ``"aligned"`` or ``"dense"``).
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
  if not isinstance(payload, payload_lib.Payload):
    raise TypeError("aggregate: `payload` must be a gsparse_jax Payload "
                    f"(from gs.compress), got {type(payload).__name__}.")
  if axis_name is not None and not isinstance(
      axis_name, (str, workers_lib.Workers)):
    raise TypeError(f"aggregate: `axis_name` must be a string or None, got "
                    f"{axis_name!r}.")
  workers = (axis_name if isinstance(axis_name, workers_lib.Workers)
             else workers_lib.Workers(axis_name))
  if payload.layout not in payload_lib.STANDARD_LAYOUTS:
    raise ValueError(
        f"gsparse_jax.aggregate takes a payload of layout "
        f"{payload_lib.STANDARD_LAYOUTS}; layout {payload.layout!r} is "
        "aggregated by its compressor (`compressor.aggregate`).")
  n = workers.size  # raises if the axis is not bound
  if workers.axis_name is None:
    return payload_lib.decompress(payload, jnp.float32)
  if payload.layout == payload_lib.DENSE:
    return workers.sum(payload.values).astype(jnp.float32) / n
  base = jnp.zeros((payload.size,), jnp.float32)
  if payload.layout == payload_lib.ALIGNED:
    total = workers.sum(payload.values).astype(jnp.float32)
    return base.at[payload.indices].add(total / n, mode="drop")
  indices = workers.all_gather(payload.indices)
  values = workers.all_gather(payload.values)
  total = base.at[indices.reshape(-1)].add(
      values.reshape(-1).astype(jnp.float32), mode="drop")
  return total / n
