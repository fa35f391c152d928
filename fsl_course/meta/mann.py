r"""A memory-augmented black-box learner: the episode is a *sequence*, and the network learns to learn.

Following Santoro et al. 2016 (*One-shot learning with memory-augmented neural networks*,
arXiv:1605.06065), the support set is presented one image at a time and each label arrives **one step
late**: the controller's input at step ``t`` is ``(f(x_t), onehot(y_{t-1}))`` (``y_{-1}``: no label,
zeros). The network cannot copy the label it is asked to predict; to answer it must bind "image
``x_{t-1}`` came with label ``y_{t-1}``" in a memory and look the binding up when a similar image comes back.

The controller is an LSTM; the memory is external and content-addressed, as in Santoro et al. (with a
simpler write rule: every step gets a fresh slot instead of their least-recently-used addressing):

* at step ``t`` the controller emits a key ``k_t = W [h_t, f(x_t)]`` for the image it sees;
* when ``y_t`` arrives (at step ``t + 1``), the pair ``(k_t, onehot(y_t))`` is written to memory;
* a read with key ``k`` returns ``sum_i a_i onehot(y_i)``, ``a = softmax_i(s cos(k, k_i))`` (``s`` learned).

The queries come after the whole support sequence, each on its own from the same final state (so they do
not see each other: non-transductive), with the last support label as their shifted label; by then the
memory holds every support pair. A query's logits are ``log read(k_q) + W_o h_q``: the memory's vote plus
the controller's own read-out. (A plain LSTM, whose only memory is its state, did not leave chance level
(loss ``ln 5``) in 3,000 standard-budget steps: Santoro et al. report that it learns slowly.)

Labels go into ``max_way`` one-hot slots. In training each episode's ``N`` labels are put into ``N``
random slots, so every slot is learned and the learner runs on any ``N <= max_way``; at test time label
``c`` uses slot ``c``. The support order is shuffled in training and fixed (seed 0) at test time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import FewShotLearner, register_learner
from fsl_course.meta.matching import attention_log_probs, cosine_similarities


def shifted_labels(labels: torch.Tensor, n_slots: int) -> torch.Tensor:
    """The MANN label input: step ``t`` gets ``onehot(y_{t-1})``, step 0 zeros.
    ``(T,)`` int64 labels -> ``(T, n_slots)`` float, row ``t`` = one-hot of ``labels[t - 1]``."""
    one_hot = F.one_hot(labels, n_slots).float()
    return torch.cat([torch.zeros_like(one_hot[:1]), one_hot[:-1]])


@register_learner("mann")
class MANN(FewShotLearner):
    """Memory-augmented black-box learner: Conv-4 embedding (batch norm, eval mode at test), an LSTM controller
    over the label-shifted support sequence, and a content-addressed memory of (key, label) pairs;
    ``predict`` -> ``(n_query, N)`` logits for ``N <= max_way``."""

    def __init__(self, hidden: int = 64, lstm_hidden: int = 256, key_dim: int = 64, max_way: int = 20):
        super().__init__(hidden=hidden, lstm_hidden=lstm_hidden, key_dim=key_dim, max_way=max_way)
        self.max_way = max_way
        self.backbone = Conv4(hidden=hidden, norm="batch")
        features = self.backbone.feature_dim()
        self.lstm = nn.LSTM(features + max_way, lstm_hidden)
        self.key = nn.Linear(lstm_hidden + features, key_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.readout = nn.Linear(lstm_hidden, max_way)

    def episode_logits(self, support_x, support_y, query_x, n_way):
        if n_way > self.max_way:
            raise ValueError(f"this MANN has {self.max_way} label slots; it cannot solve {n_way}-way episodes")
        device = support_x.device
        if self.training:  # random support order and random label slots
            order = torch.randperm(len(support_y)).to(device)
            slots = torch.randperm(self.max_way)[:n_way].to(device)
        else:  # a fixed order (seeded, the same for every call) and slot c for label c
            order = torch.randperm(len(support_y), generator=torch.Generator().manual_seed(0)).to(device)
            slots = torch.arange(n_way, device=device)
        features = self.backbone(torch.cat([support_x, query_x]))
        support_f, query_f = features[: len(support_x)][order], features[len(support_x):]
        support_slots = slots[support_y[order]]  # (S,)
        inputs = torch.cat([support_f, shifted_labels(support_slots, self.max_way)], dim=1)  # (S, D + max_way)
        support_h, (h, c) = self.lstm(rearrange(inputs, "s d -> s 1 d"))  # (S, 1, H); state after the support
        support_keys = self.key(torch.cat([support_h[:, 0], support_f], dim=1))  # (S, key_dim): k_t, stored with y_t
        n_query = len(query_f)
        last_label = F.one_hot(support_slots[-1], self.max_way).float().expand(n_query, -1)
        query_in = rearrange(torch.cat([query_f, last_label], dim=1), "q d -> 1 q d")  # one more step, queries as a batch
        query_h, _ = self.lstm(query_in, (h.expand(-1, n_query, -1).contiguous(), c.expand(-1, n_query, -1).contiguous()))
        query_h = query_h[0]  # (Q, H)
        query_keys = self.key(torch.cat([query_h, query_f], dim=1))  # (Q, key_dim)
        scores = self.log_scale.exp() * cosine_similarities(query_keys, support_keys)  # (Q, S)
        memory_vote = attention_log_probs(scores, support_slots, self.max_way)  # (Q, max_way): log sum_i a_i [slot_i = k]
        return (memory_vote + self.readout(query_h))[:, slots]  # (Q, N): the slots of labels 0..N-1


__all__ = ["MANN", "shifted_labels"]
