"""The one error-feedback reference loop: `sparsify`'s step over workers.

A compressor's reference is ``select_all(a, step, state) -> (sent,
state)``: ``a`` is every worker's vector ``[workers, d]``, ``sent`` what
each sends as a dense vector, ``state`` whatever the reference carries
between steps (None at step 0); ``receive_all(sent, state) -> (mean,
state)`` aggregates (default `mean_of`; compressors whose selection learns
from the aggregate, or whose collective rounds, use their own).
`per_worker` turns a one-worker ``select(a, step, worker) -> sent`` into a
``select_all``.

`Feedback` is one step of every feedback rule (docs/algorithms.md), and
`feedback_run` steps it through a sequence of gradients; tests whose
gradients depend on the parameters (a training loop) call `Feedback.step`
themselves.
"""

from typing import NamedTuple

import numpy as np

RULES = ("none", "ef", "ef21", "ef21m", "ef_mean")


def mean_of(sent, state):
  """The default ``receive_all``: the mean over workers."""
  return sent.mean(axis=0), state


def per_worker(select):
  """``select(a, step, worker) -> sent`` as a ``select_all``."""
  def select_all(a, step, state):
    return np.stack([select(row, step, i) for i, row in enumerate(a)]), state
  return select_all


class Feedback:
  """Every worker's feedback memory, stepped one gradient at a time.

  Rules: ``"none"``; ``"ef"`` (EF14: ``a = e + g``, send ``C(a)``, keep
  ``e = a - sent``); ``"ef21"`` (send ``c_i = C(g - h_i)``, ``h_i += c_i``,
  output ``h += mean c``); ``"ef21m"`` (EF21 on the momentum ``v = beta v +
  (1 - beta) g``); ``"ef_mean"`` (PyTorch ``powerSGD_hook``: keep ``a -
  mean``, what all received, instead of what this worker sent).

  Attributes:
    memory: ``[workers, d]``, EF's ``e`` or EF21's ``h_i`` (zeros for none).
    shared: ``[d]``, EF21's ``h``.
  """

  def __init__(self, select_all, receive_all=mean_of, rule="ef",
               momentum=0.9, dtype=np.float64):
    assert rule in RULES, rule
    self.select_all, self.receive_all = select_all, receive_all
    self.rule, self.momentum, self.dtype = rule, momentum, dtype
    self.memory = self.velocity = self.shared = None
    self.state, self.t = None, 0

  def step(self, g):
    """One step on every worker's gradient ``g`` ``[workers, d]``.

    Returns:
      (the output every worker gets ``[d]``, what each sent
      ``[workers, d]``).
    """
    g = np.asarray(g, self.dtype)
    if self.memory is None:
      self.memory = np.zeros_like(g)
      self.velocity = np.zeros_like(g)
      self.shared = np.zeros(g.shape[1], self.dtype)
    if self.rule == "ef21m":
      self.velocity = (self.momentum * self.velocity
                       + (1.0 - self.momentum) * g)
      g = self.velocity
    if self.rule == "none":
      x = g
    elif self.rule in ("ef", "ef_mean"):
      x = self.memory + g
    else:
      x = g - self.memory
    sent, self.state = self.select_all(x, self.t, self.state)
    sent = np.asarray(sent, self.dtype)  # what travels, in the arithmetic
    mean, self.state = self.receive_all(sent, self.state)
    self.t += 1
    if self.rule == "ef":
      self.memory = x - sent
    elif self.rule == "ef_mean":
      self.memory = x - mean
    elif self.rule in ("ef21", "ef21m"):
      self.memory = self.memory + sent
      self.shared = self.shared + mean
      return self.shared.copy(), sent
    return mean, sent


class Run(NamedTuple):
  """What `feedback_run` returns.

  Attributes:
    outputs: ``[steps, d]``, the output every worker gets each step.
    memory: ``[workers, d]``, the final `Feedback.memory`.
    sent: ``[steps, workers, d]``, what each worker sent.
    shared: ``[d]``, the final EF21 ``h`` (zeros for the other rules).
  """

  outputs: np.ndarray
  memory: np.ndarray
  sent: np.ndarray
  shared: np.ndarray


def feedback_run(grads, select_all, receive_all=mean_of, feedback="ef",
                 momentum=0.9, dtype=np.float64):
  """`Feedback` stepped through ``grads`` ``[steps, workers, d]``.

  Args:
    grads: ``[steps, workers, d]``.
    select_all, receive_all: the compressor's reference.
    feedback: one of `RULES`.
    momentum: EF21M's beta.
    dtype: the arithmetic of the memories and what is sent (float32
      reproduces the library's rounding bit for bit).

  Returns:
    A `Run`.
  """
  loop = Feedback(select_all, receive_all, feedback, momentum, dtype)
  outputs, sent = zip(*(loop.step(g) for g in grads))
  return Run(np.stack(outputs), loop.memory, np.stack(sent), loop.shared)
