"""What every `gsparse` subcommand shares: one-line option errors, types."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Callable, NoReturn, Sequence

# The modules the subcommands import beyond the core dependencies, by import
# name, with the distribution that provides each; all come with `CLI_EXTRA`.
EXTRA_MODULES = {
    "flax": "flax",
    "matplotlib": "matplotlib",
    "orbax": "orbax-checkpoint",
    "rich": "rich",
    "sklearn": "scikit-learn",
}
CLI_EXTRA = "gsparse_jax[cli]"


class OptionError(ValueError):
  """A bad option found after parsing (e.g. an unwritable ``--out``).

  Raise it with a message that names the option and what it allows; `main`
  prints it as one line and exits 2.
  """


class MissingModule(Exception):
  """A module of `CLI_EXTRA` that a subcommand needs is not installed."""

  def __init__(self, module: str):
    self.module = module.partition(".")[0]
    super().__init__(self.module)

  def message(self, command: str) -> str:
    """One line naming what to install, e.g. ``gsparse: compare needs
    scikit-learn; install gsparse_jax[cli]``."""
    package = EXTRA_MODULES.get(self.module, self.module)
    return (f"gsparse: {command} needs {package}; install {CLI_EXTRA} "
            f"(pip install '{CLI_EXTRA}')")


def installed(module: str) -> bool:
  """Whether ``module`` (e.g. ``"orbax.checkpoint"``) can be imported;
  imports at most its parent packages."""
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):  # a missing parent; a spec-less module
    return False


def require(modules: Sequence[str]) -> None:
  """Raises `MissingModule` for the first of ``modules`` not installed."""
  for module in modules:
    if not installed(module):
      raise MissingModule(module)


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


def check_writable_dir(path: str, option: str) -> None:
  """Raises `OptionError` unless ``path`` is, or could be made, a directory
  this process can write; creates nothing."""
  full = os.path.abspath(path)
  if os.path.exists(full):
    if not os.path.isdir(full):
      raise OptionError(f"{option}: {path} exists and is not a directory")
    if not os.access(full, os.W_OK | os.X_OK):
      raise OptionError(f"{option}: directory {path} is not writable")
    return
  parent = os.path.dirname(full)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise OptionError(f"{option}: cannot create {path} ({parent} is not a "
                      "writable directory)")


def console():
  """A rich console on stdout; 160 columns wide when it is not a terminal
  (rich's default of 80 would fold the tables in logs and pipes)."""
  from rich.console import Console  # pylint: disable=g-import-not-at-top

  terminal = Console()
  return terminal if terminal.is_terminal else Console(width=160)


def request_cpu_devices(count: int) -> None:
  """Asks XLA:CPU for ``count`` devices (the workers of a CPU-only machine).

  Does nothing when the number is configured already (``JAX_NUM_CPU_DEVICES``)
  or JAX has started; the devices JAX has are then used.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_num_cpu_devices < 1:  # not configured
    try:
      jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # a backend is up already
      pass


def add_ratio_option(parser: argparse.ArgumentParser) -> None:
  """``--ratio``: the fraction of values each worker sends, in (0, 1]."""
  parser.add_argument("--ratio", type=bounded(float, 0, 1, low_open=True),
                      default=0.01, help="fraction of values each worker "
                      "sends, in (0, 1] (default: %(default)s)")
