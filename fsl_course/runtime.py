"""Where computations run, and how to make them repeatable."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def device() -> torch.device:
    """The best available device: cuda, then mps, then cpu.

    ``FSL_COURSE_DEVICE`` (e.g. ``cpu``) overrides the choice, which is how the tests
    force a CPU run on a GPU machine. Code never calls ``.cuda()``; it moves tensors and
    modules to ``device()``.
    """
    forced = os.environ.get("FSL_COURSE_DEVICE")
    if forced:
        try:
            return torch.device(forced)
        except RuntimeError as err:
            raise ValueError(
                f"FSL_COURSE_DEVICE={forced!r} is not a device torch knows; "
                "expected e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'"
            ) from err
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices) with ``seed``.

    Returns a CPU ``torch.Generator`` seeded with ``seed``: draw noise that must match
    across CPU and GPU from it, then move the tensor to the device.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)
