"""Stage 1 — the language: grammar, AST, parser, emitter, located errors (pure Python)."""
