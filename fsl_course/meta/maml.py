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

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fsl_course.meta.backbones import Conv4
from fsl_course.meta.base import FewShotLearner, register_learner, validate_episode

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


# --------------------------------------------------------------------------- few-shot learners on the core


class MAMLClassifier(FewShotLearner):
    r"""The Conv-4 classifier that MAML, first-order MAML and Reptile meta-learn: ``f_theta(x) = W g(x) + b``.

    **Normalisation.** GroupNorm (8 groups) after every convolution: each image is normalised on its own,
    the same in training and at test time, so the learner is non-transductive and batching tasks changes
    nothing. (Finn et al. used batch norm with the statistics of the current batch at test time too,
    which is transductive: a query's prediction then depends on the other queries.)

    **Head.** One shared row ``w`` ``(1, D)`` and bias ``b`` ``(1,)`` is copied for each of the episode's
    ``N`` classes before the inner loop (Ye & Chao 2022, arXiv:2106.16245): the classes start equal, the
    inner loop tells them apart, the learner is invariant to the order of the labels, and one learner
    solves episodes of any ``N`` (train 5-way, test 20-way). The meta-gradient of ``w`` is the sum over
    the copies.

    **Test time.** ``predict`` adapts to the support set with ``test_inner_steps`` steps (default: as many as
    in training; gradients are computed even inside ``torch.no_grad()``) and answers the queries with the
    adapted parameters. More steps than the meta-training used can hurt: the initialisation is learned for
    ``inner_steps`` steps of size ``inner_lr``, and with ``inner_lr = 0.4`` a second step overshoots (a
    1-step MAML measured 80% with 1 test step and 21% with 3, on 10 5-way 1-shot test episodes; lesson 10).
    """

    first_order: ClassVar[bool] = False

    def __init__(self, hidden: int = 64, inner_lr: float = 0.4, inner_steps: int = 1, test_inner_steps: int | None = None,
                 vectorise: bool | None = None):
        super().__init__(hidden=hidden, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         vectorise=vectorise)
        for name, value in (("inner_steps", inner_steps), ("test_inner_steps", test_inner_steps)):
            if value is None and name == "test_inner_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.inner_lr, self.inner_steps, self.vectorise = inner_lr, inner_steps, vectorise
        self.test_inner_steps = inner_steps if test_inner_steps is None else test_inner_steps
        self.backbone = Conv4(hidden=hidden, norm="group")
        self.head = nn.Linear(self.backbone.feature_dim(), 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W) -> (B, N)``: ``N`` is the number of rows of the head in use (1 for the module's own)."""
        return self.head(self.backbone(x))

    def initial_params(self, n_way: int) -> Params:
        """``theta`` for an ``n_way`` episode: the module's parameters with the head row copied ``n_way`` times
        (``head.weight`` ``(N, D)``, ``head.bias`` ``(N,)``; views, so gradients flow back to the shared row)."""
        params = parameters_of(self)
        params["head.weight"] = params["head.weight"].expand(n_way, -1)
        params["head.bias"] = params["head.bias"].expand(n_way)
        return params

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, n_way: int, steps: int, first_order: bool) -> Params:
        """``theta' = U_steps(theta; S)`` (:func:`inner_adapt`) from :meth:`initial_params`."""
        with torch.enable_grad():
            return inner_adapt(self, self.initial_params(n_way), support_x, support_y, steps=steps,
                               inner_lr=self.inner_lr, first_order=first_order)

    def episode_logits(self, support_x, support_y, query_x, n_way):
        if self.training:  # the meta-training objective: differentiate through the inner loop
            adapted = self.adapt(support_x, support_y, n_way, self.inner_steps, self.first_order)
        else:  # test time: adapt (no meta-gradient needed) and answer
            adapted = {k: v.detach() for k, v in self.adapt(support_x, support_y, n_way, self.test_inner_steps, True).items()}
        return functional_call(self, adapted, (query_x,))

    def batch_loss(self, episodes) -> torch.Tensor:
        """Mean meta-loss over a meta-batch. ``vectorise`` (None: on a GPU only) runs the tasks in one
        ``torch.func.vmap`` call instead of a Python loop (``benchmarks/maml_speed.py``: on a 2-core CPU
        the loop is faster, 9.2 against 5.1 tasks/s second order). vmap needs episodes of one shape."""
        vectorise = self.vectorise if self.vectorise is not None else next(self.parameters()).device.type == "cuda"
        if not vectorise or len(episodes) == 1:
            return super().batch_loss(episodes)
        n_way = validate_episode(episodes[0].support_x, episodes[0].support_y, episodes[0].query_x)
        # NCHW parameter tensors: vmap has no batching rule for channels-last convolution weights
        params = {k: v.contiguous() for k, v in self.initial_params(n_way).items()}
        stack = lambda key: torch.stack([getattr(e, key) for e in episodes])  # noqa: E731

        def one_task(sx, sy, qx, qy):
            return maml_loss(self, params, sx, sy, qx, qy, steps=self.inner_steps, inner_lr=self.inner_lr,
                             first_order=self.first_order)

        return vmap(one_task)(stack("support_x"), stack("support_y"), stack("query_x"), stack("query_y")).mean()


