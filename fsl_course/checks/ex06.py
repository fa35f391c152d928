"""Visible checks of exercise 06 (DDPM from the variational bound): the linear and cosine noise
schedules, the closed form of ``q(x_t | x_0)``, the posterior ``q(x_{t-1} | x_t, x_0)``, the
simple noise-prediction loss and one ancestral sampling step.

Timesteps are **0-based** everywhere, as in :mod:`fsl_course.diffusion`: index ``k = 0..T-1`` of a
schedule tensor is the paper's ``t = k + 1``, so ``betas[0]`` is ``beta_1``, ``alphas_cumprod[0]``
is ``abar_1 = 1 - beta_1`` (``abar_0 = 1`` is not stored), and ``k = 0`` is the last denoising step.

The expected values are worked out by hand, so the checks do not depend on the package's
reference implementations:

* a two-step schedule with round square roots: ``betas = [0.0784, 0.609375]``, so
  ``alpha = [0.9216, 0.390625]`` (square roots 0.96 and 0.625), ``alphas_cumprod = [0.9216, 0.36]``
  (square roots 0.96 and 0.6) and ``1 - abar = [0.0784, 0.64]`` (square roots 0.28 and 0.8);
* the schedules' formulas evaluated with Python's ``math`` on a few steps;
* the posterior by Bayes' rule for scalars: the prior ``x_{t-1} | x_0 ~ N(sqrt(abar_{t-1}) x_0,
  1 - abar_{t-1})`` times the likelihood ``x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)``, a
  product of two Gaussians in ``x_{t-1}`` (precisions add, means are precision-weighted);
* the loss with a linear stand-in ``eps_model(x, t) = a x`` and the draws ``t``, ``eps`` that the
  stated convention takes from a seeded generator: ``mean((eps - a x_t)^2)``, and an "oracle" model
  that knows ``x_0`` and so predicts the noise exactly (loss 0).

Parts D and E are checked on their own: while their checks run, the names ``q_sample`` and
``posterior_mean_variance`` that the learner's function may look up in its notebook are bound to
right answers (and restored afterwards), so a mistake in Part B or C fails only that part's check.
The hidden tests do the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fsl_course.checks import (
    bound_in_globals_of,
    call_checked,
    close64 as _close,
    dtype_name as _dtype,
    fmt_values as _fmt,
    Misuse as _Misuse,
    visible_check,
)
from fsl_course.checks.losses import is_scalar as _scalar
from fsl_course.checks.losses import near as _near
from fsl_course.checks.losses import shape_of as _shape
from fsl_course.checks.losses import show as _show

F64 = torch.float64
# A hand-made two-step schedule (0-based: index 0 is t = 1, index 1 is t = 2).
HAND_BETAS = (0.0784, 0.609375)  # alpha = 0.9216, 0.390625: sqrt 0.96, 0.625
HAND_ABAR = (0.9216, 0.36)  # sqrt 0.96, 0.6; 1 - abar = 0.0784, 0.64: sqrt 0.28, 0.8
COSINE_S, MAX_BETA = 0.008, 0.999


def _hand_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(HAND_BETAS, dtype=F64), torch.tensor(HAND_ABAR, dtype=F64)


def _linear_betas(num_steps: int) -> list[float]:
    """``beta_k = 1e-4 + k (0.02 - 1e-4) / (T - 1)``, ``k = 0..T-1``, as Python floats."""
    return [1e-4 + k * (0.02 - 1e-4) / (num_steps - 1) for k in range(num_steps)]


def _cosine_f(t: float, num_steps: int) -> float:
    return math.cos((t / num_steps + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2


def _schedule(num_steps: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two schedules from their formulas, in Python floats (for the checks' own expectations)."""
    if kind == "linear":
        betas = _linear_betas(num_steps)
    else:
        f = [_cosine_f(t, num_steps) for t in range(num_steps + 1)]
        betas = [min(1 - f[t] / f[t - 1], MAX_BETA) for t in range(1, num_steps + 1)]
    abar, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        abar.append(product)
    return torch.tensor(betas, dtype=F64), torch.tensor(abar, dtype=F64)


def _call(expect, what: str, function, *args):
    """``function(*args)``, failing the check with a hint on an off-by-one timestep or a broadcasting error."""
    return call_checked(expect, what, function, args, index_hint="timesteps are 0-based: t holds indices 0..T-1 into "
                        "the schedule tensors (index k is the paper's t = k + 1), so index with t itself, no t + 1 or t - 1",
                        per_sample_call="per_sample(values, t, x)")


# --------------------------------------------------------------------------- right answers for Parts B and C


def _per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t.to(like.device)].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _check_args(name: str, signature: str, x, t, schedule) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 1:
        raise _Misuse(f"{signature}: {name} must be a floating (B, ...) tensor, got {_shape(x)}")
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or tuple(t.shape) != (len(x),):
        raise _Misuse(f"{signature}: t must be a (B,) = ({len(x)},) int64 tensor of 0-based timesteps, got "
                      f"{_shape(t)} ({_dtype(t)})")
    for tensor in schedule:
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1:
            raise _Misuse(f"{signature}: the schedule tensors are (T,), got {_shape(tensor)}")
        if len(t) and int(t.max()) >= len(tensor) or len(t) and int(t.min()) < 0:
            raise _Misuse(f"{signature}: t must hold 0-based timesteps 0..{len(tensor) - 1}, got values in "
                          f"[{int(t.min())}, {int(t.max())}]")


