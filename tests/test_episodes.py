"""The N-way K-shot episode sampler."""

from __future__ import annotations

import pytest
import torch

from fsl_course.data import load
from fsl_course.episodes import EpisodeSampler, sample_episode


@pytest.fixture(scope="module")
def images():
    # class c, instance i is filled with the value 1000 * c + i: easy to trace back
    c, n = 12, 9
    values = (1000 * torch.arange(c)[:, None] + torch.arange(n)[None]).float()
    return values[:, :, None, None, None].expand(c, n, 1, 4, 4).contiguous()


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = x[:, 0, 0, 0].long()
    return v // 1000, v % 1000


@pytest.mark.parametrize("way, shot, query", [(5, 1, 3), (3, 4, 5), (12, 9, 0)])
def test_episode_structure(images, way, shot, query):
    ep = sample_episode(images, way, shot, query, torch.Generator().manual_seed(1))
    assert ep.support_x.shape == (way * shot, 1, 4, 4) and ep.query_x.shape == (way * query, 1, 4, 4)
    assert torch.equal(ep.support_y, torch.arange(way).repeat_interleave(shot))
    assert torch.equal(ep.query_y, torch.arange(way).repeat_interleave(query))
    assert ep.support_y.dtype == ep.query_y.dtype == torch.int64
    assert len(set(ep.classes.tolist())) == way
    s_cls, s_inst = decode(ep.support_x)
    q_cls, q_inst = decode(ep.query_x)
    assert torch.equal(s_cls, ep.classes[ep.support_y]) and torch.equal(q_cls, ep.classes[ep.query_y])
    for label in range(way):  # support and query never share an instance
        s = set(s_inst[ep.support_y == label].tolist())
        q = set(q_inst[ep.query_y == label].tolist())
        assert len(s) == shot and len(q) == query and not s & q


def test_seeded_and_varied(images):
    a = [e.classes for e in EpisodeSampler(images, 5, 1, 2, seed=3).episodes(20)]
    b = [e.classes for e in EpisodeSampler(images, 5, 1, 2, seed=3).episodes(20)]
    c = [e.classes for e in EpisodeSampler(images, 5, 1, 2, seed=4).episodes(20)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert len({tuple(x.tolist()) for x in a}) > 15


def test_every_class_and_instance_gets_drawn(images):
    seen = torch.zeros(images.shape[:2], dtype=torch.bool)
    for ep in EpisodeSampler(images, 3, 2, 2, seed=0).episodes(200):
        c, i = decode(torch.cat([ep.support_x, ep.query_x]))
        seen[c, i] = True
    assert seen.all()


def test_sampler_accepts_datasets():
    ep = EpisodeSampler(load("digits", "test"), 5, 5, 15).sample()
    assert ep.support_x.shape == (25, 1, 28, 28) and ep.way == 5 and ep.shot == 5


@pytest.mark.parametrize(
    "way, shot, query, message",
    [
        (13, 1, 1, "asked for 13-way episodes but the dataset has only 12 classes"),
        (5, 5, 5, r"shot \+ query = 5 \+ 5 = 10 instances per class but each class has only 9"),
        (1, 1, 1, "way must be an int >= 2"),
        (5, 0, 1, "shot must be an int >= 1"),
        (5, 1.5, 1, "shot must be an int"),
    ],
)
def test_impossible_requests_are_clear_errors(images, way, shot, query, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(images, way, shot, query)


def test_wrong_images_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dense tensor \(n_classes, n_per_class, C, H, W\)"):
        sample_episode(torch.zeros(10, 28, 28), 5, 1, 1)
