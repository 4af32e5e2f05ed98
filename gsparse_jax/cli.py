"""The `gsparse` command (also `python -m gsparse_jax`).

Each subcommand is a module of `gsparse_jax._src.cli` with ``NAME``, ``HELP``,
``configure(parser)``, ``requires(args)`` (the modules beyond the core
dependencies it imports for these options) and ``run(args) -> int``;
`COMMANDS` lists them. Bad options print one line naming the option and what
it allows, and exit 2 (no traceback, nothing written); so does a missing
module of the ``cli`` extra, naming the extra to install.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from gsparse_jax._src.cli import advise
from gsparse_jax._src.cli import bench
from gsparse_jax._src.cli import common
from gsparse_jax._src.cli import compare
from gsparse_jax._src.cli import info

COMMANDS: tuple = (compare, info, bench, advise)


def build_parser() -> common.OneLineParser:
  parser = common.OneLineParser(
      prog="gsparse",
      description="Gradient sparsification for JAX: compare compressors, "
                  "inspect the installation, benchmark, advise.")
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=common.OneLineParser)
  for command in COMMANDS:
    command.configure(sub.add_parser(command.NAME, help=command.HELP,
                                     description=command.HELP))
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``gsparse ARGV``; returns the exit code."""
  parser = build_parser()
  args = parser.parse_args(argv)
  command = next(c for c in COMMANDS if c.NAME == args.command)
  try:
    common.require(command.requires(args))
    return int(command.run(args) or 0)
  except common.OptionError as error:
    print(f"gsparse {args.command}: error: {error}", file=sys.stderr)
    return 2
  except common.MissingModule as error:
    print(error.message(args.command), file=sys.stderr)
    return 2
  except ModuleNotFoundError as error:
    # A module of the extra that `requires` did not list, or that is found
    # but cannot be imported: still one line. Any other module is a bug.
    top = (error.name or "").partition(".")[0]
    if top not in common.EXTRA_MODULES:
      raise
    print(common.MissingModule(top).message(args.command), file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
