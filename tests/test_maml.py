"""The functional MAML core (fsl_course.meta.maml): the meta-gradient against central finite
differences, first order = second order without the Hessian term, the closed form on a quadratic,
and Reptile's update."""

import pytest
import torch
from torch import nn

from fsl_course.meta.maml import inner_adapt, maml_loss, parameters_of, reptile_update

f64 = torch.float64


def tiny_task(seed=0):
    """A float64 2-layer tanh net (3 -> 4 -> 2 classes) and a support and query set."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    sx, qx = torch.randn(6, 3, generator=g, dtype=f64), torch.randn(8, 3, generator=g, dtype=f64)
    sy, qy = torch.randint(2, (6,), generator=g), torch.randint(2, (8,), generator=g)
    return model, sx, sy, qx, qy


def flat(params):
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vector, like):
    out, i = {}, 0
    for name, p in like.items():
        out[name] = vector[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_second_order_meta_gradient_matches_central_finite_differences(steps):
    model, sx, sy, qx, qy = tiny_task()
    params = parameters_of(model)
    loss = maml_loss(model, params, sx, sy, qx, qy, steps=steps, inner_lr=0.5)
    analytic = flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    theta, h = flat(params).detach(), 1e-5
    numeric = torch.empty_like(theta)
    for i in range(len(theta)):
        e = torch.zeros_like(theta)
        e[i] = h
        up = maml_loss(model, unflat(theta + e, params), sx, sy, qx, qy, steps=steps, inner_lr=0.5)
        down = maml_loss(model, unflat(theta - e, params), sx, sy, qx, qy, steps=steps, inner_lr=0.5)
        numeric[i] = (up - down) / (2 * h)
    relative = (analytic - numeric).norm() / numeric.norm()
    assert relative < 1e-6, relative
    # and the first-order gradient is measurably different (the Hessian term matters here)
    fo = maml_loss(model, params, sx, sy, qx, qy, steps=steps, inner_lr=0.5, first_order=True)
    first = flat(dict(zip(params, torch.autograd.grad(fo, list(params.values())))))
    assert (first - analytic).norm() / analytic.norm() > 1e-3


def test_first_order_is_second_order_without_the_hessian_term():
    model, sx, sy, qx, qy = tiny_task(1)
    params, alpha = parameters_of(model), 0.3
    theta = flat(params).detach()

    def support_loss(v):
        return nn.functional.cross_entropy(torch.func.functional_call(model, unflat(v, params), (sx,)), sy)

    def query_loss(v):
        return nn.functional.cross_entropy(torch.func.functional_call(model, unflat(v, params), (qx,)), qy)

    g_s = torch.autograd.functional.jacobian(support_loss, theta)
    adapted = theta - alpha * g_s
    g_q = torch.autograd.functional.jacobian(query_loss, adapted)
    hessian = torch.autograd.functional.hessian(support_loss, theta)
    expected_so = (torch.eye(len(theta), dtype=f64) - alpha * hessian) @ g_q       # (I - alpha H_S) grad L_Q(theta')
    for first_order, expected in ((False, expected_so), (True, g_q)):
        loss = maml_loss(model, params, sx, sy, qx, qy, steps=1, inner_lr=alpha, first_order=first_order)
        got = flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_one_inner_step_on_a_quadratic_is_the_closed_form():
    # L_S(theta) = 1/2 (theta - c)^T A (theta - c): one step gives theta - alpha A (theta - c)
    g = torch.Generator().manual_seed(3)
    m = torch.randn(4, 4, generator=g, dtype=f64)
    a, c = m @ m.T + torch.eye(4, dtype=f64), torch.randn(4, generator=g, dtype=f64)

    class Point(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.randn(4, generator=g, dtype=f64))

        def forward(self, x):
            return self.theta

    point = Point()

    def quadratic(theta, _):
        return 0.5 * (theta - c) @ a @ (theta - c)

    params = parameters_of(point)
    adapted = inner_adapt(point, params, torch.zeros(1), torch.zeros(1), steps=1, inner_lr=0.1, loss_fn=quadratic)
    expected = params["theta"] - 0.1 * a @ (params["theta"] - c)
    torch.testing.assert_close(adapted["theta"], expected, rtol=1e-12, atol=1e-12)
    two = inner_adapt(point, params, torch.zeros(1), torch.zeros(1), steps=2, inner_lr=0.1, loss_fn=quadratic)
    step = torch.eye(4, dtype=f64) - 0.1 * a
    torch.testing.assert_close(two["theta"] - c, step @ step @ (params["theta"] - c), rtol=1e-12, atol=1e-12)
    assert torch.equal(point.theta, params["theta"])  # the module is untouched


def test_reptile_moves_the_parameters_towards_the_adapted_ones():
    model, sx, sy, _, _ = tiny_task(2)
    params = parameters_of(model)
    before = {k: v.detach().clone() for k, v in params.items()}
    adapted = inner_adapt(model, params, sx, sy, steps=3, inner_lr=0.5, first_order=True)
    reptile_update(params, adapted, 0.25)
    for name in params:
        torch.testing.assert_close(params[name].detach(), before[name] + 0.25 * (adapted[name].detach() - before[name]))
    with pytest.raises(ValueError, match="same parameter names"):
        reptile_update(params, {"x": torch.zeros(1)}, 0.1)


def test_bad_arguments_are_clear_errors():
    model, sx, sy, _, _ = tiny_task()
    with pytest.raises(ValueError, match="steps must be an int"):
        inner_adapt(model, parameters_of(model), sx, sy, steps=-1)
    with pytest.raises(ValueError, match="non-empty dict"):
        inner_adapt(model, {}, sx, sy)


def test_vmap_over_tasks_gives_the_loops_meta_gradient_on_conv4():
    from torch.func import vmap

    from fsl_course.meta.backbones import Conv4

    torch.manual_seed(0)
    model = nn.Sequential(Conv4(hidden=8, norm="group"), nn.Linear(8, 3)).double().to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(4)
    sx, qx = torch.rand(2, 3, 1, 28, 28, generator=g, dtype=f64), torch.rand(2, 6, 1, 28, 28, generator=g, dtype=f64)
    sy, qy = torch.arange(3).repeat(2, 1), torch.arange(3).repeat(2, 2)
    params = parameters_of(model)
    for first_order in (False, True):
        loop = torch.stack([maml_loss(model, params, *task, first_order=first_order) for task in zip(sx, sy, qx, qy)])
        batched = vmap(lambda a, b, c, d: maml_loss(model, params, a, b, c, d, first_order=first_order))(sx, sy, qx, qy)
        torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)
        g_loop = torch.autograd.grad(loop.mean(), list(params.values()))
        g_vmap = torch.autograd.grad(batched.mean(), list(params.values()))
        for a, b in zip(g_loop, g_vmap):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)
