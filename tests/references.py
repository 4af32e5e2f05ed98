"""Small NumPy reference implementations the tests compare against."""

import numpy as np


def top_k_indices(a, k):
  """Indices of the k largest |a|, ties to the lower index."""
  return np.argsort(-np.abs(a), kind="stable")[:k]


def ef_run(grads, select, feedback="ef"):
  """Error feedback (SPEC §1) over workers, in float64.

  Args:
    grads: ``[steps, workers, d]``.
    select: ``select(a, step, worker) -> (indices, values)`` for one worker.
    feedback: "ef" (memory) or "none".

  Returns:
    (outputs ``[steps, d]``, each the mean of what the workers sent,
     final memory ``[workers, d]``).
  """
  steps, workers, d = grads.shape
  memory = np.zeros((workers, d))
  outputs = []
  for t in range(steps):
    total = np.zeros(d)
    for i in range(workers):
      a = grads[t, i] + (memory[i] if feedback == "ef" else 0.0)
      indices, values = select(a, t, i)
      sent = np.zeros(d)
      sent[indices] = values
      if feedback == "ef":
        memory[i] = a - sent
      total += sent
    outputs.append(total / workers)
  return np.stack(outputs), memory


def top_k_select(k):
  def select(a, step, worker):
    del step, worker
    indices = top_k_indices(a, k)
    return indices, a[indices]
  return select


def linear_regression_top_k_ef(x, y, workers, steps, k, lr):
  """Data-parallel least squares, Top-k + EF per worker, SGD on the mean.

  Model ``x @ w + b`` with loss ``mean((x @ w + b - y)**2)`` on each worker's
  equal slice of the batch; parameters start at zero; float64.

  Returns:
    (w, b, memory ``[workers, d]``), the flat order being ``b`` then ``w``
    (the leaf order of the pytree ``{"b", "w"}``).
  """
  features, outputs = x.shape[1], y.shape[1]
  w = np.zeros((features, outputs))
  b = np.zeros(outputs)
  d = w.size + b.size
  memory = np.zeros((workers, d))
  xs = x.reshape(workers, -1, features).astype(np.float64)
  ys = y.reshape(workers, -1, outputs).astype(np.float64)
  for _ in range(steps):
    total = np.zeros(d)
    for i in range(workers):
      residual = xs[i] @ w + b - ys[i]
      scale = 2.0 / residual.size
      grad = np.concatenate([scale * residual.sum(0),
                             (scale * xs[i].T @ residual).ravel()])
      a = grad + memory[i]
      idx = top_k_indices(a, k)
      sent = np.zeros(d)
      sent[idx] = a[idx]
      memory[i] = a - sent
      total += sent
    mean = total / workers
    b = b - lr * mean[:outputs]
    w = w - lr * mean[outputs:].reshape(features, outputs)
  return w, b, memory
