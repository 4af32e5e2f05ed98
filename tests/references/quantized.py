"""References of the quantized family: scaled sign, QSGD and Top-k with
low-bit values (float64)."""

import numpy as np

from . import draws
from .feedback import mean_of
from .feedback import per_worker


def select_sign(a, step, worker, scale="l1"):
  """``scale(a) * sign(a)`` with ``sign(0) = +1``."""
  del step, worker
  a = np.asarray(a, np.float64)
  if scale == "l1":
    magnitude = np.mean(np.abs(a))
  else:
    magnitude = np.sqrt(np.sum(a * a) / a.size)
  return magnitude * np.where(a < 0, -1.0, 1.0)


def select_qsgd(a, step, worker, compressor, segment=0):
  """QSGD of ``a``: per bucket ``||b|| sign(a_j) l_j / s``, ``l_j`` the
  stochastic rounding of ``s |a_j| / ||b||`` with the library's uniforms."""
  d = a.size
  s = 2 ** compressor.bits - 1
  block = compressor.block_size(d)
  num_blocks = compressor.num_blocks(d)
  blocks = np.zeros(num_blocks * block)
  blocks[:d] = a
  blocks = blocks.reshape(-1, block)
  norms = np.linalg.norm(blocks, axis=1, keepdims=True)
  scaled = np.minimum(np.abs(blocks) / np.where(norms > 0, norms, 1.0) * s,
                      s)
  low = np.floor(scaled)
  up = draws.uniform((num_blocks, block), step, worker, segment) < (
      scaled - low)
  sent = norms * np.sign(blocks) * (low + up) / s
  return sent.reshape(-1)[:d]


def select_quantized_top_k(a, step, worker, compressor):
  """Top-k (ties to the lower index), the kept values in index order cut
  into chunks, each value the nearest of ``2**bits`` evenly spaced levels
  of ``[-m, m]`` (``m`` its chunk's largest magnitude)."""
  del step, worker
  a = np.asarray(a, np.float64)
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


def _sign(compressor, d, segment):
  del d, segment
  return per_worker(lambda a, step, worker: select_sign(
      a, step, worker, compressor.scale)), mean_of


def _qsgd(compressor, d, segment):
  del d
  return per_worker(lambda a, step, worker: select_qsgd(
      a, step, worker, compressor, segment)), mean_of


def _quantized_top_k(compressor, d, segment):
  del d, segment
  return per_worker(lambda a, step, worker: select_quantized_top_k(
      a, step, worker, compressor)), mean_of


REFERENCES = {"sign": _sign, "qsgd": _qsgd,
              "quantized_top_k": _quantized_top_k}
