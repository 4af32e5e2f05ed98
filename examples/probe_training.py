"""Training with error feedback written out, to measure what the state hides.

`gs.sparsify` keeps each worker's accumulated gradient ``a_i = e_i + g_i``
and error ``e_i`` inside the optimizer state. The studies of the
reproduction report need them every step (how many entries a threshold
rule passes, the total error ``sum_t ||a_t - sent_t||^2``, the recall of an
approximate selection against exact Top-k), so this module runs the same
algorithm (Stich et al. 2018's error feedback, SPEC's EF14) with the
compressor applied through `common.sent_by`, the memory explicit, and SGD on
the workers' mean:

    a_i = e_i + g_i;  s_i = C(a_i);  e_i <- a_i - s_i;  x <- x - lr mean_i s_i

Two problems: the digits MLP of `common` (8 workers, minibatches) and the
heterogeneous linear regression of `regtopk_linear_regression` (20 workers,
full batches). A problem is ``(x0, data, grads, evaluate)`` with flat
parameters, so one jitted `lax.scan` serves both and every seed reuses its
compilation.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import common
import gsparse_jax as gs
import regtopk_linear_regression


class Problem(NamedTuple):
  """A data-parallel problem on flat parameters.

  Attributes:
    x0: initial flat parameters ``[d]``.
    data: a pytree of arrays (an argument of the jitted run, not a constant).
    grads: ``(x, data, key) -> [workers, d]`` each worker's gradient.
    evaluate: ``(x, data) -> scalar`` (test accuracy, log-distance, ...).
    workers: number of workers.
  """
  x0: jax.Array
  data: object
  grads: Callable
  evaluate: Callable
  workers: int


@functools.lru_cache(maxsize=None)
def _digits_functions(workers: int, batch_per_worker: int):
  """The digits ``(grads, evaluate, unravel)``, shared by every seed."""
  model = common.MLP()
  _, unravel = ravel_pytree(model.init(jax.random.key(0), jnp.ones((1, 64))))

  def worker_grad(x, data, key):
    x_train, y_train = data[0], data[1]
    rows = jax.random.randint(key, (batch_per_worker,), 0, x_train.shape[0])
    grad = jax.grad(common.classifier_loss)(unravel(x), model, x_train[rows],
                                            y_train[rows])
    return ravel_pytree(grad)[0]

  def grads(x, data, key):
    return jax.vmap(worker_grad, (None, None, 0))(
        x, data, jax.random.split(key, workers))

  def evaluate(x, data):
    logits = model.apply(unravel(x), data[2])
    return jnp.mean(jnp.argmax(logits, -1) == data[3])

  return grads, evaluate


def digits_problem(seed: int, *, workers: int = 8,
                   batch_per_worker: int = 16) -> Problem:
  """The digits MLP: each worker draws its own minibatch every step."""
  (x_train, y_train), (x_test, y_test) = common.digits_split(seed)
  params = common.MLP().init(jax.random.key(seed), jnp.ones((1, 64)))
  grads, evaluate = _digits_functions(workers, batch_per_worker)
  data = tuple(jnp.asarray(v) for v in (x_train, y_train, x_test, y_test))
  return Problem(ravel_pytree(params)[0], data, grads, evaluate, workers)


def _regression_grads(x, data, key):
  del key
  return jax.vmap(regtopk_linear_regression.mse_grad, (None, 0, 0))(
      x, data[0], data[1])


def _log_distance(x, data):
  return jnp.log10(jnp.sum((x - data[2]) ** 2))


def regression_problem(seed: int, *, workers: int = 20, dim: int = 100,
                       samples: int = 500) -> Problem:
  """The RegTop-k paper's linear regression; evaluates log10 ||x - x*||^2."""
  a, y, x_star, x0 = regtopk_linear_regression.make_data(workers, dim,
                                                         samples, seed)
  data = (jnp.asarray(a), jnp.asarray(y), jnp.asarray(x_star, jnp.float32))
  return Problem(jnp.asarray(x0), data, _regression_grads, _log_distance,
                 workers)


@functools.lru_cache(maxsize=None)
def _trajectory(compressor, grads, evaluate, workers: int, steps: int,
                lr: float, rule: Optional[Callable], probe_k: Optional[int]):
  send = common.sent_by(compressor)
  exact = common.sent_by(gs.top_k(k=probe_k)) if probe_k else None

  def step(carry, key):
    x, memory, data = carry
    accumulated = memory + grads(x, data, key)  # [workers, d]
    sent = jax.vmap(send)(accumulated)
    memory = accumulated - sent
    x = x - lr * jnp.mean(sent, axis=0)
    out = {
        "eval": evaluate(x, data),
        "sent": jnp.sum(sent != 0, axis=1),
        "passed": (jax.vmap(rule)(accumulated) if rule is not None
                   else jnp.sum(sent != 0, axis=1)),
        "error": jnp.sum(memory ** 2, axis=1),
    }
    if exact is not None:  # worker 0's recall of the exact Top-k set
      chosen, best = sent[0] != 0, exact(accumulated[0]) != 0
      out["recall"] = (jnp.sum(chosen & best)
                       / jnp.maximum(jnp.sum(best), 1))
    return (x, memory, data), out

  @jax.jit
  def run(x0, data, key):
    memory = jnp.zeros((workers, x0.shape[0]), x0.dtype)
    (x, _, data), out = jax.lax.scan(step, (x0, memory, data),
                                     jax.random.split(key, steps))
    return out

  return run


def ef_trajectory(problem: Problem, compressor, *, steps: int, lr: float,
                  seed: int = 0, rule: Optional[Callable] = None,
                  probe_k: Optional[int] = None) -> dict:
  """Trains ``problem`` with error feedback around ``compressor``.

  Args:
    problem: from `digits_problem` or `regression_problem`.
    compressor: any compressor (applied per worker, no shared state).
    steps: SGD steps.
    lr: learning rate.
    seed: the key of the minibatch draws.
    rule: optional ``a -> number of entries the compressor's rule passes``
      (before its capacity), e.g. ``sum(|a| >= lambda)``; default: the
      number sent.
    probe_k: if set, also the recall of worker 0's selection against the
      exact Top-``probe_k`` of its accumulated vector, every step.

  Returns:
    NumPy arrays: ``eval [steps]`` (after each step), ``sent`` and
    ``passed [steps, workers]`` (entry counts), ``error [steps, workers]``
    (``||a - sent||^2``), and ``recall [steps]`` with ``probe_k``.
  """
  run = _trajectory(compressor, problem.grads, problem.evaluate,
                    problem.workers, steps, lr, rule, probe_k)
  out = run(problem.x0, problem.data, jax.random.key(seed))
  return {name: np.asarray(value) for name, value in out.items()}
