"""The segment plan: which leaves of a gradient `sparsify` compresses together.

A segment is a flat vector compressed as one: float leaves concatenated in
order. Under ``granularity="global"`` every float leaf sharded alike (the
same mesh axes besides the workers') joins one segment; under ``"layer"``
each leaf is its own, with the compressor specialized to its shape. Leaves
kept dense (``keep_dense``) form their own segments, sent as `dense()` sends
them. Non-float and empty leaves pass through.

The plan is worked out once, by `segment_plan`, when `sparsify`'s state is
initialized, and kept in the state (`SparsifyState.plan`) as static metadata:
a pytree node without leaves, so it is never traced, checkpointed or
sharded. The update reads it from there; `state_partition_specs` and the
`gsparse` command call the same function.

As a tree node every plan is the same node (`_PlanNode`): a state's tree
structure is that of its arrays, so a spec tree or a checkpoint target made
for the state outside `shard_map` (where the parameters' sharding is
unknown) matches the state `init` builds inside, and JAX never compares two
plans. A plan is a function of the parameters' structure, shapes, dtypes
and sharding, which the arrays next to it already pin down for `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from gsparse_jax._src import axes
from gsparse_jax._src import compressors
from gsparse_jax._src import validation
from gsparse_jax._src import wire

GRANULARITIES = ("global", "layer")

KeepDense = Union[None, Callable[[Any, Any], bool], Any]


@dataclasses.dataclass(frozen=True)
class Segment:
  """A flat vector compressed as one: float leaves concatenated in order.

  Attributes:
    leaf_ids: positions of its leaves in the flattened gradient.
    size: its length.
    wire_dtype: the dtype its values travel in (the leaves' common dtype).
    compressor: the compressor for it (specialized to the leaf's shape
      under layer granularity; `dense()` for leaves kept dense).
    axes: the mesh axes besides the workers' that its leaves vary over
      (sorted; ``()`` for replicated leaves and outside `shard_map`).
    kept_dense: whether its leaves were chosen by ``keep_dense``: they are
      all-reduced densely, without feedback memory.
  """

  leaf_ids: tuple[int, ...]
  size: int
  wire_dtype: Any
  compressor: compressors.Compressor
  axes: tuple[str, ...] = ()
  kept_dense: bool = False

  def wire(self) -> tuple[wire.Collective, ...]:
    return self.compressor.wire(self.size, self.wire_dtype)

  @property
  def dense_bytes(self) -> int:
    return self.size * jnp.dtype(self.wire_dtype).itemsize


@dataclasses.dataclass(frozen=True, repr=False)
class SegmentPlan:
  """How one gradient pytree is compressed: static, hashable, leafless.

  Attributes:
    treedef: the gradient's tree structure.
    shapes: per leaf, its shape.
    dtypes: per leaf, its dtype.
    leaf_axes: per leaf, the mesh axes besides the workers' it varies over.
    kept_dense: per leaf, whether ``keep_dense`` chose it.
    granularity: ``"global"`` or ``"layer"``.
    compressor: the compressor the plan was made for.
    segments: the compressed segments, in order.
  """

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[Any, ...]
  leaf_axes: tuple[tuple[str, ...], ...]
  kept_dense: tuple[bool, ...]
  granularity: str
  compressor: compressors.Compressor
  segments: tuple[Segment, ...]

  @property
  def dense_values(self) -> int:
    """Values of the compressed leaves, per step."""
    return sum(s.size for s in self.segments)

  @property
  def dense_bytes(self) -> int:
    """Bytes of a dense all-reduce of the compressed leaves, per step."""
    return sum(s.dense_bytes for s in self.segments)

  @property
  def sent_bytes(self) -> int:
    """Bytes one worker sends per compressed step (from the wire)."""
    return sum(wire.total_bytes(s.wire()) for s in self.segments)

  def __repr__(self) -> str:
    parts = ", ".join(
        f"{s.size}{' dense' if s.kept_dense else ''}"
        f"{' over ' + '+'.join(s.axes) if s.axes else ''}"
        for s in self.segments)
    return (f"SegmentPlan({len(self.shapes)} leaves, {self.granularity}: "
            f"[{parts}])")

  def with_leaf_axes(self, leaf_axes) -> "SegmentPlan":
    """The plan for the same leaves varying over other mesh axes (as
    `segment_plan` makes it inside `shard_map` for that sharding)."""
    return _make_plan(self.treedef, self.shapes, self.dtypes,
                      tuple(tuple(a) for a in leaf_axes), self.kept_dense,
                      self.granularity, self.compressor)

  def matches(self, treedef) -> bool:
    """Whether a gradient of this tree structure fits the plan: the same
    structure, or that structure with its parameter wrappers (objects
    holding one array each, as `flax.nnx.Variable`: `nnx.Optimizer` hands
    them to init and plain arrays to update) replaced by their arrays."""
    if treedef == self.treedef:
      return True
    if treedef.num_leaves != self.treedef.num_leaves:
      return False
    tree = jax.tree.unflatten(self.treedef, [0] * self.treedef.num_leaves)
    unwrapped = jax.tree.map(
        lambda node: node.get_value() if _is_wrapper(node) else node, tree,
        is_leaf=_is_wrapper)
    return jax.tree.structure(unwrapped) == treedef

  def with_dtypes(self, dtypes) -> "SegmentPlan":
    """The plan for the same leaves in other dtypes (a gradient in another
    precision than its parameters travels in its own dtype)."""
    return _make_plan(self.treedef, self.shapes, tuple(dtypes),
                      self.leaf_axes, self.kept_dense, self.granularity,
                      self.compressor)


class _PlanNode:
  """The pytree aux data of a `SegmentPlan`: equal to every other."""

  __slots__ = ("plan",)

  def __init__(self, plan: SegmentPlan):
    self.plan = plan

  def __eq__(self, other) -> bool:
    return isinstance(other, _PlanNode)

  def __hash__(self) -> int:
    return hash(_PlanNode)


jax.tree_util.register_pytree_node(
    SegmentPlan, lambda plan: ((), _PlanNode(plan)),
    lambda node, _: node.plan)

_flax_registered = []


def _register_with_flax() -> None:
  """Lets `flax.serialization` (when installed) write a state holding a
  plan: nothing is stored; a restore keeps the target's plan."""
  if _flax_registered:
    return
  _flax_registered.append(True)
  if importlib.util.find_spec("flax") is None:
    return
  from flax import serialization  # pylint: disable=g-import-not-at-top
  serialization.register_serialization_state(
      SegmentPlan, lambda plan: {}, lambda target, state: target)


def segment_plan(tree: Any, compressor: compressors.Compressor, *,
                 granularity: str = "global",
                 axis_name: Optional[str] = None,
                 keep_dense: KeepDense = None) -> SegmentPlan:
  """The segments `sparsify` compresses a pytree of this form in.

  Args:
    tree: the parameters or gradient (arrays, tracers or
      `jax.ShapeDtypeStruct`); inside `jax.shard_map` their types say which
      mesh axes besides ``axis_name`` each leaf varies over.
    compressor: the `Compressor` of the transformation.
    granularity: ``"global"`` or ``"layer"``.
    axis_name: the workers' axis (not counted among a leaf's axes).
    keep_dense: None, a ``(path, leaf) -> bool`` predicate or a pytree (or
      tree prefix) of bools: the float leaves all-reduced densely.

  Returns:
    A `SegmentPlan`.

  Example:
    >>> import jax.numpy as jnp, gsparse_jax as gs
    >>> tree = {"b": jnp.zeros(3), "w": jnp.zeros((2, 4))}
    >>> [s.size for s in gs.segment_plan(tree, gs.top_k(0.1)).segments]
    [11]
    >>> plan = gs.segment_plan(tree, gs.top_k(0.1),
    ...                        keep_dense=gs.small_or_vector_leaves(4))
    >>> plan
    SegmentPlan(2 leaves, global: [3 dense, 8])
  """
  validation.choice(granularity, "granularity", GRANULARITIES)
  _register_with_flax()
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in leaves_with_paths]
  return _make_plan(
      treedef, tuple(tuple(int(d) for d in leaf.shape) for leaf in leaves),
      tuple(jnp.dtype(leaf.dtype) for leaf in leaves),
      tuple(axes.sharded_axes(leaf, axis_name) for leaf in leaves),
      _kept_dense(keep_dense, tree, leaves_with_paths), granularity,
      compressor)


