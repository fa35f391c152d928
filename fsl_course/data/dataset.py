"""The dense few-shot dataset every loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange


@dataclass
class FewShotDataset:
    """A dense few-shot dataset.

    Attributes:
        images: float32 tensor ``(n_classes, n_per_class, 1, H, W)`` in [0, 1], ink = 1.
        class_names: one name per class, e.g. ``"Greek/Ω"``.
        alphabets: the alphabet (group) of each class; splits are disjoint by alphabet.
        name: the dataset's name (``glyphs``, ``digits``, ``omniglot``).
        split: ``train``, ``val`` or ``test``.
    """

    images: torch.Tensor
    class_names: list[str]
    alphabets: list[str]
    name: str
    split: str

    def __post_init__(self):
        if self.images.ndim != 5 or self.images.shape[2] != 1:
            raise ValueError(f"images must have shape (n_classes, n_per_class, 1, H, W), got {tuple(self.images.shape)}")
        if not (len(self.class_names) == len(self.alphabets) == self.images.shape[0]):
            raise ValueError("class_names and alphabets need one entry per class")

    @property
    def n_classes(self) -> int:
        return self.images.shape[0]

    @property
    def n_per_class(self) -> int:
        return self.images.shape[1]

    @property
    def alphabet_names(self) -> list[str]:
        """The distinct alphabets, in order of first appearance."""
        return list(dict.fromkeys(self.alphabets))

    def __len__(self) -> int:
        return self.n_classes

    def grid(self, n_classes: int = 10, n_instances: int = 10, seed: int | None = 0, classes=None) -> torch.Tensor:
        """A (n_classes * H, n_instances * W) image: one class per row, its instances along it.

        Rows are the class indices ``classes`` if given, else ``n_classes`` classes drawn with
        ``seed`` (``seed=None``: the first ``n_classes``).
        """
        n_instances = min(n_instances, self.n_per_class)
        if classes is not None:
            classes = torch.as_tensor(list(classes), dtype=torch.long)
        elif seed is None:
            classes = torch.arange(min(n_classes, self.n_classes))
        else:
            generator = torch.Generator().manual_seed(seed)
            classes = torch.randperm(self.n_classes, generator=generator)[: min(n_classes, self.n_classes)]
        picked = self.images[classes, :n_instances, 0]  # (classes, instances, H, W)
        return rearrange(picked, "c n h w -> (c h) (n w)")

    def __repr__(self) -> str:
        _, n, _, h, w = self.images.shape
        return (
            f"FewShotDataset({self.name}/{self.split}: {self.n_classes} classes x {n} instances of "
            f"1x{h}x{w}, {len(self.alphabet_names)} alphabets)"
        )
