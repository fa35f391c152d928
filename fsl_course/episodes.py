"""N-way K-shot episodes: the unit of few-shot learning.

An episode picks ``way`` classes at random, then ``shot + query`` distinct instances of each:
the first ``shot`` form the support set (the few labelled examples), the other ``query`` the
query set to classify. Labels are episode-local, 0..way-1, in the order the classes were
drawn. Sampling is one gather from the dense (n_classes, n_per_class, 1, H, W) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from fsl_course.data.dataset import FewShotDataset


@dataclass
class Episode:
    """One few-shot task.

    Attributes:
        support_x: (way * shot, 1, H, W) support images, grouped by class.
        support_y: (way * shot,) int64 labels in 0..way-1: [0]*shot + [1]*shot + ...
        query_x: (way * query, 1, H, W) query images, grouped by class.
        query_y: (way * query,) int64 labels in 0..way-1.
        classes: (way,) int64 dataset class index of each episode label.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor

    @property
    def way(self) -> int:
        return len(self.classes)

    @property
    def shot(self) -> int:
        return len(self.support_y) // self.way

    def to(self, device: torch.device | str) -> "Episode":
        return Episode(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y, self.classes)))


def _check_request(images: torch.Tensor, way: int, shot: int, query: int) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 5:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a dense tensor (n_classes, n_per_class, C, H, W), got {shape}")
    for name, value, low in (("way", way, 2), ("shot", shot, 1), ("query", query, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    n_classes, n_per_class = images.shape[:2]
    if way > n_classes:
        raise ValueError(f"asked for {way}-way episodes but the dataset has only {n_classes} classes")
    if shot + query > n_per_class:
        raise ValueError(
            f"asked for shot + query = {shot} + {query} = {shot + query} instances per class "
            f"but each class has only {n_per_class}"
        )


def _gather(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rearrange(images[rows, cols], "n k c h w -> (n k) c h w")`` for rows (n, 1) and
    cols (n, k), as a new contiguous tensor. On the CPU the copy goes through NumPy:
    single-threaded, it is several times faster than torch's multi-threaded gather for
    these small copies when the other cores are busy (see benchmarks/episodes_speed.py)."""
    if images.device.type == "cpu":
        picked = images.detach().numpy()[rows.numpy(), cols.numpy()]
        return torch.from_numpy(picked.reshape(-1, *picked.shape[2:]))
    return images[rows.to(images.device), cols.to(images.device)].flatten(0, 1)


def sample_episode(images: torch.Tensor, way: int, shot: int, query: int, generator: torch.Generator | None = None) -> Episode:
    """Sample one ``way``-way ``shot``-shot episode with ``query`` queries per class.

    Args:
        images: dense (n_classes, n_per_class, C, H, W) tensor.
        way, shot, query: N, K and Q.
        generator: a CPU ``torch.Generator`` for reproducible episodes.

    Returns:
        An :class:`Episode` on the device of ``images``.
    """
    _check_request(images, way, shot, query)
    n_classes, n_per_class = images.shape[:2]
    classes = torch.randperm(n_classes, generator=generator)[:way]  # (way,)
    instances = torch.rand(way, n_per_class, generator=generator).argsort(dim=1)[:, : shot + query]  # (way, K+Q)
    rows = classes[:, None]
    labels = torch.arange(way, device=images.device)
    return Episode(
        support_x=_gather(images, rows, instances[:, :shot]),  # (way * shot, C, H, W)
        support_y=labels.repeat_interleave(shot),  # [0]*shot + [1]*shot + ...
        query_x=_gather(images, rows, instances[:, shot:]),  # (way * query, C, H, W)
        query_y=labels.repeat_interleave(query),
        classes=classes,
    )


class EpisodeSampler:
    """A seeded stream of episodes from one dataset.

    >>> sampler = EpisodeSampler(load("glyphs", "test"), way=5, shot=1, query=15, seed=0)  # doctest: +SKIP
    >>> for episode in sampler.episodes(600): ...                                         # doctest: +SKIP

    Args:
        dataset: a :class:`FewShotDataset` or a dense (n_classes, n_per_class, C, H, W) tensor.
        way, shot, query: N, K and Q.
        seed: the same seed gives the same episodes, in the same order, on any device.
    """

    def __init__(self, dataset: FewShotDataset | torch.Tensor, way: int, shot: int, query: int, seed: int = 0):
        self.images = getattr(dataset, "images", dataset)  # a FewShotDataset (or anything with .images) or a dense tensor
        _check_request(self.images, way, shot, query)
        self.way, self.shot, self.query, self.seed = way, shot, query, seed
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Episode:
        return sample_episode(self.images, self.way, self.shot, self.query, self.generator)

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def episodes(self, n: int) -> Iterator[Episode]:
        """The next ``n`` episodes."""
        for _ in range(n):
            yield self.sample()
