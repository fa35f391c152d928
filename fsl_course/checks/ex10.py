r"""Visible checks of exercise 10 (optimisation-based meta-learning): the MAML inner loop (second and
first order), the MAML loss of a meta-batch, and Reptile's update.

The expected values are worked out by hand or from the stated formulas, so the checks do not
depend on the package's reference implementations (:mod:`fsl_course.meta.maml`):

* a linear model ``f(x) = w x + b`` (an ``nn.Linear(1, 1)``) with the mean squared error, whose
  gradient and Hessian are in closed form,

      L(w, b) = mean_i r_i^2,  r_i = w x_i + b - y_i,   grad L = 2 mean_i r_i (x_i, 1),
      H = 2 [[mean x^2, mean x], [mean x, 1]]           (the same at every (w, b)),

  so ``k`` inner steps and the meta-gradient of a query loss are known exactly: second order
  ``(I - alpha H_S)^k grad L_Q(theta_k)``, first order ``grad L_Q(theta_k)``. With ``theta = (w, b) = (1, 0)``,
  the support set ``x = (1, 2), y = (3, 5)``, the query set ``x = (0, 3), y = (1, 4)`` and ``alpha = 0.1``:
  ``grad L_S(theta) = (-8, -5)``, one step gives ``theta' = (1.8, 0.5)``, two give ``(2.05, 0.66)``;
  ``H_S = [[5, 3], [3, 2]]``, ``I - alpha H_S = [[0.5, -0.3], [-0.3, 0.8]]``, ``grad L_Q(theta') = (5.7, 1.4)``
  (the first-order meta-gradient) and the second-order one is ``(0.5 * 5.7 - 0.3 * 1.4, -0.3 * 5.7 + 0.8 * 1.4)
  = (2.43, -0.59)``. The L1 loss ``mean |r|`` (gradient ``mean sign(r) (x, 1)``) checks that ``loss_fn`` is used:
  one step gives ``(1.15, 0.1)``. The module's own weights are ``(-3, 7)``, so that running ``model(x)`` instead
  of the model with the dict's parameters gives other numbers;
* a second task for the meta-batch, support ``x = (-1, 1), y = (0, 2)`` and query ``x = (2, -2), y = (2, 0)``:
  ``theta' = (1, 0.2)``, query loss 1.64 (the first task's is 1.93), so the meta-batch's MAML loss is the mean 1.785
  (the sum would be 3.57, the query losses at ``theta`` 1.5, the support losses at ``theta'`` 0.645);
* the meta-gradient on a small ``tanh`` network against central finite differences of ``theta -> L_Q(U(theta))``;
* Reptile's update on hand numbers: ``theta = (1, 0)``, ``theta' = (1.8, 0.5)``, ``epsilon = 0.25`` gives ``(1.2, 0.125)``.

Part B is checked on its own: while its check runs, the name ``inner_adapt`` that the learner's
``maml_meta_loss`` looks up in its notebook is bound to a right answer for Part A
(:func:`inner_adapt_of_part_a`), and restored afterwards, so a mistake in Part A fails only Part A.
The hidden tests do the same.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fsl_course.checks import (
    bound_in_globals_of,
    close64,
    first_line as _first_line,
    fmt_values as _fmt,
    visible_check,
)

F64 = torch.float64
HAND_THETA = (1.0, 0.0)  # (w, b) of the parameters passed in
MODEL_OWN = (-3.0, 7.0)  # the module's own (w, b): another point, so that model(x) gives other numbers
SUPPORT = ((1.0, 2.0), (3.0, 5.0))  # (x, y) of task 1
QUERY = ((0.0, 3.0), (1.0, 4.0))
SUPPORT_2 = ((-1.0, 1.0), (0.0, 2.0))  # task 2
QUERY_2 = ((2.0, -2.0), (2.0, 0.0))
ALPHA = 0.1
EPSILON = 0.25


# --------------------------------------------------------------------------- the right answer for Part A


def inner_adapt_of_part_a(model, params, support_x, support_y, steps=1, inner_lr=0.01, first_order=False,
                          loss_fn=F.mse_loss):
    """Part A's answer, with the exercise's signature: what Part B is checked (and graded) with."""
    def support_loss(p):
        return loss_fn(functional_call(model, p, (support_x,)), support_y)

    adapted = dict(params)
    for _ in range(steps):
        grads = grad(support_loss)(adapted)
        adapted = {name: value - inner_lr * (grads[name].detach() if first_order else grads[name])
                   for name, value in adapted.items()}
    return adapted


# --------------------------------------------------------------------------- the linear model by hand


def _rng_neutral(check):
    """Run ``check`` with torch's global random state saved and restored (the models it builds draw their
    initial weights from the global generator)."""

    @functools.wraps(check)
    def run(function, expect):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(101)
            return check(function, expect)

    return run


def hand_model(dtype=F64) -> nn.Linear:
    """``nn.Linear(1, 1)`` with its own (w, b) = (-3, 7) (not the parameters the checks pass in)."""
    model = nn.Linear(1, 1).to(dtype)
    with torch.no_grad():
        model.weight.fill_(MODEL_OWN[0])
        model.bias.fill_(MODEL_OWN[1])
    return model


def hand_params(theta=HAND_THETA, dtype=F64) -> dict:
    """``{"weight": (1, 1), "bias": (1,)}``: fresh leaf tensors that require grad, at ``theta = (w, b)``."""
    return {"weight": torch.tensor([[theta[0]]], dtype=dtype, requires_grad=True),
            "bias": torch.tensor([theta[1]], dtype=dtype, requires_grad=True)}


def hand_data(points, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as ``(n, 1)`` tensors."""
    x, y = points
    return torch.tensor(x, dtype=dtype)[:, None], torch.tensor(y, dtype=dtype)[:, None]


