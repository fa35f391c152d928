"""fsl_course: reference implementations for the few-shot learning course.

The names below are the stable interface that notebooks, tests and users rely on
(see COURSE.md, "Package interface").
"""

__version__ = "0.1.0"

from fsl_course.budget import Budget, budget
from fsl_course.cache import atomic_write, cache_dir
from fsl_course.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fsl_course.runtime import device, seed_everything

__all__ = [
    "Budget",
    "CheckpointError",
    "atomic_write",
    "budget",
    "cache_dir",
    "device",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
]
