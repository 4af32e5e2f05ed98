"""NumPy references for sign, QSGD, cast, Top-k with rounded values and
PowerSGD (float64 unless said).

``select_<name>(a, step, worker, ...)`` returns the dense vector one worker
sends for its accumulated vector ``a``; `ef_run_dense` runs error feedback
over workers with such a function (in float32 too), and
`compressor_reference` gives the contract suite's ``(select_all,
receive_all)`` (see `references.feedback_run`). PowerSGD couples the workers
inside a step: `power_sgd_reference` is in that form directly.
"""

import functools

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


def qsgd_uniforms(compressor, d, step, worker, segment=0):
  """The uniforms QSGD draws at ``step`` on ``worker`` (the library's key
  schedule, used for the draw only), ``[num_blocks, block]``."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src import transform  # pylint: disable=g-import-not-at-top
  key = jax.random.fold_in(
      transform.segment_key(jnp.asarray(step, jnp.int32), segment), worker)
  shape = (compressor.num_blocks(d), compressor.block_size(d))
  return np.asarray(jax.random.uniform(key, shape, jnp.float32), np.float64)


def select_qsgd(a, step, worker, compressor):
  """QSGD of ``a``: per bucket ``||b|| sign(a_j) l_j / s``, ``l_j`` the
  stochastic rounding of ``s |a_j| / ||b||`` with the library's uniforms."""
  d = a.size
  s = 2 ** compressor.bits - 1
  block = compressor.block_size(d)
  blocks = np.zeros(compressor.num_blocks(d) * block)
  blocks[:d] = a
  blocks = blocks.reshape(-1, block)
  norms = np.linalg.norm(blocks, axis=1, keepdims=True)
  scaled = np.minimum(np.abs(blocks) / np.where(norms > 0, norms, 1.0) * s,
                      s)
  low = np.floor(scaled)
  up = qsgd_uniforms(compressor, d, step, worker) < scaled - low
  sent = norms * np.sign(blocks) * (low + up) / s
  return sent.reshape(-1)[:d]


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


def select_quantized_top_k(a, step, worker, compressor):
  """Top-k (ties to the lower index), the kept values in index order cut
  into chunks, each value the nearest of ``2**bits`` evenly spaced levels
  of ``[-m, m]`` (``m`` its chunk's largest magnitude)."""
  del step, worker
  k = compressor.budget(a.size)
  indices = np.sort(np.argsort(-np.abs(a), kind="stable")[:k])
  top = 2 ** compressor.bits - 1
  sent = np.zeros_like(a)
  for start in range(0, k, compressor.chunk):
    chunk = indices[start:start + compressor.chunk]
    m = np.abs(a[chunk]).max()
    unit = a[chunk] / m if m > 0 else np.zeros(len(chunk))
    level = np.clip(np.round((unit + 1.0) * top / 2.0), 0, top)
    sent[chunk] = m * (2.0 * level / top - 1.0)
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


def power_sgd_reference(shape, q0):
  """PowerSGD's ``(select_all, receive_all)`` for one ``m x n`` tensor
  (Vogels, Karimireddy, Jaggi 2019, arXiv 1905.13727).

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
  return select_all, _mean_of


def power_sgd_hook_run(grads, shape, q0):
  """PowerSGD with PyTorch powerSGD_hook's error feedback: every worker
  remembers ``M_i - P Q^T`` (the aggregate), not ``M_i - P Q_i^T``.

  Returns:
    (outputs ``[steps, m * n]``, final memory ``[workers, m * n]``).
  """
  select_all, _ = power_sgd_reference(shape, q0)
  memory = np.zeros(grads.shape[1:])
  state, outputs = None, []
  for t in range(grads.shape[0]):
    x = grads[t] + memory
    sent, state = select_all(x, t, state)
    outputs.append(sent.mean(axis=0))
    memory = x - outputs[-1]
  return np.stack(outputs), memory


def _per_worker(select):
  """``select(a, step, worker)`` as the suite's ``select_all``."""
  def select_all(a, step, state):
    return np.stack([select(row, step, i) for i, row in enumerate(a)]), state
  return select_all


def _mean_of(sent, state):
  return sent.mean(axis=0), state


def compressor_reference(compressor, d):
  """``(select_all, receive_all)`` of this module's compressors on ``d``."""
  name = type(compressor).__name__
  if name == "Sign":
    return _per_worker(functools.partial(select_sign,
                                         scale=compressor.scale)), _mean_of
  if name == "QSGD":
    return _per_worker(functools.partial(select_qsgd,
                                         compressor=compressor)), _mean_of
  if name == "Cast":
    dtype = ml_dtypes.bfloat16 if compressor.dtype.name == "bfloat16" else (
        np.float16)

    def receive_all(sent, state):
      # The all-reduce adds the rounded values in `dtype`; here the exact
      # sum is rounded once (XLA:CPU's all-reduce; its vmap psum rounds
      # every addition, within a few units of `dtype` of this).
      total = sent.sum(axis=0).astype(dtype).astype(np.float64)
      return total / sent.shape[0], state
    return _per_worker(functools.partial(select_cast, dtype=dtype)), (
        receive_all)
  if name == "TopK":  # with value_dtype (the plain one is in `references`)
    k = compressor.budget(d)
    return _per_worker(functools.partial(select_top_k_low_precision,
                                         k=k)), _mean_of
  if name == "QuantizedTopK":
    return _per_worker(functools.partial(select_quantized_top_k,
                                         compressor=compressor)), _mean_of
  if name == "PowerSGD" and compressor.layout == "dense":
    return (lambda a, step, state: (a.copy(), state)), _mean_of
  raise KeyError(f"no NumPy reference for compressor {name}")
