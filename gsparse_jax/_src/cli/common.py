"""What every `gsparse` subcommand shares: one-line option errors, types."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class OptionError(ValueError):
  """A bad option found after parsing (e.g. an unwritable ``--out``).

  Raise it with a message that names the option and what it allows; `main`
  prints it as one line and exits 2.
  """


class OneLineParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors are one line and exit code 2."""

  def error(self, message: str) -> NoReturn:
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def bounded(kind: Callable, low=None, high=None, *, low_open=False,
            description: str = "") -> Callable[[str], object]:
  """An argparse ``type`` that parses ``kind`` and checks ``low``/``high``.

  Args:
    kind: `int` or `float`.
    low, high: inclusive bounds (None: unbounded); ``low_open`` excludes low.
    description: what is allowed, for the message (default from the bounds).
  """
  left = "(" if low_open else "["
  allowed = description or (
      f"a number in {left}{low}, {high}]" if high is not None
      else f"{'an integer' if kind is int else 'a number'} "
           f"{'>' if low_open else '>='} {low}")

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"must be {allowed}, got {text!r}") from None
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high or value != value:  # NaN fails every bound
      raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value

  return parse
