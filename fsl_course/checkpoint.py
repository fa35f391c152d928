"""Checkpoints: a ``state_dict`` plus a JSON-able config, never a pickled module.

The file is written with ``torch.save`` and read with ``weights_only=True``, so loading
one cannot run code, and it always loads onto the CPU (move it with ``.to(device())``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fsl_course.cache import atomic_write

FORMAT = "fsl-course-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable fsl-course checkpoint."""


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``{state_dict, config}`` to ``path`` atomically. ``config`` must be JSON-able
    (it says how to rebuild the model: class name, sizes, training command, seed, budget)."""
    try:
        config_json = json.dumps(config, sort_keys=True)
    except TypeError as err:
        raise TypeError(f"checkpoint config must be JSON-serialisable: {err}") from err
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save({"format": FORMAT, "version": FORMAT_VERSION, "config": config_json, "state_dict": state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(state_dict, config)`` on CPU.

    Raises :class:`CheckpointError` with a clear message for a missing, truncated or
    foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: expected a file written by `fsl-course train`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, random bytes, ...
        raise CheckpointError(
            f"{path} is not a readable fsl-course checkpoint (truncated or a foreign file?): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a torch file but not an fsl-course checkpoint: expected a dict with "
            f"format={FORMAT!r}, a JSON config and a state_dict"
        )
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {blob.get('version')}, this package reads {FORMAT_VERSION}")
    return blob["state_dict"], json.loads(blob["config"])
