"""gs.cast and top_k(value_dtype=...): low-precision values, error kept."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import gsparse_jax as gs
import references
import runners

WORKERS = 8
STEPS = 4
PARAMS = {"w": jnp.zeros((6, 5)), "b": jnp.zeros((7,))}  # 37 entries
LOW = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
EPSILON = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}  # unit roundoff


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cast_matches_reference_with_error_feedback(dtype, context, mesh):
  tx = gs.sparsify(gs.cast(dtype), axis_name=runners.AXIS)
  grads = runners.normal_grads(PARAMS, STEPS, WORKERS, seed=1)
  outputs, state = runners.run_steps(tx, PARAMS, grads, context, mesh)

  run = references.feedback_run(
      runners.flat(grads), references.per_worker(
          lambda a, t, i: references.dense.rounded(a, LOW[dtype])),
      dtype=np.float32)
  sent, memory = run.sent, run.memory
  # What each worker keeps, a - round(a) in float32, is exact.
  np.testing.assert_array_equal(
      runners.worker_rows(state.memory[0], WORKERS), memory)
  # The all-reduce adds the rounded values in `dtype`; how it rounds the
  # partial sums is the collective's (XLA:CPU's vmap psum rounds each add,
  # its all-reduce once), so the mean is within n roundoffs of the exact one.
  got = runners.flat(outputs)
  bound = WORKERS * EPSILON[dtype] * np.abs(sent).mean(axis=1)
  for worker in range(WORKERS):
    assert np.all(np.abs(got[:, worker] - sent.mean(axis=1)) <= bound)
    np.testing.assert_array_equal(got[:, worker], got[:, 0])


def test_cast_bytes_are_half_of_float32():
  c = gs.cast()
  assert gs.compress(c, jnp.ones(3), (), jax.random.key(0)).values.dtype == (
      jnp.bfloat16)  # what the all-reduce carries
  tx = gs.sparsify(gs.cast(), axis_name=runners.AXIS)
  _, state = runners.run_steps(tx, PARAMS, runners.normal_grads(
      PARAMS, 2, 2), "vmap")
  stats = gs.comm_stats(state)
  assert stats["sent_bytes"] == 2 * 37 * 2
  assert stats["sent_bytes"] == 2 * sum(
      c.bytes for c in gs.cast().wire(37, jnp.float32))
  assert stats["compression"] == 2.0


def test_cast_output_keeps_the_parameter_dtype():
  tx = gs.sparsify(gs.cast())
  params = {"a": jnp.zeros(4, jnp.float32), "h": jnp.zeros(3, jnp.float16)}
  grads = {"a": jnp.ones(4, jnp.float32), "h": jnp.ones(3, jnp.float16)}
  out, _ = tx.update(grads, tx.init(params))
  assert out["a"].dtype == jnp.float32 and out["h"].dtype == jnp.float16


@pytest.mark.parametrize("bad", [jnp.int8, "float64", "nonsense"])
def test_cast_bad_dtype_raises(bad):
  with pytest.raises(ValueError, match="dtype"):
    gs.cast(bad)


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
def test_top_k_bfloat16_values_keep_rounding_error(context, mesh):
  c = gs.top_k(k=5, method="sort", value_dtype=jnp.bfloat16)
  tx = gs.sparsify(c, axis_name=runners.AXIS)
  grads = runners.normal_grads(PARAMS, STEPS, WORKERS, seed=2)
  outputs, state = runners.run_steps(tx, PARAMS, grads, context, mesh)

  run = references.feedback_run(
      runners.flat(grads), references.per_worker(
          references.sparse.top_k_rounded_select(5, ml_dtypes.bfloat16)),
      dtype=np.float32)
  expected, memory = run.outputs, run.memory
  np.testing.assert_array_equal(
      runners.worker_rows(state.memory[0], WORKERS), memory)
  # The rounded values are added in float32 after the all-gather.
  got = runners.flat(outputs)
  for worker in range(WORKERS):
    np.testing.assert_allclose(got[:, worker], expected, rtol=1e-6,
                               atol=1e-7)
  # 5 bf16 values and 5 int32 indices per worker and step: 6 B per entry.
  assert gs.comm_stats(state)["sent_bytes"] == STEPS * 5 * 6
  # The memory holds a rounding error at the sent entries, not zero.
  assert np.count_nonzero(memory) == memory.size


def test_top_k_value_dtype_validation():
  assert gs.top_k(0.1).value_dtype is None
  assert gs.top_k(0.1, value_dtype="bfloat16").wire(100, jnp.float32)[
      0].bytes == 10 * 6
  with pytest.raises(ValueError, match="value_dtype"):
    gs.top_k(0.1, value_dtype=jnp.int32)
