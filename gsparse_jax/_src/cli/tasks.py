"""The training tasks of `gsparse compare`: data, Flax NNX model, loss.

Every task trains offline on data every machine has: scikit-learn's bundled
8x8 digits (an MLP and a small CNN) or the source files of Python's own
standard library (a small causal transformer language model on characters).
Batches are a pure function of ``(seed, step)``, so the data position of a
run is its step count and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The data split does not move with --seed: every run is scored on one test set.
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Task:
  """A supervised task.

  Attributes:
    name: the ``--task`` name.
    summary: one line for the help and the results.
    metric: ``"accuracy"`` or ``"loss"``, the figure the table and the plots
      lead with.
    make_model: ``(seed) -> nnx.Module``.
    loss: ``(model, inputs, targets) -> scalar`` mean loss of one batch.
    evaluate: ``(model) -> (loss, accuracy)`` on the held-out data.
    sample: ``(rng, shape) -> (inputs, targets)``: a batch of the training
      data with leading dimensions ``shape``.
  """

  name: str
  summary: str
  metric: str
  make_model: Callable[[int], Any]
  loss: Callable[..., jax.Array]
  evaluate: Callable[[Any], tuple[jax.Array, jax.Array]]
  sample: Callable[[np.random.Generator, tuple[int, ...]], tuple[Any, Any]]

  def batch(self, seed: int, step: int, shape: tuple[int, ...]):
    """The training batch of ``step`` (0-based), leading dims ``shape``."""
    return self.sample(np.random.default_rng([seed, step]), shape)


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _scores(logits, labels):
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return _cross_entropy(logits, labels), accuracy


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits: (1797 x 64 pixels in 0..16, 1797 labels).

  Read from the file scikit-learn ships (``sklearn/datasets/data/
  digits.csv.gz``, what ``sklearn.datasets.load_digits`` reads) without
  importing scikit-learn, which takes seconds; through `load_digits` when
  the file is not where it used to be.
  """
  import gzip  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.find_spec("sklearn")
  path = (None if spec is None or not spec.submodule_search_locations else
          os.path.join(list(spec.submodule_search_locations)[0], "datasets",
                       "data", "digits.csv.gz"))
  if path is None or not os.path.isfile(path):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    return digits.data, digits.target
  with gzip.open(path, "rt") as f:
    table = np.loadtxt(f, delimiter=",")
  return table[:, :-1], table[:, -1].astype(np.int64)


def _classifier(name, summary, make_model, image_shape) -> Task:
  """A digits classifier; ``image_shape`` is what the model takes per image."""
  pixels, targets = load_digits()
  order = np.random.default_rng(SPLIT_SEED).permutation(len(targets))
  images = (pixels[order] / 16.0).astype(np.float32).reshape(
      (-1,) + image_shape)
  labels = targets[order].astype(np.int32)
  train_size = 1400  # of 1797; the other 397 are the test set
  train_x, test_x = images[:train_size], images[train_size:]
  train_y, test_y = labels[:train_size], labels[train_size:]

  def sample(rng, shape):
    rows = rng.integers(0, train_size, shape)
    return train_x[rows], train_y[rows]

  return Task(
      name=name, summary=summary, metric="accuracy", make_model=make_model,
      loss=lambda model, x, y: _cross_entropy(model(x), y),
      evaluate=lambda model: _scores(model(test_x), test_y),
      sample=sample)


def _mlp(seed):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  rngs = nnx.Rngs(seed)
  return nnx.Sequential(
      nnx.Linear(64, 128, rngs=rngs), jax.nn.relu,
      nnx.Linear(128, 128, rngs=rngs), jax.nn.relu,
      nnx.Linear(128, 10, rngs=rngs))


def _cnn(seed):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  rngs = nnx.Rngs(seed)
  flatten = lambda x: x.reshape(x.shape[0], -1)
  return nnx.Sequential(
      nnx.Conv(1, 16, (3, 3), rngs=rngs), jax.nn.relu,
      nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs), jax.nn.relu,  # 4x4
      flatten, nnx.Linear(4 * 4 * 32, 10, rngs=rngs))


# The character corpus: a fixed list of pure-Python standard-library modules
# present in every CPython >= 3.11, read in this order.
CORPUS_FILES = ("textwrap.py", "string.py", "functools.py", "heapq.py",
                "bisect.py", "shlex.py", "fnmatch.py", "glob.py")
VOCAB = 97  # printable ASCII (95), newline, and one "other" symbol
CONTEXT = 32


def encode(text: str) -> np.ndarray:
  """Characters to ids: printable ASCII 0..94, newline 95, the rest 96."""
  codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
  ids = np.where((codes >= 32) & (codes < 127), codes - 32, VOCAB - 1)
  return np.where(codes == 10, VOCAB - 2, ids).astype(np.int32)


