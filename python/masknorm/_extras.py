"""Optional packages: a missing one is named with the extra that installs it."""
from __future__ import annotations

import importlib.util
from typing import List, Sequence


def missing(modules: Sequence[str]) -> List[str]:
    """The modules of ``modules`` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, modules: Sequence[str], what: str) -> None:
    """Raise ModuleNotFoundError naming masknorm's ``extra`` when one of
    ``modules`` (which ``what`` needs) is not installed."""
    absent = missing(modules)
    if absent:
        raise ModuleNotFoundError(
            f"{what} needs {' and '.join(modules)}, and {', '.join(absent)} is not installed. "
            f'Install masknorm\'s "{extra}" extra: pip install "masknorm[{extra}]" '
            f'(or, from a clone: pip install --no-build-isolation ".[{extra}]")',
            name=absent[0],
        )
