"""How `sparsify`'s state is laid out over workers and a mesh.

Per-worker leaves (error memory, compressor state, statistics) carry a
leading worker axis, of local size 1 inside the step, so that a `shard_map`
can shard them over the workers' axis and a checkpoint holds every worker's.
Shared leaves (EF21's estimate) are identical on every worker. These helpers
add and drop that axis and give the `PartitionSpec` of each kind of leaf.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def per_worker(tree):
  """Adds the leading worker axis (local size 1) to every leaf."""
  return jax.tree.map(lambda x: x[None], tree)


def local(tree):
  """Drops the leading worker axis."""
  return jax.tree.map(lambda x: x[0], tree)


def per_worker_spec(axis_name: str, segment_axes=()) -> P:
  """The `PartitionSpec` of a per-worker state leaf of a segment.

  Its leading axis (local size 1) is sharded over the workers' axis and
  the segment's other axes, worker-major: globally one entry per device of
  the group of devices that hold different state (a worker's tensor-parallel
  shards), so checkpoints hold all of them.
  """
  return P((axis_name, *segment_axes)) if segment_axes else P(axis_name)


def shared_spec(segment_axes=()) -> P:
  """The `PartitionSpec` of a segment's shared (worker-identical) memory:
  its flat axis sharded over the segment's axes, replicated otherwise."""
  return P(tuple(segment_axes)) if segment_axes else P()