def _q_sample_of_part_b(x0, t, noise, alphas_cumprod):
    """Part B's answer, in the learner's namespace while Parts D and E are checked."""
    _check_args("x0", "q_sample(x0, t, noise, alphas_cumprod)", x0, t, [alphas_cumprod])
    if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
        raise _Misuse(f"q_sample(x0, t, noise, alphas_cumprod): noise must have x0's shape {tuple(x0.shape)}, got {_shape(noise)}")
    abar = _per_sample(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def _posterior_of_part_c(x0, xt, t, betas, alphas_cumprod):
    """Part C's answer, in the learner's namespace while Part E is checked."""
    _check_args("x0", "posterior_mean_variance(x0, xt, t, betas, alphas_cumprod)", x0, t, [betas, alphas_cumprod])
    if not isinstance(xt, torch.Tensor) or xt.shape != x0.shape:
        raise _Misuse(f"posterior_mean_variance(x0, xt, t, betas, alphas_cumprod): xt must have x0's shape "
                      f"{tuple(x0.shape)}, got {_shape(xt)}")
    abar_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    coef_x0 = betas * abar_prev.sqrt() / (1 - alphas_cumprod)
    coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)
    variance = betas * (1 - abar_prev) / (1 - alphas_cumprod)
    mean = _per_sample(coef_x0, t, x0) * x0 + _per_sample(coef_xt, t, x0) * xt
    return mean, _per_sample(variance, t, x0).expand_as(x0)


def _earlier_parts_in_place(function, names: tuple[str, ...]):
    """Bind ``names`` (``q_sample``, ``posterior_mean_variance``) in ``function``'s module (the notebook)
    to the right answers above while the block runs, then restore what was there."""
    right = {"q_sample": _q_sample_of_part_b, "posterior_mean_variance": _posterior_of_part_c}
    return bound_in_globals_of(function, {name: right[name] for name in names})


# --------------------------------------------------------------------------- Part A


def _schedule_pair(expect, make_schedule, num_steps: int, kind: str):
    out = _call(expect, f"make_schedule({num_steps}, {kind!r})", make_schedule, num_steps, kind)
    expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out),
           f"make_schedule({num_steps}, {kind!r}) returns a pair of tensors (betas, alphas_cumprod), got "
           f"{type(out).__name__}. hint: return betas, torch.cumprod(1 - betas, dim=0)")
    betas, abar = out
    expect(tuple(betas.shape) == (num_steps,) and tuple(abar.shape) == (num_steps,),
           f"make_schedule({num_steps}, {kind!r}) gives two ({num_steps},) tensors, one value per step, got "
           f"{_shape(betas)} and {_shape(abar)}. hint: index k = 0..T-1 is the paper's t = k + 1; abar_0 = 1 is not stored")
    return betas, abar


