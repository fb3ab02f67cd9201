"""``python -m tunesmith ...`` runs the command-line interface (same as the ``tunesmith`` script)."""

import sys

from tunesmith.cli import main

sys.exit(main())
