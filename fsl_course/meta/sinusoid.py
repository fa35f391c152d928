r"""Sinusoid regression, the toy problem of MAML (Finn et al. 2017, section 5.1).

A task is a sine wave ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``phi ~ U[0, pi]``; inputs ``x ~ U[-5, 5]``. A learner sees ``K`` points of a new wave (the support
set) and must predict the whole curve. The model is the paper's MLP ``1 -> 40 -> 40 -> 1`` with ReLUs;
the loss is the mean squared error. The waves differ so much that their average says little: with
``phi ~ U[0, pi]``, ``E[y | x] = E[A] E[sin(x - phi)] = -(2 / pi) E[A] cos x ~ -1.62 cos x``, and a network
pre-trained on all waves at once learns about that curve (mean squared error about 3 on a new wave),
while MAML learns an initialisation from which one gradient step on ``K`` points fits the new wave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


@dataclass
class SinusoidTasks:
    """A batch of sine-wave regression tasks.

    Attributes:
        amplitude, phase: ``(B,)`` the waves' ``A`` and ``phi``.
        support_x, support_y: ``(B, K, 1)`` the ``K`` observed points of each wave.
        query_x, query_y: ``(B, Q, 1)`` held-out points of the same waves.
    """

    amplitude: torch.Tensor
    phase: torch.Tensor
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def curve(self, x: torch.Tensor) -> torch.Tensor:
        """The true waves at ``x`` ``(M, 1)``: ``(B, M, 1)``."""
        return self.amplitude[:, None, None] * torch.sin(x[None] - self.phase[:, None, None])


def sample_sinusoid_tasks(n_tasks: int, shot: int = 10, query: int = 10, generator: torch.Generator | None = None) -> SinusoidTasks:
    """``n_tasks`` waves, each with ``shot`` support and ``query`` query points (all drawn independently)."""
    if n_tasks < 1 or shot < 1 or query < 0:
        raise ValueError(f"need n_tasks >= 1, shot >= 1, query >= 0, got {n_tasks}, {shot}, {query}")
    amplitude = torch.empty(n_tasks).uniform_(*AMPLITUDE, generator=generator)
    phase = torch.empty(n_tasks).uniform_(*PHASE, generator=generator)
    x = torch.empty(n_tasks, shot + query, 1).uniform_(*X_RANGE, generator=generator)
    y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
    return SinusoidTasks(amplitude, phase, x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:])


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    """Finn et al.'s regressor: ``(B, 1) -> (B, 1)``, ``Linear(1, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, 1)``."""
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


__all__ = ["SinusoidTasks", "sample_sinusoid_tasks", "sinusoid_mlp"]
