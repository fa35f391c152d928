"""Baselines that every few-shot method has to beat.

* :class:`PixelNearestNeighbour`: 1-nearest neighbour on raw pixels.
* :class:`PixelPrototype`: nearest class mean on raw pixels (a Prototypical Network whose
  embedding is the identity).
* :class:`PretrainFinetune`: the "Baseline" of Chen et al. 2019, *A Closer Look at Few-shot
  Classification* (arXiv:1904.04232): pre-train a Conv-4 with ordinary cross-entropy on all
  training classes (:func:`pretrain`), then, for each episode, freeze it and fit a new
  linear classifier on the support features.

Notation: support set ``{(x_i, y_i)}_{i=1}^{NK}`` with ``y_i in {0..N-1}``, queries ``x_q``,
``S_c = {i : y_i = c}``, ``||.||`` the Euclidean norm over all pixels (or features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import FewShotLearner, register_learner
from fsl_course.meta.protonet import prototypes, squared_distances


@register_learner("pixel-nn")
class PixelNearestNeighbour(FewShotLearner):
    """1-nearest neighbour in pixel space.

    ``logit_c(x_q) = - min_{i in S_c} ||x_q - x_i||^2``: the class of the closest support
    image wins. No parameters, nothing to train.
    """

    def episode_logits(self, support_x, support_y, query_x, n_way):
        d = squared_distances(rearrange(query_x, "q c h w -> q (c h w)"), rearrange(support_x, "s c h w -> s (c h w)"))
        return torch.stack([d[:, support_y == c].min(dim=1).values for c in range(n_way)], dim=1).neg()


@register_learner("pixel-prototype")
class PixelPrototype(FewShotLearner):
    """Nearest class mean (prototype) in pixel space.

    ``p_c = (1/K) sum_{i in S_c} x_i``  and  ``logit_c(x_q) = - ||x_q - p_c||^2``, so
    ``softmax(logits)`` is the Prototypical-Network posterior with the identity embedding.
    No parameters, nothing to train.
    """

    def episode_logits(self, support_x, support_y, query_x, n_way):
        p = prototypes(rearrange(support_x, "s c h w -> s (c h w)"), support_y, n_way)
        return squared_distances(rearrange(query_x, "q c h w -> q (c h w)"), p).neg()


@register_learner("baseline")
class PretrainFinetune(FewShotLearner):
    """Pretrain then fine-tune: the *Baseline* of Chen et al. 2019 (arXiv:1904.04232).

    Training (:func:`pretrain`): the Conv-4 backbone ``f`` and a linear head over all ``C``
    training classes minimise ordinary cross-entropy; the head is then thrown away.

    Test time, per episode: ``f`` is frozen in eval mode (batch norm uses its running
    statistics: non-transductive) and a new head ``W`` ``(N, D)``, ``b`` ``(N,)``, started at
    zero, minimises the support cross-entropy

        L(W, b) = -(1 / NK) sum_i log softmax(W f(x_i) + b)_{y_i}

    with ``finetune_steps`` full-batch Adam steps (learning rate ``finetune_lr``). The
    problem is convex and the start is fixed, so the result is deterministic. The query
    logits are ``W f(x_q) + b``: ``(n_query, N)``.
    """

    def __init__(self, hidden: int = 64, norm: str = "batch", finetune_steps: int = 100, finetune_lr: float = 0.01):
        super().__init__(hidden=hidden, norm=norm, finetune_steps=finetune_steps, finetune_lr=finetune_lr)
        if finetune_steps < 1:
            raise ValueError(f"finetune_steps must be >= 1, got {finetune_steps}")
        self.backbone = Conv4(in_channels=1, hidden=hidden, norm=norm)
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr

    def episode_logits(self, support_x, support_y, query_x, n_way):
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                support_f, query_f = self.backbone(support_x), self.backbone(query_x)
        finally:
            self.backbone.train(was_training)
        weight, bias = self.finetune_head(support_f, support_y, n_way)
        return query_f @ weight.T + bias

    def finetune_head(self, features: torch.Tensor, labels: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit ``W`` ``(N, D)`` and ``b`` ``(N,)`` to ``features`` ``(n, D)``, ``labels`` ``(n,)`` (see class doc)."""
        # gradients are needed here even when the caller evaluates under no_grad / inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            features, labels = features.clone(), labels.clone()  # ordinary tensors, usable by autograd
            weight = torch.zeros(n_way, features.shape[1], device=features.device, requires_grad=True)
            bias = torch.zeros(n_way, device=features.device, requires_grad=True)
            optimizer = torch.optim.Adam([weight, bias], lr=self.finetune_lr)
            for _ in range(self.finetune_steps):
                optimizer.zero_grad()
                F.cross_entropy(features @ weight.T + bias, labels).backward()
                optimizer.step()
        return weight.detach(), bias.detach()


def pretrain(
    backbone: nn.Module,
    dataset,
    steps: int,
    batch_size: int,
    lr: float,
    device: torch.device | str,
    progress: bool = True,
    seed: int = 0,
) -> list[float]:
    """Pre-train ``backbone`` with cross-entropy over all classes of ``dataset``.

    A linear head ``(D -> C)`` is added for the ``C`` training classes; each step draws
    ``batch_size`` images uniformly from all ``C * n`` images and takes one Adam step on

        L = -(1 / B) sum_b log softmax(head(f(x_b)))_{y_b}.

    Args:
        backbone: maps ``(B, 1, H, W)`` to ``(B, D)``; trained in place, left in eval mode.
        dataset: a :class:`~fsl_course.data.FewShotDataset` or a dense image tensor
            ``(C, n, 1, H, W)`` (class ``c`` of the dense tensor has label ``c``).
        steps, batch_size, lr: number of Adam steps, images per step, learning rate.
        device: where to train (batches are drawn on the CPU and moved).
        progress: show a tqdm bar with the running loss.
        seed: seeds the head's initialisation and the batch sampler (the backbone keeps
            its own initialisation).

    Returns:
        The training loss at each step (length ``steps``). The head is discarded.
    """
    images = getattr(dataset, "images", dataset)
    if not isinstance(images, torch.Tensor) or images.ndim != 5:
        raise ValueError("dataset must be a FewShotDataset or a dense (C, n, 1, H, W) image tensor")
    n_classes, n_per_class = images.shape[:2]
    flat_images = rearrange(images, "c n ch h w -> (c n) ch h w")
    generator = torch.Generator().manual_seed(seed)

    backbone.to(device).eval()
    with torch.no_grad():  # probe the feature size in eval mode, so no batch-norm statistics move
        feature_dim = backbone(flat_images[:1].to(device)).shape[1]
    backbone.train()
    head = nn.Linear(feature_dim, n_classes).to(device)
    with torch.no_grad():  # seeded, so two runs with the same seed agree
        bound = feature_dim**-0.5
        head.weight.copy_(torch.empty(n_classes, feature_dim).uniform_(-bound, bound, generator=generator))
        head.bias.zero_()
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=lr)

    losses = []
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, leave=False)
    for _ in bar:
        index = torch.randint(n_classes * n_per_class, (batch_size,), generator=generator)
        x, y = flat_images[index].to(device), (index // n_per_class).to(device)
        loss = F.cross_entropy(head(backbone(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    backbone.eval()
    return losses
