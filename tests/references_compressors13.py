"""NumPy references for sign, cast and PowerSGD (float64 unless said).

``select_<name>(a, step, worker, ...)`` returns the dense vector one worker
sends for its accumulated vector ``a``; `ef_run_dense` runs error feedback
over workers with such a function. PowerSGD couples the workers inside a
step, so it has a run of its own, `power_sgd_run`.
"""

import ml_dtypes
import numpy as np


def select_sign(a, step, worker, scale="l1"):
  """``scale(a) * sign(a)`` with ``sign(0) = +1``."""
  del step, worker
  a = np.asarray(a, np.float64)
  if scale == "l1":
    magnitude = np.mean(np.abs(a))
  else:
    magnitude = np.sqrt(np.sum(a * a) / a.size)
  return magnitude * np.where(a < 0, -1.0, 1.0)


def select_cast(a, step, worker, dtype=ml_dtypes.bfloat16):
  """``a`` rounded to ``dtype`` (from float32, as the library holds it)."""
  del step, worker
  return np.asarray(a, np.float32).astype(dtype).astype(np.float64)


def select_top_k_low_precision(a, step, worker, k,
                               dtype=ml_dtypes.bfloat16):
  """Top-k (ties to the lower index) with the kept values rounded."""
  indices = np.argsort(-np.abs(a), kind="stable")[:k]
  sent = np.zeros_like(a)
  sent[indices] = select_cast(a[indices], step, worker, dtype)
  return sent


def ef_run_dense(grads, select, feedback="ef", dtype=np.float64):
  """Error feedback over workers with a dense ``select(a, step, worker)``.

  Args:
    grads: ``[steps, workers, d]``.
    select: returns the dense vector a worker sends for ``a``.
    feedback: ``"ef"`` or ``"none"``.
    dtype: the arithmetic of ``a = memory + grad`` and ``a - sent``
      (float32 reproduces the library's rounding bit for bit).

  Returns:
    (sent ``[steps, workers, d]``, outputs ``[steps, d]`` (the workers' mean
    of what they sent), final memory ``[workers, d]``).
  """
  grads = np.asarray(grads, dtype)
  steps, workers, d = grads.shape
  memory = np.zeros((workers, d), dtype)
  sent = np.zeros((steps, workers, d), dtype)
  for t in range(steps):
    for i in range(workers):
      a = grads[t, i] + (memory[i] if feedback == "ef" else 0.0)
      sent[t, i] = select(a, t, i)
      if feedback == "ef":
        memory[i] = a - sent[t, i]
  return sent, sent.mean(axis=1), memory


def orthonormal_columns(p):
  """An orthonormal basis of the columns of ``p`` (Gram-Schmidt, float64).

  The approximation only depends on the projector ``P P^T``, so any
  orthonormal basis of the same span gives the same outputs.
  """
  basis = []
  for column in p.T:
    for b in basis:
      column = column - (b @ column) * b
    norm = np.linalg.norm(column)
    basis.append(column / norm)
  return np.stack(basis, axis=1)


def power_sgd_run(grads, shape, q0, feedback="ef", memory_of="own"):
  """PowerSGD over workers, as in Vogels et al. 2019 (arXiv 1905.13727).

  Args:
    grads: ``[steps, workers, m * n]`` (one tensor of ``shape`` flattened).
    shape: ``(m, n)``.
    q0: ``[n, r]``, the first ``Q`` (the same on every worker), then warm
      started; or ``q0(step) -> [n, r]``, a fresh ``Q`` every step.
    feedback: ``"ef"`` or ``"none"``.
    memory_of: ``"own"``: worker i remembers ``M_i - P Q_i^T`` (this
      library); ``"mean"``: ``M_i - P Q^T`` (PyTorch's powerSGD_hook).

  Returns:
    (outputs ``[steps, m * n]``, final memory ``[workers, m * n]``, final
    ``Q``).
  """
  steps, workers, _ = grads.shape
  m, n = shape
  q = None if callable(q0) else np.asarray(q0, np.float64)
  memory = np.zeros(grads.shape[1:])
  outputs = []
  for t in range(steps):
    if callable(q0):
      q = np.asarray(q0(t), np.float64)
    matrices = [(grads[t, i] + (memory[i] if feedback == "ef" else 0.0)
                 ).reshape(m, n) for i in range(workers)]
    p_hat = orthonormal_columns(np.mean([mi @ q for mi in matrices], axis=0))
    own_q = [mi.T @ p_hat for mi in matrices]
    q = np.mean(own_q, axis=0)
    out = p_hat @ q.T
    if feedback == "ef":
      for i, mi in enumerate(matrices):
        sent = p_hat @ own_q[i].T if memory_of == "own" else out
        memory[i] = (mi - sent).reshape(-1)
    outputs.append(out.reshape(-1))
  return np.stack(outputs), memory, q
