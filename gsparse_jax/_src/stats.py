"""Communication statistics kept in the optimizer state, and `comm_stats`.

Counters are cumulative and per worker (each leaf has a leading worker axis of
local size 1, like the rest of the per-worker state). Totals can pass 2**32
(bytes of a large model over many steps) while JAX runs without 64-bit types
by default, so each total is a pair of uint32 words (low, high) added with a
carry; `comm_stats` turns them back into Python numbers on the host.

On a mesh with several axes a worker is a group of devices (its
tensor-parallel shards, or the devices of its slice): each device sends its
own payload across the workers' axis, and the figures are per device of a
worker (where devices of one worker differ, e.g. data-dependent counts of
different shards, their mean, rounded).
"""

from __future__ import annotations

import collections.abc
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

_WORD = 1 << 32


class CommStats(NamedTuple):
  """Cumulative communication figures of one worker.

  Attributes:
    steps: int32 ``[1]``, update calls, skipped ones included.
    skipped_steps: int32 ``[1]``, calls skipped for non-finite gradients.
    sent_values: ``[1, 2]`` uint32 words, real values sent (padding excluded).
    sent_bytes: ``[1, 2]``, bytes this worker put on the wire (fixed-capacity
      payloads count their capacity; indices at 4 bytes; ARC's sketch too).
    dense_values: ``[1, 2]``, values a dense all-reduce would have sent.
    dense_bytes: ``[1, 2]``, bytes of that dense all-reduce payload.
    overflow_values: ``[1, 2]``, values selected but left in memory because
      the payload's capacity was full.
    inner_dense_bytes: ``[1, 2]``, bytes of the dense reduction inside the
      worker's group of devices that produced the gradient (two-level data
      parallelism: ``sparsify(..., inner_axes=...)``; 0 otherwise). Counted
      on every call, skipped ones included: that reduction ran before
      `sparsify` saw the gradient.
    workers: int32 ``[1]``, the number of workers the latest update call
      aggregated over (the size of the workers' axis, 1 for
      ``axis_name=None``); 0 before the first call, or where the update does
      not record it.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  sent_values: jax.Array
  sent_bytes: jax.Array
  dense_values: jax.Array
  dense_bytes: jax.Array
  overflow_values: jax.Array
  inner_dense_bytes: jax.Array
  workers: jax.Array


_COUNTERS = ("sent_values", "sent_bytes", "dense_values", "dense_bytes",
             "overflow_values", "inner_dense_bytes")
_FIELDS_REQUIRED = ("steps", "skipped_steps") + _COUNTERS


def init_stats() -> CommStats:
  # A fresh array per field: shared buffers could not be donated to a step.
  return CommStats(jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                   *(jnp.zeros((1, 2), jnp.uint32) for _ in _COUNTERS),
                   workers=jnp.zeros((1,), jnp.int32))


def add_to_counter(counter: jax.Array, value: Union[int, jax.Array]
                   ) -> jax.Array:
  """Adds a non-negative Python int (any size) or uint32 array to a counter."""
  low, high = counter[..., 0], counter[..., 1]
  if isinstance(value, int):
    add_low = jnp.uint32(value % _WORD)
    add_high = jnp.uint32(value // _WORD)
  else:
    add_low = jnp.asarray(value).astype(jnp.uint32)
    add_high = jnp.uint32(0)
  new_low = low + add_low
  carry = (new_low < low).astype(jnp.uint32)
  return jnp.stack([new_low, high + add_high + carry], axis=-1)


def record_step(stats: CommStats, *, applied: jax.Array, sent_values,
                sent_bytes: int, dense_values: int, dense_bytes: int,
                overflow_values, inner_dense_bytes: int = 0,
                workers: Optional[int] = None) -> CommStats:
  """Stats after one update call; counters only move when ``applied``.

  ``inner_dense_bytes`` is the exception: it moves on every call. So does
  ``workers`` (the size of the workers' axis, e.g.
  ``axes.num_workers(axis_name)``), which replaces the recorded one; None
  keeps it.
  """
  applied = jnp.asarray(applied)
  gate = lambda v: jnp.where(applied, v, 0)
  return CommStats(
      steps=stats.steps + 1,
      skipped_steps=stats.skipped_steps + (1 - applied.astype(jnp.int32)),
      sent_values=add_to_counter(stats.sent_values, gate(sent_values)),
      sent_bytes=add_to_counter(stats.sent_bytes, gate(sent_bytes)),
      dense_values=add_to_counter(stats.dense_values, gate(dense_values)),
      dense_bytes=add_to_counter(stats.dense_bytes, gate(dense_bytes)),
      overflow_values=add_to_counter(stats.overflow_values,
                                     gate(overflow_values)),
      inner_dense_bytes=add_to_counter(stats.inner_dense_bytes,
                                       inner_dense_bytes),
      workers=(stats.workers if workers is None else
               jnp.zeros_like(stats.workers) + jnp.int32(workers)),
  )


def _counter_value(counter) -> np.ndarray:
  words = np.asarray(counter).astype(np.float64).reshape(-1, 2)
  return words[:, 0] + words[:, 1] * float(_WORD)


def _plain(value) -> Any:
  """The array inside a framework's variable box (e.g. an ``nnx.Variable``)."""
  get_value = getattr(value, "get_value", None)
  return get_value() if callable(get_value) else value


