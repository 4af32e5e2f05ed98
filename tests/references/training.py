"""A small data-parallel training problem with Top-k and error feedback."""

import numpy as np

from .feedback import Feedback
from .feedback import per_worker
from .sparse import top_k_select


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
  xs = x.reshape(workers, -1, features).astype(np.float64)
  ys = y.reshape(workers, -1, outputs).astype(np.float64)
  loop = Feedback(per_worker(top_k_select(k)), rule="ef")
  for _ in range(steps):
    grads = []
    for i in range(workers):
      residual = xs[i] @ w + b - ys[i]
      scale = 2.0 / residual.size
      grads.append(np.concatenate([scale * residual.sum(0),
                                   (scale * xs[i].T @ residual).ravel()]))
    mean, _ = loop.step(np.stack(grads))
    b = b - lr * mean[:outputs]
    w = w - lr * mean[outputs:].reshape(features, outputs)
  return w, b, loop.memory
