"""Stage 3 — compile: check, search graph, program, strategy declarations, freeze, diff (pure Python)."""
