"""References of the low-rank family: PowerSGD (Vogels, Karimireddy, Jaggi,
"PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", arXiv 1905.13727), float64."""

import numpy as np

from . import dense
from . import draws
from .feedback import feedback_run
from .feedback import mean_of


def orthonormal_columns(p):
  """An orthonormal basis of the columns of ``p`` (Gram-Schmidt, float64).

  The approximation only depends on the projector ``P P^T``, so any
  orthonormal basis of the same span gives the same outputs.
  """
  basis = []
  for column in p.T:
    for b in basis:
      column = column - (b @ column) * b
    basis.append(column / np.linalg.norm(column))
  return np.stack(basis, axis=1)


def power_sgd_reference(shape, q0):
  """PowerSGD's ``(select_all, receive_all)`` for one ``m x n`` tensor.

  Worker i sends ``P Q_i^T``: ``P`` the orthonormalized mean of ``M_i Q``,
  ``Q_i = M_i^T P``; the reference's state is the mean ``Q``, the next
  step's ``Q`` (warm start).

  Args:
    shape: ``(m, n)``.
    q0: ``[n, r]``, the first ``Q`` (the same on every worker), then warm
      started; or ``q0(step) -> [n, r]``, a fresh ``Q`` every step.
  """
  def select_all(a, step, state):
    if callable(q0):
      q = np.asarray(q0(step), np.float64)
    else:
      q = np.asarray(q0, np.float64) if state is None else state
    matrices = a.reshape((a.shape[0],) + tuple(shape))
    p_hat = orthonormal_columns(np.mean(matrices @ q, axis=0))
    own_q = np.transpose(matrices, (0, 2, 1)) @ p_hat
    sent = (p_hat @ np.transpose(own_q, (0, 2, 1))).reshape(a.shape)
    return sent, own_q.mean(axis=0)
  return select_all, mean_of


def power_sgd_hook_run(grads, shape, q0):
  """PowerSGD with PyTorch powerSGD_hook's error feedback: every worker
  remembers ``M_i - P Q^T`` (the aggregate), not ``M_i - P Q_i^T``.

  Returns:
    (outputs ``[steps, m * n]``, final memory ``[workers, m * n]``).
  """
  run = feedback_run(grads, *power_sgd_reference(shape, q0),
                     feedback="ef_mean")
  return run.outputs, run.memory


def _power_sgd(compressor, d, segment):
  if compressor.matrix is None:  # too small to gain: sent dense
    return dense.REFERENCES["dense"](compressor, d, segment)
  if compressor.warm_start:
    q0 = np.asarray(compressor.init(d), np.float64)  # the library's draw
  else:
    n, r = compressor.matrix[1], min(compressor.rank, *compressor.matrix)
    q0 = lambda step: draws.normal((n, r), step, segment)
  return power_sgd_reference(compressor.matrix, q0)


REFERENCES = {"power_sgd": _power_sgd}
