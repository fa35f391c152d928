r"""Relation Networks (Sung et al. 2018, arXiv:1711.06025): a *learned* similarity.

An embedding ``f`` (Conv-4 that pools only in its first two blocks: 28x28 -> 64 x 7 x 7 maps) and a
relation module ``g`` (two conv blocks and two linear layers ending in a sigmoid) score every
(query, class) pair:

    e_c = (1 / K) sum_{i in S_c} f(x_i)   (the mean of the K shots' maps),
    r_{q,c} = g( concat(f(x_q), e_c) ) in (0, 1),

(Sung et al. *sum* the shots' maps and train a separate model for each K; the mean keeps the relation
module's inputs at the same scale for every K, so one model trained on 1-shot episodes also answers
5-shot ones: with the sum, a 1-shot model's 5-shot inputs are 5 times larger than any it was trained on),
and are trained by regression onto the match indicator, ``L = sum_{q,c} (r_{q,c} - [y_q = c])^2``
(mean squared error over the ``Q x N`` pairs). The class with the largest relation score wins, so
``predict`` returns ``r`` as the ``(n_query, N)`` logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from fsl_course.meta.backbones import Conv4, norm_layer
from fsl_course.meta.base import FewShotLearner, register_learner


def relation_pairs(query_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
    """Every (query, class) pair of feature maps, concatenated along channels:
    ``(Q, C, H, W)``, ``(N, C, H, W)`` -> ``(Q * N, 2C, H, W)``, ordered query-major (pair ``q * N + c``)."""
    n_query, n_way = len(query_maps), len(class_maps)
    q = repeat(query_maps, "q c h w -> (q n) c h w", n=n_way)
    e = repeat(class_maps, "n c h w -> (q n) c h w", q=n_query)
    return torch.cat([q, e], dim=1)


class RelationModule(nn.Module):
    """``g``: ``(B, 2C, 7, 7)`` pairs -> ``(B,)`` relation scores in (0, 1): two blocks of conv 3x3 ->
    norm -> ReLU -> max-pool (7 -> 3 -> 1), then linear ``C -> hidden`` -> ReLU -> linear ``hidden -> 1`` -> sigmoid."""

    def __init__(self, channels: int = 64, hidden: int = 8, norm: str = "batch"):
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1, bias=norm == "none"), norm_layer(norm, channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"), norm_layer(norm, channels), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        maps = self.blocks(pairs)  # (B, C, 1, 1) for 7x7 inputs
        return torch.sigmoid(self.head(maps.flatten(1))).squeeze(1)


@register_learner("relation")
class RelationNet(FewShotLearner):
    """Relation Network: ``predict`` returns relation scores ``r`` ``(n_query, N)`` in (0, 1); ``loss`` is
    the mean squared error to the one-hot query labels. Batch norm, non-transductive at test time."""

    def __init__(self, hidden: int = 64, norm: str = "batch", relation_hidden: int = 8):
        super().__init__(hidden=hidden, norm=norm, relation_hidden=relation_hidden)
        self.backbone = Conv4(hidden=hidden, norm=norm, pools=2, flatten=False)
        self.relation = RelationModule(hidden, relation_hidden, norm)

    def episode_logits(self, support_x, support_y, query_x, n_way):
        maps = self.backbone(torch.cat([support_x, query_x]))  # (S + Q, C, 7, 7)
        support_maps, query_maps = maps[: len(support_x)], maps[len(support_x):]
        one_hot = F.one_hot(support_y, n_way).to(maps.dtype)  # (S, N)
        class_maps = torch.einsum("sn,schw->nchw", one_hot / one_hot.sum(0), support_maps)  # mean of each class's shots
        scores = self.relation(relation_pairs(query_maps, class_maps))  # (Q * N,)
        return rearrange(scores, "(q n) -> q n", n=n_way)

    def loss(self, support_x, support_y, query_x, query_y):
        scores = self.predict(support_x, support_y, query_x)
        return F.mse_loss(scores, F.one_hot(query_y, scores.shape[1]).to(scores.dtype))


__all__ = ["RelationModule", "RelationNet", "relation_pairs"]
