"""Visible checks of exercise 04 (the GAN from the minimax game): the optimal discriminator, the
discriminator's loss and the two generator losses, all from logits ``l`` with ``D = sigmoid(l)``.

The expected values are worked out by hand in the messages (``softplus(l) = log(1 + e^l)``,
``log sigmoid(l) = -softplus(-l)``, ``log(1 - sigmoid(l)) = -softplus(l)``), so the checks do not
depend on the package's reference implementations."""

from __future__ import annotations

import math

import torch

from fsl_course.checks import visible_check
from fsl_course.checks.losses import LOG_2, softplus
from fsl_course.checks.losses import gradients as _grad
from fsl_course.checks.losses import is_scalar as _scalar
from fsl_course.checks.losses import near as _near
from fsl_course.checks.losses import shape_of as _shape
from fsl_course.checks.losses import show as _show


@visible_check
def optimal_discriminator(optimal_discriminator, expect):
    p, q = torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.1, 0.3, 0.2])
    d = optimal_discriminator(p, q)
    expect(isinstance(d, torch.Tensor) and d.shape == p.shape,
           f"densities of shape (3,) give D* of shape (3,), got {_shape(d)}. hint: elementwise, p_data / (p_data + p_model)")
    hint = "D*(x) = p_data(x) / (p_data(x) + p_model(x))"
    if torch.allclose(d.float(), torch.tensor([0.25, 0.75, 0.5])):
        hint = "D* is the probability that x is *real*: p_data goes on top, p_data / (p_data + p_model)"
    elif torch.allclose(d.float(), torch.full((3,), 0.5)):
        hint = "1/2 is D* only where p_data = p_model (at the generator's optimum), not for any densities"
    expect(torch.allclose(d.float(), torch.tensor([0.75, 0.25, 0.5]), atol=1e-6),
           f"p_data = [0.3, 0.1, 0.2], p_model = [0.1, 0.3, 0.2] give D* = [0.75, 0.25, 0.5], got "
           f"{[round(v, 4) for v in d.tolist()]}. hint: {hint}")
    d = optimal_discriminator(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]))
    expect(torch.isfinite(d).all() and torch.equal(d, torch.tensor([1.0, 0.0, 0.5])),
           f"where only the data has mass D* = 1, where only the model has mass D* = 0, and where both densities "
           f"are 0 (0 / 0) return 0.5, a discriminator that cannot tell; got {d.tolist()}. hint: "
           "total = p_data + p_model; torch.where(total > 0, p_data / total, 0.5) (and avoid dividing by 0 "
           "in the branch you do not use, e.g. with torch.where(total > 0, total, 1) as the divisor)")
    tiny = optimal_discriminator(torch.tensor([1e-30, 3e-30], dtype=torch.float64),
                                 torch.tensor([3e-30, 1e-30], dtype=torch.float64))
    expect(isinstance(tiny, torch.Tensor) and tiny.dtype == torch.float64,
           f"float64 densities give a float64 D*, got {tiny.dtype if isinstance(tiny, torch.Tensor) else type(tiny).__name__}. "
           "hint: compute with the inputs' own dtype (torch.full_like / torch.ones_like keep it)")
    expect(torch.allclose(tiny, torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=1e-12, atol=0),
           f"D* depends only on the ratio of the densities: p_data = [1e-30, 3e-30], p_model = [3e-30, 1e-30] "
           f"give [0.25, 0.75]; got {tiny.tolist()}. "
           "hint: no epsilon in the denominator: it changes D* wherever both densities are small")
    p, q = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)), torch.rand(4, 5, generator=torch.Generator().manual_seed(1))
    before = p.clone(), q.clone()
    d = optimal_discriminator(p, q)
    expect(isinstance(d, torch.Tensor) and d.shape == (4, 5) and torch.allclose(d, p / (p + q)),
           "any shape: (4, 5) densities give (4, 5) values p / (p + q). hint: elementwise operations only, no sum or mean")
    expect(torch.equal(p, before[0]) and torch.equal(q, before[1]),
           "do not modify p_data or p_model in place. hint: no +=, /= or out= on the inputs")


