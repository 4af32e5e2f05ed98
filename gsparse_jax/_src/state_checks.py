"""The checks of `sparsify`'s inputs against its state and its arguments.

Every check runs at trace time on static facts (tree structures, shapes,
dtypes and the mesh axes a value is typed as varying over), so it costs the
compiled step nothing, and each names the leaf or field at fault and what
to do about it.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from gsparse_jax._src import axes
from gsparse_jax._src import layout
from gsparse_jax._src import segments as segments_lib

PER_WORKER_FIELDS = ("memory", "compressor_state", "stats")

_SPECS_HINT = (
    "Build the state's specs with gs.state_partition_specs(opt_state, "
    "axis_name, param_specs) from the same parameter specs the step gives "
    "shard_map, and call init inside shard_map with the parameters' "
    "in_specs (or use gs.data_parallel(..., param_specs=...)).")


def path_name(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def check_leaves(tree, name: str) -> None:
  """Every leaf of ``tree`` (the argument ``name``) is a real array."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
      raise TypeError(
          f"sparsify: `{name}` leaf {path_name(path)} is a "
          f"{type(leaf).__name__}, not an array; pass a pytree of arrays.")
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"sparsify: `{name}` leaf {path_name(path)} has complex dtype "
          f"{dtype}; only real float leaves are compressed (split complex "
          "gradients into real and imaginary parts).")


def check_inner_axes(inner_axes, axis_name) -> tuple[str, ...]:
  names = (inner_axes,) if isinstance(inner_axes, str) else inner_axes
  try:
    names = tuple(names or ())
  except TypeError:
    names = None
  if names is None or not all(isinstance(a, str) for a in names):
    raise ValueError("`inner_axes` must be a mesh axis name or a tuple of "
                     f"names; got {inner_axes!r}.")
  if axis_name in names:
    raise ValueError(f"`inner_axes` {names} must not contain the workers' "
                     f"axis `axis_name`={axis_name!r}.")
  return names


def plan_for_update(updates, plan, axis_name) -> segments_lib.SegmentPlan:
  """The state's plan, checked against this gradient.

  The gradient must have the structure and shapes of the parameters the
  state was initialized with, and its leaves must vary over the mesh axes
  the plan was made for. A gradient in other float dtypes than the
  parameters travels in its own: the plan for those dtypes is returned.
  """
  got = jax.tree.structure(updates)
  if not plan.matches(got):
    raise ValueError(
        "sparsify: the structure of `updates` differs from the one the "
        f"state was initialized with: expected {plan.treedef}, got {got}. "
        "Call init with parameters of the same structure as the gradients.")
  leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, leaf), shape, dtype in zip(leaves, plan.shapes, plan.dtypes):
    if tuple(leaf.shape) != shape:
      size = segments_lib.leaf_size(leaf.shape)
      raise ValueError(
          f"sparsify: `updates` leaf {path_name(path)} has {size} entries "
          f"(shape {tuple(leaf.shape)}); the state was initialized for "
          f"{segments_lib.leaf_size(shape)} (shape {shape}). Under shard_map "
          "call init inside it with the parameters' in_specs, and restore "
          "checkpoints into a target built the same way.")
    if segments_lib.is_compressible(leaf.dtype, leaf.shape) != (
        segments_lib.is_compressible(dtype, shape)):
      raise ValueError(
          f"sparsify: `updates` leaf {path_name(path)} has dtype "
          f"{leaf.dtype}; the state was initialized for {dtype}: a float "
          "leaf must stay a float leaf.")
  for (path, leaf), expected in zip(leaves, plan.leaf_axes):
    found = axes.sharded_axes(leaf, axis_name)
    if found != expected:
      raise ValueError(
          f"sparsify: `updates` leaf {path_name(path)} varies over mesh axes "
          f"{list(found)} besides the workers', but the state was "
          f"initialized for a leaf varying over {list(expected)} (outside "
          "shard_map, or with other parameter specs). " + _SPECS_HINT)
  dtypes = tuple(jnp.dtype(leaf.dtype) for _, leaf in leaves)
  return plan if dtypes == plan.dtypes else plan.with_dtypes(dtypes)