def _theta(params) -> torch.Tensor:
    """``(w, b)`` of a dict of the linear model, float64, detached."""
    return torch.stack([params["weight"].detach().reshape(()), params["bias"].detach().reshape(())]).to("cpu", F64)


def _linear_grad(theta: torch.Tensor, points, loss: str = "mse") -> torch.Tensor:
    """The closed-form gradient of the linear model's loss at ``theta = (w, b)``."""
    x, y = (torch.tensor(v, dtype=F64) for v in points)
    r = theta[0] * x + theta[1] - y
    if loss == "l1":
        return torch.stack([(r.sign() * x).mean(), r.sign().mean()])
    return torch.stack([2 * (r * x).mean(), 2 * r.mean()])


def _linear_hessian(points) -> torch.Tensor:
    x = torch.tensor(points[0], dtype=F64)
    return 2 * torch.stack([torch.stack([(x * x).mean(), x.mean()]), torch.stack([x.mean(), torch.ones((), dtype=F64)])])


def _linear_steps(points, steps: int, alpha: float = ALPHA, loss: str = "mse", theta=HAND_THETA) -> torch.Tensor:
    theta = torch.tensor(theta, dtype=F64)
    for _ in range(steps):
        theta = theta - alpha * _linear_grad(theta, points, loss)
    return theta


def _linear_meta_grad(support, query, steps: int, first_order: bool, alpha: float = ALPHA) -> torch.Tensor:
    """``(I - alpha H_S)^steps grad L_Q(theta_steps)`` (second order) or ``grad L_Q(theta_steps)`` (first order)."""
    g = _linear_grad(_linear_steps(support, steps, alpha), query)
    if not first_order:
        m = torch.eye(2, dtype=F64) - alpha * _linear_hessian(support)
        for _ in range(steps):
            g = m @ g
    return g


def _linear_loss(theta: torch.Tensor, points) -> float:
    x, y = (torch.tensor(v, dtype=F64) for v in points)
    return float(((theta[0] * x + theta[1] - y) ** 2).mean())


def _same_entries(params, entries: dict) -> bool:
    """``params`` is a dict that holds exactly the tensors of ``entries`` (the same objects)."""
    return (isinstance(params, dict) and len(params) == len(entries)
            and all(params.get(name) is value for name, value in entries.items()))


def _rounded(values: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values.tolist()) + ")"


def _near(theta: torch.Tensor, *values) -> bool:
    return bool(torch.allclose(theta, torch.tensor(values, dtype=F64), rtol=1e-6, atol=1e-8))


