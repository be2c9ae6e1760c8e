"""How many hypothesis examples a property test runs: `examples(n)` is n, except under `make mutants`.

The `mutation` profile (tests/conftest.py) caps it: one failing example is enough to kill a mutant,
and a mutation run executes the covering tests once per mutant (thousands of times).
"""

from __future__ import annotations

from hypothesis import settings

MUTATION_EXAMPLES = 30


def examples(n: int) -> int:
    return min(n, MUTATION_EXAMPLES) if settings.get_current_profile_name() == "mutation" else n