def stdlib_corpus() -> np.ndarray:
  """The encoded corpus, from the standard library of this interpreter."""
  root = sysconfig.get_paths()["stdlib"]
  texts = []
  for name in CORPUS_FILES:
    with open(os.path.join(root, name), encoding="utf-8") as f:
      texts.append(f.read())
  return encode("\n".join(texts))


def _char_transformer(seed, dim=64, heads=4, layers=2):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Block(nnx.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, rngs):
      self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
          heads, dim, decode=False, keep_rngs=False, rngs=rngs)
      self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
      self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
      self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
      mask = nnx.make_causal_mask(x[..., 0])
      x = x + self.attention(self.norm1(x), mask=mask)
      return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

  class CharLM(nnx.Module):
    """Token + learned position embeddings, blocks, next-character logits."""

    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
      self.position = nnx.Param(
          0.02 * jax.random.normal(rngs.params(), (CONTEXT, dim)))
      self.blocks = nnx.List([Block(rngs) for _ in range(layers)])
      self.norm = nnx.LayerNorm(dim, rngs=rngs)
      self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens) + self.position[:tokens.shape[-1]]
      for block in self.blocks:
        x = block(x)
      return self.head(self.norm(x))

  return CharLM(nnx.Rngs(seed))


def _charlm() -> Task:
  corpus = stdlib_corpus()
  split = int(0.9 * len(corpus))
  train, test = corpus[:split], corpus[split:]
  windows = lambda text, starts: text[starts[..., None]
                                      + np.arange(CONTEXT + 1)]
  # A fixed held-out set: 128 windows evenly spaced over the test text.
  held_out = windows(test, np.linspace(0, len(test) - CONTEXT - 1, 128,
                                       dtype=np.int64))

  def sample(rng, shape):
    chunk = windows(train, rng.integers(0, split - CONTEXT - 1, shape))
    return chunk[..., :-1], chunk[..., 1:]

  return Task(
      name="charlm",
      summary="causal transformer LM on characters of Python's stdlib source",
      metric="loss", make_model=_char_transformer,
      loss=lambda model, x, y: _cross_entropy(model(x), y),
      evaluate=lambda model: _scores(model(held_out[:, :-1]),
                                     held_out[:, 1:]),
      sample=sample)


TASKS = {
    "digits-mlp": lambda: _classifier(
        "digits-mlp", "MLP (64-128-128-10) on scikit-learn's 8x8 digits",
        _mlp, (64,)),
    "digits-cnn": lambda: _classifier(
        "digits-cnn", "two-conv CNN on scikit-learn's 8x8 digits", _cnn,
        (8, 8, 1)),
    "charlm": _charlm,
}


def make_task(name: str) -> Task:
  """Builds the task ``name`` (one of `TASKS`), loading its data."""
  return TASKS[name]()


def load_task(text: str) -> Task:
  """The task of ``--task``: a built-in name, ``FILE.py:NAME`` or
  ``package.module:NAME``, where NAME is a `Task` or a zero-argument
  callable returning one.

  Raises:
    ValueError: one line naming the problem (unknown task, missing file,
      module or name, or an object that is not a Task).
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  if text in TASKS:
    return make_task(text)
  where, colon, name = text.rpartition(":")
  if not colon or not where or not name:
    raise ValueError(f"unknown task {text!r}; choose from "
                     f"{', '.join(TASKS)}, or give FILE.py:NAME or "
                     "package.module:NAME")
  if where.endswith(".py"):
    if not os.path.isfile(where):
      raise ValueError(f"no file {where}")
    module_name = "gsparse_user_task_" + os.path.basename(where)[:-3]
    spec = importlib.util.spec_from_file_location(module_name, where)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look it up
    spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(where)
    except ImportError as error:
      raise ValueError(f"cannot import {where}: {error}") from None
  if not hasattr(module, name):
    raise ValueError(f"{where} has no {name!r}")
  task = getattr(module, name)
  if not isinstance(task, Task) and callable(task):
    try:
      task = task()
    except TypeError as error:  # it wants arguments
      raise ValueError(f"{where}:{name} is not a gs.Task, and calling it "
                       f"with no arguments failed: {error}") from None
  if not isinstance(task, Task):
    raise ValueError(f"{where}:{name} is not a gs.Task (nor a "
                     f"zero-argument callable returning one): got "
                     f"{type(task).__name__}")
  if task.metric not in ("accuracy", "loss"):
    raise ValueError(f"{where}:{name}: metric must be 'accuracy' or "
                     f"'loss', got {task.metric!r}")
  return task
