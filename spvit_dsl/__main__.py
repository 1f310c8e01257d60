"""``python -m spvit_dsl`` (also what ``torchrun -m spvit_dsl search ...`` runs)."""

from .cli.app import main

main()
