"""Compute budgets: one preset, read from ``FSL_COURSE_BUDGET``, sizes every run.

* ``smoke``: the test suite; seconds per notebook, results are not meaningful.
* ``standard`` (default): a 2-core laptop CPU, at most 5 minutes per notebook.
* ``full``: a GPU, paper-grade results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

PRESETS = ("smoke", "standard", "full")
ENV_VAR = "FSL_COURSE_BUDGET"

T = TypeVar("T")


@dataclass(frozen=True)
class Budget:
    """A budget preset. ``pick`` chooses a value per preset:

    >>> Budget("smoke").pick(smoke=10, standard=2_000, full=20_000)
    10
    """

    name: str

    def __post_init__(self):
        if self.name not in PRESETS:
            raise ValueError(
                f"unknown budget {self.name!r}; valid budgets are: {', '.join(PRESETS)} "
                f"(set {ENV_VAR} or pass --budget)"
            )

    def pick(self, *, smoke: T, standard: T, full: T) -> T:
        return {"smoke": smoke, "standard": standard, "full": full}[self.name]

    def __str__(self) -> str:
        return self.name


def budget(name: str | None = None) -> Budget:
    """The budget preset: ``name`` if given, else ``$FSL_COURSE_BUDGET``, else ``standard``."""
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "standard"
    return Budget(name.strip().lower())