@visible_check
def discriminator_loss(discriminator_loss, expect):
    zero = discriminator_loss(torch.zeros(4), torch.zeros(4))
    expect(_scalar(zero),
           f"return a scalar tensor (0-dim), got {_shape(zero)}. hint: the mean over each batch, e.g. .mean(), not per-sample values")
    hint = "L_D = -E[log D(x)] - E[log(1 - D(G(z)))], each expectation a mean over its batch"
    if _near(zero, -2 * LOG_2):
        hint = "the sign: the discriminator *maximises* V, so its loss is -V = -mean(log D(x)) - mean(log(1 - D(G(z))))"
    elif _near(zero, 4 * 2 * LOG_2):
        hint = "average over each batch (.mean()), do not sum"
    elif _near(zero, LOG_2):
        hint = ("average the real and the fake terms separately and add the two means; one mean over the "
                "concatenated logits halves the loss")
    expect(_near(zero, 2 * LOG_2),
           f"logits 0 (D = 1/2 everywhere) give log 4 = {2 * LOG_2:.4f}, got {_show(zero)}. hint: {hint}")
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.5) + softplus(-3.0)) / 2
    got = discriminator_loss(real, fake)
    swapped = (softplus(2.0) + softplus(-1.0)) / 2 + (softplus(-0.5) + softplus(3.0)) / 2
    expect(_near(got, expected),
           f"real logits [2, -1], fake logits [0.5, -3] give mean(softplus(-l_real)) + mean(softplus(l_fake)) = "
           f"{expected:.4f}, got {_show(got)}. hint: "
           + ("real and fake are swapped: real samples should get D(x) -> 1, fakes D(G(z)) -> 0"
              if _near(got, swapped) else "-log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l)"))
    uneven = discriminator_loss(torch.tensor([1.0]), torch.tensor([0.0, 0.0, 0.0]))
    expect(_near(uneven, softplus(-1.0) + LOG_2),
           f"batch sizes may differ: 1 real logit 1 and 3 fake logits 0 give softplus(-1) + log 2 = "
           f"{softplus(-1.0) + LOG_2:.4f}, got {_show(uneven)}. hint: one mean per batch, then add them")
    extreme = discriminator_loss(torch.tensor([200.0, -200.0]), torch.tensor([-200.0, 200.0]))
    expect(_near(extreme, 200.0, 1e-4),
           f"logits of +-200: the discriminator is right on one sample of each batch and wrong by 200 nats on "
           f"the other, so the loss is 200 / 2 + 200 / 2 = 200; got {_show(extreme)}. hint: "
           "torch.log(torch.sigmoid(l)) gives log(0) = -inf for l = -200 (sigmoid underflows); use "
           "F.softplus(-l) for -log sigmoid(l) and F.softplus(l) for -log(1 - sigmoid(l)) (or F.logsigmoid)")
    real_grad, fake_grad = _grad(discriminator_loss, torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expect(real_grad is not None and fake_grad is not None
           and torch.allclose(real_grad, torch.tensor([-0.5, -(1 - sig(2.0))]) / 2, atol=1e-6)
           and torch.allclose(fake_grad, torch.tensor([0.5, sig(-1.0)]) / 2, atol=1e-6),
           "the gradient must flow: dL_D/dl_real = -(1 - sigmoid(l)) / B_real and dL_D/dl_fake = sigmoid(l) / B_fake. "
           "hint: torch operations on the logits only, no .detach(), .item() or NumPy")


def _generator_checks(loss_fn, expect, *, saturating: bool) -> None:
    name = "L_G = E[log(1 - D(G(z)))]" if saturating else "L_G = -E[log D(G(z))]"
    formula = "-mean(softplus(l))" if saturating else "mean(softplus(-l))"
    this, that = ("saturating (minimax)", "non-saturating") if saturating else ("non-saturating", "saturating (minimax)")
    zero = loss_fn(torch.zeros(3))
    expect(_scalar(zero), f"return a scalar tensor (0-dim), got {_shape(zero)}. hint: {formula}")
    logits = torch.tensor([3.0, -1.0])
    sign = -1.0 if saturating else 1.0
    want = sign * (softplus(sign * -3.0) + softplus(sign * 1.0)) / 2  # the loss at logits [3, -1]
    got = loss_fn(logits)
    # what typical mistakes give at [3, -1]: the other loss, this loss's negative, the other loss's negative
    other = -sign * (softplus(-sign * -3.0) + softplus(-sign * 1.0)) / 2
    if _near(got, other):
        hint = f"this is the {that} loss; the {this} loss is {name} = {formula}"
    elif _near(got, -want):
        hint = f"the sign: the generator *minimises* {name}, which is " + ("<= 0" if saturating else ">= 0")
    elif _near(got, -other):
        hint = ("log D(G(z)) and log(1 - D(G(z))) are mixed up: log(1 - sigmoid(l)) = -softplus(l), "
                "log sigmoid(l) = -softplus(-l)")
    elif _near(zero, 3 * sign * LOG_2):
        hint = "average over the batch (.mean()), do not sum"
    else:
        hint = f"{name} = {formula}"
    target = sign * LOG_2
    expect(_near(zero, target), f"logits 0 (D = 1/2) give {target:.4f}, got {_show(zero)}. hint: {hint}")
    expect(_near(got, want), f"fake logits [3, -1] give {formula} = {want:.4f}, got {_show(got)}. hint: {hint}")
    big = 200.0 if saturating else -200.0
    extreme = loss_fn(torch.tensor([big, 0.0]))
    target = (-200.0 - LOG_2) / 2 if saturating else (200.0 + LOG_2) / 2
    expect(_near(extreme, target, 1e-4),
           f"fake logits [{big:g}, 0] give {target:.4f}, got {_show(extreme)}. hint: "
           + ("torch.log(1 - torch.sigmoid(200)) is log(0) = -inf (sigmoid rounds to 1); use -F.softplus(l) "
              "(or F.logsigmoid(-l))" if saturating else
              "torch.log(torch.sigmoid(-200)) is log(0) = -inf (sigmoid underflows to 0); use F.softplus(-l) "
              "(or -F.logsigmoid(l))"))
    (grad,) = _grad(loss_fn, torch.tensor([-10.0, 0.0, 10.0, 2.0]))
    logits = torch.tensor([-10.0, 0.0, 10.0, 2.0])
    want_grad = -torch.sigmoid(logits if saturating else -logits) / 4  # 1 - sigmoid(l) = sigmoid(-l)
    expect(grad is not None and torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-9),
           ("dL_G/dl = -sigmoid(l) / B: tiny where D rejects the fake (l = -10), which is why this loss saturates; "
            if saturating else
            "dL_G/dl = -(1 - sigmoid(l)) / B: about -1 / B where D rejects the fake (l = -10), so the generator still learns; ")
           + f"got {grad.tolist() if grad is not None else 'no gradient'} for l = [-10, 0, 10, 2] (expected "
           f"{[float(f'{v:.4g}') for v in want_grad.tolist()]}). hint: torch operations on the logits only, no .detach() or .item()")


@visible_check
def generator_loss_saturating(generator_loss_saturating, expect):
    _generator_checks(generator_loss_saturating, expect, saturating=True)


@visible_check
def generator_loss_nonsaturating(generator_loss_nonsaturating, expect):
    _generator_checks(generator_loss_nonsaturating, expect, saturating=False)