@visible_check
def make_schedule(make_schedule, expect):
    # linear, T = 3: linspace(1e-4, 0.02, 3) = [1e-4, 0.01005, 0.02]
    betas, abar = _schedule_pair(expect, make_schedule, 3, "linear")
    want_betas = torch.tensor([1e-4, 0.01005, 0.02], dtype=F64)
    hint = "betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)"
    if _close(betas, want_betas.flip(0)):
        hint = "the betas grow: from beta_1 = 1e-4 (index 0) up to beta_T = 0.02 (index T - 1)"
    elif any(_close(betas, torch.tensor([1e-4 + k * (0.02 - 1e-4) / 3 for k in ks], dtype=F64)) for ks in ((0, 1, 2), (1, 2, 3))):
        hint = "T values from 1e-4 to 0.02, both included (steps of (0.02 - 1e-4) / (T - 1)): torch.linspace(1e-4, 0.02, num_steps)"
    expect(_close(betas, want_betas, rtol=1e-6, atol=1e-12),
           f"linear, T = 3: betas = linspace(1e-4, 0.02, 3) = [0.0001, 0.01005, 0.02], got {_fmt(betas)}. hint: {hint}")
    alphas = [1 - b for b in want_betas.tolist()]
    want_abar = torch.tensor([alphas[0], alphas[0] * alphas[1], alphas[0] * alphas[1] * alphas[2]], dtype=F64)
    hint = "alphas_cumprod = torch.cumprod(1 - betas, dim=0): abar_t is the product of alpha_s = 1 - beta_s for s <= t"
    if _close(abar, 1 - want_betas):
        hint = "that is alpha_t = 1 - beta_t; abar_t is the running product of the alphas: torch.cumprod(1 - betas, dim=0)"
    elif _close(abar, torch.cumprod(want_betas, 0)):
        hint = "the cumulative product of the alphas, 1 - betas, not of the betas"
    elif _close(abar, torch.cat([torch.ones(1, dtype=F64), want_abar[:-1]])):
        hint = ("0-based: alphas_cumprod[0] is abar_1 = 1 - beta_1 (the paper's t = 1), not abar_0 = 1, which is not "
                "stored; torch.cumprod(1 - betas, dim=0) gives exactly that")
    expect(_close(abar, want_abar, rtol=1e-6, atol=1e-12),
           f"linear, T = 3: alphas_cumprod = [0.9999, 0.9999 * 0.98995, 0.9999 * 0.98995 * 0.98] = {_fmt(want_abar, 6)}, "
           f"got {_fmt(abar, 6)}. hint: {hint}")
    expect(betas.dtype == F64 and abar.dtype == F64,
           f"the schedule is computed and returned in float64, got {betas.dtype} and {abar.dtype}. hint: "
           "dtype=torch.float64 in linspace/arange (products of a thousand numbers and differences such as 1 - abar "
           "need it; the later functions cast to the data's dtype)")

    # cosine, T = 2 by hand: f(t) = cos(((t / 2 + s) / (1 + s)) pi / 2)^2, t = 0, 1, 2
    f = [_cosine_f(t, 2) for t in range(3)]
    beta_1 = 1 - f[1] / f[0]  # 0.5062
    want_betas = torch.tensor([beta_1, MAX_BETA], dtype=F64)
    want_abar = torch.tensor([1 - beta_1, (1 - beta_1) * (1 - MAX_BETA)], dtype=F64)
    betas, abar = _schedule_pair(expect, make_schedule, 2, "cosine")
    hint = ("abar(t) = f(t) / f(0) with f(t) = cos(((t / T + s) / (1 + s)) pi / 2)^2 for t = 0..T (T + 1 values, "
            "torch.arange(T + 1)); beta_t = 1 - abar(t) / abar(t - 1) for t = 1..T, clipped at 0.999")
    if isinstance(betas, torch.Tensor) and betas.numel() == 2 and abs(float(betas[0]) - 0.5) < 1e-6:
        hint = "the offset s = 0.008 inside the cosine: ((t / T + s) / (1 + s)) pi / 2"
    elif isinstance(betas, torch.Tensor) and betas.numel() == 2 and abs(float(betas[0])) < 1e-9:
        hint = ("beta_1 is 0: abar(t) for t = 1..T is what the schedule stores; compute f on t = 0..T (torch.arange(T + 1)) "
                "and take beta_t = 1 - f(t) / f(t - 1) for t = 1..T (abar(0) = 1 is not stored)")
    elif isinstance(betas, torch.Tensor) and betas.numel() == 2 and float(betas[1]) > MAX_BETA + 1e-9:
        hint = ("clip the betas at 0.999: f(T) = cos(pi / 2)^2 = 0 makes beta_T = 1 and abar_T = 0, and 1 / sqrt(abar_T) "
                "would be infinite when sampling: betas.clamp(max=0.999)")
    expect(_close(betas, want_betas, rtol=1e-9, atol=1e-12),
           f"cosine, T = 2: f(0) = {f[0]:.6f}, f(1) = {f[1]:.6f}, f(2) = cos(pi / 2)^2 = 0, so beta_1 = 1 - f(1) / f(0) = "
           f"{beta_1:.6f} and beta_2 = min(1 - f(2) / f(1), 0.999) = 0.999; got {_fmt(betas, 6)}. hint: {hint}")
    hint = "alphas_cumprod = torch.cumprod(1 - betas, dim=0) with the clipped betas"
    if isinstance(abar, torch.Tensor) and abar.numel() == 2 and abs(float(abar[1])) < 1e-12:
        hint = ("recompute alphas_cumprod = torch.cumprod(1 - betas, dim=0) *after* clipping the betas: f(T) / f(0) = 0, but "
                "the clipped schedule keeps abar_T = abar_{T-1} * 0.001 > 0, and the pair must agree")
    expect(_close(abar, want_abar, rtol=1e-9, atol=1e-15),
           f"cosine, T = 2: alphas_cumprod = cumprod(1 - betas) = [{1 - beta_1:.6f}, {1 - beta_1:.6f} * 0.001] = "
           f"{_fmt(want_abar, 6)}, got {_fmt(abar, 6)}. hint: {hint}")
    expect(betas.dtype == F64 and abar.dtype == F64,
           f"the cosine schedule is float64 too, got {betas.dtype} and {abar.dtype}. hint: torch.arange(T + 1, dtype=torch.float64)")

    # T = 1000: the whole schedules
    for kind in ("linear", "cosine"):
        betas, abar = _schedule_pair(expect, make_schedule, 1000, kind)
        want_betas, want_abar = _schedule(1000, kind)
        where = torch.argmax((betas.detach().to(F64) - want_betas).abs()).item() if betas.is_floating_point() else 0
        expect(_close(betas, want_betas, rtol=1e-9, atol=1e-13),
               f"{kind}, T = 1000: betas[{where}] should be {want_betas[where].item():.8g}, got "
               f"{betas[where].item() if betas.is_floating_point() else _dtype(betas)}; the first three should be "
               f"{_fmt(want_betas[:3], 6)}, the last {want_betas[-1].item():.6g}. hint: do not hard-code T anywhere")
        expect(_close(abar, want_abar, rtol=1e-9, atol=1e-15),
               f"{kind}, T = 1000: alphas_cumprod = cumprod(1 - betas) ends at abar_T = {want_abar[-1].item():.6g}, got "
               f"{abar[-1].item() if abar.is_floating_point() else _dtype(abar)}. hint: torch.cumprod(1 - betas, dim=0)")
    f = [_cosine_f(t, 1000) for t in (0, 500)]
    expect(abs(abar[499].item() - f[1] / f[0]) <= 1e-10 * f[1] / f[0],
           f"cosine: before the clipping bites, cumprod(1 - beta) telescopes back to abar(t) = f(t) / f(0): at t = 500 "
           f"(index 499) {f[1] / f[0]:.10f}, got {abar[499].item():.10f}")


# --------------------------------------------------------------------------- Part B


