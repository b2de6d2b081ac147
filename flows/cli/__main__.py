"""`python -m flows.cli`: the same as the `ganflow` command."""

import sys

from flows.cli import main

sys.exit(main())
