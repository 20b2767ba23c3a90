"""``python -m tl_residual`` runs the command line (``--version`` prints the version)."""

from tl_residual.cli import main

main()
