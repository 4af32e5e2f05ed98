"""References of the sparse family: Top-k and its approximations, Rand-k,
thresholds, RegTop-k and ARC-Top-K (float64).

`REFERENCES` maps registry names to ``build(compressor, d, segment) ->
(select_all, receive_all)`` (see `references.feedback`).
"""

import statistics

import numpy as np

from . import dense
from . import draws
from .feedback import mean_of
from .feedback import per_worker


def top_k_indices(a, k):
  """Indices of the k largest |a|, ties to the lower index."""
  return np.argsort(-np.abs(a), kind="stable")[:k]


def keep(a, indices, values=None):
  """The dense vector with ``values`` (default ``a``'s) at ``indices``."""
  out = np.zeros_like(a)
  out[indices] = a[indices] if values is None else values
  return out


def top_k_select(k):
  """``select(a, step, worker)``: Top-k of ``a``, dense."""
  return lambda a, step, worker: keep(a, top_k_indices(a, k))


def threshold_with_capacity(row, passing, capacity):
  """The passing entries of ``row``; over capacity, the largest of them."""
  indices = np.flatnonzero(passing)
  if indices.size > capacity:
    order = np.argsort(-np.abs(row[indices]), kind="stable")
    indices = indices[order[:capacity]]
  return keep(row, indices)


def gaussian_k_mask(u, ratio):
  """Gaussian-k's selection, as the authors' `GaussianCompressor` does it.

  Signed mean and std (``d - 1`` divisor) of ``u``; ``tau = mean +
  Phi^-1(1 - ratio/2) std``; ``k = max(int(ratio d), 1)``; up to three
  counts of ``|u| > tau``, rescaling ``tau`` by 0.5 (below 2k/3) or 1.5
  (above 4k/3) after each, stopping inside the band; the set sent is the
  last one counted.
  """
  d = u.size
  k = max(int(ratio * d), 1)
  z = statistics.NormalDist().inv_cdf(1.0 - ratio / 2.0) if ratio < 1 else 0.0
  tau = u.mean() + z * u.std(ddof=1)
  for _ in range(3):
    passing = np.abs(u) > tau
    count = passing.sum()
    if count < 2.0 * k / 3.0:
      tau *= 0.5
    elif count > 4.0 * k / 3.0:
      tau *= 1.5
    else:
      break
  return passing


def reg_top_k_scores(a, state, mu):
  """RegTop-k's ``|a| |tanh(r / mu)|`` per worker; ``state`` = last (s, S)."""
  if state is None:
    return np.abs(a)
  sent, total = state
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(sent != 0, total[None, :] / sent, 1e8)
  weight = np.where(ratio == 0, 0.0, np.abs(np.tanh(ratio / mu)))
  return np.abs(a) * weight


def _top_k(compressor, d, segment):
  del segment
  return per_worker(top_k_select(compressor.budget(d))), mean_of


def top_k_rounded_select(k, dtype):
  """``select(a, step, worker)``: Top-k (ties to the lower index) with the
  kept values rounded to ``dtype``."""
  def select(a, step, worker):
    indices = top_k_indices(a, k)
    return keep(a, indices, dense.rounded(a[indices], dtype))
  return select


def _top_k_rounded(compressor, d, segment):
  """Top-k with the kept values rounded to the compressor's value dtype."""
  del segment
  return per_worker(top_k_rounded_select(
      compressor.budget(d), dense.NARROW[compressor.value_dtype.name])), mean_of


def _rand_k(compressor, d, segment):
  def select_all(a, step, state):
    indices = draws.compressed_indices(compressor, d, step, a.shape[0],
                                       segment)
    return np.stack([keep(row, idx) for row, idx in zip(a, indices)]), state
  return select_all, mean_of


def _hard_threshold(compressor, d, segment):
  del segment
  capacity = compressor.capacity(d)
  return per_worker(lambda a, step, worker: threshold_with_capacity(
      a, np.abs(a) >= compressor.threshold, capacity)), mean_of


def _gaussian_k(compressor, d, segment):
  del segment
  capacity = compressor.capacity(d)
  return per_worker(lambda a, step, worker: threshold_with_capacity(
      a, gaussian_k_mask(a, compressor.ratio), capacity)), mean_of


def _reg_top_k(compressor, d, segment):
  del segment
  k = compressor.budget(d)
  def select_all(a, step, state):
    scores = reg_top_k_scores(a, state and state[:2], compressor.mu)
    sent = np.stack([keep(row, top_k_indices(score, k))
                     for row, score in zip(a, scores)])
    return sent, (sent, None)
  def receive_all(sent, state):
    return sent.mean(axis=0), (sent, sent.sum(axis=0))
  return select_all, receive_all


def _arc_top_k(compressor, d, segment):
  """Rows ranked by the energy of the workers' summed sketch ``sum_i G_i
  Omega`` (the rows themselves when no wider than the rank)."""
  num_rows, row_len = compressor.grid(d)
  kept = compressor.rows_kept(d)
  def select_all(a, step, state):
    workers = a.shape[0]
    padded = np.zeros((workers, num_rows * row_len))
    padded[:, :d] = a
    rows = padded.reshape(workers, num_rows, row_len)
    if row_len <= compressor.rank:
      sketch = rows.sum(axis=0)
    else:
      omega = draws.normal((row_len, compressor.rank), step, segment)
      sketch = (rows @ omega).sum(axis=0)
    chosen = np.argsort(-np.sum(sketch**2, axis=1), kind="stable")[:kept]
    sent = np.zeros_like(rows)
    sent[:, chosen] = rows[:, chosen]
    return sent.reshape(workers, -1)[:, :d], state
  return select_all, mean_of


REFERENCES = {
    "top_k": _top_k,
    "approx_top_k": _top_k,  # lax.approx_max_k is exact off TPU
    "top_k_bf16": _top_k_rounded,
    "rand_k": _rand_k,
    "hard_threshold": _hard_threshold,
    "gaussian_k": _gaussian_k,
    "reg_top_k": _reg_top_k,
    "arc_top_k": _arc_top_k,
}
