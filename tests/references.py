"""Small NumPy reference implementations the tests compare against."""

import numpy as np


def top_k_indices(a, k):
  """Indices of the k largest |a|, ties to the lower index."""
  return np.argsort(-np.abs(a), kind="stable")[:k]


def ef_run(grads, select, feedback="ef"):
  """Error feedback (EF14, docs/algorithms.md) over workers, in float64.

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


# ---------------------------------------------------------------------------
# The contract suite's references: every registry compressor, every feedback
# rule, all workers at once, float64. A compressor's reference is
# ``select_all(a, step, state) -> (sent, state)``: ``a`` is every worker's
# vector ``[workers, d]``, ``sent`` what each sends as a dense vector, and
# ``state`` whatever the reference carries between steps (None at step 0).
# ``receive_all(sent, state) -> (mean, state)`` aggregates (default: the
# mean); compressors whose selection learns from the aggregate use it.
# ---------------------------------------------------------------------------


def rows_top_k(a, k):
  """Top-k of every row of ``a`` (ties to the lower index), dense."""
  out = np.zeros_like(a)
  for i, row in enumerate(a):
    indices = top_k_indices(row, k)
    out[i, indices] = row[indices]
  return out


def threshold_with_capacity(row, passing, capacity):
  """The passing entries of ``row``; over capacity, the largest of them."""
  indices = np.flatnonzero(passing)
  if indices.size > capacity:
    order = np.argsort(-np.abs(row[indices]), kind="stable")
    indices = indices[order[:capacity]]
  out = np.zeros_like(row)
  out[indices] = row[indices]
  return out


def gaussian_k_mask(u, ratio):
  """Gaussian-k's selection, as the authors' `GaussianCompressor` does it.

  Signed mean and std (``d - 1`` divisor) of ``u``; ``tau = mean +
  Phi^-1(1 - ratio/2) std``; ``k = max(int(ratio d), 1)``; up to three
  counts of ``|u| > tau``, rescaling ``tau`` by 0.5 (below 2k/3) or 1.5
  (above 4k/3) after each, stopping inside the band; the set sent is the
  last one counted.
  """
  import statistics
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


def library_draw(compressor, d, step, workers):
  """Indices a key-driven compressor draws at ``step`` on every worker.

  Uses the library for the random draw only (the key schedule is the
  library's to choose); what is done with the indices is checked against
  NumPy by the caller.
  """
  import jax
  import jax.numpy as jnp
  import gsparse_jax as gs
  from gsparse_jax._src import transform
  key = transform.segment_key(jnp.asarray(step, jnp.int32), 0)
  draw = lambda _: gs.compress(compressor, jnp.zeros(d), compressor.init(d),
                               key, "data").indices
  return np.asarray(jax.vmap(draw, axis_name="data")(jnp.arange(workers)))


def arc_sketch_matrix(compressor, d, step):
  """ARC-Top-K's Gaussian sketch ``Omega`` at ``step`` (the library's key)."""
  import jax
  import jax.numpy as jnp
  from gsparse_jax._src import transform
  _, row_len = compressor.grid(d)
  key = transform.segment_key(jnp.asarray(step, jnp.int32), 0)
  return np.asarray(jax.random.normal(key, (row_len, compressor.rank),
                                      jnp.float32), np.float64)


def compressor_reference(compressor, d):
  """``(select_all, receive_all)`` for a registry compressor on ``d`` entries."""
  name = type(compressor).__name__
  mean_of = lambda sent, state: (sent.mean(axis=0), state)

  if name == "Dense":
    return (lambda a, step, state: (a.copy(), state)), mean_of
  if name in ("TopK", "ApproxTopK") and getattr(compressor, "value_dtype",
                                                None) is None:
    k = compressor.budget(d)
    return (lambda a, step, state: (rows_top_k(a, k), state)), mean_of
  if name == "RandK":
    def rand_k(a, step, state):
      indices = library_draw(compressor, d, step, a.shape[0])
      sent = np.zeros_like(a)
      for i, idx in enumerate(indices):
        sent[i, idx] = a[i, idx]
      return sent, state
    return rand_k, mean_of
  if name == "HardThreshold":
    capacity = compressor.capacity(d)
    def hard(a, step, state):
      return np.stack([threshold_with_capacity(
          row, np.abs(row) >= compressor.threshold, capacity) for row in a]
                      ), state
    return hard, mean_of
  if name == "GaussianK":
    capacity = compressor.capacity(d)
    def gaussian(a, step, state):
      return np.stack([threshold_with_capacity(
          row, gaussian_k_mask(row, compressor.ratio), capacity)
                       for row in a]), state
    return gaussian, mean_of
  if name == "RegTopK":
    k = compressor.budget(d)
    def reg(a, step, state):
      scores = reg_top_k_scores(a, state and state[:2], compressor.mu)
      sent = np.zeros_like(a)
      for i in range(a.shape[0]):
        indices = top_k_indices(scores[i], k)
        sent[i, indices] = a[i, indices]
      return sent, (sent, None)
    def receive(sent, state):
      total = sent.sum(axis=0)
      return sent.mean(axis=0), (sent, total)
    return reg, receive
  if name == "ARCTopK":
    num_rows, row_len = compressor.grid(d)
    kept = compressor.rows_kept(d)
    def arc(a, step, state):
      workers = a.shape[0]
      padded = np.zeros((workers, num_rows * row_len))
      padded[:, :d] = a
      rows = padded.reshape(workers, num_rows, row_len)
      if row_len <= compressor.rank:
        sketch = rows.sum(axis=0)
      else:
        sketch = (rows @ arc_sketch_matrix(compressor, d, step)).sum(axis=0)
      chosen = np.argsort(-np.sum(sketch**2, axis=1), kind="stable")[:kept]
      sent = np.zeros_like(rows)
      sent[:, chosen] = rows[:, chosen]
      return sent.reshape(workers, -1)[:, :d], state
    return arc, mean_of
  import references_compressors13  # pylint: disable=g-import-not-at-top
  return references_compressors13.compressor_reference(compressor, d)


def feedback_run(grads, select_all, receive_all, feedback, momentum=0.9):
  """``sparsify``'s step over workers in float64, for any feedback rule.

  Args:
    grads: ``[steps, workers, d]``.
    select_all, receive_all: the compressor's reference.
    feedback: ``"none"``, ``"ef"``, ``"ef21"`` or ``"ef21m"``.
    momentum: EF21M's beta.

  Returns:
    (outputs ``[steps, d]``, final worker memory ``[workers, d]`` (EF's
    ``e``, EF21's ``h_i``; zeros for ``"none"``)).
  """
  steps, workers, d = grads.shape
  memory = np.zeros((workers, d))  # e, or h_i
  velocity = np.zeros((workers, d))
  shared = np.zeros(d)  # EF21's h
  state = None
  outputs = []
  for t in range(steps):
    g = grads[t]
    if feedback == "ef21m":
      velocity = momentum * velocity + (1.0 - momentum) * g
      g = velocity
    if feedback == "none":
      x = g
    elif feedback == "ef":
      x = memory + g
    else:
      x = g - memory
    sent, state = select_all(x, t, state)
    mean, state = receive_all(sent, state)
    if feedback == "ef":
      memory = x - sent
      outputs.append(mean)
    elif feedback == "none":
      outputs.append(mean)
    else:
      memory = memory + sent
      shared = shared + mean
      outputs.append(shared.copy())
  return np.stack(outputs), memory


# All-reduces in a narrow dtype: the collective rounds the sum (vmap's psum
# after every addition, XLA:CPU's all-reduce once, NCCL after every hop), so
# the mean equals the reference's only up to that rounding, vmap and
# shard_map may differ in those bits, and that rounding is in no memory (the
# memories, rounding errors of each worker's own values, stay exact). The
# unit roundoff of the sum's dtype, per compressor:
SUM_ROUNDING = {"cast": 2.0 ** -8}
