"""The library's random draws, for references of key-driven compressors.

The key schedule (`transform.segment_key` of the step and the segment) is
the library's to choose, so these use the library for the draw only; what
is done with what was drawn is NumPy, in the family modules.
"""

import numpy as np


def segment_key(step, segment):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gsparse_jax._src import transform  # pylint: disable=g-import-not-at-top
  return transform.segment_key(jnp.asarray(step, jnp.int32), segment)


def compressed_indices(compressor, d, step, workers, segment=0):
  """``[workers, k]``: the indices a key-driven compressor (Rand-k) draws
  at ``step`` on every worker."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top
  key = segment_key(step, segment)
  draw = lambda _: gs.compress(compressor, jnp.zeros(d), compressor.init(d),
                               key, "data").indices
  return np.asarray(jax.vmap(draw, axis_name="data")(jnp.arange(workers)))


def normal(shape, step, segment=0):
  """The step's standard normals of ``shape`` (ARC's sketch, PowerSGD's
  fresh ``Q``), float64."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return np.asarray(jax.random.normal(segment_key(step, segment), shape,
                                      jnp.float32), np.float64)


def uniform(shape, step, worker, segment=0):
  """One worker's uniforms of ``shape`` at ``step`` (QSGD's rounding)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  key = jax.random.fold_in(segment_key(step, segment), worker)
  return np.asarray(jax.random.uniform(key, shape, jnp.float32), np.float64)
