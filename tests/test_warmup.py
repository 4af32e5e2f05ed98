"""`sparsify(..., warmup_steps=N)`: N dense all-reduce steps, then the
compressor, as if it had started at step N (memory and state untouched)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gsparse_jax as gs
import runners

WORKERS, STEPS, WARMUP = 8, 4, 2
PARAMS = {"b": jnp.zeros(6), "w": jnp.zeros((5, 4))}
GRADS = runners.normal_grads(PARAMS, STEPS, WORKERS, seed=3)

# Deterministic compressors (the step count seeds randomness, and the
# warm-up shifts it), with each kind of state: none, worker state
# (RegTop-k), shared memory (EF21), momentum (EF21M).
CASES = [(gs.top_k(k=3), "ef"), (gs.reg_top_k(0.2), "ef"),
         (gs.top_k(k=3), "ef21"), (gs.hard_threshold(0.5, capacity_ratio=0.5),
                                   "ef21m")]


def _run(compressor, feedback, warmup, grads, context, mesh):
  tx = gs.sparsify(compressor, feedback=feedback, axis_name=runners.AXIS,
                   warmup_steps=warmup)
  return runners.run_steps(tx, PARAMS, grads, context, mesh)


# Every case under shard_map (where the two branches' results differ in
# what they vary over); the plain Top-k case in every context.
RUNS = ([(c, f, "shard_map") for c, f in CASES]
        + [(CASES[0][0], CASES[0][1], ctx) for ctx in ("vmap", "pmap")])


@pytest.mark.parametrize(
    "compressor,feedback,context", RUNS,
    ids=[f"{c.__class__.__name__}-{f}-{x}" for c, f, x in RUNS])
def test_warmup_is_dense_then_a_fresh_compressor(compressor, feedback,
                                                 context, mesh):
  outputs, state = _run(compressor, feedback, WARMUP, GRADS, context, mesh)
  later = jax.tree.map(lambda g: g[WARMUP:], GRADS)
  fresh, fresh_state = _run(compressor, feedback, 0, later, context, mesh)
  # Warm-up steps: every worker gets the workers' mean (NumPy).
  flat_out, flat_grads = runners.flat(outputs), runners.flat(GRADS)
  mean = flat_grads[:WARMUP].mean(axis=1, keepdims=True)
  np.testing.assert_allclose(flat_out[:WARMUP],
                             np.broadcast_to(mean, flat_out[:WARMUP].shape),
                             rtol=1e-5, atol=1e-6)
  # Then what a compressor started fresh on the later gradients sends: the
  # warm-up left its memory and state untouched. (To float rounding: inside
  # a branch of the conditional XLA may fuse EF21M's momentum differently.)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  close(flat_out[WARMUP:], runners.flat(fresh))
  for a, b in zip(jax.tree.leaves((state.memory, state.compressor_state,
                                   state.shared_memory)),
                  jax.tree.leaves((fresh_state.memory,
                                   fresh_state.compressor_state,
                                   fresh_state.shared_memory))):
    close(np.asarray(a), np.asarray(b))
  # The warm-up steps are counted as dense bytes.
  stats, fresh_stats = gs.comm_stats(state), gs.comm_stats(fresh_state)
  dense_step = stats["dense_bytes"] // STEPS
  assert stats["sent_bytes"] == WARMUP * dense_step + fresh_stats["sent_bytes"]
  assert stats["steps"] == STEPS


def test_dense_all_reduce_runs_only_in_the_warmup_branch(mesh):
  # Compiled under shard_map: the gradient-sized all-reduce sits inside a
  # branch of the conditional, never in the step's main computation.
  import functools
  from jax.sharding import NamedSharding, PartitionSpec as P
  d = 4096
  tx = gs.sparsify(gs.top_k(k=8), axis_name=runners.AXIS, warmup_steps=5,
                   nonfinite="ignore")
  specs = gs.state_partition_specs(jax.eval_shape(tx.init, jnp.zeros(d)),
                                   runners.AXIS)
  state = jax.jit(jax.shard_map(lambda: tx.init(jnp.zeros(d)), mesh=mesh,
                                in_specs=(), out_specs=specs))()

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh,
                     in_specs=(P(runners.AXIS), specs), out_specs=(P(), specs))
  def step(grads, state):
    return tx.update(grads[0], state)

  grads = jax.device_put(jnp.ones((WORKERS, d)),
                         NamedSharding(mesh, P(runners.AXIS)))
  text = step.lower(grads, state).compile().as_text()
  entry = text[text.index("ENTRY"):]
  entry = entry[:entry.index("\n}")]
  dense = f"f32[{d}]"
  assert " conditional(" in entry
  assert not any("all-reduce" in line and dense in line
                 for line in entry.splitlines())
  assert any("all-reduce" in line and dense in line
             for line in text.splitlines())


@pytest.mark.parametrize("bad", [-1, 1.5, "2", None])
def test_bad_warmup_steps_raise(bad):
  with pytest.raises(ValueError, match="warmup_steps"):
    gs.sparsify(gs.top_k(0.1), warmup_steps=bad)
