"""gs.power_sgd: a NumPy power iteration from the same first Q, 8 workers."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
from gsparse_jax._src import transform
import references
import runners

WORKERS = 8
STEPS = 4
# Leaf order b, c, w: b is 1-D (dense); c is viewed as 6 x 20, w as 16 x 12.
PARAMS = {"w": jnp.zeros((16, 12)), "b": jnp.zeros((7,)),
          "c": jnp.zeros((6, 4, 5))}
MATRICES = {"c": (1, (6, 20)), "w": (2, (16, 12))}  # segment, (m, n)


def _leaf(tree, name):
  leaf = np.asarray(tree[name])
  return leaf.reshape(leaf.shape[:2] + (-1,))


def _initial_q(state, segment):
  """The first Q read from the state (the same on every worker)."""
  q = np.asarray(state.compressor_state[segment])
  q = q.reshape((-1,) + q.shape[-2:])
  np.testing.assert_array_equal(q, np.broadcast_to(q[0], q.shape))
  return q[0]


def _run(compressor, context, mesh, grads, feedback="ef"):
  tx = gs.sparsify(compressor, feedback=feedback, axis_name=runners.AXIS,
                   granularity="layer")
  outputs, state = runners.run_steps(tx, PARAMS, grads, context, mesh)
  return tx.init(PARAMS), outputs, state


@pytest.mark.parametrize("context,feedback",
                         [("vmap", "ef"), ("shard_map", "ef"),
                          ("vmap", "ef21m"), ("vmap", "none")])
@pytest.mark.parametrize("rank", [1, 2])
def test_matches_numpy_power_iteration(rank, context, feedback, mesh):
  grads = runners.normal_grads(PARAMS, STEPS, WORKERS, seed=rank)
  init, outputs, state = _run(gs.power_sgd(rank), context, mesh, grads,
                              feedback)

  for name, (segment, shape) in MATRICES.items():
    expected, memory, _, _ = references.feedback_run(
        _leaf(grads, name).astype(np.float64),
        *references.low_rank.power_sgd_reference(
            shape, _initial_q(init, segment)), feedback)
    got = _leaf(outputs, name)
    for worker in range(WORKERS):
      np.testing.assert_allclose(got[:, worker], expected, rtol=1e-4,
                                 atol=1e-4)
    if feedback != "none":
      np.testing.assert_allclose(
          runners.worker_rows(jax.tree.leaves(state.memory[segment])[-1],
                              WORKERS), memory, rtol=1e-4, atol=1e-4)
  # The 1-D leaf is sent dense.
  if feedback == "none":
    b = _leaf(grads, "b")
    np.testing.assert_allclose(_leaf(outputs, "b"), np.broadcast_to(
        b.mean(1, keepdims=True), b.shape), rtol=1e-6, atol=1e-6)


def test_same_outputs_as_pytorch_hook_memory(mesh):
  """The hook's memory M_i - P Q^T gives the same outputs as this library's
  M_i - P Q_i^T, and memories with the same sum over workers."""
  grads = runners.normal_grads(PARAMS, STEPS, WORKERS, seed=5)
  init, outputs, state = _run(gs.power_sgd(2), "vmap", mesh, grads)
  segment, shape = MATRICES["w"]
  expected, hook_memory = references.low_rank.power_sgd_hook_run(
      _leaf(grads, "w").astype(np.float64), shape, _initial_q(init, segment))
  np.testing.assert_allclose(_leaf(outputs, "w")[:, 0], expected, rtol=1e-4,
                             atol=1e-4)
  memory = runners.worker_rows(state.memory[segment], WORKERS)
  assert not np.allclose(memory, hook_memory, atol=1e-2)
  np.testing.assert_allclose(memory.sum(0), hook_memory.sum(0), rtol=1e-4,
                             atol=1e-4)


def test_fresh_q_each_step_without_warm_start(mesh):
  grads = runners.normal_grads(PARAMS, 3, WORKERS, seed=6)
  init, outputs, _ = _run(gs.power_sgd(2, warm_start=False), "vmap", mesh,
                          grads)
  assert init.compressor_state == ((), (), ())
  segment, (m, n) = MATRICES["w"]
  draw = lambda t: jax.random.normal(
      transform.segment_key(jnp.asarray(t, jnp.int32), segment), (n, 2))
  expected = references.feedback_run(
      _leaf(grads, "w").astype(np.float64),
      *references.low_rank.power_sgd_reference((m, n), draw), "ef").outputs
  np.testing.assert_allclose(_leaf(outputs, "w")[:, 0], expected, rtol=1e-4,
                             atol=1e-4)


def test_rank_one_matrices_are_exact_after_one_step(mesh):
  rng = np.random.default_rng(7)
  u = rng.normal(size=16)
  grads = {name: jnp.zeros((1, WORKERS) + p.shape)
           for name, p in PARAMS.items()}
  grads["w"] = jnp.asarray(np.einsum("m,in->imn", u, rng.normal(
      size=(WORKERS, 12)))[None], jnp.float32)  # M_i = u v_i^T
  for context in ("vmap", "shard_map"):
    _, outputs, state = _run(gs.power_sgd(1), context, mesh, grads)
    np.testing.assert_allclose(outputs["w"][0, 0], np.asarray(
        grads["w"][0]).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.memory[MATRICES["w"][0]], 0.0,
                               atol=1e-5)


def test_bytes_are_the_declared_wire_cost(mesh):
  grads = runners.normal_grads(PARAMS, 2, 2, seed=8)
  compressor = gs.power_sgd()
  _, _, state = _run(compressor, "vmap", mesh, grads)
  stats = gs.comm_stats(state)
  # Hand count per step: b dense (7 floats); c: (6 + 20) and w: (16 + 12)
  # float32 values of P and Q, two all-reduces each.
  assert stats["sent_bytes"] == 2 * 4 * (7 + 26 + 28)
  declared = [compressor.for_shape(p.shape).wire(p.size, jnp.float32)
              for p in jax.tree.leaves(PARAMS)]
  assert [len(w) for w in declared] == [1, 2, 2]
  assert stats["sent_bytes"] == 2 * sum(c.bytes for w in declared for c in w)
  assert stats["sent_values"] == 2 * (7 + 26 + 28)


def test_which_tensors_are_compressed():
  c = gs.power_sgd(rank=2, min_compression_rate=2.0)
  assert c.layout == "dense"  # no shape: global granularity
  assert c.for_shape((100,)).layout == "dense"
  assert c.for_shape((8, 8)).layout == "low_rank"  # 2 * 16 * 2 <= 64
  assert c.for_shape((7, 8)).layout == "dense"  # 2 * 15 * 2 > 56
  assert gs.power_sgd().for_shape((4, 2, 5)).matrix == (4, 10)  # 14 * 2 <= 40
  assert gs.power_sgd(rank=3).for_shape((40, 100)).budget(4000) == 3 * 140
  # A rank of min(m, n) or more never compresses: r (m + n) > m n.
  assert gs.power_sgd(rank=50).for_shape((4, 1000)).layout == "dense"


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=1.5),
                                    dict(min_compression_rate=0.5)])
def test_bad_arguments_raise(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    gs.power_sgd(**kwargs)


def test_global_granularity_warns_that_it_sends_dense():
  # Under "global" the segment is a flat vector of unknown shape, which
  # PowerSGD sends dense: the warning says so, and the stats agree.
  with pytest.warns(UserWarning, match="granularity='layer'"):
    tx = gs.sparsify(gs.power_sgd(rank=1), granularity="global")
  grads = {"w": jnp.arange(2048.0).reshape(64, 32)}
  _, state = tx.update(grads, tx.init(grads))
  assert gs.comm_stats(state)["density"] == 1.0
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    layer = gs.sparsify(gs.power_sgd(rank=1), granularity="layer")
  _, state = layer.update(grads, layer.init(grads))
  assert gs.comm_stats(state)["density"] < 1.0
