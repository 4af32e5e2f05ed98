"""EF21 and EF21-SGDM (docs/algorithms.md): NumPy references, wire."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsparse_jax as gs
import references
import runners

WORKERS = 8
STEPS = 4
D = 48


def ef21_reference(grads, select, momentum=None):
  """EF21 (or EF21-SGDM when ``momentum`` is set) over workers, float64.

  Args:
    grads: ``[steps, workers, d]``.
    select: ``select(x) -> [workers, d]`` what every worker sends, given
      every worker's vector ``x`` ``[workers, d]`` (ARC needs all of them).
    momentum: EF21M's ``beta`` in ``v <- beta v + (1 - beta) g``, or None.

  Returns:
    (outputs ``[steps, d]``, final ``h_i`` ``[workers, d]``, final ``h``).
  """
  run = references.feedback_run(
      grads, lambda x, step, state: (select(x), state),
      feedback="ef21" if momentum is None else "ef21m",
      momentum=momentum)
  return run.outputs, run.memory, run.shared


def top_k_rows(k):
  def select(x):
    out = np.zeros_like(x)
    for i, row in enumerate(x):
      indices = references.top_k_indices(row, k)
      out[i, indices] = row[indices]
    return out
  return select


def exact_arc_rows(rows_kept, row_len):
  """ARC-Top-K with rows no wider than the rank: exact aggregate energy."""
  def select(x):
    matrices = x.reshape(x.shape[0], -1, row_len)
    energy = np.sum(matrices.sum(axis=0)**2, axis=1)
    rows = np.argsort(-energy, kind="stable")[:rows_kept]
    out = np.zeros_like(matrices)
    out[:, rows] = matrices[:, rows]
    return out.reshape(x.shape)
  return select


CASES = {
    # name: (compressor, NumPy selection)
    "top_k": (lambda: gs.top_k(0.125, method="sort"),
              lambda: top_k_rows(6)),
    "arc_top_k": (lambda: gs.arc_top_k(0.25, rank=4, row_size=4),
                  lambda: exact_arc_rows(3, 4)),
}


def _grads(seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(STEPS, WORKERS, D)).astype(np.float32)


def _memory(state, workers=WORKERS):
  """(h_i ``[workers, d]``, h as seen by every worker ``[workers?, d]``)."""
  estimates = runners.worker_rows(state.memory[0].estimate, workers)
  return estimates, np.asarray(state.shared_memory[0])


@pytest.mark.parametrize("context", ["vmap", "shard_map"])
@pytest.mark.parametrize("feedback", ["ef21", "ef21m"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name, feedback, context, mesh):
  make_compressor, make_select = CASES[name]
  tx = gs.sparsify(make_compressor(), feedback=feedback,
                   axis_name=runners.AXIS, momentum=0.9)
  grads = _grads()
  outputs, state = runners.run_steps(tx, jnp.zeros(D), jnp.asarray(grads),
                                     context, mesh)
  expected, estimates, shared = ef21_reference(
      grads.astype(np.float64), make_select(),
      momentum=0.9 if feedback == "ef21m" else None)

  # The output (h) is the same on every worker and equals the reference.
  for worker in range(WORKERS):
    np.testing.assert_allclose(outputs[:, worker], expected, rtol=1e-5,
                               atol=1e-6)
  h_i, h = _memory(state)
  np.testing.assert_allclose(h_i, estimates, rtol=1e-5, atol=1e-6)
  # h is consistent: identical everywhere and the mean of the workers' h_i.
  h = h.reshape(-1, D)
  np.testing.assert_array_equal(h, np.broadcast_to(h[0], h.shape))
  np.testing.assert_allclose(h[0], shared, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h[0], h_i.mean(axis=0), rtol=1e-5, atol=1e-6)


# Top-k and ARC-Top-K are checked against NumPy above, dense below.
OTHER_COMPRESSORS = {
    "dense": gs.dense,
    "rand_k_shared": lambda: gs.rand_k(0.1, shared=True),
    "rand_k_independent": lambda: gs.rand_k(0.1, shared=False),
}


@pytest.mark.parametrize("name", list(OTHER_COMPRESSORS))
def test_ef21m_usable_with_every_compressor(name):
  tx = gs.sparsify(OTHER_COMPRESSORS[name](), feedback="ef21m",
                   axis_name=runners.AXIS)
  outputs, state = runners.run_steps(tx, jnp.zeros(D),
                                     jnp.asarray(_grads(1)[:3]), "vmap")
  assert np.all(np.isfinite(outputs))
  np.testing.assert_array_equal(
      outputs, np.broadcast_to(outputs[:, :1], outputs.shape))
  h_i, h = _memory(state)
  np.testing.assert_allclose(h[0], h_i.mean(axis=0), rtol=1e-5, atol=1e-6)


def _ef21_dense_vs_sgd(targets, lr, steps):
  tx = optax.chain(gs.sparsify(gs.dense(), feedback="ef21",
                               axis_name=runners.AXIS), optax.sgd(lr))
  params = jnp.zeros(targets.shape[-1])
  state = jax.vmap(lambda _: tx.init(params))(jnp.arange(WORKERS))

  def worker(params, state, target):
    updates, state = tx.update(params - target, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.vmap(worker, in_axes=(None, 0, 0), out_axes=(0, 0),
                          axis_name=runners.AXIS))
  plain = np.zeros(targets.shape[-1], np.float32)
  for _ in range(steps):
    new_params, state = step(params, state, targets)
    new_params = np.asarray(new_params)
    # Plain SGD on the mean gradient, in float32 like the library.
    mean_grad = np.mean(plain[None] - targets, axis=0, dtype=np.float32)
    plain = (plain - np.float32(lr) * mean_grad).astype(np.float32)
    yield new_params, plain
    params = jnp.asarray(new_params[0])


def test_ef21_with_dense_is_plain_sgd_exactly():
  # With C = identity, c_i = g_i - h_i, h_i <- g_i, h <- h + mean(g - h_i) =
  # mean(g): plain SGD. On dyadic data (multiples of 1/8, lr 1/2, 8
  # workers) every float32 operation is exact, so equality is bitwise.
  rng = np.random.default_rng(2)
  targets = (rng.integers(-64, 64, size=(WORKERS, 16)) / 8).astype(
      np.float32)
  for params, plain in _ef21_dense_vs_sgd(jnp.asarray(targets), 0.5, 6):
    np.testing.assert_array_equal(params,
                                  np.broadcast_to(plain, params.shape))


def test_ef21_with_dense_is_plain_sgd_on_random_data():
  # On arbitrary floats h + (mean(g) - mean(h_i)) differs from mean(g) only
  # by float32 rounding of the adds (a few ulps of the largest term).
  rng = np.random.default_rng(3)
  targets = rng.normal(size=(WORKERS, 16)).astype(np.float32)
  for params, plain in _ef21_dense_vs_sgd(jnp.asarray(targets), 0.1, 6):
    np.testing.assert_allclose(params, np.broadcast_to(plain, params.shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("feedback", ["ef21", "ef21m"])
def test_aligned_compressor_aggregates_with_one_psum(feedback, mesh):
  # Shared-seed Rand-k is aligned: the whole exchange of EF21 is one psum
  # of the k values (nonfinite="ignore" drops the NaN-check psum).
  reduces, gathers = runners.collectives(runners.lowered_step_text(
      gs.rand_k(0.05, shared=True), mesh, feedback=feedback))
  assert gathers == 0 and reduces == ["tensor<100xf32>"]


def test_first_step_sends_compressed_gradient():
  # h_i and h start at zero, so EF21's first output is mean_i C(g_i).
  tx = gs.sparsify(gs.top_k(k=1), feedback="ef21")
  update = jax.jit(tx.update)
  out, state = update(jnp.array([1.0, -5.0, 2.0]), tx.init(jnp.zeros(3)))
  np.testing.assert_array_equal(np.asarray(out), [0.0, -5.0, 0.0])
  out, state = update(jnp.array([1.0, -5.0, 2.0]), state)
  np.testing.assert_array_equal(np.asarray(out), [0.0, -5.0, 2.0])
