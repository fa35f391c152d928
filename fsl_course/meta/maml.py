r"""MAML and Reptile on one functional core (``torch.func``).

The bi-level objective (Finn, Abbeel & Levine 2017, *Model-Agnostic Meta-Learning*, arXiv:1703.03400):
for tasks ``T_i`` with a support set ``S_i`` and a query set ``Q_i``,

    min_theta  sum_i L_{Q_i}(theta'_i),      theta'_i = U_k(theta; S_i),
    U: theta <- theta - alpha grad L_{S_i}(theta), repeated k times (the inner loop, :func:`inner_adapt`).

The meta-gradient of one task with one inner step is, by the chain rule,

    d L_Q(theta') / d theta = (I - alpha H_S(theta)) grad L_Q(theta'),      H_S = Hessian of L_S at theta,

so second-order MAML needs a Hessian-vector product (autograd computes it by differentiating
through the inner step, ``first_order=False``), and **first-order MAML** drops the ``alpha H_S``
term: the gradient of each inner step is treated as a constant (``first_order=True``), giving
``grad L_Q(theta')``. **Reptile** (Nichol, Achiam & Schulman 2018, arXiv:1803.02999) needs no
meta-gradient at all: run the inner loop and move towards its result,
``theta <- theta + epsilon (theta'_i - theta)`` (:func:`reptile_update`).

Everything works on a dict of parameters ``{name: tensor}`` run through
``torch.func.functional_call(model, params, x)``, so the same model serves every task, tasks can be
batched with ``torch.func.vmap``, and the pre-trained module's own parameters are never modified.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

Params = dict[str, torch.Tensor]


def parameters_of(model: nn.Module) -> Params:
    """The model's trainable parameters as a dict ``{name: tensor}`` (the tensors themselves, so a
    loss on them back-propagates into the module's parameters)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def task_loss(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> torch.Tensor:
    """``loss_fn(f_params(x), y)``: the model run with ``params`` in place of its own (``functional_call``)."""
    return loss_fn(functional_call(model, params, (x,)), y)


def inner_adapt(
    model: nn.Module,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    steps: int = 1,
    inner_lr: float = 0.4,
    first_order: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Params:
    """The inner loop ``theta' = U_k(theta; S)``: ``steps`` gradient steps of size ``inner_lr`` on the support loss,

        theta_{j+1} = theta_j - alpha grad_theta L_S(theta_j),      L_S(theta) = loss_fn(f_theta(support_x), support_y).

    Second order by default: the returned tensors are differentiable functions of ``params``
    (through the gradients), so a query loss on them back-propagates the full meta-gradient
    ``(I - alpha H_S) grad L_Q`` per step. ``first_order=True`` detaches each inner gradient
    (first-order MAML; Reptile uses the same loop). ``params``: ``{name: tensor}`` as from
    :func:`parameters_of`; returns a new dict, ``params`` is not changed.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: tensor}, e.g. parameters_of(model)")

    def support_loss(p: Params) -> torch.Tensor:
        return task_loss(model, p, support_x, support_y, loss_fn)

    adapted = dict(params)
    for _ in range(steps):
        grads = grad(support_loss)(adapted)
        adapted = {name: value - inner_lr * (grads[name].detach() if first_order else grads[name])
                   for name, value in adapted.items()}
    return adapted


def maml_loss(
    model: nn.Module,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    query_y: torch.Tensor,
    *,
    steps: int = 1,
    inner_lr: float = 0.4,
    first_order: bool = False,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """One task's meta-loss ``L_Q(U_k(theta; S))``; its gradient with respect to ``params`` is the
    MAML meta-gradient (second order, or first order with ``first_order=True``)."""
    adapted = inner_adapt(model, params, support_x, support_y, steps=steps, inner_lr=inner_lr,
                          first_order=first_order, loss_fn=loss_fn)
    return task_loss(model, adapted, query_x, query_y, loss_fn)


@torch.no_grad()
def reptile_update(params: Params, adapted: Params, epsilon: float) -> Params:
    """Reptile's outer step ``theta <- theta + epsilon (theta' - theta)``, in place on ``params`` (the
    module's parameters), returned for convenience. ``adapted``: :func:`inner_adapt` of the task (any order)."""
    if set(adapted) != set(params):
        raise ValueError("adapted must hold the same parameter names as params")
    for name, value in params.items():
        value.add_(epsilon * (adapted[name].detach() - value))
    return params


__all__ = ["Params", "inner_adapt", "maml_loss", "parameters_of", "reptile_update", "task_loss"]
