"""`gsparse info`: versions, devices and every compressor with its options.

Needs only the core dependencies (plain text, no rich), so it runs on a bare
``pip install gsparse_jax`` and shows which optional packages are there.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import platform

NAME = "info"
HELP = ("print the versions of jax, jaxlib, optax and flax, the devices, and "
        "every compressor with its parameters and defaults")

PACKAGES = ("gsparse_jax", "jax", "jaxlib", "optax", "chex", "numpy",
            # optional: the `cli` extra
            "flax", "orbax-checkpoint", "scikit-learn", "matplotlib", "rich")


def configure(parser) -> None:
  del parser  # no options


def requires(args) -> tuple[str, ...]:
  del args
  return ()  # the core dependencies only


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


def table(headers: tuple, rows: list) -> str:
  """``rows`` as left-aligned columns under ``headers`` and a rule."""
  widths = [max(len(str(cell)) for cell in column)
            for column in zip(headers, *rows)]
  lines = [headers, tuple("-" * width for width in widths), *rows]
  return "\n".join("  ".join(f"{cell!s:<{width}}" for cell, width
                             in zip(line, widths)).rstrip()
                   for line in lines)


def run(args) -> int:
  del args
  import jax  # pylint: disable=g-import-not-at-top

  import gsparse_jax as gs  # pylint: disable=g-import-not-at-top

  print(f"Python {platform.python_version()} on {platform.platform()}")
  for package in PACKAGES:
    print(f"{package:<18}{version(package)}")
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  print(f"devices: {len(devices)} x {', '.join(kinds)} "
        f"(backend {jax.default_backend()})")
  print()
  print("compressors (gsparse compare --compressors NAME)")
  print(table(("name", "factory", "parameters (defaults)", "what"),
              [(entry.name, f"gs.{entry.factory.__name__}",
                parameters(entry.factory), entry.summary)
               for entry in gs.COMPRESSORS.values()]))
  return 0