@visible_check
def q_sample(q_sample, expect):
    _, abar = _hand_schedule()
    x0 = torch.tensor([[1.0, -2.0, 0.5], [2.0, 0.0, -1.0]])
    noise = torch.tensor([[0.5, 1.0, -1.0], [-0.5, 2.0, 1.0]])
    before = x0.clone(), noise.clone(), abar.clone()
    t = torch.tensor([1, 0])
    xt = _call(expect, "q_sample(x0, t, noise, alphas_cumprod) with alphas_cumprod = [0.9216, 0.36], t = [1, 0]",
               q_sample, x0, t, noise, abar)
    expect(isinstance(xt, torch.Tensor) and xt.shape == x0.shape,
           f"x0 of shape (2, 3) gives x_t of shape (2, 3), got {_shape(xt)}. hint: the coefficients are one number per "
           "sample: shape (B, 1) here, (B, 1, ..., 1) in general, e.g. per_sample(alphas_cumprod, t, x0)")

    def rows(first, second):  # sample 0 with (coefficient of x_0, of noise) = first, sample 1 with second
        return torch.stack([first[0] * x0[0] + first[1] * noise[0], second[0] * x0[1] + second[1] * noise[1]])

    want = rows((0.6, 0.8), (0.96, 0.28))
    hint = "x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, with abar_t = alphas_cumprod[t] for each sample"
    if _close(xt, rows((0.36, 0.64), (0.9216, 0.0784))):
        hint = "the square roots: the coefficients are standard deviations, sqrt(abar_t) and sqrt(1 - abar_t), not variances"
    elif _close(xt, rows((0.96, 0.28), (0.6, 0.8))):
        hint = ("0-based timesteps: sample 0 has t = 1, so abar = alphas_cumprod[1] = 0.36; index with t itself "
                "(alphas_cumprod[t], no t - 1)")
    elif _close(xt, rows((0.8, 0.6), (0.28, 0.96))):
        hint = "sqrt(abar_t) multiplies x_0 and sqrt(1 - abar_t) the noise, not the other way round"
    elif _close(xt, rows((0.6, 0.8), (0.6, 0.8))):
        hint = "one abar per sample, alphas_cumprod[t] with the whole (B,) tensor t, not t[0] for the batch"
    expect(_close(xt, want, rtol=1e-6, atol=1e-6),
           f"alphas_cumprod = [0.9216, 0.36] and t = [1, 0]: sample 0 has abar = 0.36, so x_t = 0.6 x_0 + 0.8 noise, "
           f"sample 1 has abar = 0.9216, so x_t = 0.96 x_0 + 0.28 noise: expected {_fmt(want)}, got {_fmt(xt)}. hint: {hint}")
    expect(xt.dtype == torch.float32,
           f"float32 data with the float64 schedule gives float32 x_t, got {xt.dtype}. hint: cast the coefficients to "
           "x0's dtype (per_sample does); the schedule stays float64")
    expect(all(torch.equal(a, b) for a, b in zip((x0, noise, abar), before)),
           "do not modify x0, noise or alphas_cumprod in place. hint: no +=, *= or out= on the inputs")

    square, square_noise = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xt = _call(expect, "q_sample on a (2, 2) batch", q_sample, square, torch.tensor([0, 1]), square_noise, abar)
    want = torch.stack([0.96 * square[0] + 0.28 * square_noise[0], 0.6 * square[1] + 0.8 * square_noise[1]])
    expect(_close(xt, want, rtol=1e-6, atol=1e-6),
           f"a batch of 2 samples of 2 coordinates, t = [0, 1]: expected {_fmt(want)}, got {_fmt(xt)}. hint: "
           "alphas_cumprod[t] has shape (B,) and broadcasts along the *last* dimension of (B, D) (silently, when "
           "B = D): reshape it to (B, 1, ..., 1), e.g. per_sample(alphas_cumprod, t, x0)")

    g = torch.Generator().manual_seed(6)
    images, image_noise = torch.randn(3, 1, 2, 2, generator=g, dtype=F64), torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
    xt = _call(expect, "q_sample on images (3, 1, 2, 2)", q_sample, images, torch.tensor([0, 1, 1]), image_noise, abar)
    root = torch.tensor([0.96, 0.6, 0.6], dtype=F64).reshape(3, 1, 1, 1)
    want = root * images + (1 - root**2).sqrt() * image_noise
    expect(_close(xt, want, rtol=1e-12, atol=1e-12) and xt.dtype == F64,
           f"images (3, 1, 2, 2) in float64 give float64 x_t of the same shape, each sample with its own abar; got "
           f"{_shape(xt)} ({_dtype(xt)}). hint: per_sample(alphas_cumprod, t, x0) has shape (B, 1, 1, 1) for images")

    _, abar = _schedule(1000, "linear")
    x0 = torch.randn(4, 2, generator=g, dtype=F64)
    xt = _call(expect, "q_sample with the linear schedule", q_sample, x0, torch.zeros(4, dtype=torch.long), torch.zeros_like(x0), abar)
    expect(_close(xt, math.sqrt(0.9999) * x0, rtol=1e-12, atol=1e-14),
           f"t = 0 is the paper's t = 1, the first noising step: with the linear schedule abar_1 = 1 - 1e-4, so zero noise "
           f"gives x_t = sqrt(0.9999) x_0; got {_fmt(xt)} for x_0 = {_fmt(x0)}")


# --------------------------------------------------------------------------- Part C


def _bayes(x0: float, xt: float, alpha: float, beta: float, abar_prev: float) -> tuple[float, float]:
    """The posterior of x_{t-1} given x_t and x_0, for scalars, by Bayes' rule:
    prior N(sqrt(abar_prev) x0, 1 - abar_prev) times likelihood N(x_t; sqrt(alpha) x_{t-1}, beta)."""
    if abar_prev == 1.0:
        return x0, 0.0  # the prior is a point mass at x_0
    prior_precision, likelihood_precision = 1 / (1 - abar_prev), alpha / beta
    variance = 1 / (prior_precision + likelihood_precision)
    mean = variance * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * xt / beta)
    return mean, variance


def _posterior_table(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, betas: torch.Tensor, abar: torch.Tensor):
    """Bayes' rule elementwise: (mean, variance) of x0's shape, float64."""
    mean, variance = [], []
    for b, k in enumerate(t.tolist()):
        alpha, beta = 1 - betas[k].item(), betas[k].item()
        abar_prev = abar[k - 1].item() if k > 0 else 1.0
        pairs = [_bayes(a, c, alpha, beta, abar_prev) for a, c in zip(x0[b].reshape(-1).tolist(), xt[b].reshape(-1).tolist())]
        mean.append([m for m, _ in pairs])
        variance.append([v for _, v in pairs])
    return torch.tensor(mean, dtype=F64).reshape(x0.shape), torch.tensor(variance, dtype=F64).reshape(x0.shape)


