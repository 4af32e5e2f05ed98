"""The sampled-threshold top-k kernel (see `selection`), and the sort one.

XLA:CPU notes behind the code (jax 0.10, measured at d = 1e7):

- Magnitudes are compared as int32 bit patterns (`bits(x) & 0x7fffffff`):
  monotone in the value for non-negative floats, exact, and cheap.
- Comparisons are arithmetic (`((a - t) >> 31) + 1` is `a >= t`) and reduce
  along a minor axis of 32 first: such row reductions run vectorized and on
  all cores, while a comparison summed straight into a scalar is ~10x slower.
- The kernel never stores a full-size temporary: XLA:CPU allocates a fresh
  temp buffer per call, and first-touching 40 MB costs about as much as the
  whole selection. Hence the care with pads, loop-invariant code motion and
  values read twice (`_map_rows`, `count_ge`).
- Index arithmetic that feeds a gather is computed into its own buffer
  first (`_materialize`); fused into the gather it runs as slow scalar code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gsparse_jax._src.selection_plan import _ALIGN
from gsparse_jax._src.selection_plan import _ROW
from gsparse_jax._src.selection_plan import _WORD_BITS
from gsparse_jax._src.selection_plan import _round_up
from gsparse_jax._src.selection_plan import _threshold_supports
from gsparse_jax._src.selection_plan import ThresholdPlan

# Block size of the blocked prefix sum, and the size up to which it uses a
# single block.
_SCAN_BLOCK = 16
_SCAN_SINGLE_BLOCK = 256
# Magnitude bits above every float (+inf is 0x7f800000).
_ABOVE_ALL = 0x7F800001


def threshold_bits(threshold: jax.Array, strict: bool) -> jax.Array:
  """Magnitude bits ``t`` such that ``bits(|x|) >= t`` is the comparison."""
  threshold = jnp.asarray(threshold, jnp.float32)
  bits = lax.bitcast_convert_type(jnp.maximum(threshold, 0.0), jnp.int32)
  if strict:  # |x| > t  <=>  bits(|x|) >= bits(t) + 1, for t >= 0
    return jnp.where(threshold < 0, 0, bits + 1)
  return bits



@functools.partial(jax.jit, static_argnums=1)
def sort_kernel(x: jax.Array, k: int) -> jax.Array:
  # lax.top_k already breaks ties by lower index.
  return lax.top_k(jnp.abs(x), k)[1].astype(jnp.int32)


@functools.lru_cache(maxsize=256)
def threshold_kernel(plan: ThresholdPlan):
  """Jitted `x -> (indices, used_fallback)` for one plan, vmap-friendly.

  Under `jax.vmap` a `lax.cond` turns into a select that runs both branches,
  i.e. the slow fallback on every call; the custom batching rule maps the
  unbatched kernel over the batch instead, keeping the branch real.
  """

  @jax.custom_batching.custom_vmap
  def kernel(x):
    return _top_k_abs_threshold(x, plan)

  @kernel.def_vmap
  def _kernel_vmap(axis_size, in_batched, x):
    del axis_size
    if not in_batched[0]:
      return kernel(x), (False, False)
    return lax.map(kernel, x), (True, True)

  return jax.jit(kernel)


def _top_k_abs_threshold(
    x: jax.Array, plan: ThresholdPlan) -> tuple[jax.Array, jax.Array]:
  """Exact top-k by sampled threshold; returns `(indices, used_fallback)`."""
  size, k = plan.size, plan.k
  if x.shape != (size,):
    raise ValueError(f"plan is for shape ({size},), got x of shape {x.shape}.")
  if not _threshold_supports(x.dtype):
    raise ValueError(f"threshold selection needs a float dtype of at most 32 "
                     f"bits, got {x.dtype}.")
  threshold = _sample_threshold(x, plan)
  words = pack_words(x, threshold)
  num_candidates = total_popcount(words)
  found = (num_candidates >= k) & (num_candidates <= plan.capacity)
  # The fallback touches only word-sized temporaries: a `lax.top_k` fallback
  # would add a full-size |x| buffer that every call pays for in page faults.
  words, lower, upper, num_candidates = lax.cond(
      found,
      lambda: (words, threshold, jnp.full_like(threshold, _ABOVE_ALL),
               num_candidates),
      lambda: _fallback_candidates(x, plan, threshold, num_candidates))
  positions, magnitude_bits = _compact_candidates(
      x, words, num_candidates, plan.capacity)
  indices = _exact_top_k_of_candidates(
      positions, magnitude_bits, lower, upper, k)
  return indices, ~found


def _magnitude_bits(x: jax.Array, via_abs: bool = False) -> jax.Array:
  """int32 bit pattern of `|x|` as float32; monotone in `|x|`, exact.

  `via_abs` spells the same value differently (float `abs` instead of a
  mask), so that XLA does not merge two passes over x into one shared,
  stored full-size buffer.
  """
  as_f32 = x.astype(jnp.float32)  # exact for bfloat16 / float16
  if via_abs:
    return lax.bitcast_convert_type(jnp.abs(as_f32), jnp.int32)
  return lax.bitcast_convert_type(as_f32, jnp.int32) & 0x7FFFFFFF


def _sample_positions(plan: ThresholdPlan) -> np.ndarray:
  """The sampled positions: fixed, so results are reproducible.

  An input adversarial to this sample is still handled exactly (fallback).
  """
  rng = np.random.default_rng(0x5E1EC7)
  return rng.integers(0, plan.size, plan.sample_size).astype(np.int32)


def _sample_threshold(x: jax.Array, plan: ThresholdPlan) -> jax.Array:
  """Magnitude bits of the sampled value of rank `plan.sample_rank`."""
  sample = jnp.sort(_magnitude_bits(x[_sample_positions(plan)]))
  return sample[plan.sample_size - plan.sample_rank]


def _ge(a: jax.Array, t: jax.Array) -> jax.Array:
  """1 where `a >= t`, else 0, for int32 `a, t` in `[-1, 2**31 - 1)`.

  Written arithmetically: XLA:CPU vectorizes this inside reductions, unlike a
  boolean comparison.
  """
  return ((a - t) >> 31) + 1


def _map_rows(x: jax.Array, row_fn, via_abs: bool = False) -> jax.Array:
  """Applies `row_fn(bits, index)` to x viewed as rows of 32 entries.

  `bits` are the magnitude bits of a `(n, 32)` block of x and `index` the
  positions of its entries; `row_fn` reduces each row to one value, so x is
  read once and nothing of its size is written. The bulk of x (a multiple of
  `_ALIGN` entries) is a plain reshape; the short tail is padded with bits
  -1 (below every threshold). A pad inside the bulk expression is avoided on
  purpose: XLA:CPU then emits slow scalar code or, if the bits are read
  twice, stores them as a full-size buffer.

  Returns:
    The concatenated row results, one per 32 entries of the padded x.
  """
  size = x.shape[0]
  bulk = size // _ALIGN * _ALIGN
  parts = []
  if bulk:
    shape = (bulk // _WORD_BITS, _WORD_BITS)
    bits = _magnitude_bits(x[:bulk], via_abs).reshape(shape)
    index = lax.broadcasted_iota(jnp.int32, shape, 0) * _WORD_BITS + (
        lax.broadcasted_iota(jnp.int32, shape, 1))
    parts.append(row_fn(bits, index))
  if bulk < size:
    tail = _round_up(size - bulk, _ALIGN)
    shape = (tail // _WORD_BITS, _WORD_BITS)
    bits = jnp.pad(_magnitude_bits(x[bulk:], via_abs),
                   (0, tail - (size - bulk)), constant_values=-1)
    index = bulk + lax.iota(jnp.int32, tail)
    parts.append(row_fn(bits.reshape(shape), index.reshape(shape)))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _pack(mask_rows: jax.Array) -> jax.Array:
  """Packs a 0/1 int32 `(n, 32)` array into n uint32 words (bit j = col j)."""
  place = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(mask_rows.astype(jnp.uint32) << place, axis=1,
                 dtype=jnp.uint32)


def pack_words(x: jax.Array, threshold: jax.Array) -> jax.Array:
  """Bit j of word w is set iff `|x[32 w + j]| >= threshold` (as bits)."""
  return _map_rows(x, lambda bits, _: _pack(_ge(bits, threshold)))


def _row_sum(values: jax.Array) -> jax.Array:
  """Sum of an int32 `(n, m)` array: row sums first, then the total."""
  per_row = jnp.sum(values, axis=1)
  # Keeps XLA from merging the two reductions into one full reduction, which
  # XLA:CPU runs many times slower.
  return jnp.sum(lax.optimization_barrier(per_row))


def total_popcount(words: jax.Array) -> jax.Array:
  counts = lax.population_count(words).astype(jnp.int32)
  return _row_sum(counts.reshape(-1, _ROW))


def count_ge(x: jax.Array, t: jax.Array) -> jax.Array:
  """Number of entries of x with magnitude bits >= t >= 0; one pass over x.

  Called in a loop: the barrier ties x to the loop-varying `t`, so that XLA
  cannot hoist `|x|` out of the loop as a full-size loop-invariant buffer.
  """
  x, t = lax.optimization_barrier((x, t))
  per_row = _map_rows(x, lambda bits, _: jnp.sum(_ge(bits, t), axis=1))
  return _row_sum(per_row.reshape(-1, _ROW))


def _above_and_tie(bits: jax.Array, t: jax.Array):
  """0/1 masks `bits > t` and `bits == t`, reading `bits` once."""
  diff = bits - t
  return (-diff >> 31) & 1, (diff >> 31) - ((diff - 1) >> 31)


def _fallback_candidates(x, plan, threshold, num_candidates):
  """Candidate words when the sampled threshold missed.

  Finds the exact k-th magnitude `v` by bisection with counting passes over x
  (up to 31 passes: slow, but exact and light on memory), then takes every
  entry above `v` and the lowest-index ties at `v`, at most `capacity` in
  all. The usual cause of a miss, massive ties at the sampled threshold
  (zeros of a sparse gradient, constant input), is settled by one probe.

  Returns:
    `(words, v, v + 1, n)`: packed candidate mask, bounds on the candidates'
    k-th magnitude bits and the number of candidates.
  """
  k, capacity = plan.k, plan.capacity
  too_few = num_candidates < k
  # Invariant: count(>= lo) >= k > count(>= hi) = hi_count.
  lo = jnp.where(too_few, 0, threshold)
  probe = jnp.where(too_few, threshold, threshold + 1)
  probe_count = jnp.where(too_few, num_candidates, count_ge(x, probe))
  hi = jnp.where(probe_count < k, probe, _ABOVE_ALL)
  hi_count = jnp.where(probe_count < k, probe_count, 0)

  def step(state):
    lo, hi, hi_count = state
    mid = lo + (hi - lo) // 2
    count = count_ge(x, mid)
    enough = count >= k
    return (jnp.where(enough, mid, lo), jnp.where(enough, hi, mid),
            jnp.where(enough, hi_count, count))

  kth, _, num_above = lax.while_loop(
      lambda s: s[1] - s[0] > 1, step, (lo, hi, hi_count))

  # Keep the first `capacity - num_above` ties at kth in index order.
  tie_words = _map_rows(
      x, lambda bits, _: _pack(_above_and_tie(bits, kth)[1]), via_abs=True)
  tie_counts = lax.population_count(tie_words).astype(jnp.int32)
  tie_ends = _inclusive_prefix_sum(tie_counts)
  ties_kept = capacity - num_above
  last_word = jnp.minimum(
      _row_sum(1 - _ge(tie_ends, ties_kept).reshape(-1, _ROW)),
      tie_words.shape[0] - 1)
  rank = ties_kept - 1 - (tie_ends[last_word] - tie_counts[last_word])
  last_tie = jnp.where(
      tie_ends[-1] <= ties_kept, jnp.int32(plan.size),
      last_word * _WORD_BITS + _select_bit(tie_words[last_word], rank))

  def keep(bits, index):
    above, is_tie = _above_and_tie(bits, kth)
    return _pack(above | (is_tie & _ge(last_tie, index)))

  words = _map_rows(x, keep)
  return words, kth, kth + 1, total_popcount(words)


def _inclusive_prefix_sum(values: jax.Array) -> jax.Array:
  """Inclusive prefix sum of a 1-D int32 array.

  Blocked: rows of `_SCAN_BLOCK` values get their running sums from one
  masked row reduction (vectorized on XLA:CPU), row totals are scanned
  recursively. On XLA:CPU this is ~3x faster than `lax.associative_scan`,
  ~8x faster than `jnp.cumsum` at 1e6 values, and compiles in few ops.
  """
  size = values.shape[0]
  # Short arrays in one block: fewer levels, fewer ops to compile.
  block = _SCAN_BLOCK if size > _SCAN_SINGLE_BLOCK else size
  num_rows = -(-size // block)
  # Callers pass sizes that are multiples of the block where it matters
  # (`_ALIGN`): a pad fused into the reduction below makes it 5x slower.
  rows = jnp.pad(values, (0, num_rows * block - size)).reshape(num_rows, block)
  column = lax.broadcasted_iota(jnp.int32, (block, block), 1)
  row = lax.broadcasted_iota(jnp.int32, (block, block), 0)
  lower = (column <= row).astype(values.dtype)  # lower[j, i] = i <= j
  running = jnp.sum(rows[:, None, :] * lower[None], axis=2)
  if num_rows > 1:
    totals = running[:, -1]
    running = running + (_inclusive_prefix_sum(totals) - totals)[:, None]
  return running.reshape(-1)[:size]


def _select_bit(word: jax.Array, rank: jax.Array) -> jax.Array:
  """Position of the `rank`-th (0-based) set bit of each uint32 `word`."""
  position = jnp.zeros_like(rank)
  for width in (16, 8, 4, 2, 1):
    low_mask = jnp.uint32((1 << width) - 1)
    low_count = lax.population_count(word & low_mask).astype(jnp.int32)
    upper = rank >= low_count
    rank = jnp.where(upper, rank - low_count, rank)
    word = jnp.where(upper, word >> width, word)
    position = position + jnp.where(upper, width, 0)
  return position


def _materialize(values: jax.Array) -> jax.Array:
  """Returns `values`, computed into a buffer of its own.

  XLA fuses cheap elementwise producers into their consumers; when the
  consumer is a gather, the producer is then evaluated per gathered element
  in scalar code (2-5x slower here). A reduction is never fused into its
  consumers, so a sum over a size-2 axis acts as a fusion barrier
  (`lax.optimization_barrier` does not: XLA:CPU removes it before fusion).
  """
  return jnp.sum(jnp.stack([values, jnp.zeros_like(values)]), axis=0)


def unpack_words(words: jax.Array, num_slots: int) -> jax.Array:
  """Indices of the set bits of `words` in increasing order, padded.

  Slot s holds the s-th set bit. Its word is the number of words whose
  inclusive bit count is <= s: a histogram of the word ends (one scatter over
  the words) and a prefix sum over the slots, no search.

  Returns:
    int32 `(num_slots,)` indices; slots past the number of set bits hold
    arbitrary in-range indices.
  """
  counts = lax.population_count(words).astype(jnp.int32)
  ends = _materialize(_inclusive_prefix_sum(counts))
  # Whole scan blocks: a pad inside the prefix sum would be slow.
  padded_slots = _round_up(num_slots, _SCAN_BLOCK)
  hist = jnp.zeros(padded_slots, jnp.int32).at[ends].add(1, mode="drop")
  word = _materialize(jnp.minimum(
      _inclusive_prefix_sum(hist)[:num_slots], words.shape[0] - 1))
  slots = jnp.arange(num_slots, dtype=jnp.int32)
  rank_in_word = slots - (ends - counts)[word]
  return word * _WORD_BITS + _select_bit(words[word], rank_in_word)


def _compact_candidates(x, words, num_candidates, capacity):
  """Candidate indices (increasing) and magnitude bits; padding bits = -1."""
  valid = jnp.arange(capacity, dtype=jnp.int32) < num_candidates
  positions = _materialize(
      jnp.where(valid, unpack_words(words, capacity), 0))
  magnitude_bits = jnp.where(valid, _magnitude_bits(x[positions]), -1)
  return positions, magnitude_bits


def _exact_top_k_of_candidates(positions, magnitude_bits, lower, upper, k):
  """Exact top-k among candidates stored in increasing index order.

  Args:
    positions: int32 `(capacity,)` indices into x, increasing on valid slots.
    magnitude_bits: int32 `(capacity,)` magnitude bits, -1 on padding.
    lower: magnitude bits such that at least `k` candidates are >= it.
    upper: magnitude bits such that fewer than `k` candidates are >= it.
    k: number to select.

  Returns:
    int32 `(k,)` indices.
  """
  capacity = magnitude_bits.shape[0]
  rows = magnitude_bits.reshape(capacity // _ROW, _ROW)

  # Largest v with count(bits >= v) >= k; invariant count(>= lo) >= k and
  # count(>= hi) < k. At most 31 steps over the ~1.3 k candidates.
  def value_step(bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = _row_sum(_ge(rows, mid)) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  largest = jnp.max(lax.optimization_barrier(jnp.max(rows, axis=1)))
  kth_bits, _ = lax.while_loop(
      lambda b: b[1] - b[0] > 1, value_step,
      (lower, jnp.minimum(upper, largest + 1)))

  above = _ge(rows, kth_bits + 1)
  ties = _ge(rows, kth_bits) - above
  ties_needed = k - _row_sum(above)

  # Ties go to the lowest indices: find the last slot p whose tie is needed.
  # Usually every tie is needed and the search ends at once.
  slot_rows = lax.broadcasted_iota(jnp.int32, rows.shape, 0) * _ROW + (
      lax.broadcasted_iota(jnp.int32, rows.shape, 1))

  def slot_step(bounds):
    lo, hi = bounds  # ties in slots <= lo < needed <= ties in slots <= hi
    mid = lo + (hi - lo) // 2
    enough = _row_sum(ties * _ge(mid, slot_rows)) >= ties_needed
    return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

  all_ties_needed = _row_sum(ties) == ties_needed
  start = jnp.where(all_ties_needed, capacity - 2, -1)
  last = jnp.full_like(start, capacity - 1)
  _, last_tie_slot = lax.while_loop(
      lambda b: b[1] - b[0] > 1, slot_step, (start, last))

  selected = above | (ties & _ge(last_tie_slot, slot_rows))
  chosen = unpack_words(
      _pack(selected.reshape(capacity // _WORD_BITS, _WORD_BITS)), k)
  return positions[_materialize(chosen)]