def check_segments(state, segments, updates, axis_name) -> None:
  """Per-worker state holds exactly one worker's segments of these sizes,
  sharded over the axes the gradient's leaves vary over."""
  if len(state.memory) != len(segments) or len(state.compressor_state) != len(
      segments):
    raise ValueError(
        f"sparsify: the state holds {len(state.memory)} compressed segments, "
        f"its plan {len(segments)}: the state was not made by this "
        "transformation's init.")
  for field in PER_WORKER_FIELDS:
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        getattr(state, field))[0]:
      if leaf.ndim == 0 or leaf.shape[0] != 1:
        raise ValueError(
            f"sparsify: state leaf {field}{path_name(path)} has shape "
            f"{tuple(leaf.shape)}, expected a leading worker axis of size 1 "
            "inside the step. Under shard_map, shard per-worker state over "
            "the workers' axis: in_specs/out_specs from "
            "gs.state_partition_specs(opt_state, axis_name); under vmap/pmap "
            "map the state over the workers.")
  for index, (segment, memory) in enumerate(zip(segments, state.memory)):
    for leaf in jax.tree.leaves(memory):
      if leaf.shape[-1] != segment.size:
        raise ValueError(
            f"sparsify: segment {index} of the gradient has {segment.size} "
            f"entries, its state memory has {leaf.shape[-1]}. Call init with "
            "parameters of the same structure as the gradients (inside "
            "shard_map: with the same in_specs as the step's parameters).")
  if axis_name is not None and axes.is_varying(state.stats.steps, axis_name):
    _check_sharding(state, segments, updates, axis_name)


def _check_sharding(state, segments, updates, axis_name) -> None:
  """The state came through shard_map specs that match the gradient's axes.

  Without this, a spec that forgets an axis the gradient varies over (a
  tensor-parallel leaf with ``P(axis_name)`` state) fails later in JAX or
  XLA with an error about shapes or types far from its cause.
  """
  paths = [path_name(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(updates)[0]]
  for index, segment in enumerate(segments):
    leaf_names = ", ".join(paths[i] for i in segment.leaf_ids)
    fields = (("memory", state.memory[index], True),
              ("compressor_state", state.compressor_state[index], True),
              ("shared_memory", state.shared_memory[index], False))
    for field, tree, per_worker in fields:
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = f"{field}[{index}]{jax.tree_util.keystr(path)}"
        got = axes.sharded_axes(leaf, axis_name)
        if got == segment.axes:
          continue
        spec = (layout.per_worker_spec(axis_name, got) if per_worker
                else layout.shared_spec(got))
        expected = (layout.per_worker_spec(axis_name, segment.axes)
                    if per_worker else layout.shared_spec(segment.axes))
        missing = sorted(set(segment.axes) - set(got))
        extra = sorted(set(got) - set(segment.axes))
        reason = (f"the gradient leaves {leaf_names} vary over mesh axis "
                  f"{missing[0]!r} (their parameters are sharded over it)"
                  if missing else
                  f"the gradient leaves {leaf_names} do not vary over mesh "
                  f"axis {extra[0]!r} (their parameters are replicated over "
                  "it)")
        raise ValueError(
            f"sparsify: state leaf {where} is sharded as {spec}, but "
            f"{reason}; it must be {expected}. Build the state's specs with "
            f"gs.state_partition_specs(opt_state, {axis_name!r}, "
            "param_specs) from the same parameter specs the "
            "step gives shard_map, and use them for init's out_specs and the "
            "step's in_specs/out_specs.")


def warn_if_already_reduced(leaves) -> None:
  """Warns when a gradient is a global array over a multi-device mesh.

  Under `jax.jit` with an explicit mesh (``jax.set_mesh``) the gradient of
  a batch sharded over the mesh arrives already all-reduced by XLA, densely:
  compressing it afterwards saves nothing, although the statistics would
  count compression. Outside `shard_map` nothing else can be seen.
  """
  for leaf in leaves:
    mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()):
      continue
    manual = set(getattr(mesh, "manual_axes", ()))
    if any(size > 1 and name not in manual
           for name, size in zip(mesh.axis_names, mesh.axis_sizes)):
      warnings.warn(
          "gsparse_jax.sparsify(axis_name=None) got a gradient that is a "
          f"global array over a {mesh.size}-device mesh: XLA has already "
          "all-reduced it densely, so compressing it saves no traffic. Put "
          "the step in gs.data_parallel(loss_fn, tx, mesh=...) with "
          "sparsify(..., axis_name='data') to compress the workers' local "
          "gradients.", UserWarning, stacklevel=3)
      return
