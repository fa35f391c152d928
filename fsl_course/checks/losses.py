"""Helpers shared by the visible checks of exercises on losses (``ex04``, ``ex05``): scalar-loss
tests, short descriptions of a returned value, and gradients of a loss with respect to its inputs."""

from __future__ import annotations

import math

import torch

LOG_2 = math.log(2.0)


def softplus(x: float) -> float:
    """``log(1 + e^x)`` for a Python float, without overflow."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def is_scalar(value) -> bool:
    """Whether ``value`` is a 0-dim tensor."""
    return isinstance(value, torch.Tensor) and value.ndim == 0


def shape_of(value) -> str:
    """``(2, 3)`` for a tensor, else the type's name: for messages."""
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def near(value, target: float, tol: float = 1e-5) -> bool:
    """``value`` is a finite floating-point scalar tensor within ``tol * max(1, |target|)`` of ``target``."""
    return (is_scalar(value) and value.is_floating_point() and bool(torch.isfinite(value))
            and abs(value.item() - target) <= tol * max(1.0, abs(target)))


def show(value) -> str:
    """A scalar's value, else its shape or type: for messages."""
    return f"{value.item():.6g}" if is_scalar(value) else shape_of(value)


def gradients(loss_fn, *inputs: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of ``loss_fn(*inputs)`` with respect to each input (copies that require grad);
    ``None`` for each when the loss is not a differentiable scalar (or does not use that input)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*leaves)
    if not is_scalar(loss) or not loss.requires_grad:
        return [None] * len(leaves)
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))
