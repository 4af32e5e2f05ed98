"""Threshold compressors: hard-threshold and Gaussian-k, at a fixed capacity.

Both send every entry whose magnitude passes a threshold, so the number sent
varies per step. XLA needs static shapes (and every worker must send the
same number of slots for the all-gather), so the payload has a fixed
capacity: if more entries pass than fit, the largest magnitudes are sent,
the others stay in error memory (never dropped) and are counted in
``Payload.overflow`` (``overflow_values`` in `comm_stats`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import selection
from gsparse_jax._src import validation
from gsparse_jax._src import wire

# Gaussian-k's refinement, as the authors' GaussianK-SGD code runs it
# (`compression.py`, `GaussianCompressor`): `while loops < 3:` count; below
# 2k/3 halve tau, above 4k/3 multiply it by 1.5, else stop. The set sent is
# the one counted last, so at most two rescalings reach the selection (a third
# is computed and thrown away).
GAUSSIAN_RESCALINGS = 2
GAUSSIAN_SHRINK = 0.5  # too few selected: lower the threshold
GAUSSIAN_GROW = 1.5  # too many selected: raise it
# Default payload slots, in units of k. The rule's count lands in
# [2k/3, 4k/3] when the refinement converges; when it runs out it does not.
# Measured (d = 1e4-1e6, ratios 0.001-0.1): 90%-zero vectors at ratio 0.001
# pass ~1.9k every time, Student-t(2) vectors up to ~2.7k in about one draw
# in ten, and with k <= 50 one halving can overshoot to 7-16k on normal data.
# With k >= 1000, 2k holds all of them but about one Student-t(2) draw in
# ten, at twice Top-k's bytes. On real, heavy-tailed gradients the rule can
# pass more (digits MLP, ratio 0.01: ~4k on average); the excess overflows.
GAUSSIAN_CAPACITY = 2.0


def threshold_payload(x: jax.Array, threshold: jax.Array, capacity: int,
                      value_dtype, *, strict: bool = False
                      ) -> payload_lib.Payload:
  """The entries with ``|x| >= threshold`` (``>`` if strict), ``capacity`` slots.

  When they fit, they are compacted in index order (no sort). When they do
  not, the passing entries are exactly the largest magnitudes of ``x``, so a
  Top-``capacity`` of ``x`` keeps the largest of them; the rest is overflow.
  Both paths use the fast kernels of `selection` (one pass over ``x``).

  Args:
    x: the 1-D vector being compressed.
    threshold: float scalar (may be traced).
    capacity: the static number of payload slots.
    value_dtype: the dtype of the values on the wire.
    strict: compare with ``>`` instead of ``>=``.

  Returns:
    A sparse `Payload` with ``count = min(passed, capacity)`` and
    ``overflow = max(passed - capacity, 0)``.
  """
  indices, passed = selection.compact_at_least(x, threshold, capacity,
                                               strict=strict)
  indices = jax.lax.cond(
      passed <= capacity, lambda: indices,
      lambda: selection.top_k_abs(x, capacity, method="auto"))
  return payload_lib.sparse_payload(
      x, indices, jnp.minimum(passed, capacity), value_dtype,
      overflow=jnp.maximum(passed - capacity, 0))


@dataclasses.dataclass(frozen=True)
class HardThreshold(compressors.Compressor):
  """Hard-threshold sparsifier (see `hard_threshold`)."""

  threshold: float = 0.0
  capacity_ratio: float = 0.01

  def budget(self, size):
    # No target count: the threshold decides; the capacity bounds it.
    return wire.budget(self.capacity_ratio, size)

  def select(self, x, state, context):
    del state
    return threshold_payload(x, self.threshold, self.capacity(x.shape[0]),
                             context.value_dtype)


@dataclasses.dataclass(frozen=True)
class GaussianK(compressors.Compressor):
  """Gaussian-k sparsifier (see `gaussian_k`)."""

  ratio: float = 0.01
  capacity_ratio: Optional[float] = None

  def budget(self, size):
    return gaussian_target(self.ratio, size)

  def capacity(self, size):
    if self.capacity_ratio is None:
      return int(min(size, math.ceil(GAUSSIAN_CAPACITY * self.budget(size))))
    return max(self.budget(size), wire.budget(self.capacity_ratio, size))

  def threshold(self, x: jax.Array) -> jax.Array:
    """The refined threshold ``tau`` for ``x`` (compared as ``|x| > tau``)."""
    return gaussian_threshold(x, self.ratio)

  def select(self, x, state, context):
    del state
    return threshold_payload(x, self.threshold(x), self.capacity(x.shape[0]),
                             context.value_dtype, strict=True)


def gaussian_target(ratio: float, size: int) -> int:
  """Gaussian-k's ``k = max(int(ratio * size), 1)`` (rounded down, as the
  reference code does)."""
  return int(min(size, max(int(ratio * size), 1)))


def gaussian_threshold(x: jax.Array, ratio: float,
                       rescalings: int = GAUSSIAN_RESCALINGS) -> jax.Array:
  """Gaussian-k's threshold: a normal fit, then at most ``rescalings`` fixes.

  ``tau = mean(x) + Phi^-1(1 - ratio/2) * std(x)`` (the signed mean; the
  standard deviation with the ``d - 1`` divisor). With ``k =
  max(int(ratio * d), 1)``: while the number of ``|x| > tau`` is below
  ``2k/3`` halve ``tau``, above ``4k/3`` multiply it by 1.5, at most
  ``rescalings`` times, counting after each (a `lax.while_loop`: no extra
  pass over ``x`` when the first count is in the band). The last counted
  ``tau`` is returned, which is exactly the set the reference
  GaussianK-SGD code sends.

  Args:
    x: the 1-D vector.
    ratio: the target fraction of entries, in (0, 1].
    rescalings: how many times ``tau`` may be rescaled.

  Returns:
    float32 scalar ``tau``.
  """
  x = x.astype(jnp.float32)
  k = gaussian_target(ratio, x.shape[0])
  # Phi^-1(1 - ratio/2): the two-sided normal quantile (static).
  z = statistics.NormalDist().inv_cdf(1.0 - ratio / 2.0)
  # ddof 1 as torch.std; a single entry has no spread (not NaN).
  tau = jnp.mean(x) + z * jnp.std(x, ddof=1 if x.shape[0] > 1 else 0)
  # The band [2k/3, 4k/3] for integer counts, in exact integer arithmetic:
  # count < 2k/3 iff count < ceil(2k/3); count > 4k/3 iff count > 4k // 3.
  low, high = -(-2 * k // 3), 4 * k // 3

  def count_above(t):
    return selection.count_at_least(x, t, strict=True)

  def out_of_band(count):
    return (count < low) | (count > high)

  def cond(carry):
    step, _, count = carry
    return (step < rescalings) & out_of_band(count)

  def body(carry):
    step, t, count = carry
    t = jnp.where(count < low, GAUSSIAN_SHRINK * t, GAUSSIAN_GROW * t)
    return step + 1, t, count_above(t)

  _, tau, _ = jax.lax.while_loop(
      cond, body, (jnp.zeros([], jnp.int32), tau, count_above(tau)))
  return tau


def hard_threshold(threshold: float, *, capacity_ratio: float
                   ) -> HardThreshold:
  """Hard-threshold sparsifier: sends every entry with ``|a| >= threshold``.

  No sorting and no budget: the number sent varies per step, which is the
  point (with error feedback, a constant threshold minimizes the total
  error over training, not the per-step error). Entries are written into a
  payload of fixed capacity; if more pass than fit, the largest magnitudes
  are sent and the rest stays in error memory, counted as overflow in
  `comm_stats`.

  Args:
    threshold: ``lambda``, a finite number >= 0, compared with the
      accumulated gradient's magnitudes (see `calibrate_threshold`).
    capacity_ratio: payload slots as a fraction of the vector's length, in
      (0, 1]: ``capacity = max(1, round(capacity_ratio * d))``. The bytes on
      the wire are fixed by it.

  Returns:
    A `Compressor`.

  Example:
    >>> import jax, jax.numpy as jnp, gsparse_jax as gs
    >>> c = gs.hard_threshold(1.0, capacity_ratio=0.5)
    >>> p = gs.compress(c, jnp.array([0.5, -2.0, 1.0, 0.1]), c.init(4),
    ...                 jax.random.key(0))
    >>> p.indices.tolist(), int(p.count), int(p.overflow)
    ([1, 2], 2, 0)

  Reference: Sahu, Dutta, Abdelmoniem, Banerjee, Canini, Kalnis,
  "Rethinking gradient sparsification as total error minimization", 2021.
  """
  threshold = validation.finite_nonnegative(threshold, "threshold")
  capacity_ratio = validation.ratio(capacity_ratio, "capacity_ratio")
  return HardThreshold(threshold=threshold, capacity_ratio=capacity_ratio)


def calibrate_threshold(grads: Any, target_density: float) -> float:
  """A hard threshold that ``target_density`` of a sample's entries pass.

  Returns the ``k``-th largest magnitude over all float entries of
  ``grads`` (``k = max(1, round(target_density * d))``), so that ``k``
  entries (more on ties) satisfy ``|g| >= threshold``. Calibrate on a
  representative accumulated gradient; with error feedback the memory grows
  until entries pass, so the achieved density drifts (see `comm_stats`),
  often well above the target. `hard_threshold` selects exactly what the
  authors' `ThreshReducer` (sands-lab/rethinking-sparsification) sends only
  while no worker's count exceeds its capacity (the reference pads every
  worker to the step's largest count instead), so to reproduce it choose
  ``capacity_ratio`` above the highest per-worker density of the run;
  ``overflow_values`` in `comm_stats` counts what did not fit.

  Args:
    grads: an array or pytree of arrays (a sample gradient), on host or
      device. Non-float leaves are ignored.
    target_density: the fraction of entries that should pass, in (0, 1].

  Returns:
    The threshold, a Python float.

  Example:
    >>> import jax.numpy as jnp, gsparse_jax as gs
    >>> gs.calibrate_threshold(jnp.array([0.1, -4.0, 2.0, 0.5]), 0.5)
    2.0
  """
  target_density = validation.ratio(target_density, "target_density")
  magnitudes = [np.abs(np.asarray(leaf, np.float64)).reshape(-1)
                for leaf in jax.tree.leaves(grads)
                if jnp.issubdtype(np.asarray(leaf).dtype, jnp.floating)]
  magnitudes = (np.concatenate(magnitudes) if magnitudes
                else np.zeros((0,)))
  if magnitudes.size == 0:
    raise ValueError("calibrate_threshold needs a non-empty float sample in "
                     "`grads`.")
  k = wire.budget(target_density, magnitudes.size)
  # k-th largest magnitude, without a full sort.
  return float(np.partition(magnitudes, magnitudes.size - k)[
      magnitudes.size - k])


def gaussian_k(ratio: float, *, capacity_ratio: Optional[float] = None
               ) -> GaussianK:
  """Gaussian-k: approximate Top-k by a threshold from a normal fit.

  The rule of the authors' code, exactly: with ``k = max(int(ratio*d), 1)``,
  ``tau = mean(a) + Phi^-1(1 - ratio/2) * std(a)`` is rescaled at most twice
  (halved when fewer than ``2k/3`` entries have ``|a| > tau``, multiplied by
  1.5 when more than ``4k/3``), and every entry passing the last ``tau``
  counted is sent. No sort, so it is cheap on accelerators, but when the
  refinement runs out the count is far from ``k`` (zero-heavy or
  heavy-tailed vectors); `comm_stats` reports the achieved density and the
  overflow.

  Args:
    ratio: target fraction of entries, in (0, 1].
    capacity_ratio: payload slots as a fraction of ``d``, in [ratio, 1]; the
      bytes on the wire are fixed by it. Default: ``ceil(2k)`` slots
      (`GAUSSIAN_CAPACITY`), which hold the rule's count on normal and
      90%-zero vectors with ``k >= 1000``. When more entries pass than fit
      (the reference sends them all), the largest magnitudes are sent and the
      rest stays in error memory, counted as overflow; ``capacity_ratio=1``
      reproduces the reference's selection always.

  Returns:
    A `Compressor`.

  Example:
    >>> import gsparse_jax as gs
    >>> c = gs.gaussian_k(0.03)
    >>> c.budget(100), c.capacity(100)
    (3, 6)

  Reference: Shi, Chu, Cheung, See, "Understanding Top-k sparsification in
  distributed deep learning", arXiv 1911.08772, 2019 (code:
  hclhkbu/GaussianK-SGD).
  """
  ratio = validation.ratio(ratio)
  if capacity_ratio is not None:
    capacity_ratio = validation.ratio(capacity_ratio, "capacity_ratio")
    if capacity_ratio < ratio:
      raise ValueError(
          f"`capacity_ratio` must be in [ratio, 1] = [{ratio}, 1], got "
          f"{capacity_ratio!r}.")
  return GaussianK(ratio=ratio, capacity_ratio=capacity_ratio)