@visible_check
def posterior_mean_variance(posterior_mean_variance, expect):
    betas, abar = _hand_schedule()
    x0 = torch.tensor([[1.0, -2.0], [0.5, 1.5], [2.0, 0.0]])
    xt = torch.tensor([[0.5, 1.0], [-1.0, 0.25], [1.0, 3.0]])
    before = x0.clone(), xt.clone(), betas.clone(), abar.clone()
    t = torch.tensor([1, 1, 0])
    out = _call(expect, "posterior_mean_variance with betas = [0.0784, 0.609375], alphas_cumprod = [0.9216, 0.36], t = [1, 1, 0]",
                posterior_mean_variance, x0, xt, t, betas, abar)
    expect(isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out),
           f"return a pair of tensors (mean, variance), got {type(out).__name__}"
           f"{' of ' + str(len(out)) if isinstance(out, (tuple, list)) else ''}. hint: return mean, variance")
    mean, variance = out
    expect(mean.shape == x0.shape and variance.shape == x0.shape,
           f"x0 and xt of shape (3, 2) give a mean and a variance of shape (3, 2), got {_shape(mean)} and {_shape(variance)}. "
           "hint: the coefficients are (B, 1, ..., 1) (per_sample); the variance is the same for every coordinate of a "
           "sample: per_sample(...).expand_as(x0)")
    want_mean, want_variance = _posterior_table(x0, xt, t, betas, abar)
    # index 1 (t = 2): coef_x0 = 0.609375 * 0.96 / 0.64 = 0.9140625, coef_xt = 0.0784 * 0.625 / 0.64 = 0.0765625
    hint = ("mean = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t, "
            "with abar_t = alphas_cumprod[k] and abar_{t-1} = alphas_cumprod[k - 1] for index k")
    if _close(mean[:2], 0.0765625 * x0[:2] + 0.9140625 * xt[:2]):
        hint = "the two coefficients are swapped: beta_t sqrt(abar_{t-1}) / (1 - abar_t) multiplies x_0"
    elif _close(mean[:2], (0.609375 * 0.6 / 0.64) * x0[:2] + 0.625 * xt[:2]):
        hint = ("abar_{t-1} is the previous step's: for index k = 1 it is alphas_cumprod[0] = 0.9216, while 1 - abar_t "
                "uses alphas_cumprod[1] = 0.36")
    elif _close(mean[:2], 0.9140625 * x0[:2] + (0.0784 * 0.390625 / 0.64) * xt[:2]):
        hint = "sqrt(alpha_t) in the coefficient of x_t, not alpha_t"
    expect(_close(mean[:2], want_mean[:2], rtol=1e-5, atol=1e-6),
           f"index k = 1 (the paper's t = 2): Bayes' rule with the prior x_{{t-1}} | x_0 ~ N(0.96 x_0, 0.0784) and the likelihood "
           f"x_t | x_{{t-1}} ~ N(0.625 x_{{t-1}}, 0.609375) gives the mean 0.9140625 x_0 + 0.0765625 x_t = {_fmt(want_mean[:2])}, "
           f"got {_fmt(mean[:2])}. hint: {hint}")
    hint = "beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)"
    if _close(variance[:2], torch.full((2, 2), 0.609375, dtype=F64)):
        hint = "that is beta_t, the forward step's variance; the posterior's is beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)"
    elif _close(variance[:2], torch.full((2, 2), 0.0746484375 ** 0.5, dtype=F64)):
        hint = "return the variance beta~_t, not the standard deviation"
    expect(_close(variance[:2], want_variance[:2], rtol=1e-5, atol=1e-7),
           f"index k = 1: the posterior variance 1 / (1 / 0.0784 + 0.390625 / 0.609375) = beta~ = 0.609375 * 0.0784 / 0.64 = "
           f"0.0746484375, got {_fmt(variance[:2], 8)}. hint: {hint}")
    hint = ("build abar_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]]): abar_{t-1} at index 0 is "
            "abar_0 = 1 (no noise yet), so the mean's coefficients are 1 and 0 and beta~ = 0")
    if _close(mean[2:], 0.6 * x0[2:] + (0.64 * 0.96 / 0.0784) * xt[2:]):
        hint = ("alphas_cumprod[k - 1] with k = 0 is alphas_cumprod[-1], the *last* step's abar (Python wraps around); "
                "abar_{t-1} at index 0 is 1: " + hint)
    expect(_close(mean[2:], x0[2:], rtol=1e-6, atol=1e-6) and _close(variance[2:], torch.zeros(1, 2, dtype=F64), atol=0),
           f"index k = 0 (the paper's t = 1, the last denoising step): abar_0 = 1, so given x_1 and x_0 the previous "
           f"step is x_0 itself: mean x_0 = {_fmt(x0[2:])} and variance exactly 0; got mean {_fmt(mean[2:])}, variance "
           f"{_fmt(variance[2:])}. hint: {hint}")
    expect(mean.dtype == torch.float32 and variance.dtype == torch.float32,
           f"float32 data with the float64 schedule gives float32 results, got {mean.dtype} and {variance.dtype}. hint: "
           "compute the coefficients in float64 from the schedule, then cast (per_sample casts to x0's dtype)")
    expect(all(torch.equal(a, b) for a, b in zip((x0, xt, betas, abar), before)),
           "do not modify the inputs in place. hint: no +=, *= or out= on them, no assignment into alphas_cumprod")

    betas, abar = _schedule(1000, "linear")
    g = torch.Generator().manual_seed(7)
    x0, xt = torch.randn(5, 1, 2, 2, generator=g, dtype=F64), torch.randn(5, 1, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([999, 0, 500, 1, 37])
    out = _call(expect, "posterior_mean_variance with the linear schedule (T = 1000) on images (5, 1, 2, 2)",
                posterior_mean_variance, x0, xt, t, betas, abar)
    expect(isinstance(out, (tuple, list)) and len(out) == 2, "return a pair (mean, variance)")
    want_mean, want_variance = _posterior_table(x0, xt, t, betas, abar)
    expect(_close(out[0], want_mean, rtol=1e-10, atol=1e-12) and _close(out[1], want_variance, rtol=1e-10, atol=0)
           and out[0].dtype == F64 and out[1].dtype == F64,
           f"the linear schedule, T = 1000, float64 images (5, 1, 2, 2) at indices t = [999, 0, 500, 1, 37]: Bayes' rule "
           f"per sample gives the mean {_fmt(want_mean)} and a variance of shape (5, 1, 2, 2); got the mean {_fmt(out[0])} "
           f"and a variance of shape {_shape(out[1])} ({_dtype(out[1])}). hint: per-sample coefficients (B, 1, 1, 1), "
           "float64 in, float64 out")


# --------------------------------------------------------------------------- Part D


class _LinearEps(nn.Module):
    """``eps_model(x, t) = a x``: a linear stand-in whose loss has a closed form. Records its calls."""

    def __init__(self, a: float, dtype=torch.float32):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=dtype))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, *rest):
        if rest or not isinstance(x, torch.Tensor) or not isinstance(t, torch.Tensor):
            raise _Misuse(f"the model is called as eps_model(x_t, t) with two tensors, got "
                          f"{', '.join(_shape(v) for v in (x, t, *rest))}")
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.a * x


