"""Gradient accumulation that communicates once per optimizer step.

`optax.MultiSteps` calls its inner transformation on every micro-batch and
throws the result away until the k-th one, so wrapping `sparsify` in it runs
the compression and its collectives k times per optimizer step: k times the
traffic that accumulation is meant to save. `multi_steps` instead adds each
micro-gradient to a per-worker accumulator (no collective) and runs the
inner chain, `sparsify` and its collectives included, only on the k-th call,
inside `jax.lax.cond`; the other calls return zero updates.

Under `jax.shard_map` the branch is a real one (the micro-step counter is
identical on every worker), so the collectives run once per optimizer step.
Under `jax.vmap` with a batched state, JAX turns `lax.cond` into a select
that evaluates both branches: the results are the same, only the simulated
communication is computed every call.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsparse_jax._src import validation


class MultiStepsState(NamedTuple):
  """State of `multi_steps`.

  Attributes:
    mini_step: int32 scalar, micro-steps since the last optimizer step
      (identical on every worker).
    micro_grads: this worker's sum of those micro-gradients (float32 or
      wider), each leaf with a leading worker axis of size 1, like the
      per-worker fields of `SparsifyState`.
    inner_state: the state of the wrapped transformation.
  """

  mini_step: jax.Array
  micro_grads: Any
  inner_state: Any

  # Read by `gsparse_jax.state_partition_specs`: sharded over the workers.
  per_worker_fields = ("micro_grads",)


def _accumulator_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def multi_steps(tx: optax.GradientTransformation, every_k_steps: int
                ) -> optax.GradientTransformation:
  """Runs ``tx`` on the mean of every ``every_k_steps`` micro-gradients.

  Each call adds this worker's gradient to its accumulator. The k-th call
  passes the mean of the k gradients to ``tx`` (for example
  ``optax.chain(gs.sparsify(...), optax.adam(...))``), so compression and
  communication happen once per optimizer step; the other calls return
  zeros and leave ``tx``'s state untouched.

  Args:
    tx: the transformation to run once per optimizer step.
    every_k_steps: micro-batches per optimizer step, an integer >= 1.

  Returns:
    An `optax.GradientTransformation` whose state is a `MultiStepsState`.
    Under `jax.shard_map`, its ``micro_grads`` are sharded over the
    workers' axis like `sparsify`'s memory
    (`gsparse_jax.state_partition_specs` does it).

  Example:
    >>> import jax.numpy as jnp, gsparse_jax as gs
    >>> tx = gs.multi_steps(gs.sparsify(gs.top_k(k=1)), every_k_steps=2)
    >>> state = tx.init(jnp.zeros(3))
    >>> u, state = tx.update(jnp.array([1.0, -4.0, 2.0]), state)
    >>> u.tolist()
    [0.0, 0.0, 0.0]
    >>> u, state = tx.update(jnp.array([3.0, 0.0, 0.0]), state)
    >>> u.tolist()  # top-1 of the mean [2, -2, 1]: ties go to the lower index
    [2.0, 0.0, 0.0]
  """
  k = validation.positive_int(every_k_steps, "every_k_steps")

  def init_fn(params):
    return MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        micro_grads=jax.tree.map(
            lambda p: jnp.zeros((1,) + jnp.shape(p),
                                _accumulator_dtype(jnp.result_type(p))),
            params),
        inner_state=tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    total = jax.tree.map(lambda acc, g: acc + g[None].astype(acc.dtype),
                         state.micro_grads, updates)
    mini_step = state.mini_step + 1

    def step(total, inner_state):
      mean = jax.tree.map(lambda t, g: (t[0] / k).astype(g.dtype), total,
                          updates)
      new_updates, inner_state = tx.update(mean, inner_state, params,
                                           **extra_args)
      new_updates = jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates,
                                 updates)
      return (new_updates, jax.tree.map(jnp.zeros_like, total), inner_state,
              jnp.zeros([], jnp.int32))

    def accumulate(total, inner_state):
      # Fresh zeros, typed identical on every worker like the updates of a
      # communicating chain (`zeros_like` would inherit the local gradient's
      # per-worker type under `shard_map`).
      zeros = jax.tree.map(lambda g: jnp.zeros(g.shape, g.dtype), updates)
      return zeros, total, inner_state, mini_step

    # A real branch: the micro-steps skip the inner chain and its
    # collectives entirely (a `jnp.where` would run them every call).
    new_updates, total, inner_state, mini_step = jax.lax.cond(
        mini_step >= k, step, accumulate, total, state.inner_state)
    return new_updates, MultiStepsState(mini_step, total, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
