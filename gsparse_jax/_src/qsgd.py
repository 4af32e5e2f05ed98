"""QSGD: unbiased stochastic quantization to a few levels of the norm.

Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-efficient SGD
via gradient quantization and encoding", 2017 (arXiv 1610.02132). With
``s = 2**bits - 1`` levels and ``u_j = s * |a_j| / ||a||_2`` in ``[0, s]``,
entry ``j`` is sent as

  Q(a)_j = ||a||_2 * sign(a_j) * l_j / s,
  l_j = floor(u_j) + 1 with probability u_j - floor(u_j), else floor(u_j),

so ``E[Q(a)] = a``. As in the paper, the vector is cut into buckets of
``bucket_size`` consecutive entries, each quantized with its own norm. On the
wire each entry is ``bits + 1`` bits (the level ``l_j`` in the low ``bits``
bits, the sign above it; packed into uint32 words) and each bucket carries
its float32 norm. The random draws come from
the step's key folded with the worker index, so workers quantize
independently. This module sends fixed-width codes, not the paper's Elias
coding of the levels (variable length does not fit XLA's static shapes).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from gsparse_jax._src import quantized
from gsparse_jax._src import validation

LAYOUT = "qsgd_levels"  # (bits + 1)-bit codes + a float32 norm per bucket
MAX_BITS = 16
# Buckets of 512 entries, each with its own norm, as in the paper's
# experiments: the variance bound min(d/s^2, sqrt(d)/s) then has d = 512,
# not the whole gradient's size.
DEFAULT_BUCKET_SIZE = 512


@dataclasses.dataclass(frozen=True)
class QSGD(quantized.Quantizer):
  """Stochastic quantization to ``2**bits - 1`` levels of the l2 norm."""

  bits: int = 4
  bucket_size: Optional[int] = DEFAULT_BUCKET_SIZE

  @property
  def layout(self):
    return LAYOUT

  @property
  def width(self):
    return self.bits + 1  # the level and the sign

  @property
  def levels(self) -> int:
    """``s = 2**bits - 1``, the number of nonzero levels."""
    return 2 ** self.bits - 1

  def block_size(self, size):
    return min(self.bucket_size or size, max(size, 1))

  def encode(self, blocks, context):
    key = context.key
    if context.worker is not None:
      key = jax.random.fold_in(key, context.worker)
    norms = jnp.sqrt(jnp.sum(jnp.square(blocks), axis=1))
    safe = jnp.where(norms > 0, norms, 1.0)[:, None]  # zero bucket: zeros
    # |a_j| <= ||a|| up to rounding; the clip keeps l_j within `bits` bits.
    scaled = jnp.minimum(jnp.abs(blocks) / safe * self.levels, self.levels)
    low = jnp.floor(scaled)
    up = jax.random.uniform(key, blocks.shape, jnp.float32) < scaled - low
    level = low.astype(jnp.uint32) + up.astype(jnp.uint32)
    negative = (blocks < 0).astype(jnp.uint32)
    return level | (negative << self.bits), norms

  def decode(self, codes, scales):
    level = (codes & jnp.uint32(self.levels)).astype(jnp.float32)
    signs = 1.0 - 2.0 * (codes >> self.bits).astype(jnp.float32)
    return (scales / self.levels)[:, None] * level * signs


def qsgd(bits: int = 4, *,
         bucket_size: Optional[int] = DEFAULT_BUCKET_SIZE) -> QSGD:
  """QSGD: each entry to one of ``2**bits - 1`` levels of the norm, unbiased.

  The vector is cut into buckets of ``bucket_size`` entries; each worker
  sends ``||b||_2 * sign(a_j) * l_j / s`` for entry ``j`` of bucket ``b``,
  with ``s = 2**bits - 1`` and ``l_j`` the stochastic rounding of
  ``s * |a_j| / ||b||_2`` (so the expectation is ``a``): ``bits + 1`` bits
  per entry, bit-packed, plus a float32 norm per bucket. Workers all-gather
  the buffers and average the decoded vectors:
  ``4 * (ceil(d * (bits + 1) / 32) + ceil(d / bucket_size))`` bytes per
  worker and step. The randomness comes from the step's key folded with the
  worker index (a uniform draw per entry, which dominates the cost on CPU).
  Unbiased, so it also works without error feedback.

  Args:
    bits: bits per level, an integer in [1, 16] (4: 15 levels).
    bucket_size: entries per bucket (an integer >= 1), or None for one norm
      per compressed segment (the whole vector). Smaller buckets: less
      variance, more norms on the wire.

  Returns:
    A `Compressor` with its own wire format (layout ``"qsgd_levels"``).

  Example:
    >>> import gsparse_jax as gs
    >>> c = gs.qsgd(bits=4, bucket_size=32)
    >>> [w.bytes for w in c.wire(64, "float32")]  # 10 words + 2 norms
    [48]

  Reference: Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
  Communication-efficient SGD via gradient quantization and encoding", 2017
  (arXiv 1610.02132).
  """
  bits = validation.int_in_range(bits, "bits", 1, MAX_BITS)
  return QSGD(bits=bits, bucket_size=validation.optional_positive_int(
      bucket_size, "bucket_size"))
