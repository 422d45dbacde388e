"""`python -m bytelm.cli SUBCOMMAND ...`, the same as `bytelm SUBCOMMAND ...`."""
import sys

from . import main

sys.exit(main())
