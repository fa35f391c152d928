"""Visible checks of exercise 05 (stable and conditional GANs): the WGAN critic's loss and the
WGAN generator's loss, the gradient penalty of WGAN-GP, the critic's loss in one step of the
DAGAN game on feature pairs, and DAGAN-style augmentation of a support set.

The expected values are worked out by hand, so the checks do not depend on the package's
reference implementations:

* critic scores are plain numbers (no sigmoid, no log), so the losses are differences of means;
* a linear critic ``f(x) = <w, x>`` has the gradient ``w`` at every point, so its penalty is
  ``weight * (||w|| - 1)^2`` whatever the interpolation, and the penalty's gradient with respect
  to ``w`` is ``2 weight (||w|| - 1) w / ||w||``;
* a quadratic critic ``f(x) = ||x||^2 / 2`` has the gradient ``x``; it records the points it is
  called with, so the checks can see the interpolates ``x_hat`` and recover each sample's ``eps``;
* the DAGAN checks use stand-ins for the generator (``G(u, z) = u + a z``, noise ``z`` drawn with
  ``torch.randn``) and for the pair critic (linear), whose outputs are known.

Part D is checked on its own: while its check runs, the names ``critic_loss`` and
``gradient_penalty`` that the learner's ``dagan_critic_loss`` looks up in its notebook are bound to
right answers for the stand-in critic (and restored afterwards), so a mistake in Part A or C
fails only that part's check. The hidden tests of Part D do the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fsl_course.checks import bound_in_globals_of, visible_check
from fsl_course.checks.losses import LOG_2, softplus
from fsl_course.checks.losses import gradients as _grad
from fsl_course.checks.losses import is_scalar as _scalar
from fsl_course.checks.losses import near as _near
from fsl_course.checks.losses import shape_of as _shape
from fsl_course.checks.losses import show as _show


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


class _Misuse(Exception):
    """A stand-in network was called the wrong way; the check turns it into a failed expectation."""


def _call(expect, what: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``; a misused stand-in fails the check with its own message."""
    try:
        return function(*args, **kwargs)
    except _Misuse as err:
        expect(False, f"{what}: {err}")


# --------------------------------------------------------------------------- Parts A and B


