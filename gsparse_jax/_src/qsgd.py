"""QSGD: unbiased stochastic quantization to a few levels of the norm.

Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-efficient SGD
via gradient quantization and encoding", 2017 (arXiv 1610.02132). With
``s = 2**bits - 1`` levels and ``u_j = s * |a_j| / ||a||_2`` in ``[0, s]``,
entry ``j`` is sent as

  Q(a)_j = ||a||_2 * sign(a_j) * l_j / s,
  l_j = floor(u_j) + 1 with probability u_j - floor(u_j), else floor(u_j),

so ``E[Q(a)] = a``. On the wire each entry is ``bits + 1`` bits (the level
``l_j`` in the low ``bits`` bits, the sign above it; packed into uint32
words) and the vector carries its float32 norm. The random draws come from
the step's key folded with the worker index, so workers quantize
independently. This module sends fixed-width codes, not the paper's Elias
coding of the levels (variable length does not fit XLA's static shapes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gsparse_jax._src import quantized
from gsparse_jax._src import validation

LAYOUT = "qsgd_levels"  # (bits + 1)-bit codes + a float32 norm
MAX_BITS = 16


@dataclasses.dataclass(frozen=True)
class QSGD(quantized.Quantizer):
  """Stochastic quantization to ``2**bits - 1`` levels of the l2 norm."""

  bits: int = 4

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

  def encode(self, x, context):
    key = context.key
    if context.worker is not None:
      key = jax.random.fold_in(key, context.worker)
    norm = jnp.sqrt(jnp.sum(jnp.square(x)))
    safe_norm = jnp.where(norm > 0, norm, 1.0)  # a zero vector sends zeros
    # |a_j| <= ||a|| up to rounding; the clip keeps l_j within `bits` bits.
    scaled = jnp.minimum(jnp.abs(x) / safe_norm * self.levels, self.levels)
    low = jnp.floor(scaled)
    up = jax.random.uniform(key, x.shape, jnp.float32) < scaled - low
    level = low.astype(jnp.uint32) + up.astype(jnp.uint32)
    negative = (x < 0).astype(jnp.uint32)
    return level | (negative << self.bits), norm

  def decode(self, codes, scale):
    level = (codes & jnp.uint32(self.levels)).astype(jnp.float32)
    signs = 1.0 - 2.0 * (codes >> self.bits).astype(jnp.float32)
    return scale / self.levels * level * signs


def qsgd(bits: int = 4) -> QSGD:
  """QSGD: each entry to one of ``2**bits - 1`` levels of the norm, unbiased.

  Each worker sends ``||a||_2 * sign(a_j) * l_j / s`` with ``s = 2**bits - 1``
  and ``l_j`` the stochastic rounding of ``s * |a_j| / ||a||_2`` (so the
  expectation is ``a``): ``bits + 1`` bits per entry, bit-packed, plus the
  float32 norm. Workers all-gather the words and norms and average the
  decoded vectors: ``4 * ceil(d * (bits + 1) / 32) + 4`` bytes per worker
  and step. The randomness comes from the step's key folded with the worker
  index. Unbiased, so it also works without error feedback; the norm is
  per compressed segment (use ``granularity="layer"`` for one per tensor).

  Args:
    bits: bits per level, an integer in [1, 16] (4: 15 levels).

  Returns:
    A `Compressor` with its own wire format (layout ``"qsgd_levels"``).

  Example:
    >>> import gsparse_jax as gs
    >>> [c.bytes for c in gs.qsgd(bits=4).wire(64, "float32")]  # 10 words + norm
    [44]

  Reference: Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD:
  Communication-efficient SGD via gradient quantization and encoding", 2017
  (arXiv 1610.02132).
  """
  bits = validation.positive_int(bits, "bits")
  if bits > MAX_BITS:
    raise ValueError(f"`bits` must be an integer in [1, {MAX_BITS}], got "
                     f"{bits!r}.")
  return QSGD(bits=bits)
