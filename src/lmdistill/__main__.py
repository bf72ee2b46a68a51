"""``python -m lmdistill`` runs the command line."""

from lmdistill.cli import run

run()