@visible_check
def critic_loss(critic_loss, expect):
    zero = critic_loss(torch.zeros(4), torch.zeros(4))
    expect(_scalar(zero),
           f"return a scalar tensor (0-dim), got {_shape(zero)}. hint: the mean of each batch, e.g. .mean(), not per-sample values")
    hint = "L_f = mean f(G(z)) - mean f(x): a difference of two means of raw scores"
    if _near(zero, 2 * LOG_2) or _near(zero, -2 * LOG_2):
        hint = ("this is the GAN discriminator's loss; a WGAN critic's scores are not logits: no sigmoid, softplus "
                "or log, just fake_scores.mean() - real_scores.mean()")
    expect(_near(zero, 0.0), f"scores 0 for every sample give 0, got {_show(zero)}. hint: {hint}")
    real, fake = torch.tensor([1.0, 2.0, 3.0, 2.0]), torch.tensor([0.5, 1.5, 1.0, 1.0])
    got = critic_loss(real, fake)
    if _near(got, 1.0):
        hint = ("the sign: the critic maximises the Wasserstein estimate mean f(x) - mean f(G(z)), so its loss (to "
                "minimise) is mean f(G(z)) - mean f(x)")
    elif _near(got, 4.0 - 8.0):
        hint = "average over each batch (.mean()), do not sum"
    elif _near(got, -0.5):
        hint = ("average each batch separately, then subtract: one mean over the concatenated scores halves the loss "
                "(and mixes the two batches when their sizes differ)")
    elif _near(got, sum(softplus(-s) for s in real.tolist()) / 4 + sum(softplus(s) for s in fake.tolist()) / 4):
        hint = "this is the GAN discriminator's loss; no sigmoid, softplus or log: the critic's scores are used as they are"
    expect(_near(got, -1.0),
           f"real scores [1, 2, 3, 2] (mean 2) and fake scores [0.5, 1.5, 1, 1] (mean 1) give 1 - 2 = -1, got "
           f"{_show(got)}. hint: {hint}")
    try:
        uneven = critic_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5]))
    except RuntimeError as err:
        expect(False, f"3 real and 2 fake scores raised {_first_line(err)}. hint: the two batches may have different "
                      "sizes: average each batch separately, fake_scores.mean() - real_scores.mean(), do not subtract "
                      "the scores elementwise")
    expect(_near(uneven, -1.0),
           f"batch sizes may differ: real scores [1, 2, 3] and fake scores [0.5, 1.5] give 1 - 2 = -1, got {_show(uneven)}. "
           "hint: one mean per batch, then subtract; a mean over the concatenated scores mixes the two batches")
    column = critic_loss(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.5], [1.5]]))
    expect(_near(column, -1.0),
           f"scores of shape (B, 1), as a network ending in nn.Linear(..., 1) returns them: (3, 1) real [1, 2, 3] and "
           f"(2, 1) fake [0.5, 1.5] give -1, got {_show(column)}. hint: .mean() over all elements works for (B,) and (B, 1)")
    real_grad, fake_grad = _grad(critic_loss, torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.0, 1.0, 4.0]))
    expect(real_grad is not None and fake_grad is not None
           and torch.allclose(real_grad, torch.full((2,), -0.5)) and torch.allclose(fake_grad, torch.full((4,), 0.25)),
           "the gradient must flow: dL_f/df(x_i) = -1 / B_real and dL_f/df(G(z_j)) = +1 / B_fake (here -1/2 and +1/4); got "
           f"{[g.tolist() if g is not None else None for g in (real_grad, fake_grad)]}. hint: torch operations on the scores "
           "only, no .detach(), .item() or NumPy")
    double = critic_loss(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    expect(_scalar(double) and double.dtype == torch.float64,
           f"float64 scores give a float64 loss, got {double.dtype if isinstance(double, torch.Tensor) else _shape(double)}. "
           "hint: compute with the scores themselves, no torch.tensor(...) around a Python number")


@visible_check
def wgan_generator_loss(wgan_generator_loss, expect):
    zero = wgan_generator_loss(torch.zeros(3))
    expect(_scalar(zero), f"return a scalar tensor (0-dim), got {_shape(zero)}. hint: -fake_scores.mean()")
    got = wgan_generator_loss(torch.tensor([1.0, 2.0, 3.0]))
    hint = "L_G = -mean f(G(z))"
    if _near(got, 2.0):
        hint = ("the sign: the generator wants the critic to score its fakes *high* (like real samples), so it "
                "minimises -mean f(G(z))")
    elif _near(got, -6.0):
        hint = "average over the batch (.mean()), do not sum"
    elif _near(zero, LOG_2) or _near(zero, -LOG_2):
        hint = "this is a GAN generator loss; a WGAN critic's scores are not logits: no sigmoid, softplus or log"
    expect(_near(zero, 0.0), f"fake scores 0 give 0, got {_show(zero)}. hint: {hint}")
    expect(_near(got, -2.0), f"fake scores [1, 2, 3] give -mean = -2, got {_show(got)}. hint: {hint}")
    column = wgan_generator_loss(torch.tensor([[1.0], [3.0]]))
    expect(_near(column, -2.0), f"(B, 1) scores [[1], [3]] give -2, got {_show(column)}. hint: .mean() over all elements")
    (grad,) = _grad(wgan_generator_loss, torch.tensor([5.0, -3.0, 0.0, 100.0]))
    expect(grad is not None and torch.allclose(grad, torch.full((4,), -0.25)),
           "dL_G/df(G(z_j)) = -1 / B for every fake, however high or low its score (the WGAN loss never saturates); got "
           f"{grad.tolist() if grad is not None else 'no gradient'} for 4 scores. hint: torch operations on the scores "
           "only, no .detach() or .item()")


# --------------------------------------------------------------------------- Part C


class _LinearCritic(nn.Module):
    """``f(x) = <w, x>`` per sample (over all non-batch dimensions): gradient ``w`` everywhere."""

    def __init__(self, w: torch.Tensor, column: bool = False):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.column = column

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(self.w.shape):
            raise _Misuse(f"the critic must be called on the interpolates x_hat, of real's shape (B, "
                          f"{', '.join(map(str, self.w.shape))}), got {_shape(x)}")
        score = (x * self.w).flatten(1).sum(1)
        return score[:, None] if self.column else score


class _QuadraticCritic(nn.Module):
    """``f(x) = ||x||^2 / 2`` per sample: gradient ``x``. Keeps the inputs it is called with."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.shape:
            raise _Misuse(f"the critic must be called on the interpolates x_hat, of real's shape (B, "
                          f"{', '.join(map(str, self.shape))}), got {_shape(x)}")
        self.seen.append(x.detach().clone())
        return 0.5 * x.pow(2).flatten(1).sum(1)


def _penalty_hint(value, weight: float, norm: float, batch: int) -> str:
    """What a typical mistake gives for a linear critic of gradient norm ``norm`` on ``batch`` samples."""
    if not _scalar(value):
        return "return weight * mean((norm - 1)^2), a scalar: one norm per sample, then the mean over the batch"
    if abs(norm - 1) > 1e-3 and _near(value, weight * (math.sqrt(batch) * norm - 1) ** 2):
        return ("one norm for the whole batch: take the norm of each sample's gradient separately, "
                "grad.flatten(1).norm(dim=1), shape (B,), then the mean of (norm - 1)^2")
    if abs(norm - 1) > 1e-3 and _near(value, weight * (norm**2 - 1) ** 2):
        return "the norm, not the squared norm: ||grad|| = sqrt(sum of squares), e.g. grad.flatten(1).norm(dim=1)"
    if abs(norm - 1) > 1e-3 and _near(value, weight * (norm / batch - 1) ** 2):
        return ("take the gradient of critic(x_hat).sum(), not of .mean(): each score depends on its own sample "
                "only, so the gradient of the sum is every sample's own gradient (the mean divides it by B)")
    if abs(norm - 1) > 1e-3 and _near(value, (norm - 1) ** 2):
        return f"multiply by weight (here {weight:g})"
    if norm < 1 and _near(value, 0.0):
        return ("the penalty is two-sided, (||grad|| - 1)^2 also where the norm is below 1 (Gulrajani et al.), "
                "not max(0, ||grad|| - 1)^2")
    if _near(value, weight * abs(norm - 1)):
        return "square the difference: (||grad|| - 1)^2"
    return "GP = weight * mean over the batch of (||grad f(x_hat)||_2 - 1)^2, one norm per sample"


@visible_check
def gradient_penalty(gradient_penalty, expect):
    seed = 1234
    data = torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 2, generator=data), torch.randn(4, 2, generator=data)
    critic = _LinearCritic(torch.tensor([3.0, 4.0]))
    gp = _call(expect, "a linear critic on (4, 2) samples", gradient_penalty, critic, real, fake, torch.Generator().manual_seed(seed))
    expect(_scalar(gp), f"return a scalar tensor (0-dim), got {_shape(gp)}. hint: {_penalty_hint(gp, 10.0, 5.0, 4)}")
    expect(_near(gp, 160.0),
           "a linear critic f(x) = <w, x> with w = [3, 4] has the gradient w at every x_hat, of norm 5, so "
           f"GP = 10 * (5 - 1)^2 = 160 for any eps; got {_show(gp)}. hint: {_penalty_hint(gp, 10.0, 5.0, 4)}")
    small = _LinearCritic(torch.tensor([0.18, 0.24]))
    gp_small = _call(expect, "a linear critic", gradient_penalty, small, real, fake, torch.Generator().manual_seed(seed))
    expect(_near(gp_small, 4.9),
           f"w = [0.18, 0.24] (norm 0.3) gives 10 * (0.3 - 1)^2 = 4.9, got {_show(gp_small)}. "
           f"hint: {_penalty_hint(gp_small, 10.0, 0.3, 4)}")
    expect(gp.requires_grad and gp.grad_fn is not None,
           "the penalty must be differentiable in the critic's parameters (it is part of the critic's loss), but it "
           "has no gradient. hint: torch.autograd.grad(scores.sum(), x_hat, create_graph=True): without "
           "create_graph the gradient is a constant, and the critic's optimiser never sees the penalty")
    (w_grad,) = torch.autograd.grad(gp, critic.w, allow_unused=True)
    expect(w_grad is not None and torch.allclose(w_grad, torch.tensor([48.0, 64.0]), rtol=1e-4),
           "dGP/dw = 2 * weight * (||w|| - 1) * w / ||w|| = 2 * 10 * 4 * [0.6, 0.8] = [48, 64] for w = [3, 4]; got "
           f"{w_grad.tolist() if w_grad is not None else 'no gradient'}. hint: create_graph=True, and no .detach() "
           "or .item() on the gradient or its norm")

    # the interpolates: x_hat_b = eps_b x_b + (1 - eps_b) G(z)_b, one eps in [0, 1] per sample
    batch = 6
    real = torch.randn(batch, 3, generator=data)
    fake = real + torch.rand(batch, 3, generator=data) + 0.5  # differs from real in every coordinate
    quadratic = _QuadraticCritic((3,))
    gp = _call(expect, "a quadratic critic", gradient_penalty, quadratic, real, fake, torch.Generator().manual_seed(seed))
    seen = [x for x in quadratic.seen if x.shape == real.shape]
    expect(len(seen) >= 1, "the critic must be called on the interpolates x_hat, a tensor of real's shape (6, 3). "
                           "hint: scores = critic(x_hat)")
    x_hat = seen[-1]
    t = (x_hat - fake) / (real - fake)  # eps of each coordinate: x_hat = eps x + (1 - eps) G(z)
    expect(bool(((t > -1e-5) & (t < 1 + 1e-5)).all()),
           "every x_hat must lie on the segment between its real and its fake sample, x_hat = eps x + (1 - eps) G(z) with "
           f"0 <= eps <= 1; found eps between {t.min().item():.3g} and {t.max().item():.3g}. hint: eps ~ U(0, 1) is "
           "torch.rand, not torch.randn")
    expect(bool((t.max(1).values - t.min(1).values < 1e-5).all()),
           "one eps per sample, shared by all its coordinates: found different eps within one sample. hint: eps has "
           "shape (B, 1, ..., 1), (B,) + (1,) * (real.ndim - 1), and broadcasts over the sample, not real's shape")
    expect(t[:, 0].max() - t[:, 0].min() > 1e-4,
           "one eps per sample, not one for the whole batch: found the same eps for all 6 samples. hint: "
           "torch.rand((B,) + (1,) * (real.ndim - 1), ...)")
    eps = torch.rand((batch, 1), generator=torch.Generator().manual_seed(seed))
    if torch.allclose(t[:, :1], 1 - eps, atol=1e-5):
        hint = "eps multiplies the real samples: x_hat = eps * real + (1 - eps) * fake"
    else:
        hint = ("draw eps first, in one call, exactly as torch.rand((B,) + (1,) * (real.ndim - 1), generator=generator, "
                "dtype=real.dtype), then .to(real.device)")
    expect(torch.allclose(t[:, :1], eps, atol=1e-5),
           f"with a seeded generator, eps must be the convention's {[round(v, 4) for v in eps.flatten().tolist()]}, got "
           f"{[round(v, 4) for v in t[:, 0].tolist()]} (the hidden tests compare with the package's penalty for the "
           f"same seed). hint: {hint}")
    expected = 10.0 * ((x_hat.norm(dim=1) - 1) ** 2).mean().item()
    expect(_near(gp, expected, 1e-4),
           f"the quadratic critic f(x) = ||x||^2 / 2 has the gradient x_hat, so GP = 10 * mean((||x_hat_b|| - 1)^2) = "
           f"{expected:.4f} for your x_hat, got {_show(gp)}. hint: the norm of each sample's gradient, then the mean")

    # images: the norm is over all non-batch dimensions, and eps broadcasts over them
    images = torch.rand(3, 1, 2, 2, generator=data), torch.rand(3, 1, 2, 2, generator=data)
    ones = _LinearCritic(torch.ones(1, 2, 2))
    try:
        gp = _call(expect, "images (3, 1, 2, 2)", gradient_penalty, ones, *images, torch.Generator().manual_seed(seed))
    except RuntimeError as err:
        expect(False, f"images of shape (3, 1, 2, 2) raised {_first_line(err)}. hint: eps must have shape (B, 1, 1, 1) "
                      "for images, (B,) + (1,) * (real.ndim - 1), so that it broadcasts over each image")
    hint = "the norm over all non-batch dimensions: flatten each sample's gradient, grad.flatten(1).norm(dim=1)"
    expect(_near(gp, 10.0),
           f"images (3, 1, 2, 2) and f(x) = sum of the pixels: the gradient is 1 at each of 4 pixels, norm 2, so "
           f"GP = 10 * (2 - 1)^2 = 10, got {_show(gp)}. hint: {hint}")
    try:
        column = _call(expect, "a critic returning (B, 1)", gradient_penalty, _LinearCritic(torch.tensor([3.0, 4.0]), column=True),
                       real[:4, :2], fake[:4, :2], torch.Generator().manual_seed(seed))
    except RuntimeError as err:
        expect(False, f"a critic that returns scores of shape (B, 1) raised {_first_line(err)}. hint: take the gradient "
                      "of critic(x_hat).sum(), which works for (B,) and (B, 1) scores")
    expect(_near(column, 160.0), f"a critic that returns (B, 1) scores must give the same penalty, 160, got {_show(column)}. "
                                 "hint: the gradient of critic(x_hat).sum()")

    for weight, want in ((1.0, 16.0), (0.0, 0.0)):
        value = gradient_penalty(critic, real[:4, :2], fake[:4, :2], torch.Generator().manual_seed(seed), weight=weight)
        expect(_near(value, want), f"weight={weight:g} gives {weight:g} * (5 - 1)^2 = {want:g}, got {_show(value)}. "
                                   "hint: multiply by the argument weight, do not hard-code 10")

    # no gradient reaches the real or the fake samples (the generator is trained by its own loss)
    source = torch.randn(4, 3, generator=data, requires_grad=True)
    real_in, fake_in = source * 1.0, source * 0.5 + 1.0  # like a generator's outputs: part of a graph
    before = real_in.detach().clone(), fake_in.detach().clone()
    gp = _call(expect, "a quadratic critic", gradient_penalty, _QuadraticCritic((3,)), real_in, fake_in,
               torch.Generator().manual_seed(seed))
    expect(_scalar(gp), f"return a scalar tensor (0-dim), got {_shape(gp)}")
    (source_grad,) = torch.autograd.grad(gp, source, allow_unused=True) if gp.requires_grad else (None,)
    expect(source_grad is None or not bool(source_grad.any()),
           "the penalty must not send gradients into real or fake (for a generated batch, into the generator). hint: "
           "x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)")
    expect(torch.equal(real_in.detach(), before[0]) and torch.equal(fake_in.detach(), before[1]),
           "do not modify real or fake in place. hint: no +=, *= or out= on the inputs")

    double = gradient_penalty(_LinearCritic(torch.tensor([3.0, 4.0], dtype=torch.float64)), real[:4, :2].double(),
                              fake[:4, :2].double(), torch.Generator().manual_seed(seed))
    expect(_scalar(double) and double.dtype == torch.float64 and _near(double, 160.0, 1e-9),
           f"float64 samples and critic give a float64 penalty (160), got {_show(double)} "
           f"({double.dtype if isinstance(double, torch.Tensor) else type(double).__name__}). hint: draw eps with "
           "dtype=real.dtype")


# --------------------------------------------------------------------------- Parts D and E: stand-ins


class _ShiftGenerator(nn.Module):
    """A stand-in for FeatureGenerator: ``G(h, z) = h + a z`` with ``z ~ N(0, I)`` of the feature
    size, in raw (``forward``) or in standard units (``forward_standard``), whichever ``units`` allows."""

    def __init__(self, dim: int, units: str, a: float = 0.5):
        super().__init__()
        self.feature_dim = self.noise_dim = dim
        self.units = units
        self.a = nn.Parameter(torch.tensor(a))
        self.noise_calls: list[tuple[int, torch.Generator | None]] = []

    def noise(self, n, generator=None):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise _Misuse(f"generator_net.noise(n, generator) takes the number of noise vectors, an int >= 1, got {n!r}")
        self.noise_calls.append((n, generator))
        return torch.randn((n, self.noise_dim), generator=generator)

    def _apply(self, h, z, name):
        if not isinstance(h, torch.Tensor) or not isinstance(z, torch.Tensor) or h.ndim != 2 or h.shape != z.shape:
            raise _Misuse(f"generator_net.{name}(h, z) takes features (B, D) and noise (B, k) of as many rows, "
                          f"got {_shape(h)} and {_shape(z)}")
        return h + self.a * z

    def forward_standard(self, u, z):
        if self.units != "standard":
            raise _Misuse("augment_support works in raw feature units: call generator_net(h, z), not "
                          "generator_net.forward_standard(u, z) (the DAGAN game's standard units)")
        return self._apply(u, z, "forward_standard")

    def forward(self, h, z):
        if self.units != "raw":
            raise _Misuse("the DAGAN game is played in standard units: the fake is generator_net.forward_standard(u, z), "
                          "not generator_net(u, z) (raw units)")
        return self._apply(h, z, "forward")


class _PairCritic(nn.Module):
    """``f([a, b]) = <w, [a, b]>``: a linear critic on pairs ``(B, 2D)``, gradient ``w`` everywhere."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, pairs):
        if not isinstance(pairs, torch.Tensor) or pairs.ndim != 2 or pairs.shape[1] != len(self.w):
            raise _Misuse(f"the critic scores pairs: one (B, 2D) = (B, {len(self.w)}) tensor per call, "
                          f"torch.cat([u, u_other], dim=1) or torch.cat([u, G], dim=1); got {_shape(pairs)}")
        return pairs @ self.w


# --------------------------------------------------------------------------- Part D

def _critic_loss_of_part_a(real_scores, fake_scores):
    """Part A's loss, in the learner's namespace while Part D is checked."""
    return fake_scores.mean() - real_scores.mean()


def _penalty_of_the_linear_pair_critic(critic, real, fake, generator=None, weight=10.0):
    """The gradient penalty of :class:`_PairCritic` (gradient ``w`` at every point), in the learner's
    namespace while Part D is checked: ``weight (||w|| - 1)^2``. It draws ``eps`` as Part C's
    convention says, which changes nothing here but the generator's state."""
    if not isinstance(critic, _PairCritic):
        raise _Misuse(f"gradient_penalty(critic, real, fake, generator): pass the critic first, got {type(critic).__name__}")
    for name, pairs in (("real", real), ("fake", fake)):
        if not isinstance(pairs, torch.Tensor) or pairs.ndim != 2 or pairs.shape[1] != len(critic.w):
            raise _Misuse(f"the penalty interpolates whole pairs: gradient_penalty(critic, real, fake, generator) with {name} "
                          f"the (B, 2D) = (B, {len(critic.w)}) pairs, got {_shape(pairs)}")
    torch.rand((len(real), 1), generator=generator, dtype=real.dtype)
    return weight * (critic.w.norm() - 1) ** 2


def _parts_a_and_c_in_place(function):
    """Bind ``critic_loss`` and ``gradient_penalty`` in ``function``'s module (the notebook) to the two
    functions above while the block runs, then restore what was there."""
    return bound_in_globals_of(function, {"critic_loss": _critic_loss_of_part_a, "gradient_penalty": _penalty_of_the_linear_pair_critic})



@visible_check
def dagan_critic_loss(dagan_critic_loss, expect):
    dim, batch, seed = 2, 4, 77
    data = torch.Generator().manual_seed(5)
    u, u_other = torch.randn(batch, dim, generator=data), torch.randn(batch, dim, generator=data)
    before = u.clone(), u_other.clone()
    w = torch.tensor([0.5, -0.5, 1.5, 0.5])  # [w1, w2]: w1 scores the first feature of a pair, w2 the second
    critic, generator_net = _PairCritic(w), _ShiftGenerator(dim, "standard")
    generator = torch.Generator().manual_seed(seed)
    with _parts_a_and_c_in_place(dagan_critic_loss):  # Part D on its own: right answers for Parts A and C
        loss = _call(expect, "with stand-ins for the generator and the critic", dagan_critic_loss,
                     critic, generator_net, u, u_other, generator)
    expect(_scalar(loss), f"return a scalar tensor (0-dim), got {_shape(loss)}. hint: "
                          "critic_loss(critic(real), critic(fake)) + gradient_penalty(critic, real, fake, generator)")
    expect(len(generator_net.noise_calls) == 1 and generator_net.noise_calls[0][0] == batch
           and generator_net.noise_calls[0][1] is generator,
           f"draw the noise once, z = generator_net.noise(len(u), generator), with the generator you were given; the "
           f"calls were {[(n, 'your generator' if g is generator else g) for n, g in generator_net.noise_calls]}. "
           "hint: the same seed must give the same loss")
    z = torch.randn((batch, dim), generator=torch.Generator().manual_seed(seed))
    fake_second = u + 0.5 * z  # G(u, z) of the stand-in
    w1, w2 = w[:dim], w[dim:]
    wasserstein_part = (w2 @ (fake_second.mean(0) - u_other.mean(0))).item()  # the <w1, u> terms cancel
    penalty = 10.0 * (w.norm().item() - 1) ** 2  # a linear critic: gradient w at every interpolate
    want = wasserstein_part + penalty
    swapped = (w1 @ fake_second.mean(0) + w2 @ u.mean(0) - w1 @ u.mean(0) - w2 @ u_other.mean(0)).item() + penalty
    if _near(loss, wasserstein_part):
        hint = "add the gradient penalty: critic_loss(...) + gradient_penalty(critic, real, fake, generator)"
    elif _near(loss, -wasserstein_part + penalty):
        hint = "real and fake are swapped: critic_loss(critic(real_pairs), critic(fake_pairs))"
    elif _near(loss, swapped):
        hint = "a pair is [u, second]: u first, then u_other (real) or G(u, z) (fake), torch.cat(..., dim=1)"
    else:
        hint = ("real = torch.cat([u, u_other], 1), fake = torch.cat([u, generator_net.forward_standard(u, z)], 1), then "
                "critic_loss(critic(real), critic(fake)) + gradient_penalty(critic, real, fake, generator)")
    expect(_near(loss, want, 1e-4),
           f"a linear pair critic f([a, b]) = <w1, a> + <w2, b> and the stand-in G(u, z) = u + z / 2 give "
           f"<w2, mean G(u, z) - mean u_other> + 10 (||w|| - 1)^2 = {wasserstein_part:.4f} + {penalty:.4f} = {want:.4f}, "
           f"got {_show(loss)}. hint: {hint}")
    state = torch.Generator().manual_seed(seed)
    torch.randn((batch, dim), generator=state), torch.rand((batch, 1), generator=state)  # z, then eps
    expect(torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=state)),
           "draw from generator exactly what the package's train_feature_gan draws in a critic step: z first "
           "(generator_net.noise(len(u), generator)), then the penalty's eps (gradient_penalty(..., generator)), "
           "nothing else. hint: pass generator to gradient_penalty too")
    expect(loss.requires_grad, "the loss must be differentiable in the critic's parameters. hint: no .detach() or .item()")
    w_grad, a_grad = torch.autograd.grad(loss, [critic.w, generator_net.a], allow_unused=True)
    expect(a_grad is None or not bool(a_grad.any()),
           "the critic's step must not send gradients into the generator. hint: compute the fake pairs under "
           "torch.no_grad() (the penalty detaches its inputs, the critic's scores of the fakes do not)")
    want_grad = torch.cat([torch.zeros(dim), fake_second.mean(0) - u_other.mean(0)]) + 2 * 10.0 * (w.norm() - 1) * w / w.norm()
    expect(w_grad is not None and torch.allclose(w_grad, want_grad, rtol=1e-4, atol=1e-5),
           f"dL/dw = [0, mean G(u, z) - mean u_other] + 2 * 10 * (||w|| - 1) * w / ||w|| = "
           f"{[round(v, 4) for v in want_grad.tolist()]}, got {w_grad.tolist() if w_grad is not None else 'no gradient'}. "
           "hint: no .detach() or .item() on the critic's scores or on the penalty")
    expect(torch.equal(u, before[0]) and torch.equal(u_other, before[1]),
           "do not modify u or u_other in place. hint: torch.cat makes new tensors")


