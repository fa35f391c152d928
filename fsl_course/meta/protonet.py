r"""Prototypical Networks (Snell, Swersky & Zemel 2017, arXiv:1703.05175).

An embedding ``f_phi`` (Conv-4) maps images to ``R^D``; each class is represented by the mean of
its support embeddings, its *prototype*, and a query is classified by a softmax over negative
squared Euclidean distances:

    p_c = (1 / |S_c|) sum_{i in S_c} f(x_i),        logit_c(x) = -||f(x) - p_c||^2.

**The linear-classifier view.** ``-||f - p_c||^2 = 2 p_c^T f - ||p_c||^2 - ||f||^2``, and the last
term is the same for every class, so it cancels in the softmax: a Prototypical Network is a linear
classifier on ``f(x)`` with weights ``w_c = 2 p_c`` and biases ``b_c = -||p_c||^2``, whose
parameters are *computed* from the support set instead of learned by gradient descent.
Training minimises the query cross-entropy over episodes (:func:`fsl_course.meta.episodic.train_episodic`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import FewShotLearner, register_learner


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``d[i, j] = ||a_i - b_j||^2`` for ``a``: ``(n, D)``, ``b``: ``(m, D)`` -> ``(n, m)``.

    Computed as a broadcast difference, which is exact (the expansion
    ``||a||^2 - 2 a.b + ||b||^2`` is faster but can come out slightly negative).
    """
    return (rearrange(a, "n d -> n 1 d") - rearrange(b, "m d -> 1 m d")).pow(2).sum(-1)


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means ``p_c = (1 / |S_c|) sum_{i in S_c} e_i``: ``(n, D)``, ``(n,)`` -> ``(n_way, D)``."""
    one_hot = F.one_hot(labels, n_way).to(embeddings.dtype)  # (n, N)
    return (one_hot.T @ embeddings) / one_hot.sum(0).unsqueeze(1)


def prototype_linear_weights(protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The equivalent linear classifier of prototypes ``(N, D)``: ``W = 2 p`` ``(N, D)``,
    ``b_c = -||p_c||^2`` ``(N,)``; ``f @ W.T + b`` equals ``-||f - p_c||^2`` up to ``-||f||^2``."""
    return 2 * protos, -protos.pow(2).sum(1)


@register_learner("protonet")
class ProtoNet(FewShotLearner):
    """Prototypical Network on a Conv-4 embedding (batch norm by default, used non-transductively:
    ``.eval()`` at test time, which :func:`fsl_course.evaluation.evaluate` does).

    ``logits = -squared_distances(f(query_x), prototypes(f(support_x), support_y, N))``: ``(n_query, N)``.
    """

    def __init__(self, hidden: int = 64, norm: str = "batch"):
        super().__init__(hidden=hidden, norm=norm)
        self.backbone = Conv4(hidden=hidden, norm=norm)

    def episode_logits(self, support_x, support_y, query_x, n_way):
        # one forward pass for support and queries: the same batch-norm batch in training
        features = self.backbone(torch.cat([support_x, query_x]))
        support_f, query_f = features[: len(support_x)], features[len(support_x):]
        return -squared_distances(query_f, prototypes(support_f, support_y, n_way))


__all__ = ["ProtoNet", "prototype_linear_weights", "prototypes", "squared_distances"]
