"""`python -m gsparse_jax` is the `gsparse` command."""

import sys

from gsparse_jax import cli

if __name__ == "__main__":  # not when pytest's doctest collection imports it
  sys.exit(cli.main())
