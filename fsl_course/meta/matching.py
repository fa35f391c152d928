r"""Matching Networks (Vinyals et al. 2016, arXiv:1606.04080): classification as attention over the support set.

The prediction for a query ``x`` is a weighted vote of the support labels,

    P(y = c | x, S) = sum_i a(x, x_i) [y_i = c],      a(x, x_i) = softmax_i( s * cos(f(x), f(x_i)) ),

with ``cos(u, v) = u^T v / (||u|| ||v||)`` and one Conv-4 ``f`` for queries and support (the paper's
*full-context embeddings*, an LSTM over the support set, are left out: Vinyals et al. report them
helping on miniImageNet, not on Omniglot). ``s`` is a learnable inverse temperature (started at 10):
a softmax over cosines in ``[-1, 1]`` alone cannot become confident (for 5 classes the largest
possible probability would be ``e / (e + 4 e^-1) = 0.65``); the paper's attention has no ``s``.

The logits are ``log P(y = c | x, S)``, computed stably as ``logsumexp_{i in S_c} s cos_i - logsumexp_i s cos_i``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import FewShotLearner, register_learner


def cosine_similarities(query: torch.Tensor, support: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``cos[q, i] = u_q^T v_i / (||u_q|| ||v_i||)``: ``(Q, D)``, ``(S, D)`` -> ``(Q, S)``."""
    return F.normalize(query, dim=1, eps=eps) @ F.normalize(support, dim=1, eps=eps).T


def attention_log_probs(scores: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """``log P(y = c | x_q) = log sum_{i: y_i = c} softmax_i(scores[q])_i``: ``(Q, S)`` scores -> ``(Q, N)``."""
    log_attention = scores.log_softmax(dim=1)  # (Q, S): log a(x_q, x_i)
    in_class = F.one_hot(support_y, n_way).T.bool()  # (N, S)
    masked = rearrange(log_attention, "q s -> q 1 s").masked_fill(~in_class, -math.inf)  # (Q, N, S)
    return masked.logsumexp(dim=2)


@register_learner("matching")
class MatchingNet(FewShotLearner):
    """Matching Network with cosine attention on a Conv-4 embedding (batch norm, non-transductive at test time).

    ``predict`` returns ``(n_query, N)`` log-probabilities ``log P(y = c | x_q, S)`` (each row's
    ``exp`` sums to 1); the training loss is their negative mean at the true labels.
    """

    def __init__(self, hidden: int = 64, norm: str = "batch", init_scale: float = 10.0):
        super().__init__(hidden=hidden, norm=norm, init_scale=init_scale)
        self.backbone = Conv4(hidden=hidden, norm=norm)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def episode_logits(self, support_x, support_y, query_x, n_way):
        features = self.backbone(torch.cat([support_x, query_x]))
        support_f, query_f = features[: len(support_x)], features[len(support_x):]
        scores = self.log_scale.exp() * cosine_similarities(query_f, support_f)  # (Q, S)
        return attention_log_probs(scores, support_y, n_way)


__all__ = ["MatchingNet", "attention_log_probs", "cosine_similarities"]
