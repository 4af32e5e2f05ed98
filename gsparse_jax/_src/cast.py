"""Low-precision all-reduce: the dense vector cast to bfloat16 or float16.

PyTorch DDP's ``bf16_compress_hook`` / ``fp16_compress_hook``: each worker
casts its vector to the low precision, the workers all-reduce it in that
precision, and the mean is cast back to float32. Half the bytes of a
float32 all-reduce, every entry sent. With error feedback the rounding error
``a - round(a)`` stays in memory (`add_sent` adds the rounded values).

Example:
  >>> import jax, jax.numpy as jnp, gsparse_jax as gs
  >>> c = gs.cast(jnp.bfloat16)
  >>> p = gs.compress(c, jnp.array([1.0, 1.00390625]), c.init(2),
  ...                 jax.random.key(0))
  >>> p.values.dtype, p.values.tolist()  # 1 + 2**-8 rounds to 1 in bf16
  (dtype(bfloat16), [1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import validation
from gsparse_jax._src import wire

DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Cast(compressors.Compressor):
  """Dense, with the values on the wire in ``dtype``."""

  dtype: Any = jnp.dtype(jnp.bfloat16)

  @property
  def layout(self):
    return payload_lib.DENSE

  def budget(self, size):
    return size

  def wire(self, size, value_dtype):
    del value_dtype  # the values travel in `dtype`, whatever the gradient's
    return (wire.all_reduce(size * self.dtype.itemsize),)

  def select(self, x, state, context):
    del state, context
    return payload_lib.dense_payload(x, self.dtype)


def cast(dtype: Any = jnp.bfloat16) -> Cast:
  """Dense all-reduce in low precision (DDP's bf16/fp16 compress hooks).

  Each worker sends its whole vector cast to ``dtype``; the sum over
  workers is computed in ``dtype`` by the all-reduce and divided by the
  number of workers in float32. With error feedback the rounding error goes
  to memory, so nothing is lost over steps. bfloat16 keeps float32's range;
  with float16 the sum over workers must stay below 65504 in magnitude.

  Args:
    dtype: ``jnp.bfloat16`` (default) or ``jnp.float16``.

  Returns:
    A `Compressor` with layout ``"dense"``.

  Example:
    >>> import gsparse_jax as gs
    >>> [c.bytes for c in gs.cast().wire(100, "float32")]
    [200]
  """
  return Cast(dtype=validation.dtype(dtype, "dtype", DTYPES))