def small_or_vector_leaves(min_size: int = 4096) -> Callable[[Any, Any], bool]:
  """A ``keep_dense`` predicate: leaves of rank <= 1 or under ``min_size``.

  Biases, norm scales and small tables cost little to send densely, and
  low-rank or top-k compression of them gains little (PowerSGD's hook and
  hivemind send them uncompressed too).

  Args:
    min_size: leaves with fewer entries are kept dense.

  Returns:
    A ``(path, leaf) -> bool`` predicate for ``sparsify(keep_dense=...)``.

  Example:
    >>> import jax.numpy as jnp, gsparse_jax as gs
    >>> keep = gs.small_or_vector_leaves(min_size=100)
    >>> keep((), jnp.zeros(500)), keep((), jnp.zeros((20, 20)))
    (True, False)
  """
  min_size = validation.count(min_size, "min_size", minimum=0)
  return lambda path, leaf: len(leaf.shape) <= 1 or leaf_size(leaf.shape) < (
      min_size)


def _is_wrapper(node) -> bool:
  return hasattr(node, "get_value") and len(jax.tree.leaves(node)) == 1


def leaf_size(shape) -> int:
  return int(np.prod(shape))


def is_compressible(dtype, shape) -> bool:
  """Whether a leaf of this dtype and shape goes through the compressor."""
  return jnp.issubdtype(dtype, jnp.floating) and leaf_size(shape) > 0


