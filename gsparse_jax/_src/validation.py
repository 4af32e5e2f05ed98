"""Argument checks shared by every factory: one message format everywhere.

Each check returns the value normalized (a Python float or int) or raises
`ValueError` naming the argument and what it allows.

Example:
  >>> from gsparse_jax._src import validation
  >>> validation.ratio(0.5)
  0.5
  >>> validation.positive_int(0, "rank")
  Traceback (most recent call last):
  ...
  ValueError: `rank` must be an integer >= 1, got 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np


def _is_real(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def ratio(value: Any, name: str = "ratio") -> float:
  """A kept fraction: a real number in (0, 1]."""
  if not _is_real(value) or not 0.0 < float(value) <= 1.0:
    raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}.")
  return float(value)


def ratio_or_k(fraction: Any, k: Any, factory: str
               ) -> tuple[Optional[float], Optional[int]]:
  """Exactly one of a kept fraction (the argument `ratio`) or a count ``k``
  (the other None), normalized; ``factory`` names the caller."""
  if (fraction is None) == (k is None):
    raise ValueError(f"{factory} needs exactly one of `ratio` (in (0, 1]) or "
                     f"`k` (an integer >= 1); got ratio={fraction!r}, "
                     f"k={k!r}.")
  if fraction is not None:
    return ratio(fraction), None
  return None, positive_int(k, "k")


def positive_int(value: Any, name: str, minimum: int = 1) -> int:
  """An integer >= ``minimum``."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise ValueError(f"`{name}` must be an integer >= {minimum}, got "
                     f"{value!r}.")
  return int(value)


def int_in_range(value: Any, name: str, low: int, high: int) -> int:
  """An integer in [low, high]."""
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or not low <= value <= high):
    raise ValueError(f"`{name}` must be an integer in [{low}, {high}], got "
                     f"{value!r}.")
  return int(value)


def optional_positive_int(value: Any, name: str) -> Optional[int]:
  """None, or an integer >= 1."""
  return None if value is None else positive_int(value, name)


def integer(value: Any, name: str) -> int:
  """Any integer (e.g. a seed)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"`{name}` must be an integer, got {value!r}.")
  return int(value)


def count(value: Any, name: str, minimum: int = 1) -> int:
  """A whole number >= ``minimum``, as an int or an integral float (``8.0``;
  e.g. a worker count computed in floats)."""
  if (not _is_real(value) or not math.isfinite(value)
      or int(value) != value or value < minimum):
    raise ValueError(f"`{name}` must be an integer >= {minimum}, got "
                     f"{value!r}.")
  return int(value)


def positive(value: Any, name: str) -> float:
  """A real number > 0, infinity included (e.g. an unlimited bandwidth)."""
  if not _is_real(value) or not float(value) > 0.0:
    raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")
  return float(value)


def at_least(value: Any, name: str, minimum: float) -> float:
  """A finite real number >= ``minimum`` (e.g. a size given as ``1e9``)."""
  if not _is_real(value) or not minimum <= float(value) < math.inf:
    raise ValueError(f"`{name}` must be a finite number >= {minimum}, got "
                     f"{value!r}.")
  return float(value)


def finite_positive(value: Any, name: str) -> float:
  """A finite real number > 0."""
  if not _is_real(value) or not 0.0 < float(value) < math.inf:
    raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
  return float(value)


def finite_nonnegative(value: Any, name: str) -> float:
  """A finite real number >= 0."""
  if not _is_real(value) or not 0.0 <= float(value) < math.inf:
    raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
  return float(value)


def in_interval(value: Any, name: str, low: float, high: float, *,
                low_closed: bool = True, high_closed: bool = False) -> float:
  """A real number in the interval [low, high) (ends as given)."""
  ok = _is_real(value)
  if ok:
    v = float(value)
    ok = ((v >= low if low_closed else v > low)
          and (v <= high if high_closed else v < high))
  if not ok:
    interval = (f"{'[' if low_closed else '('}{low}, {high}"
                f"{']' if high_closed else ')'}")
    raise ValueError(f"`{name}` must be a number in {interval}, got "
                     f"{value!r}.")
  return float(value)


def choice(value: Any, name: str, allowed: tuple) -> Any:
  """One of ``allowed``."""
  try:
    ok = value in allowed
  except TypeError:  # unhashable or uncomparable
    ok = False
  if not ok:
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, allowed))}; "
        f"got {value!r}.")
  return value


def boolean(value: Any, name: str) -> bool:
  """True or False (a NumPy bool too)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"`{name}` must be True or False, got {value!r}.")
  return bool(value)


def dtype(value: Any, name: str, allowed: tuple[str, ...]) -> Any:
  """A dtype (a name, a NumPy/JAX dtype or scalar type) among ``allowed``.

  Returns:
    The `numpy.dtype` (hashable, so compressors can hold it).
  """
  try:
    normalized = jnp.dtype(value)
  except TypeError:
    normalized = None
  if normalized is None or normalized.name not in allowed:
    raise ValueError(f"`{name}` must be one of {', '.join(allowed)}; got "
                     f"{value!r}.")
  return normalized
