r"""A hypernetwork learner: a network that *outputs the weights* of each episode's classifier.

Given the support set, the hypernetwork ``h`` maps each class to the weights of a linear classifier on
the Conv-4 features ``f(x)`` (in the spirit of Ha et al. 2017, *HyperNetworks*, arXiv:1609.09106, and
Qiao et al. 2018, *Few-shot image recognition by predicting parameters from activations*,
arXiv:1706.03466):

    p_c = mean_{i in S_c} f(x_i),    m = (1/N) sum_c p_c,
    [dw_c, db_c] = h([p_c, p_c - m])                     (an MLP, shared by the classes),
    w_c = p_c + dw_c,   b_c = -||p_c||^2 / 2 + db_c,     logit_c(x) = w_c^T f(x) + b_c.

The last layer of ``h`` starts at zero, so an untrained hypernetwork *is* the Prototypical Network's
linear classifier (``w_c = p_c``, ``b_c = -||p_c||^2/2``: half the ProtoNet logits up to a per-query
constant); training learns the correction, and through ``p_c - m`` each class's weights depend on the
other classes of the episode.
"""

from __future__ import annotations

import torch
from torch import nn

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import FewShotLearner, register_learner
from fsl_course.meta.protonet import prototypes


class WeightGenerator(nn.Module):
    """``h``: prototypes ``(N, D)`` -> classifier weights ``W`` ``(N, D)`` and biases ``b`` ``(N,)`` (see module doc)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, dim + 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context = protos - protos.mean(dim=0, keepdim=True)
        delta = self.net(torch.cat([protos, context], dim=1))  # (N, D + 1)
        return protos + delta[:, :-1], -0.5 * protos.pow(2).sum(1) + delta[:, -1]


@register_learner("hypernet")
class HyperNetLearner(FewShotLearner):
    """Conv-4 embedding (batch norm, eval mode at test) + :class:`WeightGenerator`;
    ``predict`` -> ``f(x_q) @ W.T + b``: ``(n_query, N)``."""

    def __init__(self, hidden: int = 64, generator_hidden: int = 256):
        super().__init__(hidden=hidden, generator_hidden=generator_hidden)
        self.backbone = Conv4(hidden=hidden, norm="batch")
        self.generator = WeightGenerator(self.backbone.feature_dim(), generator_hidden)

    def episode_logits(self, support_x, support_y, query_x, n_way):
        features = self.backbone(torch.cat([support_x, query_x]))
        support_f, query_f = features[: len(support_x)], features[len(support_x):]
        weight, bias = self.generator(prototypes(support_f, support_y, n_way))
        return query_f @ weight.T + bias


__all__ = ["HyperNetLearner", "WeightGenerator"]
