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
