"""RegTop-k: Top-k on a score that shrinks entries the other workers cancel.

Bereyhi, Liang, Boudreau, Afana, "Regularized Top-k: a Bayesian framework for
gradient sparsification", 2025 (arXiv 2501.05633; reference code
AlBerey/RegTopK). See docs/algorithms.md.

Each worker remembers what it sent last step, ``s``, and the aggregate sum
``S`` every worker received (the sum over workers that `sparsify` already
computes for the mean, so no extra communication). With ``a`` the accumulated
gradient (error memory + gradient):

  r_j     = S_j / s_j    if this worker sent entry j last step, else 1e8
  score_j = |a_j| * |tanh(r_j / mu)|

and the ``k`` largest scores are sent, with their UNWEIGHTED values ``a_j``.
An entry whose last contribution was cancelled by the others (``r`` near 0 or
negative) gets a small score, so its budget goes to entries that move the
model; everything else ranks as in Top-k (``tanh(1e8 / mu) = 1``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gsparse_jax._src import compressors
from gsparse_jax._src import payload as payload_lib
from gsparse_jax._src import selection
from gsparse_jax._src import validation
from gsparse_jax._src import wire

# The ratio of entries this worker did not send last step (the paper's
# "1 + Delta = infinity"); 1e8 as in the reference code, so tanh(1e8/mu) == 1
# for any sensible mu.
UNSENT_RATIO = 1e8


class RegTopKState(NamedTuple):
  """What one worker remembers between steps, for one flat vector.

  The score needs ``S`` only where this worker sent, so only those ``k``
  entries of it are kept: the state is ``O(k)``, not ``O(d)``.

  Attributes:
    sent_indices: ``[k]`` int32, the entries this worker sent last step
      (padding, and every slot at step 0, hold ``size``: nothing sent).
    sent_values: ``[k]`` float32, the values ``s`` it sent there.
    aggregate_sum: ``[k]`` float32, the sum ``S`` over all workers of what
      they sent last step, at those entries.
  """

  sent_indices: jax.Array
  sent_values: jax.Array
  aggregate_sum: jax.Array


def posterior_ratio(state: RegTopKState) -> jax.Array:
  """``[k]`` ratios ``r = S / s`` at the entries sent last step.

  Entries not sent (padding slots, step 0) are ``1e8``. A sent value of
  exactly 0 carried nothing, so its entry counts as unsent too (this also
  avoids ``0 / 0``).
  """
  sent_nonzero = state.sent_values != 0
  safe_sent = jnp.where(sent_nonzero, state.sent_values, 1.0)
  return jnp.where(sent_nonzero, state.aggregate_sum / safe_sent,
                   UNSENT_RATIO)


@dataclasses.dataclass(frozen=True)
class RegTopK(compressors.Compressor):
  """RegTop-k (see `reg_top_k`)."""

  ratio: float = 0.01
  mu: float = 4.0
  method: str = "auto"

  def budget(self, size):
    return wire.budget(self.ratio, size)

  def init(self, size):
    k = self.budget(size)
    return RegTopKState(
        sent_indices=jnp.full((k,), size, jnp.int32),
        sent_values=jnp.zeros((k,), jnp.float32),
        aggregate_sum=jnp.zeros((k,), jnp.float32))

  def scores(self, x: jax.Array, state: RegTopKState) -> jax.Array:
    """``|a| * |tanh(r / mu)|``, the magnitudes RegTop-k ranks."""
    magnitude = jnp.abs(x.astype(jnp.float32))
    # Every unsent entry has the same ratio, hence the same weight (exactly 1
    # unless mu is enormous): one pass over d, then k entries rescored.
    unsent_weight = abs(math.tanh(UNSENT_RATIO / self.mu))
    scores = magnitude if unsent_weight == 1.0 else magnitude * unsent_weight
    ratio = posterior_ratio(state)
    # r = 0 (exact cancellation) weighs 0 even if mu underflows float32.
    sent_weight = jnp.where(ratio == 0, 0.0,
                            jnp.abs(jnp.tanh(ratio / self.mu)))
    at_sent = jnp.take(magnitude, state.sent_indices, mode="fill",
                       fill_value=0.0) * sent_weight
    return scores.at[state.sent_indices].set(at_sent, mode="drop")

  def select(self, x, state, context):
    k = self.budget(x.shape[0])
    indices = selection.top_k_abs(self.scores(x, state), k,
                                  method=self.method)
    # The score only chooses; the unweighted accumulated values are sent.
    return payload_lib.sparse_payload(x, indices, k, context.value_dtype)

  def update(self, state, sent, received):
    del state
    # S, the sum every worker already received, at the entries sent.
    mean_at_sent = jnp.take(received.mean, sent.indices, mode="fill",
                            fill_value=0.0)
    return RegTopKState(
        sent_indices=sent.indices.astype(jnp.int32),
        sent_values=sent.values.astype(jnp.float32),
        aggregate_sum=(mean_at_sent * received.num_workers).astype(
            jnp.float32))


def reg_top_k(ratio: float, *, mu: float = 4.0,
              method: str = "auto") -> RegTopK:
  """Regularized Top-k: Top-k that avoids entries the workers cancel.

  Each worker scores its accumulated gradient ``a`` by
  ``|a_j| * |tanh(r_j / mu)|``, with ``r_j = S_j / s_j`` the ratio of last
  step's aggregate sum to what this worker sent there (``1e8`` where it sent
  nothing, and at step 0), sends the ``k`` best-scored entries unweighted,
  and keeps the rest in error memory. ``S`` is the aggregate every worker
  already received, so RegTop-k costs no extra communication; its state
  holds the last sent (index, value) pairs and ``S`` there (``3k`` numbers
  per worker and vector).

  Args:
    ratio: fraction of entries kept, in (0, 1]; ``k = max(1, round(ratio*d))``.
    mu: regularization scale, a positive finite number. Entries whose ratio
      ``r`` is small compared with ``mu`` are demoted; ``mu -> 0`` recovers
      Top-k (except entries cancelled exactly, ``r = 0``). The paper uses 4
      for linear regression and 5 for ResNet-18 on CIFAR-10.
    method: how the ``k`` best scores are found, as in `top_k`
      (``"auto"``, ``"sort"`` or ``"threshold"``).

  Returns:
    A `Compressor` with per-worker state (`RegTopKState`); use it with
    `sparsify`, which feeds it the aggregate after each step.

  Example:
    >>> import jax.numpy as jnp, optax, gsparse_jax as gs
    >>> tx = gs.sparsify(gs.reg_top_k(0.5, mu=1.0))
    >>> state = tx.init(jnp.zeros(2))
    >>> out, state = tx.update(jnp.array([3.0, 1.0]), state)
    >>> out.tolist()  # step 0: plain Top-k
    [3.0, 0.0]

  Reference: Bereyhi, Liang, Boudreau, Afana, "Regularized Top-k: a
  Bayesian framework for gradient sparsification", 2025 (arXiv 2501.05633).
  """
  ratio = validation.ratio(ratio)
  mu = validation.finite_positive(mu, "mu")
  validation.choice(method, "method", selection.METHODS)
  return RegTopK(ratio=ratio, mu=mu, method=method)