# --------------------------------------------------------------------------- Part E


@visible_check
def augment_support(augment_support, expect):
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    labels = torch.tensor([2, 0, 1])
    before = features.clone(), labels.clone()
    n, seed, size = 2, 9, 3
    generator_net = _ShiftGenerator(2, "raw", a=0.1)
    out = _call(expect, "with a stand-in generator", augment_support, generator_net, features, labels, n,
                torch.Generator().manual_seed(seed))
    expect(isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out),
           f"return a tuple (features, labels) of two tensors, got {type(out).__name__}. hint: return torch.cat(...), torch.cat(...)")
    x, y = out
    expect(x.shape == (size * (1 + n), 2) and y.shape == (size * (1 + n),),
           f"S = 3 support features (3, 2) and n = 2 give S (1 + n) = 9 rows: features (9, 2) and labels (9,), got "
           f"{_shape(x)} and {_shape(y)}. hint: "
           + ("the real features come first, then the generated ones: torch.cat([features, generated])"
              if x.shape[0] == size * n else "n generated features per support feature, plus the support features themselves"))
    expect(y.dtype == torch.int64, f"labels stay int64 (torch.long), got {y.dtype}. hint: repeat the given labels")
    expect(torch.equal(x[:size], features) and torch.equal(y[:size], labels),
           "the first S rows are the support features and their labels, unchanged. hint: torch.cat([features, generated]), "
           "real rows first")
    sources = features.repeat_interleave(n, 0)  # row i n + j comes from features[i]
    if torch.equal(y[size:], labels.repeat(n)):
        hint = ("grouped by source: rows S + i n .. S + i n + n - 1 come from features[i]: einops.repeat(features, "
                "'s d -> (s n) d', n=n) and the same for labels, not torch.cat([features] * n) or .repeat(n, 1)")
    else:
        hint = "each generated row has the label of its source: einops.repeat(labels, 's -> (s n)', n=n)"
    expect(torch.equal(y[size:], labels.repeat_interleave(n)),
           f"labels [2, 0, 1] with n = 2 give [2, 0, 1] + [2, 2, 0, 0, 1, 1], got {y.tolist()}. hint: {hint}")
    expect(len(generator_net.noise_calls) == 1 and generator_net.noise_calls[0][0] == size * n,
           f"draw all the noise in one call, z = generator_net.noise(S * n, generator), S * n = 6; the calls asked for "
           f"{[c[0] for c in generator_net.noise_calls]} noise vectors. hint: one call, so that the same seed gives the "
           "same features as the package's DAGANLearner")
    z = torch.randn((size * n, 2), generator=torch.Generator().manual_seed(seed))
    want = sources + 0.1 * z  # the stand-in's G(h, z) = h + z / 10
    if torch.allclose(x[size:], features.repeat(n, 1) + 0.1 * z, atol=1e-6):
        hint = "grouped by source: einops.repeat(features, 's d -> (s n) d', n=n), not tiled copies of the support set"
    else:
        hint = ("generator_net(repeat(features, 's d -> (s n) d', n=n), z) with z = generator_net.noise(S * n, generator), "
                "generator_net in raw feature units")
    expect(torch.allclose(x[size:], want, atol=1e-6),
           f"with the stand-in G(h, z) = h + z / 10 the generated rows are the repeated sources plus z / 10 for your "
           f"generator's z: expected {[[round(v, 3) for v in r] for r in want.tolist()]}, got "
           f"{[[round(v, 3) for v in r] for r in x[size:].tolist()]}. hint: {hint}")
    expect(not x.requires_grad,
           "augmentation only makes data for the classifier: no gradient should lead back into the generator. hint: "
           "compute the generated features under torch.no_grad()")
    expect(torch.equal(features, before[0]) and torch.equal(labels, before[1]),
           "do not modify features or labels in place")
    one = _call(expect, "with a stand-in generator", augment_support, _ShiftGenerator(2, "raw"), features, labels, 1,
                torch.Generator().manual_seed(1))
    expect(isinstance(one, tuple) and len(one) == 2 and _shape(one[0]) == "(6, 2)" and _shape(one[1]) == "(6,)",
           f"n = 1 gives 2 S = 6 rows, got {tuple(_shape(t) for t in one) if isinstance(one, tuple) else _shape(one)}. "
           "hint: do not hard-code n")
