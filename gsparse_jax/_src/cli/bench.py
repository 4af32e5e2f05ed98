"""`gsparse bench`: the benchmark suite (quick mode by default).

Runs every benchmark of ``benchmarks/`` (`benchmarks.report.run_all`) into
--out, each writing JSON and a PNG, and writes their tables to
``OUT/report.md``. The benchmarks live in the source checkout, next to the
package, not in an installed wheel.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

from gsparse_jax._src.cli import common

NAME = "bench"
HELP = ("run the benchmark suite in quick mode (--full: the sizes of "
        "benchmarks/README.md, about 15 minutes on 2 cores)")

# The suite runs 8-device shard_map steps.
DEVICES = 8


def configure(parser) -> None:
  parser.add_argument("--out", default=os.path.join("results", "bench"),
                      help="directory for the JSON, PNG and report.md "
                           "(default: %(default)s)")
  parser.add_argument("--full", action="store_true",
                      help="full sizes instead of the quick smoke sizes")


def requires(args) -> tuple[str, ...]:
  del args
  return ("matplotlib",)  # every benchmark writes a PNG


def checkout_root() -> pathlib.Path:
  """The directory holding ``gsparse_jax/`` and ``benchmarks/``."""
  return pathlib.Path(__file__).resolve().parents[3]


def run(args) -> int:
  root = checkout_root()
  if not (root / "benchmarks" / "report.py").is_file():
    raise common.OptionError(
        f"the benchmark suite is not next to the package ({root}/benchmarks "
        "is missing); run gsparse bench from a clone of the repository")
  common.check_writable_dir(args.out, "--out")
  common.request_cpu_devices(DEVICES)
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  report = importlib.import_module("benchmarks.report")
  os.makedirs(args.out, exist_ok=True)
  report.run_all(args.out, quick=not args.full)
  path = os.path.join(args.out, "report.md")
  text = report.render(args.out)
  with open(path, "w") as f:
    f.write(text + "\n")
  print(text)
  print(f"wrote {path} and the benchmarks' JSON and PNG files")
  return 0
