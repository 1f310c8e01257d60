"""Compare stage: several strategies, one spec, one budget, the same dense start and fine-tuning recipe, one table.

``spvit-dsl compare SPEC --strategies spvit,upvit,ofb,dimap,magnitude,random --budget 50% --seeds 3``: every strategy
is checked against the space first (one that cannot search it gets its reason as its row; a problem every strategy
shares, such as a missing budget, is an error before any training); the dense network is trained once (or read
back); then for every strategy and seed a **cell** (:mod:`.cells`) searches (or scores) the space under the budget
from the dense weights, builds the frozen network, fine-tunes it with the shared recipe and evaluates it; finally
every finished network is timed side by side with the dense one, and the rows (:mod:`.report`) are written as
``compare.json`` (with units), ``compare.md`` and ``compare.png`` (:mod:`.run`).

Cells are cached in ``OUT/cells/<strategy>/seed<k>/`` (``cell.json`` once finished, with a fingerprint of what they
were run with: a different budget, recipe or dense start in the same folder is refused): re-running the same command
after an interruption finishes only the missing cells, one at a time. Ours: no paper compares these methods on one
backbone under one cost model and one fine-tuning recipe.
"""

from __future__ import annotations

from .cells import cell_spec
from .run import DEFAULT_STRATEGIES, CompareResult, run_compare

__all__ = ["DEFAULT_STRATEGIES", "CompareResult", "cell_spec", "run_compare"]
