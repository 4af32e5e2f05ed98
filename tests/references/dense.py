"""References of the dense family: the dense all-reduce and its cast to a
narrow dtype (float64 unless said)."""

import ml_dtypes
import numpy as np

from .feedback import mean_of
from .feedback import per_worker

NARROW = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# All-reduces in a narrow dtype: the collective rounds the sum (vmap's psum
# after every addition, XLA:CPU's all-reduce once, NCCL after every hop), so
# the mean equals the reference's only up to that rounding, vmap and
# shard_map may differ in those bits, and that rounding is in no memory (the
# memories, rounding errors of each worker's own values, stay exact). The
# unit roundoff of the sum's dtype, per registry name:
SUM_ROUNDING = {"cast": 2.0 ** -8}


def rounded(a, dtype=ml_dtypes.bfloat16):
  """``a`` rounded to ``dtype`` (from float32, as the library holds it)."""
  return np.asarray(a, np.float32).astype(dtype).astype(np.float64)


def select_cast(a, step, worker, dtype=ml_dtypes.bfloat16):
  """What `gs.cast` sends: ``a`` rounded to ``dtype``."""
  del step, worker
  return rounded(a, dtype)


def _dense(compressor, d, segment):
  del compressor, d, segment
  return (lambda a, step, state: (a.copy(), state)), mean_of


def _cast(compressor, d, segment):
  del d, segment
  dtype = NARROW[compressor.dtype.name]

  def receive_all(sent, state):
    # The all-reduce adds the rounded values in `dtype`; here the exact sum
    # is rounded once (XLA:CPU's all-reduce; its vmap psum rounds every
    # addition, within a few units of `dtype` of this: SUM_ROUNDING).
    total = sent.sum(axis=0).astype(dtype).astype(np.float64)
    return total / sent.shape[0], state
  return per_worker(lambda a, step, worker: rounded(a, dtype)), receive_all


REFERENCES = {"dense": _dense, "cast": _cast}