def _call(expect, what: str, part: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``; a RuntimeError that a typical mistake causes fails the check with a hint."""
    try:
        return function(*args, **kwargs)
    except RuntimeError as err:
        text = str(err)
        if "in-place operation" in text or "view of a leaf Variable" in text:
            hint = ("change the parameters in place under torch.no_grad(): with torch.no_grad(): value.add_(...)"
                    if part == "C" else "do not change the tensors in place (no -=, sub_, add_): build a new dict "
                    "each step, {name: value - inner_lr * grads[name] for ...}, so that params stays as it was")
        elif "not have been used in the graph" in text or "does not require grad" in text:
            hint = ("the loss must be computed from the dict's tensors: run the model with them, "
                    "functional_call(model, params, (x,)), not model(x) (which uses the module's own weights)")
        else:
            raise
        expect(False, f"{what} raised {_first_line(err).rstrip('.')}. hint: {hint}")


def _meta_gradient(expect, what: str, adapted: dict, params: dict, model, query_x, query_y, hint_none: str):
    """``d L_Q(adapted) / d params`` (a tuple of tensors, None where ``params`` does not reach the loss)."""
    try:
        loss = F.mse_loss(functional_call(model, adapted, (query_x,)), query_y)
    except Exception as err:  # a dict that the model cannot run with
        expect(False, f"{what}: running the model with the returned dict raised {_first_line(err)}")
    expect(loss.requires_grad, f"{what}: the query loss at the returned parameters does not depend on params at all. "
                               f"hint: {hint_none}")
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    expect(all(g is not None for g in grads), f"{what}: the query loss at the returned parameters does not depend on "
                                              f"params. hint: {hint_none}")
    return torch.stack([g.reshape(()) for g in grads]).to("cpu", F64)


def tiny_problem(kind: str = "regressor", seed: int = 0, dtype=F64, shot: int = 6, query: int = 8):
    """A small random problem for the checks and the hidden tests: ``(model, params, sx, sy, qx, qy, loss_fn)``.

    ``kind``: ``"regressor"`` (``1 -> 5 -> 1`` tanh net, MSE, targets ``sin(x)``) or ``"classifier"``
    (``3 -> 4 -> 2`` tanh net, cross-entropy). ``params`` is a random point other than the module's own weights:
    fresh leaf tensors that require grad."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "classifier":
            model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
            sx, qx = torch.randn(shot, 3, generator=g, dtype=dtype), torch.randn(query, 3, generator=g, dtype=dtype)
            sy, qy = torch.randint(2, (shot,), generator=g), torch.randint(2, (query,), generator=g)
            loss_fn = F.cross_entropy
        else:
            model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)
            sx = torch.empty(shot, 1, dtype=dtype).uniform_(-2, 2, generator=g)
            qx = torch.empty(query, 1, dtype=dtype).uniform_(-2, 2, generator=g)
            sy, qy = torch.sin(2 * sx), torch.sin(2 * qx)
            loss_fn = F.mse_loss
    params = {name: (0.8 * torch.randn(p.shape, generator=g, dtype=dtype)).requires_grad_(True)
              for name, p in model.named_parameters()}
    return model, params, sx, sy, qx, qy, loss_fn


