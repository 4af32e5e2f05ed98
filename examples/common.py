"""Pieces the example scripts share: the digits data, the MLP, figures."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import numpy as np
from sklearn.datasets import load_digits


class MLP(nn.Module):
  """Two hidden ReLU layers and 10 logits (the digits classifier)."""
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(10)(x)


def digits_split(seed: int, train_size: int = 1400):
  """scikit-learn's bundled 8x8 digits, shuffled: ((x, y) train, test)."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  return (x[:train_size], y[:train_size]), (x[train_size:], y[train_size:])


@contextlib.contextmanager
def figure(path: str, **subplots_kwargs):
  """Yields (fig, axes) of `plt.subplots` and saves a PNG to ``path``."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only: no display on servers and in CI
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(**subplots_kwargs)
  try:
    yield fig, axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)