class _Oracle(nn.Module):
    """An eps_model that knows x_0: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), exact at its t."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor):
        super().__init__()
        self.x0, self.abar = x0, abar

    def forward(self, x, t):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or tuple(t.shape) != (len(x),):
            raise _Misuse(f"the model's t is a (B,) = ({len(x)},) int64 tensor of 0-based timesteps, got {_shape(t)} ({_dtype(t)})")
        abar = _per_sample(self.abar, t, x)
        return (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()


def _draws(num_steps: int, shape, dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """t, then eps, from a generator seeded with ``seed`` (the convention); returns the generator after."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(num_steps, (shape[0],), generator=g)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return t, eps, g


@visible_check
def noise_prediction_loss(noise_prediction_loss, expect):
    _, abar = _hand_schedule()
    seed, a = 11, 0.5
    x0 = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.5, 0.0], [2.0, 1.0], [0.0, -0.5], [1.0, 1.0]])
    before = x0.clone(), abar.clone()
    model = _LinearEps(a)
    generator = torch.Generator().manual_seed(seed)
    with _earlier_parts_in_place(noise_prediction_loss, ("q_sample",)):  # Part D on its own: a right q_sample
        loss = _call(expect, "with a linear stand-in eps_model(x, t) = x / 2", noise_prediction_loss, model, x0, abar, generator)
    expect(_scalar(loss), f"return a scalar tensor (0-dim), got {_shape(loss)}. hint: the mean over every element, "
                          "e.g. torch.nn.functional.mse_loss(eps_model(x_t, t), eps)")
    expect(len(model.calls) == 1 and model.calls[0][0].shape == x0.shape,
           f"call eps_model(x_t, t) once, on the whole batch x_t of x0's shape (6, 2); the calls had inputs "
           f"{[tuple(x.shape) for x, _ in model.calls]}")
    seen_x, seen_t = model.calls[0]
    expect(not seen_t.is_floating_point() and tuple(seen_t.shape) == (6,),
           f"t is a (B,) = (6,) integer tensor, one timestep per sample, got {_shape(seen_t)} ({_dtype(seen_t)}). hint: "
           "torch.randint(T, (B,), generator=generator)")
    want_t, want_eps, state = _draws(2, x0.shape, x0.dtype, seed)
    expect(torch.equal(seen_t.to(want_t.device).long(), want_t),
           f"with this generator, t = torch.randint(T, (B,), generator=generator) gives {want_t.tolist()}, the model saw "
           f"{seen_t.tolist()}. hint: draw t first, with the generator you were given, then eps "
           "(torch.randn(x0.shape, generator=generator, dtype=x0.dtype)), so that a seed gives the package's loss")
    root = _per_sample(abar, want_t, x0)
    want_xt = root.sqrt() * x0 + (1 - root).sqrt() * want_eps
    expect(_close(seen_x, want_xt, rtol=1e-6, atol=1e-6),
           f"the model must see x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for the t it is given, with eps = "
           f"torch.randn(x0.shape, generator=generator, dtype=x0.dtype) drawn right after t: expected {_fmt(want_xt)}, "
           f"got {_fmt(seen_x)}. hint: q_sample(x0, t, eps, alphas_cumprod), eps drawn after t")
    want = ((want_eps - a * want_xt) ** 2).mean().item()
    hint = "L_simple = mean over every element of (eps - eps_model(x_t, t))^2"
    if _near(loss, want * x0.numel()):
        hint = "the mean, not the sum: .mean() (or F.mse_loss), so the loss does not grow with the batch"
    elif _near(loss, want * x0.shape[1]):
        hint = "the mean over every element (F.mse_loss), not the per-sample sum averaged over the batch"
    elif _near(loss, ((x0 - a * want_xt) ** 2).mean().item()):
        hint = "the model predicts the noise eps, not x_0: compare eps_model(x_t, t) with eps"
    elif _near(loss, want ** 0.5):
        hint = "the mean of the squared errors, no square root"
    expect(_near(loss, want, 1e-5),
           f"eps_model(x, t) = x / 2 and this generator's t and eps give mean((eps - x_t / 2)^2) = {want:.6f}, got "
           f"{_show(loss)}. hint: {hint}")
    expect(torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=state)),
           "draw t and then eps from the generator, nothing else. hint: the same seed must give the same loss")
    expect(loss.requires_grad, "the loss must be differentiable in the model's parameters. hint: no torch.no_grad(), "
                               ".detach() or .item() on the prediction")
    (grad,) = torch.autograd.grad(loss, [model.a])
    want_grad = (-2 * (want_eps - a * want_xt) * want_xt).mean().item()
    expect(_near(grad, want_grad, 1e-4),
           f"dL/da for eps_model = a x is mean(-2 (eps - a x_t) x_t) = {want_grad:.6f}, got {_show(grad)}. hint: the gradient "
           "must reach the model only through its prediction; eps and x_t are data")
    expect(all(torch.equal(u, v) for u, v in zip((x0, abar), before)), "do not modify x0 or alphas_cumprod in place")

    # every timestep 0..T-1, none outside; the oracle that knows x_0 scores 0
    _, abar3 = _schedule(3, "cosine")
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(600, 2, generator=g, dtype=F64)
    oracle = _Oracle(x0, abar3)
    with _earlier_parts_in_place(noise_prediction_loss, ("q_sample",)):
        recorder = _LinearEps(0.0, F64)
        _call(expect, "600 samples, T = 3", noise_prediction_loss, recorder, x0, abar3, torch.Generator().manual_seed(13))
        perfect = _call(expect, "600 samples, T = 3, an eps_model that knows x_0", noise_prediction_loss, oracle, x0, abar3,
                        torch.Generator().manual_seed(13))
    seen = sorted(set(recorder.calls[0][1].tolist())) if recorder.calls else []
    expect(seen == [0, 1, 2],
           f"t ~ U{{0, ..., T-1}} (0-based): with T = 3 and 600 samples every index 0, 1, 2 appears, the model saw {seen}. "
           "hint: torch.randint(T, (B,), generator=generator), whose upper bound is exclusive; T = len(alphas_cumprod)")
    want_t, want_eps, _ = _draws(3, x0.shape, F64, 13)
    root = _per_sample(abar3, want_t, x0)
    seen_x = recorder.calls[0][0]
    expect(seen_x.dtype == F64 and _close(seen_x, root.sqrt() * x0 + (1 - root).sqrt() * want_eps, rtol=1e-12, atol=1e-12),
           f"float64 data: the model must see a float64 x_t made with float64 noise, eps = torch.randn(x0.shape, "
           f"generator=generator, dtype=x0.dtype) (a float32 draw gives other numbers), got {_dtype(seen_x)} "
           f"{_fmt(seen_x)}, expected {_fmt(root.sqrt() * x0 + (1 - root).sqrt() * want_eps)}")
    expect(_scalar(perfect) and perfect.dtype == F64 and _near(perfect, 0.0, 1e-10),
           f"an eps_model that predicts the noise exactly (it knows x_0: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t) at the t "
           f"it is given) scores 0, in float64 for float64 data; got {_show(perfect)} ({_dtype(perfect)}). hint: the model "
           "must see q_sample(x0, t, eps, alphas_cumprod) with the same t it is given, and eps of x0's dtype")
    zero = _call(expect, "eps_model = 0, no generator", noise_prediction_loss, lambda x, t: torch.zeros_like(x), x0, abar3, None)
    expect(_scalar(zero) and 0.8 < zero.item() < 1.2,
           f"a model that predicts 0 scores mean(eps^2), about 1 for 1,200 standard normal numbers; generator=None must "
           f"work too (the global random state); got {_show(zero)}")