def tiny_tasks(kind: str = "regressor", n_tasks: int = 3, seed: int = 0, dtype=F64, shot: int = 5, query: int = 7) -> list:
    """``n_tasks`` tasks ``(support_x, support_y, query_x, query_y)`` of the kind of :func:`tiny_problem`: regression
    targets ``a sin(2 x + c)`` with a random amplitude and phase per task, or random binary labels."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n_tasks):
        if kind == "classifier":
            sx, qx = torch.randn(shot, 3, generator=g, dtype=dtype), torch.randn(query, 3, generator=g, dtype=dtype)
            sy, qy = torch.randint(2, (shot,), generator=g), torch.randint(2, (query,), generator=g)
        else:
            a, c = 0.5 + torch.rand((), generator=g, dtype=dtype), 3 * torch.rand((), generator=g, dtype=dtype)
            sx = torch.empty(shot, 1, dtype=dtype).uniform_(-2, 2, generator=g)
            qx = torch.empty(query, 1, dtype=dtype).uniform_(-2, 2, generator=g)
            sy, qy = a * torch.sin(2 * sx + c), a * torch.sin(2 * qx + c)
        tasks.append((sx, sy, qx, qy))
    return tasks


# --------------------------------------------------------------------------- Part A


@visible_check
@_rng_neutral
def inner_adapt(inner_adapt, expect):
    model, params = hand_model(), hand_params()
    sx, sy = hand_data(SUPPORT)
    qx, qy = hand_data(QUERY)
    entries = dict(params)
    what = "one step (steps=1, inner_lr=0.1) from (w, b) = (1, 0) on the support set x = (1, 2), y = (3, 5)"
    out = _call(expect, what, "A", inner_adapt, model, params, sx, sy, steps=1, inner_lr=ALPHA, first_order=False,
                loss_fn=F.mse_loss)
    expect(isinstance(out, dict) and set(out) == {"weight", "bias"},
           f"{what}: returns a dict with the names of params, 'weight' and 'bias', got "
           f"{sorted(out) if isinstance(out, dict) else type(out).__name__}. hint: adapted = dict(params), then "
           "{name: value - inner_lr * grads[name] for name, value in adapted.items()} per step")
    shapes = {name: tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__ for name, value in out.items()}
    expect(shapes == {"weight": (1, 1), "bias": (1,)},
           f"{what}: each tensor keeps its shape, weight (1, 1) and bias (1,), got {shapes}")
    got = _theta(out)
    hint = ("theta' = theta - inner_lr * grad L_S(theta); grad L_S = 2 mean r (x, 1) = (-8, -5) with the residuals "
            "r = w x + b - y = (-2, -3)")
    if _near(got, 0.2, -0.5):
        hint = "step against the gradient: theta - inner_lr * grad, not theta + inner_lr * grad"
    elif _near(got, *HAND_THETA):
        hint = ("nothing moved: the gradient was zero or not applied. Run the model with the dict's tensors, "
                "functional_call(model, adapted, (support_x,)), not model(support_x)")
    elif _near(got, 9.0, 5.0):
        hint = "multiply the gradient by inner_lr"
    elif _near(got, 1.08, 0.05):
        hint = "use the inner_lr you are given (0.1 here), not a fixed value"
    elif _near(got, *(torch.tensor(MODEL_OWN, dtype=F64) - ALPHA * _linear_grad(torch.tensor(MODEL_OWN, dtype=F64), SUPPORT)).tolist()):
        hint = "start from params, not from the module's own weights: run the model with functional_call(model, params, (x,))"
    expect(_near(got, 1.8, 0.5), f"{what}: (w', b') = (1.8, 0.5), got {_rounded(got)}. hint: {hint}")
    expect(_same_entries(params, entries) and _near(_theta(params), *HAND_THETA),
           "inner_adapt must not change params: the dict holds the same tensors with the same values afterwards. hint: "
           "adapted = dict(params) and a new dict per step; no params[name] = ..., no in-place -=")
    expect(_near(_theta({"weight": model.weight, "bias": model.bias}), *MODEL_OWN),
           "inner_adapt leaves the module's own weights as they were (no optimizer, no in-place update)")

    what = "two steps (steps=2, inner_lr=0.1)"
    two = _call(expect, what, "A", inner_adapt, model, hand_params(), sx, sy, steps=2, inner_lr=ALPHA, first_order=False,
                loss_fn=F.mse_loss)
    got = _theta(two)
    hint = "repeat the step `steps` times, each gradient taken at the current adapted parameters"
    if _near(got, 1.8, 0.5):
        hint = "you took one step; do `steps` of them: for _ in range(steps): ..."
    elif _near(got, 2.6, 1.0):
        hint = "take each step's gradient at the current adapted parameters theta_j, not at params every time"
    expect(_near(got, 2.05, 0.66),
           f"{what}: theta_1 = (1.8, 0.5), grad L_S(theta_1) = (-2.5, -1.6), so theta_2 = (2.05, 0.66), got "
           f"{_rounded(got)}. hint: {hint}")
    zero = _call(expect, "steps=0", "A", inner_adapt, model, hand_params(), sx, sy, steps=0, inner_lr=ALPHA,
                 first_order=False, loss_fn=F.mse_loss)
    expect(isinstance(zero, dict) and set(zero) == {"weight", "bias"} and _near(_theta(zero), *HAND_THETA),
           "steps=0 gives params' values back, (1, 0). hint: for _ in range(steps), no step before the loop")

    what = "one step with loss_fn = the L1 loss mean |r|"
    l1 = _call(expect, what, "A", inner_adapt, model, hand_params(), sx, sy, steps=1, inner_lr=ALPHA, first_order=False,
               loss_fn=F.l1_loss)
    got = _theta(l1)
    expect(_near(got, 1.15, 0.1),
           f"{what}: its gradient is mean sign(r) (x, 1) = (-1.5, -1), so (1.15, 0.1), got {_rounded(got)}. hint: "
           + ("use the loss_fn you are given, not F.mse_loss" if _near(got, 1.8, 0.5) else
              "the support loss is loss_fn(prediction, support_y)"))

    # the meta-gradient, second order: (I - alpha H_S) grad L_Q(theta')
    params = hand_params()
    what = "second order (first_order=False), one step"
    adapted = _call(expect, what, "A", inner_adapt, model, params, sx, sy, steps=1, inner_lr=ALPHA, first_order=False,
                    loss_fn=F.mse_loss)
    none_hint = ("theta' = theta - inner_lr * g must be computed from the tensors of params (no .detach() of them, no "
                 "new leaf tensors), so that L_Q(theta') back-propagates to params")
    meta = _meta_gradient(expect, what, adapted, params, model, qx, qy, none_hint)
    so, fo = _linear_meta_grad(SUPPORT, QUERY, 1, False), _linear_meta_grad(SUPPORT, QUERY, 1, True)
    hint = "differentiate through the inner step: d theta' / d theta = I - alpha H_S"
    if torch.allclose(meta, fo, rtol=1e-6, atol=1e-8):
        hint = ("that is the first-order gradient: with first_order=False keep the inner gradient in the graph "
                "(torch.func.grad does; torch.autograd.grad needs create_graph=True) and do not .detach() it, so that "
                "back-propagation through theta - alpha grad L_S(theta) gives the Hessian term - alpha H_S grad L_Q")
    expect(torch.allclose(meta, so, rtol=1e-6, atol=1e-8),
           f"{what}: with H_S = [[5, 3], [3, 2]] and grad L_Q(theta') = (5.7, 1.4), the meta-gradient "
           f"d L_Q(theta') / d(w, b) = (I - 0.1 H_S) (5.7, 1.4) = (2.43, -0.59), got {_rounded(meta)}. hint: {hint}")

    params = hand_params()
    what = "first order (first_order=True), one step"
    adapted = _call(expect, what, "A", inner_adapt, model, params, sx, sy, steps=1, inner_lr=ALPHA, first_order=True,
                    loss_fn=F.mse_loss)
    expect(_near(_theta(adapted), 1.8, 0.5), f"{what}: the same step, (1.8, 0.5), got {_rounded(_theta(adapted))}")
    none_hint = ("first order still back-propagates through theta' = theta - alpha * stopgrad(g), with d theta'/d theta "
                 "= I: detach only the inner gradient, not theta or theta'")
    meta = _meta_gradient(expect, what, adapted, params, model, qx, qy, none_hint)
    hint = "treat the inner gradient as a constant: grads[name].detach() (or torch.autograd.grad without create_graph)"
    if torch.allclose(meta, so, rtol=1e-6, atol=1e-8):
        hint = ("that is the second-order gradient: with first_order=True detach the inner gradient, "
                "value - inner_lr * grads[name].detach()")
    expect(torch.allclose(meta, fo, rtol=1e-6, atol=1e-8),
           f"{what}: the inner gradient is a constant, so the meta-gradient is grad L_Q(theta') = (5.7, 1.4), got "
           f"{_rounded(meta)}. hint: {hint}")

    params = hand_params()
    what = "second order, two steps"
    adapted = _call(expect, what, "A", inner_adapt, model, params, sx, sy, steps=2, inner_lr=ALPHA, first_order=False,
                    loss_fn=F.mse_loss)
    meta = _meta_gradient(expect, what, adapted, params, model, qx, qy, "keep both steps in the graph")
    want = _linear_meta_grad(SUPPORT, QUERY, 2, False)
    expect(torch.allclose(meta, want, rtol=1e-6, atol=1e-8),
           f"{what}: (I - 0.1 H_S)^2 grad L_Q(theta_2) = {_rounded(want)}, got {_rounded(meta)}. hint: keep the graph "
           "through every step (the first_order flag applies to each step's gradient)")

    # a nonlinear network: the meta-gradient against central finite differences of theta -> L_Q(U(theta))
    model, params, sx, sy, qx, qy, loss_fn = tiny_problem("regressor", seed=102, shot=5, query=5)
    names = list(params)
    flat = torch.cat([params[name].detach().reshape(-1) for name in names])

    def unflat(vector):
        out, i = {}, 0
        for name in names:
            n = params[name].numel()
            out[name] = vector[i:i + n].view_as(params[name]).clone().requires_grad_(True)
            i += n
        return out

    what = "on a 1-5-1 tanh network (float64), two second-order steps with inner_lr=0.3"
    adapted = _call(expect, what, "A", inner_adapt, model, params, sx, sy, steps=2, inner_lr=0.3, first_order=False,
                    loss_fn=loss_fn)
    query_loss = loss_fn(functional_call(model, adapted, (qx,)), qy)
    analytic = torch.cat([g.reshape(-1) for g in torch.autograd.grad(query_loss, [params[n] for n in names])])
    h, numeric = 1e-6, torch.empty_like(flat)
    for i in range(len(flat)):
        e = torch.zeros_like(flat)
        e[i] = h
        up = loss_fn(functional_call(model, inner_adapt(model, unflat(flat + e), sx, sy, steps=2, inner_lr=0.3,
                                                        first_order=False, loss_fn=loss_fn), (qx,)), qy)
        down = loss_fn(functional_call(model, inner_adapt(model, unflat(flat - e), sx, sy, steps=2, inner_lr=0.3,
                                                          first_order=False, loss_fn=loss_fn), (qx,)), qy)
        numeric[i] = (up.detach() - down.detach()) / (2 * h)
    error = ((analytic - numeric).norm() / numeric.norm()).item()
    expect(error < 1e-6, f"{what}: the meta-gradient matches central finite differences of theta -> L_Q(U(theta)) "
                         f"(relative error {error:.1e}). hint: differentiate through every inner step")
    params = unflat(flat)
    adapted = inner_adapt(model, params, sx, sy, steps=2, inner_lr=0.3, first_order=True, loss_fn=loss_fn)
    meta = torch.autograd.grad(loss_fn(functional_call(model, adapted, (qx,)), qy), [params[n] for n in names])
    at = {name: adapted[name].detach().clone().requires_grad_(True) for name in names}
    want = torch.autograd.grad(loss_fn(functional_call(model, at, (qx,)), qy), [at[n] for n in names])
    expect(all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(meta, want)),
           "on the same network with first_order=True: the meta-gradient is grad L_Q at theta' (the inner gradients "
           "are constants)")
    expect(all(value.dtype == F64 for value in adapted.values()),
           "float64 parameters give float64 adapted parameters")


# --------------------------------------------------------------------------- Part B


def _hand_tasks(dtype=F64) -> list:
    return [(*hand_data(SUPPORT, dtype), *hand_data(QUERY, dtype)), (*hand_data(SUPPORT_2, dtype), *hand_data(QUERY_2, dtype))]


@visible_check
@_rng_neutral
def maml_meta_loss(maml_meta_loss, expect):
    with bound_in_globals_of(maml_meta_loss, {"inner_adapt": inner_adapt_of_part_a}):
        _check_maml_meta_loss(maml_meta_loss, expect)


def _check_maml_meta_loss(maml_meta_loss, expect):
    model, params, tasks = hand_model(), hand_params(), _hand_tasks()
    entries, copies = dict(params), [tuple(t.clone() for t in task) for task in tasks]
    what = "two tasks, one second-order step with inner_lr=0.1"
    loss = maml_meta_loss(model, params, tasks, steps=1, inner_lr=ALPHA, first_order=False, loss_fn=F.mse_loss)
    hint = "return the tensor: torch.stack(losses).mean()"
    if isinstance(loss, float):
        hint = "return the tensor, not loss.item(): the meta-gradient flows back through it"
    elif isinstance(loss, torch.Tensor) and loss.numel() == len(tasks):
        hint = "average the tasks' query losses into one number: torch.stack(losses).mean()"
    expect(isinstance(loss, torch.Tensor) and loss.dim() == 0,
           f"{what}: the meta-loss is a scalar tensor (0-dim), got "
           f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}. hint: {hint}")
    value = loss.item()
    theta = torch.tensor(HAND_THETA, dtype=F64)
    adapted = [_linear_steps(SUPPORT, 1), _linear_steps(SUPPORT_2, 1)]
    sums = sum(_linear_loss(a, q) for a, q in zip(adapted, (QUERY, QUERY_2)))
    hint = "for each task: theta'_i = inner_adapt(...) on its support set, then loss_fn on its query set at theta'_i"
    if math.isclose(value, sums, rel_tol=1e-6):
        hint = "average over the tasks, do not sum: the learning rate should not depend on the meta-batch size"
    elif math.isclose(value, (_linear_loss(theta, QUERY) + _linear_loss(theta, QUERY_2)) / 2, rel_tol=1e-6):
        hint = "evaluate the query loss at the adapted parameters theta'_i (functional_call(model, adapted, (query_x,)))"
    elif math.isclose(value, (_linear_loss(adapted[0], SUPPORT) + _linear_loss(adapted[1], SUPPORT_2)) / 2, rel_tol=1e-6):
        hint = "the outer loss is on the query set (query_x, query_y), not on the support set used for adapting"
    elif math.isclose(value, _linear_loss(_linear_steps(SUPPORT, 1, 0.01), QUERY) / 2
                      + _linear_loss(_linear_steps(SUPPORT_2, 1, 0.01), QUERY_2) / 2, rel_tol=1e-6):
        hint = "pass inner_lr (and steps, first_order, loss_fn) on to inner_adapt"
    expect(math.isclose(value, sums / 2, rel_tol=1e-6),
           f"{what}: theta'_1 = (1.8, 0.5) and theta'_2 = (1, 0.2) give the query losses 1.93 and 1.64, whose mean is "
           f"1.785, got {value:.5g}. hint: {hint}")
    expect(_same_entries(params, entries) and _near(_theta(params), *HAND_THETA)
           and all(torch.equal(a, b) for task, saved in zip(tasks, copies) for a, b in zip(task, saved)),
           "maml_meta_loss must not change params or the tasks")
    expect(loss.requires_grad, f"{what}: the meta-loss depends on params (requires grad). hint: no torch.no_grad(), no "
                               ".detach() and no .item() on the way")
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    expect(all(g is not None for g in grads), f"{what}: the meta-loss back-propagates to params. hint: pass params to "
                                              "inner_adapt and evaluate the query loss with the dict it returns")
    meta = torch.stack([g.reshape(()) for g in grads]).to(F64)
    so = (_linear_meta_grad(SUPPORT, QUERY, 1, False) + _linear_meta_grad(SUPPORT_2, QUERY_2, 1, False)) / 2
    fo = (_linear_meta_grad(SUPPORT, QUERY, 1, True) + _linear_meta_grad(SUPPORT_2, QUERY_2, 1, True)) / 2
    hint = "pass first_order on to inner_adapt" if torch.allclose(meta, fo) else "average the tasks' meta-gradients"
    expect(torch.allclose(meta, so, rtol=1e-6, atol=1e-8),
           f"{what}: the meta-gradient is the mean of the tasks' (I - alpha H_i) grad L_Qi(theta'_i) = mean of (2.43, "
           f"-0.59) and (3.2, -1.28) = {_rounded(so)}, got {_rounded(meta)}. hint: {hint}")

    params = hand_params()
    what = "the same meta-batch with first_order=True"
    loss = maml_meta_loss(model, params, tasks, steps=1, inner_lr=ALPHA, first_order=True, loss_fn=F.mse_loss)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    meta = torch.stack([torch.zeros((), dtype=F64) if g is None else g.reshape(()) for g in grads]).to(F64)
    hint = "pass first_order on to inner_adapt" if torch.allclose(meta, so) else "inner_adapt(..., first_order=first_order)"
    expect(torch.allclose(meta, fo, rtol=1e-6, atol=1e-8),
           f"{what}: the meta-gradient is the mean of grad L_Qi(theta'_i) = mean of (5.7, 1.4) and "
           f"(4, -1.6) = {_rounded(fo)}, got {_rounded(meta)}. hint: {hint}")

    what = "one task, steps=2"
    loss = maml_meta_loss(model, hand_params(), tasks[:1], steps=2, inner_lr=ALPHA, first_order=False, loss_fn=F.mse_loss)
    want = _linear_loss(_linear_steps(SUPPORT, 2), QUERY)
    got = float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else float("nan")
    expect(math.isclose(got, want, rel_tol=1e-6),
           f"{what}: theta_2 = (2.05, 0.66) gives the query loss {want:.5g}, got {got:.5g}. hint: "
           + ("pass steps on to inner_adapt" if math.isclose(got, 1.93, rel_tol=1e-6) else
              "inner_adapt(model, params, support_x, support_y, steps=steps, inner_lr=inner_lr, ...)"))

    what = "one task with loss_fn = the L1 loss mean |r|"
    loss = maml_meta_loss(model, hand_params(), tasks[:1], steps=1, inner_lr=ALPHA, first_order=False, loss_fn=F.l1_loss)
    x, y = (torch.tensor(v, dtype=F64) for v in QUERY)
    adapted = _linear_steps(SUPPORT, 1, loss="l1")
    want = float((adapted[0] * x + adapted[1] - y).abs().mean())
    got = float(loss.detach()) if isinstance(loss, torch.Tensor) and loss.numel() == 1 else float("nan")
    expect(math.isclose(got, want, rel_tol=1e-6),
           f"{what}: theta' = (1.15, 0.1) and the query's mean |r| = {want:.5g}, got {got:.5g}. hint: use loss_fn for "
           "the query loss and pass it on to inner_adapt for the support loss")


# --------------------------------------------------------------------------- Part C


@visible_check
@_rng_neutral
def reptile_update(reptile_update, expect):
    model = nn.Linear(1, 1).to(F64)
    with torch.no_grad():
        model.weight.fill_(HAND_THETA[0])
        model.bias.fill_(HAND_THETA[1])
    params = {name: p for name, p in model.named_parameters()}
    entries = dict(params)
    adapted = {"weight": torch.tensor([[1.8]], dtype=F64), "bias": torch.tensor([0.5], dtype=F64)}
    saved = {name: value.clone() for name, value in adapted.items()}
    what = f"theta = (1, 0), theta' = (1.8, 0.5), epsilon = {EPSILON}"
    out = _call(expect, what, "C", reptile_update, params, adapted, EPSILON)
    got = _theta({"weight": model.weight, "bias": model.bias})
    new = _theta(out) if isinstance(out, dict) and {"weight", "bias"} <= set(out) else None
    hint = "theta <- theta + epsilon (theta' - theta), in place on the tensors of params"
    if new is not None and out is not params and _near(new, 1.2, 0.125):
        hint = ("update the tensors of params in place, under torch.no_grad(): value.add_(epsilon * (adapted[name] - "
                "value)); a new dict (or new tensors) leaves the model's parameters as they were")
    elif _near(got, *HAND_THETA) and not _same_entries(params, entries):
        hint = ("params[name] = ... puts a new tensor in the dict and leaves the model's parameters as they were: "
                "update the tensors in place, value.add_(...) under torch.no_grad()")
    elif _near(got, 0.8, -0.125):
        hint = "move towards theta': theta + epsilon (theta' - theta), not theta - epsilon (theta' - theta)"
    elif _near(got, 1.6, 0.375):
        hint = "start from theta: theta + epsilon (theta' - theta) = (1 - epsilon) theta + epsilon theta', not the other way"
    elif _near(got, 1.8, 0.5):
        hint = "move by epsilon times the difference, not all the way to theta'"
    elif _near(got, 1.45, 0.125):
        hint = "move by the difference theta' - theta, not by theta'"
    expect(_near(got, 1.2, 0.125),
           f"{what}: theta + 0.25 (theta' - theta) = (1.2, 0.125) in the model's parameters, got {_rounded(got)}. "
           f"hint: {hint}")
    expect(_same_entries(params, entries), "the dict keeps the same tensors (the module's parameters), updated in place")
    expect(out is params, f"reptile_update returns params itself (the dict it updated), got {type(out).__name__}. "
                          "hint: return params")
    expect(all(p.is_leaf and p.requires_grad and p.grad_fn is None for p in params.values()),
           "the parameters stay leaves that require grad (an optimizer can still train them). hint: update under "
           "torch.no_grad()")
    expect(all(torch.equal(adapted[name], saved[name]) for name in saved), "do not modify adapted in place")

    # adapted straight from an inner loop: tensors with a graph back to params
    params = hand_params()
    adapted = {name: 2 * value - 0.5 for name, value in params.items()}  # (1.5, -0.5), requires grad
    out = _call(expect, "theta' with a graph back to params", "C", reptile_update, params, adapted, 0.5)
    got = _theta(params)
    expect(_near(got, 1.25, -0.25) and all(p.is_leaf and p.grad_fn is None for p in params.values()),
           f"theta = (1, 0), theta' = (1.5, -0.5) computed from theta (it requires grad), epsilon = 0.5: (1.25, -0.25) and "
           f"the parameters stay leaves, got {_rounded(got)}. hint: update under torch.no_grad()")
    # repeated updates towards a fixed theta': theta_n - theta' = (1 - epsilon)^n (theta_0 - theta')
    params, target = hand_params(), {"weight": torch.tensor([[3.0]], dtype=F64), "bias": torch.tensor([-2.0], dtype=F64)}
    for _ in range(3):
        reptile_update(params, target, 0.5)
    expect(_near(_theta(params), 3 - 2 / 8, -2 + 2 / 8),
           f"three updates with epsilon = 0.5 towards theta' = (3, -2) from (1, 0) close 7/8 of the gap: (2.75, -1.75), "
           f"got {_rounded(_theta(params))}")
    for epsilon, want in ((0.0, (3.0, -2.0)), (1.0, (1.0, 0.0))):
        params = hand_params((3.0, -2.0))
        reptile_update(params, hand_params(HAND_THETA), epsilon)
        expect(_near(_theta(params), *want), f"epsilon = {epsilon:g} gives {want} (from (3, -2) towards (1, 0)), got "
                                             f"{_rounded(_theta(params))}")
    params = {"w": torch.zeros(2, 3, requires_grad=True)}
    reptile_update(params, {"w": torch.ones(2, 3)}, 0.1)
    expect(params["w"].dtype == torch.float32 and close64(params["w"], torch.full((2, 3), 0.1, dtype=F64)),
           f"any shapes and names: w (2, 3) of zeros towards ones with epsilon 0.1 gives 0.1 everywhere, got "
           f"{_fmt(params['w'])}")
