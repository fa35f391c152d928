"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), for the quickest
demos. Upsampled to 28x28 (bilinear); values 0..16 scaled to [0, 1] (ink = 1).

Splits by class: ``train`` is digits 0-4 (all 170 instances used per class); ``val`` and
``test`` are digits 5-9, with disjoint instances (the first and last 85 of each class).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fsl_course.data.dataset import FewShotDataset

PER_CLASS = 170  # every digit has at least this many images
CLASSES = {"train": range(0, 5), "val": range(5, 10), "test": range(5, 10)}
INSTANCES = {"train": slice(0, PER_CLASS), "val": slice(0, PER_CLASS // 2), "test": slice(PER_CLASS // 2, PER_CLASS)}


def load_digits(split: str) -> FewShotDataset:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    per_class = [images[bunch.target == d][INSTANCES[split]] for d in CLASSES[split]]
    dense = torch.stack(per_class)  # (C, n, 8, 8)
    c, n = dense.shape[:2]
    big = F.interpolate(dense.reshape(c * n, 1, 8, 8), size=(28, 28), mode="bilinear", align_corners=False)
    return FewShotDataset(
        images=big.reshape(c, n, 1, 28, 28).clamp(0, 1),
        class_names=[str(d) for d in CLASSES[split]],
        alphabets=["digits"] * c,
        name="digits",
        split=split,
    )