def common_dtype(dtypes) -> Any:
  """The dtype values of mixed-dtype leaves travel in (standard promotion:
  bfloat16 with float32 gives float32), whatever promotion mode is set."""
  with jax.numpy_dtype_promotion("standard"):
    return jnp.result_type(*dtypes)


def group_leaves(ids, keys, granularity: str) -> list[list[int]]:
  """Which leaves are compressed together.

  Args:
    ids: positions of the compressed leaves, in order.
    keys: per leaf position, what must agree inside a segment (the mesh
      axes it varies over, whether it is kept dense).
    granularity: ``"layer"`` (a segment per leaf) or ``"global"`` (a segment
      per distinct key, in order of first appearance: one budget over all
      leaves sharded alike, never mixing a replicated leaf with the shard of
      a sharded one).

  Returns:
    The segments' leaf positions.
  """
  if granularity == "layer":
    return [[i] for i in ids]
  groups: dict[Any, list[int]] = {}
  for i in ids:
    groups.setdefault(keys[i], []).append(i)
  return list(groups.values())


def _make_plan(treedef, shapes, dtypes, leaf_axes, kept_dense, granularity,
               compressor) -> SegmentPlan:
  ids = [i for i, (dtype, shape) in enumerate(zip(dtypes, shapes))
         if is_compressible(dtype, shape)]
  keys = list(zip(leaf_axes, kept_dense))
  segments = []
  for group in group_leaves(ids, keys, granularity):
    first = group[0]
    if kept_dense[first]:
      segment_compressor = compressors.dense()
    elif granularity == "layer":
      segment_compressor = compressor.for_shape(shapes[first])
    else:
      segment_compressor = compressor
    segments.append(Segment(
        tuple(group), sum(leaf_size(shapes[i]) for i in group),
        common_dtype([dtypes[i] for i in group]), segment_compressor,
        leaf_axes[first], kept_dense[first]))
  return SegmentPlan(treedef, shapes, dtypes, leaf_axes, kept_dense,
                     granularity, compressor, tuple(segments))


_KEEP_DENSE_FORMS = ("None, a (path, leaf) -> bool predicate (e.g. "
                     "gs.small_or_vector_leaves()) or a pytree (or tree "
                     "prefix) of bools")


def check_keep_dense(keep_dense: KeepDense) -> KeepDense:
  """``keep_dense`` as given, checked where it can be without the
  parameters (the tree's structure is checked by `segment_plan`).

  Raises:
    ValueError: not one of the forms ``sparsify(keep_dense=...)`` takes.
  """
  if keep_dense is not None and not callable(keep_dense) and not all(
      isinstance(flag, (bool, np.bool_))
      for flag in jax.tree.leaves(keep_dense)):
    raise ValueError(f"`keep_dense` must be {_KEEP_DENSE_FORMS}; got "
                     f"{keep_dense!r}.")
  return keep_dense


def _kept_dense(keep_dense, tree, leaves_with_paths) -> tuple[bool, ...]:
  """Per leaf, whether ``keep_dense`` chooses it."""
  if keep_dense is None:
    return (False,) * len(leaves_with_paths)
  name = lambda path: f"keep_dense for leaf {jax.tree_util.keystr(path)}"
  if callable(keep_dense):
    return tuple(validation.boolean(keep_dense(path, leaf), name(path))
                 for path, leaf in leaves_with_paths)
  try:
    flags = jax.tree.leaves(jax.tree.broadcast(keep_dense, tree))
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"`keep_dense` must be {_KEEP_DENSE_FORMS}, a tree with the "
        f"parameters' structure {jax.tree.structure(tree)}; got "
        f"{keep_dense!r} ({error}).") from None
  return tuple(validation.boolean(flag, name(path))
               for (path, _), flag in zip(leaves_with_paths, flags))
