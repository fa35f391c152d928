"""Visible checks of exercise 01 (few-shot tasks): episodes, prototype logits, the 95% CI."""

from __future__ import annotations

import math

import numpy as np
import torch

from fsl_course.checks import visible_check


def tagged_images(n_classes: int = 7, n_per_class: int = 6, size: int = 4) -> torch.Tensor:
    """A toy dataset (C, n, 1, size, size) whose image [c, i] has c in pixel (0, 0) and i in
    pixel (0, 1), so a test can tell which images an episode picked."""
    images = torch.zeros(n_classes, n_per_class, 1, size, size)
    images[:, :, 0, 0, 0] = torch.arange(n_classes, dtype=torch.float32)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(n_per_class, dtype=torch.float32)[None, :]
    return images


def tags(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, instance) of each image of a batch (m, 1, H, W) of :func:`tagged_images`: two (m,) int64 tensors."""
    return x[:, 0, 0, 0].long(), x[:, 0, 0, 1].long()


@visible_check
def sample_episode(sample_episode, expect):
    images = tagged_images()
    sx, sy, qx, qy = sample_episode(images, way=3, shot=2, query=3, generator=torch.Generator().manual_seed(0))
    expect(tuple(sx.shape) == (6, 1, 4, 4) and tuple(qx.shape) == (9, 1, 4, 4),
           f"support_x should be (N*K, 1, H, W) = (6, 1, 4, 4) and query_x (N*Q, 1, H, W) = (9, 1, 4, 4); "
           f"got {tuple(sx.shape)}, {tuple(qx.shape)}. hint: rearrange 'n k c h w -> (n k) c h w'")
    expect(sy.dtype == torch.int64 and qy.dtype == torch.int64, "labels must be int64. hint: torch.long")
    expect(sy.tolist() == [0, 0, 1, 1, 2, 2] and qy.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2],
           f"labels are 0..N-1 grouped by class; got {sy.tolist()}, {qy.tolist()}. "
           "hint: torch.arange(N).repeat_interleave(K)")
    s_class, s_inst = tags(sx)
    q_class, q_inst = tags(qx)
    expect(len(set(s_class.tolist())) == 3, "the N classes must be distinct. hint: torch.randperm, not torch.randint")
    for c in range(3):
        expect(len(set(s_class[sy == c].tolist()) | set(q_class[qy == c].tolist())) == 1,
               f"all support and query images with label {c} must come from one dataset class. "
               "hint: index images[classes[:, None], instances]")
        used = s_inst[sy == c].tolist() + q_inst[qy == c].tolist()
        expect(len(set(used)) == len(used),
               f"label {c} uses an instance twice. hint: draw K + Q distinct instances per class with torch.randperm")
    again = sample_episode(images, 3, 2, 3, torch.Generator().manual_seed(0))
    expect(all(torch.equal(a, b) for a, b in zip((sx, sy, qx, qy), again)),
           "the same seed must give the same episode. hint: draw every random number from `generator`")


@visible_check
def prototype_logits(prototype_logits, expect):
    # 1x1 "images", small enough to do by hand: class 0 has support pixels 0 and 2
    # (prototype 1), class 1 has 10 (prototype 10)
    support_x = torch.tensor([0.0, 10.0, 2.0]).reshape(3, 1, 1, 1)
    support_y = torch.tensor([0, 1, 0])
    query_x = torch.tensor([4.0, 10.0]).reshape(2, 1, 1, 1)
    logits = prototype_logits(support_x, support_y, query_x)
    expect(tuple(logits.shape) == (2, 2), f"logits have shape (n_query, N) = (2, 2), got {tuple(logits.shape)}")
    expect(torch.allclose(logits, torch.tensor([[-9.0, -36.0], [-81.0, 0.0]])),
           f"got {logits.tolist()}. hint: for the query 4 the prototypes are 1 and 10, so its logits are "
           "-(4-1)^2 = -9 and -(4-10)^2 = -36")
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(10, 1, 5, 5, generator=g), torch.rand(4, 1, 5, 5, generator=g)
    logits = prototype_logits(sx, torch.arange(5).repeat_interleave(2), qx)
    expect(tuple(logits.shape) == (4, 5), "one logit per query and class. hint: N = support_y.max() + 1")
    expect((logits <= 0).all(), "the logits are *minus* squared distances")


@visible_check
def mean_ci95(mean_ci95, expect):
    mean, h = mean_ci95([0.6, 0.8, 1.0])
    expect(abs(mean - 0.8) < 1e-9, f"the mean of 0.6, 0.8, 1.0 is 0.8, got {mean}")
    expect(abs(h - 1.96 * 0.2 / math.sqrt(3)) < 1e-6,
           f"h should be 0.2263, got {h}. hint: s divides by E - 1 = 2 (s = 0.2 here), and h = 1.96 * s / sqrt(3)")
    expect(isinstance(mean, float) and isinstance(h, float), "return Python floats. hint: float(...)")
    expect(mean_ci95(np.full(10, 0.7))[1] == 0.0, "identical accuracies have no spread, so h = 0")
    try:
        mean_ci95([0.5])
        raised = False
    except ValueError:
        raised = True
    expect(raised, "one accuracy has no standard deviation. hint: raise ValueError for fewer than 2 accuracies")