@register_learner("maml")
class MAML(MAMLClassifier):
    """Second-order MAML (Finn et al. 2017): the meta-gradient includes ``-alpha H_S`` through every inner step."""


@register_learner("fomaml")
class FirstOrderMAML(MAMLClassifier):
    """First-order MAML: the inner gradients are constants, the meta-gradient is ``grad L_Q(theta')``."""

    first_order = True


@register_learner("reptile")
class Reptile(MAMLClassifier):
    r"""Reptile (Nichol et al. 2018): adapt to the task with ``inner_steps`` first-order steps on its support
    *and* query images, then move towards the result, ``theta <- theta + epsilon (theta' - theta)``.

    :meth:`loss` returns the surrogate ``(1/2) ||theta - stopgrad(theta')||^2``, whose gradient is
    ``theta - theta'``: one SGD step of size ``epsilon`` on it is exactly Reptile's update
    (:func:`reptile_update`), and a meta-batch averages the tasks' ``theta'`` (the paper's batched
    version). The shared head row moves towards the mean of its adapted copies. The optimiser is plain SGD.
    """

    first_order = True

    def __init__(self, hidden: int = 64, inner_lr: float = 0.1, inner_steps: int = 5, test_inner_steps: int | None = None,
                 vectorise: bool | None = None):
        super().__init__(hidden=hidden, inner_lr=inner_lr, inner_steps=inner_steps, test_inner_steps=test_inner_steps,
                         vectorise=vectorise)

    batch_loss = FewShotLearner.batch_loss  # tasks one by one: nothing to differentiate through

    def loss(self, support_x, support_y, query_x, query_y):
        n_way = validate_episode(support_x, support_y, query_x)
        x, y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        adapted = self.adapt(x, y, n_way, self.inner_steps, True)
        surrogate = 0
        for name, theta in parameters_of(self).items():
            target = adapted[name].detach()
            if target.shape != theta.shape:  # the head: N adapted copies of the shared row
                target = target.mean(0, keepdim=True) if theta.ndim == 2 else target.mean().reshape(1)
            surrogate = surrogate + 0.5 * (theta - target).pow(2).sum()
        return surrogate

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Plain SGD: a step of size ``epsilon = lr`` on the surrogate is Reptile's interpolation."""
        return torch.optim.SGD(self.parameters(), lr=lr)


__all__ = ["MAML", "FirstOrderMAML", "MAMLClassifier", "Params", "Reptile", "inner_adapt", "maml_loss", "parameters_of",
           "reptile_update", "task_loss"]
