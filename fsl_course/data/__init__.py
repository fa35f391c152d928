"""Few-shot datasets: one entry point, :func:`load`, returning a dense
:class:`FewShotDataset` with ``images`` of shape (n_classes, n_per_class, 1, 28, 28).

* ``glyphs``: embedded, Omniglot-like, rendered from matplotlib's fonts (the default).
* ``digits``: scikit-learn's bundled 8x8 digits, upsampled: the quickest demos.
* ``omniglot``: the official Omniglot folders, read from a local ``root``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from einops import rearrange

from fsl_course.data.dataset import FewShotDataset

DATASETS = {
    "glyphs": "Omniglot-like characters rendered from matplotlib's fonts (embedded, built once and cached)",
    "digits": "scikit-learn's 8x8 handwritten digits, upsampled to 28x28 (train 0-4; val/test 5-9)",
    "omniglot": "Omniglot from a local folder in the official layout (images_background/, images_evaluation/)",
}
SPLITS = ("train", "val", "test")


def load(name: str, split: str, root: str | os.PathLike | None = None, *, rotations: bool = False) -> FewShotDataset:
    """Load split ``split`` of dataset ``name``.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"``, ``"val"`` or ``"test"``; splits never share a class (glyphs and
            omniglot: never share an alphabet).
        root: the dataset folder, for ``omniglot`` only.
        rotations: add each class rotated by 90, 180 and 270 degrees as new classes (as in
            Santoro et al. 2016 and Vinyals et al. 2016, for training). Glyph rotations that
            would duplicate another class are left out.

    Returns:
        A :class:`FewShotDataset`; ``images`` is float32 (n_classes, n_per_class, 1, 28, 28).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; expected one of: {', '.join(SPLITS)}")
    if root is not None and name != "omniglot":
        raise ValueError(f"dataset {name!r} is built in and takes no root (root is for 'omniglot')")
    if name == "glyphs":
        return _load_glyphs(split, rotations)
    if name == "digits":
        from fsl_course.data.digits import load_digits

        dataset = load_digits(split)
    else:
        from fsl_course.data.omniglot import load_omniglot

        dataset = load_omniglot(root, split)
    return add_rotations(dataset) if rotations else dataset


def _load_glyphs(split: str, rotations: bool) -> FewShotDataset:
    from fsl_course.data import glyphs

    arrays = glyphs.load_arrays()
    mask = arrays["splits"] == split
    images = torch.from_numpy(arrays["images"][mask]).float().div_(255)
    dataset = FewShotDataset(
        images=rearrange(images, "c n h w -> c n 1 h w"),
        class_names=[f"{a}/{c}" for a, c in zip(arrays["alphabets"][mask], arrays["chars"][mask])],
        alphabets=[str(a) for a in arrays["alphabets"][mask]],
        name="glyphs",
        split=split,
    )
    return add_rotations(dataset, keep=arrays["rotations_ok"][mask]) if rotations else dataset


def add_rotations(dataset: FewShotDataset, keep: np.ndarray | None = None) -> FewShotDataset:
    """The dataset plus its classes rotated by k * 90 degrees (k = 1, 2, 3) as new classes.

    ``keep`` (n_classes, 4) bool selects which rotations to add (column 0 is ignored: the
    original classes are always kept). Rotated class names get a suffix, e.g. ``"Latin/R@90"``.
    """
    keep = np.ones((dataset.n_classes, 4), dtype=bool) if keep is None else keep
    images, names, alphabets = [dataset.images], list(dataset.class_names), list(dataset.alphabets)
    for k in (1, 2, 3):
        sel = np.flatnonzero(keep[:, k])
        images.append(torch.rot90(dataset.images[torch.from_numpy(sel)], k, dims=(-2, -1)))
        names += [f"{dataset.class_names[i]}@{90 * k}" for i in sel]
        alphabets += [dataset.alphabets[i] for i in sel]
    return FewShotDataset(torch.cat(images), names, alphabets, dataset.name, dataset.split)


def status() -> list[dict]:
    """One entry per dataset for ``fsl-course doctor``: name, description, available, detail."""
    from fsl_course.data import glyphs

    details = {
        "glyphs": f"cached at {glyphs.cache_path()}" if glyphs.is_cached() else "not built yet (about 15 s on first load)",
        "digits": "bundled with scikit-learn",
        "omniglot": "needs a local folder: load('omniglot', split, root=DIR)",
    }
    return [
        {"name": name, "description": description, "available": name != "omniglot", "detail": details[name]}
        for name, description in DATASETS.items()
    ]


__all__ = ["DATASETS", "SPLITS", "FewShotDataset", "add_rotations", "load", "status"]
