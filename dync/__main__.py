"""`python -m dync`: the command line, for environments without the `dync` script on PATH."""

from dync.cli import main

main()