def _is_stats_mapping(node) -> bool:
  """A `CommStats` turned into a mapping by field (``nnx.state``'s form)."""
  return (isinstance(node, collections.abc.Mapping)
          and set(node.keys()) >= set(_FIELDS_REQUIRED))


def find_stats(tree: Any) -> list[CommStats]:
  """Every `CommStats` inside a (chained, nested) optimizer state.

  Also finds them in the NNX form of a state (``nnx.state(optimizer)``,
  where each NamedTuple is a mapping by field name holding variables).
  """
  leaves = jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, CommStats) or _is_stats_mapping(x))
  found = []
  for leaf in leaves:
    if isinstance(leaf, CommStats):
      found.append(leaf)
    elif _is_stats_mapping(leaf):
      # States saved before a field existed lack it: zeros, as init makes.
      fields = {name: _plain(leaf[name]) for name in CommStats._fields
                if name in leaf}
      fields.setdefault("workers", np.zeros((1,), np.int32))
      found.append(CommStats(**fields))
  return found


def comm_stats(opt_state: Any) -> dict[str, Any]:
  """Communication figures found anywhere inside an optimizer state.

  Works on the state of `gsparse_jax.sparsify` alone or chained inside
  `optax.chain`, `optax.named_chain`, `optax.inject_hyperparams`, ... on
  states with a worker axis (from `vmap`, `pmap` or `shard_map`), and on
  the NNX forms ``optimizer.opt_state`` and ``nnx.state(optimizer)``. Several
  sparsify transforms in one state (e.g. `optax.multi_transform`) add up.

  Args:
    opt_state: an optimizer state pytree (arrays on device or host).

  Returns:
    A dict with, averaged over workers (each figure is per worker and
    cumulative): ``steps``, ``skipped_steps`` (ints), ``sent_values``,
    ``sent_bytes``, ``dense_values``, ``dense_bytes``, ``overflow_values``,
    ``inner_dense_bytes`` (bytes reduced densely inside a worker's slice, not
    across the workers' axis), ``density`` (sent / dense values) and
    ``compression`` (dense / sent bytes); ``workers``, the number of
    workers the sent values were averaged over (recorded by the update:
    the size of the workers' axis; 1 means no communication at all, so
    ``compression`` is then what a data-parallel run would save, not what
    this one did); and ``per_worker``, the same counters as NumPy arrays
    with one entry per row of the state (per worker; per device of a
    nested ``vmap`` over several axes).

  Example:
    >>> import jax.numpy as jnp, optax, gsparse_jax as gs
    >>> tx = optax.chain(gs.sparsify(gs.top_k(k=1)), optax.sgd(0.1))
    >>> state = tx.init({"w": jnp.zeros(4)})
    >>> _, state = tx.update({"w": jnp.arange(4.0)}, state)
    >>> gs.comm_stats(state)["sent_bytes"]
    8.0
  """
  found = find_stats(opt_state)
  if not found:
    raise ValueError("comm_stats found no gsparse_jax.SparsifyState in "
                     "`opt_state`; pass the state of an optimizer that "
                     "contains gsparse_jax.sparsify(...).")
  per_worker = {name: sum(_counter_value(getattr(s, name)) for s in found)
                for name in _COUNTERS}
  steps = np.asarray(found[0].steps).reshape(-1)
  skipped = np.asarray(found[0].skipped_steps).reshape(-1)
  per_worker["steps"] = steps
  per_worker["skipped_steps"] = skipped
  result: dict[str, Any] = {name: float(np.mean(v))
                            for name, v in per_worker.items()
                            if name in _COUNTERS}
  result["steps"] = int(steps.max())
  result["skipped_steps"] = int(skipped.max())
  dense_values = result["dense_values"]
  result["density"] = (result["sent_values"] / dense_values
                       if dense_values else 0.0)
  result["compression"] = (result["dense_bytes"] / result["sent_bytes"]
                           if result["sent_bytes"] else float("inf"))
  recorded = max(int(np.max(np.asarray(s.workers), initial=0))
                 for s in found)
  # Before the first update (or where it is not recorded), the state's rows.
  result["workers"] = recorded or int(steps.size)
  result["per_worker"] = per_worker
  return result
