"""``python -m dede_rt`` runs the CLI."""

from dede_rt.cli import main

main()
