"""`python -m bytelm.cli SUBCOMMAND ...`, the same as `bytelm SUBCOMMAND ...`."""
import sys

from bytelm.cli import main

sys.exit(main())
