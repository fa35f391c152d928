"""``omniglot``: Lake et al.'s Omniglot (Science 2015) read from a local folder.

Expected layout (the official one, and the one torchvision downloads into)::

    ROOT/images_background/<alphabet>/<character>/*.png   30 alphabets, 964 characters
    ROOT/images_evaluation/<alphabet>/<character>/*.png   20 alphabets, 659 characters

(``ROOT/omniglot-py/...``, torchvision's folder, is found too.) Images are 105x105 with black
ink on white; they are inverted to ink = 1 and resized to 28x28 (box filter: each output pixel
is the mean of the input pixels it covers).

Splits: ``test`` is images_evaluation (the standard evaluation alphabets); ``val`` is every
sixth background alphabet in sorted order (5 of 30) and ``train`` the other background
alphabets. Every class keeps the same number of instances (the smallest count, 20 in the
official data). Decoded arrays are cached, keyed by the folder's path, size and mtime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from fsl_course.data.dataset import FewShotDataset

PARTS = {"train": "images_background", "val": "images_background", "test": "images_evaluation"}
VAL_EVERY = 6


def find_root(root: str | os.PathLike | None) -> Path:
    """The folder that holds images_background/ and images_evaluation/, or a clear error."""
    if root is None:
        raise ValueError("omniglot is not bundled: pass root=DIR, the folder that holds images_background/ and images_evaluation/")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"omniglot root {root} does not exist (expected a folder holding images_background/ and images_evaluation/)")
    if not root.is_dir():
        raise NotADirectoryError(f"omniglot root {root} is not a folder")
    for candidate in (root, root / "omniglot-py"):
        if any((candidate / part).is_dir() for part in set(PARTS.values())):
            return candidate
    found = sorted(p.name for p in root.iterdir())[:8]
    raise ValueError(
        f"{root} does not have the Omniglot layout: expected images_background/<alphabet>/<character>/*.png "
        f"and images_evaluation/...; found {found}"
    )


def _alphabets(root: Path, split: str) -> list[Path]:
    part = root / PARTS[split]
    if not part.is_dir():
        raise ValueError(f"split {split!r} needs {part} (<alphabet>/<character>/*.png), which is missing")
    alphabets = sorted(p for p in part.iterdir() if p.is_dir())
    if split == "test":
        chosen = alphabets
    else:
        val = {i for i in range(len(alphabets)) if i % VAL_EVERY == VAL_EVERY - 1}
        chosen = [a for i, a in enumerate(alphabets) if (i in val) == (split == "val")]
    if not chosen:
        raise ValueError(f"no alphabets for split {split!r} in {part} ({len(alphabets)} alphabet folders; val takes every {VAL_EVERY}th)")
    return chosen


def _read(path: Path) -> np.ndarray:
    """One image as uint8 (28, 28), ink = 255 (the files have black ink on white)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.invert(im.convert("L")).resize((28, 28), Image.Resampling.BOX))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def load_omniglot(root: str | os.PathLike | None, split: str) -> FewShotDataset:
    root = find_root(root)
    characters = [(a, c) for a in _alphabets(root, split) for c in sorted(p for p in a.iterdir() if p.is_dir())]
    if not characters:
        raise ValueError(f"no character folders under the {split} alphabets of {root}")
    files = [sorted(c.glob("*.png")) for _, c in characters]
    empty = [str(c) for (_, c), f in zip(characters, files) if not f]
    if empty:
        raise ValueError(f"{len(empty)} character folder(s) have no .png images, e.g. {empty[0]}; every class needs at least one")
    n = min(len(f) for f in files)
    images = _cached(root, split, [f[:n] for f in files])
    return FewShotDataset(
        images=images,
        class_names=[f"{a.name}/{c.name}" for a, c in characters],
        alphabets=[a.name for a, _ in characters],
        name="omniglot",
        split=split,
    )


def _cached(root: Path, split: str, files: list[list[Path]]) -> torch.Tensor:
    """Decode, invert and resize to float (C, n, 1, 28, 28), via a uint8 .npy cache keyed by the files."""
    from fsl_course.cache import atomic_write, cache_dir

    h = hashlib.sha256(str(root.resolve()).encode() + split.encode())
    for f in (f for group in files for f in group):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = cache_dir() / f"omniglot-{h.hexdigest()[:16]}.npy"
    if not path.is_file():
        images = np.stack([np.stack([_read(f) for f in group]) for group in files])  # (C, n, 28, 28)
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, images)
    return torch.from_numpy(np.load(path))[:, :, None].float().div_(255)