# --------------------------------------------------------------------------- Part E


@visible_check
def ancestral_step(ancestral_step, expect):
    betas, abar = _hand_schedule()
    xt = torch.tensor([[1.0, -0.5], [0.25, 2.0], [-1.0, 1.0], [0.5, 0.5]])
    eps = torch.tensor([[0.5, 1.0], [-1.0, 0.5], [2.0, -1.0], [0.0, 1.5]])
    noise = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25], [1.5, -0.5]])
    before = xt.clone(), eps.clone(), noise.clone(), betas.clone(), abar.clone()
    # index 1 (t = 2): mean = (x_t - 0.609375 / 0.8 eps) / 0.625, sigma = sqrt(0.609375)
    # index 0 (t = 1): mean = (x_t - 0.0784 / 0.28 eps) / 0.96 = (x_t - 0.28 eps) / 0.96, no noise
    mean_1 = (xt - 0.76171875 * eps) / 0.625
    mean_0 = (xt - 0.28 * eps) / 0.96
    sigma = math.sqrt(0.609375)
    ones = torch.ones(4, dtype=torch.long)
    with _earlier_parts_in_place(ancestral_step, ("q_sample", "posterior_mean_variance")):  # Part E on its own
        out = _call(expect, "ancestral_step with betas = [0.0784, 0.609375], alphas_cumprod = [0.9216, 0.36], t = 1",
                    ancestral_step, eps, xt, ones, betas, abar, torch.zeros_like(xt))
        expect(isinstance(out, torch.Tensor) and out.shape == xt.shape,
               f"x_t of shape (4, 2) gives x_(t-1) of shape (4, 2), got {_shape(out)}. hint: per-sample coefficients "
               "(B, 1, ..., 1), e.g. per_sample(betas, t, xt)")
        hint = "mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), alpha_t = 1 - beta_t"
        if _close(out, xt - 0.76171875 * eps):
            hint = "divide by sqrt(alpha_t) = sqrt(1 - beta_t)"
        elif _close(out, (xt - 0.8 * eps) / 0.625) or _close(out, (xt - 0.8 * eps) / 0.6):
            hint = ("the coefficient of eps is beta_t / sqrt(1 - abar_t), not sqrt(1 - abar_t): "
                    "(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) is x0_hat, not the mean of x_(t-1)")
        elif _close(out, mean_0):
            hint = "0-based: t = 1 is index 1 of the schedule (the paper's t = 2): betas[t], alphas_cumprod[t]"
        elif _close(out, (xt - 0.609375 / 0.64 * eps) / 0.625):
            hint = "sqrt(1 - abar_t) under beta_t, not 1 - abar_t"
        expect(_close(out, mean_1, rtol=1e-5, atol=1e-6),
               f"zero noise at index 1 (the paper's t = 2): the mean (x_t - 0.609375 / sqrt(0.64) eps) / sqrt(0.390625) = "
               f"(x_t - 0.76171875 eps) / 0.625 = {_fmt(mean_1)}, got {_fmt(out)}. hint: {hint}")
        out = _call(expect, "ancestral_step at t = 1", ancestral_step, eps, xt, ones, betas, abar, noise)
        want = mean_1 + sigma * noise
        hint = "x_(t-1) = mean + sigma_t z with sigma_t = sqrt(beta_t) (the variance sigma_t^2 = beta_t)"
        if _close(out, mean_1 + 0.609375 * noise):
            hint = "sigma_t is the standard deviation sqrt(beta_t); beta_t is the variance"
        elif _close(out, mean_1 + math.sqrt(0.0746484375) * noise):
            hint = "here sigma_t^2 = beta_t (Ho et al.'s first choice), not the posterior's beta~_t"
        elif _close(out, mean_1):
            hint = "add the noise: x_(t-1) = mean + sqrt(beta_t) z for t > 0"
        expect(_close(out, want, rtol=1e-5, atol=1e-6),
               f"index 1 with noise z: mean + sqrt(0.609375) z = {_fmt(want)}, got {_fmt(out)}. hint: {hint}")
        t = torch.tensor([1, 0, 1, 0])
        out = _call(expect, "ancestral_step with t = [1, 0, 1, 0]", ancestral_step, eps, xt, t, betas, abar, noise)
        later = (t == 1)[:, None]
        want = torch.where(later, mean_1 + sigma * noise, mean_0)
        hint = "the mean of each sample with its own t, plus sqrt(beta_t) z only where t > 0"
        if _close(out, torch.where(later, mean_1 + sigma * noise, mean_0 + 0.28 * noise)):
            hint = ("no noise at t = 0 (the paper's t = 1): the last step returns the mean, x_0 = mu_theta(x_1, 1); multiply "
                    "the noise by a per-sample mask, (t > 0) reshaped to (B, 1, ..., 1)")
        elif _close(out, torch.where(later, mean_1, mean_0) + sigma * noise) or _close(out, mean_1 + sigma * noise):
            hint = "per sample: each sample uses its own t, and the noise is dropped only for the samples with t = 0"
        elif _close(out, torch.where(later, mean_1, mean_0)):
            hint = "drop the noise only where t = 0, not for the whole batch when some t is 0"
        expect(_close(out, want, rtol=1e-5, atol=1e-6),
               f"a batch with t = [1, 0, 1, 0]: samples 0 and 2 take (x_t - 0.76171875 eps) / 0.625 + sqrt(0.609375) z, "
               f"samples 1 and 3 (index 0, the last step) take (x_t - 0.28 eps) / 0.96 and no noise: {_fmt(want)}, got "
               f"{_fmt(out)}. hint: {hint}")
        expect(out.dtype == torch.float32,
               f"float32 x_t with the float64 schedule gives a float32 x_(t-1), got {out.dtype}. hint: per_sample casts "
               "the coefficients to x_t's dtype")
        expect(all(torch.equal(u, v) for u, v in zip((xt, eps, noise, betas, abar), before)),
               "do not modify the inputs in place. hint: no +=, *= or out= on them")

        # the last step gives back x_0 when eps is the true noise (float64, linear T = 1000, images)
        betas, abar = _schedule(1000, "linear")
        g = torch.Generator().manual_seed(8)
        x0, true_eps = torch.randn(3, 1, 2, 2, generator=g, dtype=F64), torch.randn(3, 1, 2, 2, generator=g, dtype=F64)
        x1 = math.sqrt(abar[0].item()) * x0 + math.sqrt(1 - abar[0].item()) * true_eps
        out = _call(expect, "ancestral_step at t = 0 on images", ancestral_step, true_eps, x1, torch.zeros(3, dtype=torch.long),
                    betas, abar, torch.randn(3, 1, 2, 2, generator=g, dtype=F64))
        expect(_close(out, x0, rtol=1e-9, atol=1e-9) and out.dtype == F64,
               f"the last step (t = 0, the paper's t = 1) with the true noise: x_1 = sqrt(abar_1) x_0 + sqrt(1 - abar_1) eps "
               f"gives back x_0, in float64 for float64 images (3, 1, 2, 2); expected {_fmt(x0)}, got {_fmt(out)} "
               f"({_dtype(out)}). hint: no noise at t = 0, and (x_1 - beta_1 / sqrt(1 - abar_1) eps) / sqrt(alpha_1) with "
               "abar_1 = alpha_1 = 1 - beta_1 is exactly x_0")
