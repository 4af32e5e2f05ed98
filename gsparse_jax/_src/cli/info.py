"""`gsparse info`: versions, devices and every compressor with its options."""

from __future__ import annotations

import importlib.metadata
import inspect
import platform

from gsparse_jax._src.cli import common

NAME = "info"
HELP = ("print the versions of jax, jaxlib, optax and flax, the devices, and "
        "every compressor with its parameters and defaults")

PACKAGES = ("gsparse_jax", "jax", "jaxlib", "optax", "flax",
            "orbax-checkpoint", "numpy")


def configure(parser) -> None:
  del parser  # no options


def version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def parameters(factory) -> str:
  """``name=default`` (or ``name``) for each parameter of ``factory``."""
  shown = []
  for parameter in inspect.signature(factory).parameters.values():
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
      continue
    shown.append(parameter.name if parameter.default is parameter.empty
                 else f"{parameter.name}={parameter.default!r}")
  return ", ".join(shown)


def run(args) -> int:
  del args
  import jax  # pylint: disable=g-import-not-at-top
  from rich.table import Table  # pylint: disable=g-import-not-at-top

  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top

  console = common.console()
  console.print(f"Python {platform.python_version()} on {platform.platform()}")
  for package in PACKAGES:
    console.print(f"{package:<18}{version(package)}")
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  console.print(f"devices: {len(devices)} x {', '.join(kinds)} "
                f"(backend {jax.default_backend()})")
  table = Table(title="compressors (gsparse compare --compressors NAME)")
  for header in ("name", "factory", "parameters (defaults)", "what"):
    table.add_column(header)
  for entry in gs.COMPRESSORS.values():
    table.add_row(entry.name, f"gs.{entry.factory.__name__}",
                  parameters(entry.factory), entry.summary)
  console.print(table)
  return 0
