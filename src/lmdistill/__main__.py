"""``python -m lmdistill`` runs the command line."""

import sys

from lmdistill.cli import main

sys.exit(main())
