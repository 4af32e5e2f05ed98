"""aggregate() in each context and layout, and the axis-typing helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gsparse_jax as gs
from gsparse_jax._src import axes
from gsparse_jax._src import payload as payload_lib

AXIS = "data"
WORKERS = 8
D = 24


def _inputs():
  return np.random.default_rng(0).normal(size=(WORKERS, D)).astype(np.float32)


def _payload(layout, x):
  """A payload of each layout; sparse/aligned pad one slot with index D."""
  if layout == "dense":
    return payload_lib.dense_payload(x, jnp.float32)
  if layout == "aligned":
    indices = jnp.array([0, 5, 9, D], jnp.int32)  # same on every worker
  else:
    worker = jax.lax.axis_index(AXIS)
    indices = jnp.stack([worker, worker + 8, (5 * worker) % 8 + 16, D]).astype(
        jnp.int32)
  return payload_lib.sparse_payload(x, indices, 3, jnp.float32, layout)


def _reference(layout, x):
  total = np.zeros(D)
  for w in range(WORKERS):
    if layout == "dense":
      total += x[w]
      continue
    idx = [0, 5, 9] if layout == "aligned" else [w, w + 8, (5 * w) % 8 + 16]
    sent = np.zeros(D)
    sent[idx] = x[w, idx]
    total += sent
  return total / WORKERS


def _run(context, fn, x, mesh):
  if context == "vmap":
    return np.asarray(jax.vmap(fn, axis_name=AXIS)(x))
  if context == "pmap":
    return np.asarray(jax.pmap(fn, axis_name=AXIS)(x))
  step = jax.jit(jax.shard_map(lambda x: fn(x[0])[None], mesh=mesh,
                               in_specs=P(AXIS), out_specs=P(AXIS)))
  return np.asarray(step(jax.device_put(x, NamedSharding(mesh, P(AXIS)))))


@pytest.mark.parametrize("context", ["vmap", "shard_map", "pmap"])
@pytest.mark.parametrize("layout", ["sparse", "aligned", "dense"])
def test_aggregate_is_mean_of_sent_on_every_worker(layout, context, mesh):
  x = _inputs()
  got = _run(context, lambda x: gs.aggregate(_payload(layout, x), AXIS), x,
             mesh)
  expected = _reference(layout, x)
  for w in range(WORKERS):
    np.testing.assert_allclose(got[w], expected, rtol=1e-6, atol=1e-7)


def test_aggregate_is_typed_replicated_under_shard_map(mesh):
  """out_specs=P() type-checks: the mean is invariant across workers."""
  x = _inputs()
  for layout in ("sparse", "aligned", "dense"):
    step = jax.jit(jax.shard_map(
        lambda x, layout=layout: gs.aggregate(_payload(layout, x[0]), AXIS),
        mesh=mesh, in_specs=P(AXIS), out_specs=P()))
    got = step(jax.device_put(x, NamedSharding(mesh, P(AXIS))))
    np.testing.assert_allclose(got, _reference(layout, x), rtol=1e-6,
                               atol=1e-7)


def test_sparse_bfloat16_payloads_are_summed_in_float32():
  """8 bfloat16 values at one index add up exactly, as float32.

  Worker w sends 1 + w/128 (exact in bfloat16). Their sum, 8.21875, needs
  more bits than bfloat16 has near 8 (steps of 1/16): a sum kept at the
  wire dtype would round it.
  """
  values = (1.0 + np.arange(WORKERS) / 128.0).astype(np.float32)

  def worker(v):
    x = jnp.zeros(D, jnp.bfloat16).at[3].set(v.astype(jnp.bfloat16))
    sent = payload_lib.sparse_payload(x, jnp.array([3, D], jnp.int32), 1,
                                      jnp.bfloat16)
    return gs.aggregate(sent, AXIS)

  got = jax.vmap(worker, axis_name=AXIS)(jnp.asarray(values))
  assert got.dtype == jnp.float32
  expected = np.zeros(D, np.float32)
  expected[3] = values.astype(np.float64).mean()  # 1.02734375, exact
  np.testing.assert_array_equal(got, np.broadcast_to(expected, got.shape))


def test_aggregate_without_axis_is_decompression():
  p = payload_lib.sparse_payload(jnp.arange(5.0), jnp.array([4, 1, 5]), 2,
                                 jnp.float32)
  np.testing.assert_array_equal(gs.aggregate(p, None), [0, 1, 0, 0, 4])


def test_to_varying_in_each_context(mesh):
  """Identity under vmap and outside maps; a cast under shard_map."""
  x = jnp.ones(3)
  assert axes.to_varying(x, AXIS) is x
  assert axes.to_varying(x, None) is x

  def under_vmap(v):
    cast = axes.to_varying(v, AXIS)
    assert cast is v  # the identity: vmap types nothing as varying
    return cast

  batch = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(
      jax.vmap(under_vmap, axis_name=AXIS)(batch), batch)

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P(), out_specs=P())
  def inside(w):
    assert not axes.is_varying(w, AXIS)
    assert axes.is_varying(axes.to_varying(w, AXIS), AXIS)
    return w

  np.testing.assert_array_equal(jax.jit(inside)(x), x)
  pmapped = jax.pmap(lambda v: axes.to_varying(v, AXIS), axis_name=AXIS)
  np.testing.assert_array_equal(pmapped(jnp.ones((WORKERS, 3))), 1.0)
