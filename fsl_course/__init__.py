"""fsl_course: reference implementations for the few-shot learning course.

The names below are the stable interface that notebooks, tests and users rely on
(see COURSE.md, "Package interface"). They are imported on first use (PEP 562), so that
``import fsl_course.grading`` or ``fsl-course exercises`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Budget": "fsl_course.budgets",
    "budget": "fsl_course.budgets",
    "atomic_write": "fsl_course.cache",
    "cache_dir": "fsl_course.cache",
    "CheckpointError": "fsl_course.checkpoint",
    "load_checkpoint": "fsl_course.checkpoint",
    "save_checkpoint": "fsl_course.checkpoint",
    "device": "fsl_course.runtime",
    "seed_everything": "fsl_course.runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fsl_course' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
