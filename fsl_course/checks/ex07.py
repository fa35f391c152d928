"""Visible checks of exercise 07 (sampling and conditioning): DDIM's subsequence of timesteps, one
DDIM step, classifier-free guidance, and the DDIM sampling loop of a class-conditional model with
guidance.

Timesteps are **0-based**, as in :mod:`fsl_course.diffusion`: index ``k = 0..T-1`` of
``alphas_cumprod`` is the paper's ``t = k + 1``, and DDIM's "previous" step ``t_prev = -1`` means
``abar_prev = 1`` (the final step, to ``x_0``).

The expected values are worked out by hand, so the checks do not depend on the package's
reference implementations:

* a three-step schedule with round square roots, ``alphas_cumprod = [0.9216, 0.64, 0.36]``:
  ``sqrt(abar) = [0.96, 0.8, 0.6]`` and ``sqrt(1 - abar) = [0.28, 0.6, 0.8]``, so with ``eta = 0``
  a DDIM step is ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``,
  ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps`` with those numbers; with ``eta > 0``
  the checks evaluate ``sigma`` with Python's ``math``;
* the timesteps of ``linspace(T - 1, 0, steps)`` on small cases (``T = 10``, 4 steps: 9, 6, 3, 0);
* guidance on two small tensors (``w = 0`` gives back the conditional prediction);
* the sampling loop with a stand-in "model" whose noise prediction is known in closed form
  (``eps = sqrt(1 - abar_t) x - sqrt(abar_t) m_y`` for a fixed image ``m_y`` per label, the null
  label included), which records how it is called; the expected samples come from the loop
  written out here with the right answers of Parts A to C.

Part D is checked on its own: while its check runs, the names ``ddim_timesteps``, ``ddim_step`` and
``guided_eps`` that the learner's ``sample`` looks up in its notebook are bound to right answers
(and restored afterwards), so a mistake in Parts A to C fails only those parts' checks. The hidden
tests do the same.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

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
from fsl_course.checks.losses import shape_of as _shape

F64 = torch.float64
HAND_ABAR = (0.9216, 0.64, 0.36)  # sqrt 0.96, 0.8, 0.6; 1 - abar = 0.0784, 0.36, 0.64: sqrt 0.28, 0.6, 0.8
IMAGE_SHAPE = (1, 28, 28)


def _call(expect, what: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``, failing the check with a hint on an off-by-one timestep or a broadcasting error."""
    return call_checked(expect, what, function, args, kwargs, index_hint="timesteps are 0-based indices 0..T-1 into "
                        "alphas_cumprod (index k is the paper's t = k + 1); t_prev = -1 is not an index but the end, abar_prev = 1",
                        per_sample_call="per_sample(values, x)")


def _hand_schedule() -> torch.Tensor:
    return torch.tensor(HAND_ABAR, dtype=F64)


def _cosine_abar(num_steps: int) -> torch.Tensor:
    """The cosine schedule's alphas_cumprod (Nichol & Dhariwal 2021, betas capped at 0.999), from its formula."""
    f = [math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(num_steps + 1)]
    abar, product = [], 1.0
    for t in range(1, num_steps + 1):
        product *= 1 - min(1 - f[t] / f[t - 1], 0.999)
        abar.append(product)
    return torch.tensor(abar, dtype=F64)


# --------------------------------------------------------------------------- right answers for Parts A to C


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _timesteps_of_part_a(num_steps, steps):
    """Part A's answer, in the learner's namespace while Part D is checked."""
    if isinstance(num_steps, bool) or isinstance(steps, bool) or not isinstance(num_steps, int) or not isinstance(steps, int):
        raise _Misuse(f"ddim_timesteps(num_steps, steps) takes two ints, got {type(num_steps).__name__} and {type(steps).__name__}")
    if not 1 <= steps <= num_steps:
        raise _Misuse(f"ddim_timesteps(num_steps, steps): steps must be in 1..num_steps = 1..{num_steps}, got {steps}")
    return torch.linspace(num_steps - 1, 0, steps, dtype=F64).round().long()


def _ddim_coefficients(t, t_prev, alphas_cumprod, eta):
    """(sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_prev), sqrt(1 - abar_prev - sigma^2), sigma), each (B,) float64."""
    abar = alphas_cumprod.detach().to("cpu", F64)
    t, t_prev = t.cpu(), t_prev.cpu()
    abar_t = abar[t]
    abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(abar_t))
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
    direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    return abar_t.sqrt(), (1 - abar_t).sqrt(), abar_prev.sqrt(), direction, sigma


def _step_of_part_b(xt, eps, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False):
    """Part B's answer, in the learner's namespace while Part D is checked."""
    signature = "ddim_step(xt, eps, t, t_prev, alphas_cumprod, eta, noise)"
    if not isinstance(xt, torch.Tensor) or not xt.is_floating_point() or xt.ndim < 1:
        raise _Misuse(f"{signature}: xt must be a floating (B, ...) tensor, got {_shape(xt)}")
    for name, value in (("eps", eps), ("noise", noise)):
        if not isinstance(value, torch.Tensor) or value.shape != xt.shape:
            raise _Misuse(f"{signature}: {name} must be a tensor of xt's shape {tuple(xt.shape)}, got {_shape(value)}")
    for name, value in (("t", t), ("t_prev", t_prev)):
        if not isinstance(value, torch.Tensor) or value.is_floating_point() or tuple(value.shape) != (len(xt),):
            raise _Misuse(f"{signature}: {name} must be a (B,) = ({len(xt)},) int64 tensor, got {_shape(value)} ({_dtype(value)})")
    if not isinstance(alphas_cumprod, torch.Tensor) or alphas_cumprod.ndim != 1:
        raise _Misuse(f"{signature}: alphas_cumprod is the (T,) tensor model.schedule.alphas_cumprod, got {_shape(alphas_cumprod)}")
    T = len(alphas_cumprod)
    if int(t.min()) < 0 or int(t.max()) >= T or int(t_prev.min()) < -1 or bool((t_prev >= t).any()):
        raise _Misuse(f"{signature}: t must hold 0-based steps in 0..{T - 1} and t_prev earlier ones (-1 for the last "
                      f"step), got t = {t.tolist()}, t_prev = {t_prev.tolist()}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
        raise _Misuse(f"{signature}: eta is a number in [0, 1], got {eta!r}")
    root_abar, root_one_minus, root_prev, direction, sigma = (_per_sample(v, xt) for v in _ddim_coefficients(t, t_prev, alphas_cumprod, eta))
    x0 = (xt - root_one_minus * eps) / root_abar
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (xt - root_abar * x0) / root_one_minus
    return root_prev * x0 + direction * eps + sigma * noise


def _guided_of_part_c(eps_cond, eps_uncond, w):
    """Part C's answer, in the learner's namespace while Part D is checked."""
    if not isinstance(eps_cond, torch.Tensor) or not isinstance(eps_uncond, torch.Tensor) or eps_cond.shape != eps_uncond.shape:
        raise _Misuse(f"guided_eps(eps_cond, eps_uncond, w): two tensors of one shape, got {_shape(eps_cond)} and {_shape(eps_uncond)}")
    return (1 + w) * eps_cond - w * eps_uncond


RIGHT_PARTS = {"ddim_timesteps": _timesteps_of_part_a, "ddim_step": _step_of_part_b, "guided_eps": _guided_of_part_c}


def _earlier_parts_in_place(function):
    """Bind Parts A to C in ``function``'s module (the notebook) to the right answers above while the block
    runs, then restore what was there (a decorated function is unwrapped by ``bound_in_globals_of``)."""
    return bound_in_globals_of(function, dict(RIGHT_PARTS))


# --------------------------------------------------------------------------- Part A


def _timesteps(expect, ddim_timesteps, num_steps: int, steps: int):
    out = _call(expect, f"ddim_timesteps({num_steps}, {steps})", ddim_timesteps, num_steps, steps)
    expect(isinstance(out, torch.Tensor) and out.dtype == torch.int64 and tuple(out.shape) == (steps,),
           f"ddim_timesteps({num_steps}, {steps}) returns a ({steps},) int64 tensor of 0-based timesteps, got {_shape(out)} "
           f"({_dtype(out)}). hint: torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round().long()")
    return out.tolist()


@visible_check
def ddim_timesteps(ddim_timesteps, expect):
    got = _timesteps(expect, ddim_timesteps, 10, 4)
    hint = "torch.linspace(T - 1, 0, steps): evenly spaced from the noisiest index T - 1 down to 0, both included"
    if got == [0, 3, 6, 9]:
        hint = "descending: sampling starts at the noisiest step, index T - 1, and ends at index 0"
    elif got and got[0] == 10:
        hint = "0-based: the noisiest step is index T - 1 = 9 (the paper's t = T); index T does not exist"
    elif got and got[0] != 9 and got[-1] == 0 and got == sorted(got, reverse=True):
        hint = "evenly spaced with both ends included, from index T - 1 = 9: linspace(T - 1, 0, steps), not a stride of T // steps"
    elif got and got[0] == 9 and got[-1] != 0:
        hint = "both ends included: the last timestep is index 0, linspace(T - 1, 0, steps)"
    expect(got == [9, 6, 3, 0], f"T = 10, 4 steps: linspace(9, 0, 4) = [9, 6, 3, 0], got {got}. hint: {hint}")

    got = _timesteps(expect, ddim_timesteps, 1000, 5)
    hint = "linspace(999, 0, 5) = [999, 749.25, 499.5, 249.75, 0], rounded to the nearest integer (torch.round)"
    if got == [999, 749, 499, 249, 0]:
        hint = "round before converting to integers: .round().long(); .long() alone truncates 249.75 to 249"
    expect(got == [999, 749, 500, 250, 0], f"T = 1000, 5 steps: [999, 749, 500, 250, 0], got {got}. hint: {hint}")

    got = _timesteps(expect, ddim_timesteps, 10, 3)
    hint = "round with torch.round, which rounds halves to the even neighbour (4.5 -> 4), as the package does"
    expect(got == [9, 4, 0], f"T = 10, 3 steps: linspace(9, 0, 3) = [9, 4.5, 0], rounded [9, 4, 0], got {got}. hint: {hint}")
    got = _timesteps(expect, ddim_timesteps, 7, 1)
    expect(got == [6], f"one step: only the noisiest index, [T - 1] = [6] for T = 7, got {got}. hint: linspace(T - 1, 0, 1) "
                       "is [T - 1]")
    got = _timesteps(expect, ddim_timesteps, 7, 7)
    expect(got == [6, 5, 4, 3, 2, 1, 0], f"steps = T = 7: every index, 6 down to 0, got {got}")
    got = _timesteps(expect, ddim_timesteps, 1000, 50)
    want = torch.linspace(999, 0, 50, dtype=F64).round().long().tolist()
    expect(got == want, f"T = 1000, 50 steps: {want[:4]} ... {want[-3:]}, got {got[:4]} ... {got[-3:]}. hint: compute the "
                        "linspace in float64 and round it")


# --------------------------------------------------------------------------- Part B


def _x0(xt, eps, k: int) -> torch.Tensor:
    """x0_hat at index k of the hand schedule."""
    return (xt - math.sqrt(1 - HAND_ABAR[k]) * eps) / math.sqrt(HAND_ABAR[k])


def _hand_step(xt, eps, k: int, k_prev: int, eta: float, noise) -> torch.Tensor:
    """One DDIM step on the hand schedule, for a whole batch at one (k, k_prev), with Python's math."""
    abar_t, abar_prev = HAND_ABAR[k], (HAND_ABAR[k_prev] if k_prev >= 0 else 1.0)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    direction = math.sqrt(max(1 - abar_prev - sigma**2, 0.0))
    return math.sqrt(abar_prev) * _x0(xt, eps, k) + direction * eps + sigma * noise


def _step(expect, what, ddim_step, xt, eps, t, t_prev, abar, eta, noise, **kwargs):
    out = _call(expect, what, ddim_step, xt, eps, t, t_prev, abar, eta, noise, **kwargs)
    expect(isinstance(out, torch.Tensor) and out.shape == xt.shape,
           f"{what}: x_t of shape {tuple(xt.shape)} gives x_prev of the same shape, got {_shape(out)}. hint: per-sample "
           "coefficients (B, 1, ..., 1): per_sample(values, xt)")
    return out


@visible_check
def ddim_step(ddim_step, expect):
    abar = _hand_schedule()
    xt = torch.tensor([[1.0, -0.5], [0.3, 1.2], [-1.0, 0.6]])
    eps = torch.tensor([[0.5, 1.0], [-1.0, 0.25], [1.5, -0.5]])
    noise = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]])
    before = xt.clone(), eps.clone(), noise.clone(), abar.clone()
    twos, ones, zeros = (torch.full((3,), k, dtype=torch.long) for k in (2, 1, 0))
    minus = torch.full((3,), -1, dtype=torch.long)
    where = "alphas_cumprod = [0.9216, 0.64, 0.36]"

    # eta = 0, index 2 -> 1: x0_hat = (x_t - 0.8 eps) / 0.6, x_prev = 0.8 x0_hat + 0.6 eps
    out = _step(expect, f"ddim_step with {where}, t = 2, t_prev = 1, eta = 0", ddim_step, xt, eps, twos, ones, abar, 0.0, noise)
    x0 = _x0(xt, eps, 2)
    want = 0.8 * x0 + 0.6 * eps
    hint = ("x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), then x_prev = sqrt(abar_prev) x0_hat + "
            "sqrt(1 - abar_prev - sigma^2) eps + sigma z, with abar_t = alphas_cumprod[t], abar_prev = alphas_cumprod[t_prev]")
    clipped = x0.clamp(-1, 1)
    if _close(out, 0.8 * clipped + 0.6 * eps) or _close(out, 0.8 * clipped + 0.6 * (xt - 0.6 * clipped) / 0.8):
        hint = "no clipping of x0_hat here (the package's ddim_step clips by default, for images; this exercise does not)"
    elif _close(out, 0.8 * (xt - 0.6 * eps) / 0.8 + 0.6 * eps):
        hint = "x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): sqrt(abar_t) divides, sqrt(1 - abar_t) multiplies eps"
    elif _close(out, 0.8 * x0 + 0.36 * eps) or _close(out, 0.64 * x0 + 0.36 * eps) or _close(out, 0.64 * x0 + 0.6 * eps):
        hint = "the square roots: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps when eta = 0"
    elif _close(out, 0.6 * x0 + 0.8 * eps) or _close(out, xt):
        hint = "x_prev uses abar_prev = alphas_cumprod[t_prev] (here 0.64), x0_hat uses abar_t = alphas_cumprod[t] (0.36)"
    else:
        quiet = _call(expect, "ddim_step with eta = 0 and zero noise", ddim_step, xt, eps, twos, ones, abar, 0.0, torch.zeros_like(noise))
        if isinstance(quiet, torch.Tensor) and quiet.shape == out.shape and not torch.equal(quiet, out):
            hint = "with eta = 0, sigma = eta (...) = 0: the noise z must not change x_prev (sigma multiplies it)"
    expect(_close(out, want, rtol=1e-5, atol=1e-6),
           f"eta = 0 from index 2 (abar_t = 0.36) to index 1 (abar_prev = 0.64): x0_hat = (x_t - 0.8 eps) / 0.6 = {_fmt(x0)}, "
           f"x_prev = 0.8 x0_hat + 0.6 eps = {_fmt(want)}, got {_fmt(out)}. hint: {hint}")
    expect(out.dtype == torch.float32,
           f"float32 x_t with a float64 schedule gives a float32 x_prev, got {_dtype(out)}. hint: cast the coefficients to "
           "x_t's dtype (per_sample does)")

    # clip_x0=True: x0_hat clipped to [-1, 1], eps replaced by the noise consistent with it
    out = _step(expect, "ddim_step(..., clip_x0=True) from t = 2 to t_prev = 1", ddim_step, xt, eps, twos, ones, abar, 0.0, noise,
                clip_x0=True)
    clipped = x0.clamp(-1, 1)
    consistent = (xt - 0.6 * clipped) / 0.8
    want = 0.8 * clipped + 0.6 * consistent
    hint = ("clip x0_hat to [-1, 1], then replace eps by the noise consistent with it, (x_t - sqrt(abar_t) x0_hat) / "
            "sqrt(1 - abar_t), and take the step with both")
    if _close(out, 0.8 * clipped + 0.6 * eps):
        hint = ("after clipping x0_hat, replace eps by (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t): the direction "
                "term must point from the clipped x0_hat to x_t")
    elif _close(out, 0.8 * x0 + 0.6 * eps):
        hint = "with clip_x0=True, clip x0_hat to [-1, 1]: x0_hat.clamp(-1, 1)"
    expect(_close(out, want, rtol=1e-5, atol=1e-6),
           f"clip_x0=True, eta = 0, index 2 to 1: x0_hat clipped to {_fmt(clipped)}, eps = (x_t - 0.6 x0_hat) / 0.8, "
           f"x_prev = 0.8 x0_hat + 0.6 eps = {_fmt(want)}, got {_fmt(out)}. hint: {hint}")

    # a skip: index 2 -> 0
    out = _step(expect, "ddim_step from t = 2 to t_prev = 0", ddim_step, xt, eps, twos, zeros, abar, 0.0, noise)
    want = 0.96 * x0 + 0.28 * eps
    expect(_close(out, want, rtol=1e-5, atol=1e-6),
           f"eta = 0, a skip from index 2 to index 0 (abar_prev = 0.9216): x_prev = 0.96 x0_hat + 0.28 eps = {_fmt(want)}, "
           f"got {_fmt(out)}. hint: DDIM may jump over steps: abar_prev is alphas_cumprod[t_prev], whatever t_prev is, not "
           "alphas_cumprod[t - 1]")

    # the last step: t_prev = -1 means abar_prev = 1, so x_prev = x0_hat
    out = _step(expect, "ddim_step from t = 0 to t_prev = -1", ddim_step, xt, eps, zeros, minus, abar, 0.0, noise)
    want = _x0(xt, eps, 0)
    hint = "t_prev = -1 is the end: abar_prev = 1, sigma = 0, so x_prev = x0_hat = (x_t - 0.28 eps) / 0.96"
    if _close(out, 0.6 * want + 0.8 * eps) or (isinstance(out, torch.Tensor) and bool(torch.isnan(out).any())):
        hint = ("alphas_cumprod[-1] is the *last* step's abar (0.36: Python wraps around; then abar_prev < abar_t, and "
                "sigma is NaN whatever eta), but t_prev = -1 means abar_prev "
                "= 1: e.g. torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)], 1), or append a 1: "
                "torch.cat([alphas_cumprod, alphas_cumprod.new_ones(1)])[t_prev]")
    expect(_close(out, want, rtol=1e-5, atol=1e-6),
           f"the last step, index 0 to t_prev = -1 (abar_prev = 1): x_prev = x0_hat = {_fmt(want)}, got {_fmt(out)}. hint: {hint}")

    # eta = 1, index 1 -> 0, with noise
    sigma = math.sqrt((1 - 0.9216) / (1 - 0.64) * (1 - 0.64 / 0.9216))
    direction = math.sqrt(1 - 0.9216 - sigma**2)
    out = _step(expect, "ddim_step from t = 1 to t_prev = 0, eta = 1", ddim_step, xt, eps, ones, zeros, abar, 1.0, noise)
    x0 = _x0(xt, eps, 1)
    want = 0.96 * x0 + direction * eps + sigma * noise
    hint = "sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev), and x_prev = ... + sigma z"
    if isinstance(out, torch.Tensor) and bool(torch.isnan(out).any()):
        hint = ("NaN: 1 - abar_prev - sigma^2 < 0, sigma is too large: sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) "
                "sqrt(1 - abar_t / abar_prev) (both factors)")
    elif _close(out, 0.96 * x0 + math.sqrt(max(0.0784 - 11 / 36, 0.0)) * eps + math.sqrt(11 / 36) * noise):
        hint = ("sigma has two factors: eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); without the "
                "first, sigma^2 > 1 - abar_prev")
    elif _close(out, 0.96 * x0 + 0.28 * eps + sigma * noise):
        hint = "the direction to x_t is sqrt(1 - abar_prev - sigma^2) eps: the fresh noise takes sigma^2 of the variance"
    elif _close(out, 0.96 * x0 + direction * eps):
        hint = "add the fresh noise: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z"
    elif _close(out, 0.96 * x0 + direction * eps + sigma**2 * noise):
        hint = "sigma multiplies z: sigma is the standard deviation, sigma^2 the variance"
    expect(_close(out, want, rtol=1e-5, atol=1e-6),
           f"eta = 1 from index 1 (abar_t = 0.64) to index 0 (abar_prev = 0.9216): sigma = sqrt(0.0784 / 0.36) sqrt(1 - "
           f"0.64 / 0.9216) = {sigma:.6f}, x_prev = 0.96 x0_hat + sqrt(0.0784 - sigma^2) eps + sigma z = {_fmt(want)}, got "
           f"{_fmt(out)}. hint: {hint}")

    out = _step(expect, "ddim_step from t = 0 to t_prev = -1, eta = 1", ddim_step, xt, eps, zeros, minus, abar, 1.0, noise)
    want = _x0(xt, eps, 0)
    expect(_close(out, want, rtol=1e-5, atol=1e-6),
           f"eta = 1, the last step (t_prev = -1, abar_prev = 1): sigma = eta sqrt(0 / (1 - abar_t)) ... = 0, so no noise "
           f"and x_prev = x0_hat = {_fmt(want)}, got {_fmt(out)}. hint: abar_prev = 1 for t_prev = -1, not alphas_cumprod[-1]")

    # one step per sample, a square batch (B = D = 4): t and t_prev differ from sample to sample
    g = torch.Generator().manual_seed(7)
    xs, es, zs = (torch.randn(4, 4, generator=g) for _ in range(3))
    t, t_prev = torch.tensor([2, 1, 2, 0]), torch.tensor([1, 0, 0, -1])
    out = _step(expect, "ddim_step with t = [2, 1, 2, 0], t_prev = [1, 0, 0, -1]", ddim_step, xs, es, t, t_prev, abar, 0.5, zs)
    want = torch.stack([_hand_step(xs[b:b + 1], es[b:b + 1], int(t[b]), int(t_prev[b]), 0.5, zs[b:b + 1])[0] for b in range(4)])
    expect(_close(out, want, rtol=1e-5, atol=1e-5),
           f"a batch of 4 samples of 4 coordinates with t = [2, 1, 2, 0], t_prev = [1, 0, 0, -1], eta = 0.5: each sample with "
           f"its own abar_t, abar_prev and sigma: expected {_fmt(want)}, got {_fmt(out)}. hint: coefficients picked at t "
           "have shape (B,) and broadcast along the *last* dimension of (B, D) (silently when B = D): reshape them to "
           "(B, 1, ..., 1), e.g. per_sample(values, xt)")

    # float64 images with a float64 schedule: float64 precision
    images, image_eps, image_noise = (torch.randn(3, 1, 2, 2, generator=g, dtype=F64) for _ in range(3))
    out = _step(expect, "ddim_step on float64 images (3, 1, 2, 2)", ddim_step, images, image_eps, torch.tensor([2, 2, 1]),
                torch.tensor([0, 1, -1]), abar, 0.5, image_noise)
    want = torch.cat([_hand_step(images[:1], image_eps[:1], 2, 0, 0.5, image_noise[:1]),
                      _hand_step(images[1:2], image_eps[1:2], 2, 1, 0.5, image_noise[1:2]),
                      _hand_step(images[2:], image_eps[2:], 1, -1, 0.5, image_noise[2:])])
    expect(_close(out, want, rtol=1e-10, atol=1e-12) and out.dtype == F64,
           f"float64 images (3, 1, 2, 2), t = [2, 2, 1], t_prev = [0, 1, -1], eta = 0.5: float64 x_prev of the same shape, "
           f"expected {_fmt(want)}, got {_fmt(out)} ({_dtype(out)}). hint: compute the coefficients in float64, then cast "
           "them to x_t's dtype")
    expect(all(torch.equal(a, b) for a, b in zip((xt, eps, noise, abar), before)),
           "do not modify the inputs in place. hint: no +=, *= or out= on them")


# --------------------------------------------------------------------------- Part C


@visible_check
def guided_eps(guided_eps, expect):
    before = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
    cond, uncond = (v.clone() for v in before)
    out = _call(expect, "guided_eps(eps_cond, eps_uncond, 0.0)", guided_eps, cond, uncond, 0.0)
    expect(isinstance(out, torch.Tensor) and out.shape == cond.shape,
           f"two (2, 2) predictions give a (2, 2) guided prediction, got {_shape(out)}. hint: return one tensor, "
           "(1 + w) * eps_cond - w * eps_uncond")
    hint = "eps = (1 + w) eps_cond - w eps_uncond, so w = 0 is the plain conditional model"
    three = _call(expect, "guided_eps(eps_cond, eps_uncond, 3.0)", guided_eps, cond.clone(), uncond.clone(), 3.0) if _close(out, uncond) else None
    if _close(three, 4 * uncond - 3 * cond):
        hint = "eps_cond and eps_uncond are swapped: (1 + w) multiplies the conditional prediction"
    elif _close(out, uncond):
        hint = ("you used the other convention, s = w: eps_uncond + s (eps_cond - eps_uncond), where s = 0 is the "
                "unconditional model. Here w = 0 is the conditional model: (1 + w) eps_cond - w eps_uncond (s = 1 + w)")
    expect(_close(out, cond, atol=0), f"w = 0: the conditional prediction eps_cond = {_fmt(cond)} itself, got {_fmt(out)}. hint: {hint}")

    out = _call(expect, "guided_eps(eps_cond, eps_uncond, 3.0)", guided_eps, cond, uncond, 3.0)
    expect(all(torch.equal(a, b) for a, b in zip((cond, uncond), before)),
           "do not modify eps_cond or eps_uncond in place. hint: no +=, *=, mul_ or out= on them")
    cond, uncond = before
    want = 4 * cond - 3 * uncond
    hint = "(1 + w) eps_cond - w eps_uncond = eps_cond + w (eps_cond - eps_uncond)"
    if _close(out, 3 * cond - 2 * uncond):
        hint = ("that is the convention s = w, w eps_cond + (1 - w) eps_uncond (e.g. Stable Diffusion's guidance_scale); "
                "here the weight is w = s - 1: (1 + w) eps_cond - w eps_uncond")
    elif _close(out, 4 * uncond - 3 * cond):
        hint = "eps_cond and eps_uncond are swapped: guidance pushes *towards* the conditional prediction"
    elif _close(out, 4 * cond + 3 * uncond) or _close(out, 3 * cond - 3 * uncond):
        hint = "(1 + w) eps_cond minus w eps_uncond: the weights sum to 1"
    expect(_close(out, want, rtol=1e-6, atol=1e-6),
           f"w = 3: 4 eps_cond - 3 eps_uncond = {_fmt(want)}, got {_fmt(out)}. hint: {hint}")

    out = _call(expect, "guided_eps with w = 1 (an int)", guided_eps, cond, uncond, 1)
    expect(_close(out, 2 * cond - uncond, rtol=1e-6, atol=1e-6),
           f"w = 1 (an int): 2 eps_cond - eps_uncond = {_fmt(2 * cond - uncond)}, got {_fmt(out)}. hint: "
           "w is a plain number, float or int")
    g = torch.Generator().manual_seed(3)
    c64, u64 = torch.randn(3, 1, 4, 4, generator=g, dtype=F64), torch.randn(3, 1, 4, 4, generator=g, dtype=F64)
    out = _call(expect, "guided_eps on float64 images (3, 1, 4, 4)", guided_eps, c64, u64, 1.5)
    expect(_close(out, 2.5 * c64 - 1.5 * u64, rtol=1e-12, atol=1e-12) and out.dtype == F64,
           f"float64 images (3, 1, 4, 4), w = 1.5: 2.5 eps_cond - 1.5 eps_uncond in float64 of the same shape, got "
           f"{_shape(out)} ({_dtype(out)})")


# --------------------------------------------------------------------------- Part D


class _StandIn(nn.Module):
    """A class-conditional "noise predictor" with a known answer: eps = sqrt(1 - abar_t) x - sqrt(abar_t) m_y, for a
    fixed image m_y per label y in 0..n_classes (n_classes: the null label), so that x0_hat = sqrt(abar_t) x +
    sqrt(1 - abar_t) m_y stays bounded. Records the (t, labels, batch size) of each call."""

    def __init__(self, alphas_cumprod: torch.Tensor, n_classes: int = 3):
        super().__init__()
        self.n_classes = n_classes
        self.schedule = SimpleNamespace(alphas_cumprod=alphas_cumprod)
        g = torch.Generator().manual_seed(70)
        means = torch.rand(n_classes, *IMAGE_SHAPE, generator=g) * 1.6 - 0.8
        self.register_buffer("means", torch.cat([means, means.mean(0, keepdim=True) * 0.5]))
        self.calls: list[tuple[list[int], list[int], int]] = []

    def forward(self, x, t, labels=None, *rest):
        if rest:
            raise _Misuse("the model is called as model(x, t, labels=labels)")
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise _Misuse(f"the model takes images x of shape (B, 1, 28, 28), got {_shape(x)}")
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or tuple(t.shape) != (len(x),):
            raise _Misuse(f"the model's t is a (B,) = ({len(x)},) int64 tensor of 0-based timesteps, one per image, got "
                          f"{_shape(t)} ({_dtype(t)}). hint: torch.full((B,), k, dtype=torch.long)")
        if labels is None:
            raise _Misuse("the model needs labels: model(x, t, labels=labels), with the null label model.n_classes for "
                          "the unconditional prediction")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or tuple(labels.shape) != (len(x),):
            raise _Misuse(f"labels must be a (B,) = ({len(x)},) int64 tensor, one per image, got {_shape(labels)} ({_dtype(labels)})")
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= len(self.schedule.alphas_cumprod)):
            raise _Misuse(f"t must hold 0-based timesteps 0..{len(self.schedule.alphas_cumprod) - 1}, got {t.tolist()}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > self.n_classes):
            raise _Misuse(f"labels are 0..{self.n_classes - 1}, or the null label model.n_classes = {self.n_classes}; got "
                          f"{labels.tolist()}")
        self.calls.append((t.tolist(), labels.tolist(), len(x)))
        abar = _per_sample(self.schedule.alphas_cumprod.to(x.device)[t], x)
        return (1 - abar).sqrt() * x - abar.sqrt() * self.means[labels].to(x.dtype)


def _right_sample(model, labels, steps, eta, w, generator, clip_x0=False, *, convention="w", final=True, last_noise=False,
                  noise=True):
    """The sampling loop with the right answers of Parts A to C (and, for hints, typical variants)."""
    B = len(labels)
    abar = model.schedule.alphas_cumprod
    timesteps = _timesteps_of_part_a(len(abar), steps).tolist()
    x = torch.randn((B, *IMAGE_SHAPE), generator=generator)
    null = torch.full_like(labels, model.n_classes)
    for i, k in enumerate(timesteps):
        k_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if k_prev < 0 and not final:
            break
        t, t_prev = torch.full((B,), k, dtype=torch.long), torch.full((B,), k_prev, dtype=torch.long)
        with torch.no_grad():
            eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat([labels, null])).chunk(2)
        eps = _guided_of_part_c(eps_cond, eps_uncond, w) if convention == "w" else w * eps_cond + (1 - w) * eps_uncond
        draw = noise and eta > 0 and (k_prev >= 0 or last_noise)
        z = torch.randn(x.shape, generator=generator) if draw else torch.zeros_like(x)
        x = _step_of_part_b(x, eps, t, t_prev, abar, eta, z, clip_x0)
    return x.clamp(-1, 1)


def _expected(model, labels, steps, eta, w, seed, clip_x0=False, **variant):
    calls = len(model.calls)
    g = torch.Generator().manual_seed(seed)
    out = _right_sample(model, labels, steps, eta, w, g, clip_x0, **variant)
    del model.calls[calls:]
    return out, g


def _sample(expect, what, sample, model, labels, steps, eta, w, generator, **kwargs):
    model.calls.clear()
    with _earlier_parts_in_place(sample):  # Part D on its own: right answers for Parts A to C
        out = _call(expect, what, sample, model, labels, steps, eta, w, generator, **kwargs)
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (len(labels), *IMAGE_SHAPE) and out.is_floating_point(),
           f"{what}: {len(labels)} labels give {len(labels)} images, a ({len(labels)}, 1, 28, 28) float tensor, got {_shape(out)}")
    return out


@visible_check
def sample(sample, expect):
    abar = _cosine_abar(20).float()  # a float32 schedule, as model.schedule.alphas_cumprod is
    model = _StandIn(abar)
    labels = torch.tensor([0, 1, 2, 0])
    seed = 71

    # eta = 0, w = 0
    out = _sample(expect, "sample(model, labels, steps=4, eta=0.0, w=0.0, generator)", sample, model, labels, 4, 0.0, 0.0,
                  torch.Generator().manual_seed(seed))
    seen = []
    for t, _, _ in model.calls:
        if len(set(t)) != 1:
            expect(False, f"at each call of the model every image is at the same step, got t = {t}. hint: "
                          "torch.full((B,), k, dtype=torch.long) for the DDIM timestep k")
        if not seen or seen[-1] != t[0]:
            seen.append(t[0])
    hint = ("loop over ddim_timesteps(len(alphas_cumprod), steps); each step goes from timesteps[i] to timesteps[i + 1], "
            "the last one to t_prev = -1")
    if seen == [19, 13, 6]:
        hint = "the last step goes from the last timestep, 0, to t_prev = -1 (abar_prev = 1): one step per DDIM timestep"
    expect(seen == [19, 13, 6, 0],
           f"T = 20, 4 steps: the model is evaluated at the DDIM timesteps ddim_timesteps(20, 4) = [19, 13, 6, 0], in that "
           f"order, got the steps {seen}. hint: {hint}")
    conditional = [labels_seen for _, labels_seen, _ in model.calls if labels.tolist() in (labels_seen, labels_seen[:len(labels)])]
    expect(len(conditional) >= 4,
           f"the model must see the labels {labels.tolist()} at every step (model(x, t, labels=labels), or the first half "
           f"of a batch of 2B), got the labels {[l for _, l, _ in model.calls][:3]} ...")
    want, state = _expected(model, labels, 4, 0.0, 0.0, seed)
    hint = ("x_T = torch.randn((B, 1, 28, 28), generator=generator), then for each DDIM timestep: eps from the model, "
            "ddim_step(x, eps, t, t_prev, model.schedule.alphas_cumprod, eta, z), and x_0 clipped to [-1, 1] at the end")
    if isinstance(out, torch.Tensor) and bool((out.abs() > 1).any()):
        hint = "clip the result to [-1, 1] at the end: x.clamp(-1, 1) (the model works on images in [-1, 1])"
    elif _close(out, _expected(model, labels, 4, 0.0, 0.0, seed, convention="s")[0], rtol=1e-4, atol=1e-4):
        hint = ("with w = 0 you sampled the unconditional model: the guidance weight's convention here is "
                "(1 + w) eps_cond - w eps_uncond, so w = 0 is the conditional model")
    elif _close(out, _expected(model, labels, 4, 0.0, 0.0, seed, final=False)[0], rtol=1e-4, atol=1e-4):
        hint = ("the last step goes from the last timestep, 0, to t_prev = -1 (abar_prev = 1, x_prev = x0_hat): one step per "
                "DDIM timestep, steps in all")
    expect(_close(out, want, rtol=1e-4, atol=1e-4),
           f"eta = 0, w = 0, 4 steps on a stand-in model (T = 20): expected {_fmt(want)}, got {_fmt(out)}. hint: {hint}")
    expect(out.dtype == torch.float32, f"float32 images, got {_dtype(out)}")

    # guidance, w = 3
    out = _sample(expect, "sample(model, labels, steps=4, eta=0.0, w=3.0, generator)", sample, model, labels, 4, 0.0, 3.0,
                  torch.Generator().manual_seed(seed))
    null = [labels_seen for _, labels_seen, _ in model.calls if 3 in labels_seen]
    expect(len(null) >= 4,
           "with w = 3 the model must also give the unconditional prediction at every step, with the null label "
           f"model.n_classes = 3 for every image (labels = torch.full_like(labels, model.n_classes)); the labels seen "
           f"were {[l for _, l, _ in model.calls][:3]} ...")
    want, _ = _expected(model, labels, 4, 0.0, 3.0, seed)
    hint = "eps = guided_eps(eps_cond, eps_uncond, w): (1 + w) eps(x, t, y) - w eps(x, t, null)"
    if _close(out, _expected(model, labels, 4, 0.0, 3.0, seed, convention="s")[0], rtol=1e-4, atol=1e-4):
        hint = "the guidance weight's convention: here (1 + w) eps_cond - w eps_uncond, not w eps_cond + (1 - w) eps_uncond"
    elif _close(out, _expected(model, labels, 4, 0.0, 0.0, seed)[0], rtol=1e-4, atol=1e-4):
        hint = "use w: the sample with w = 3 equals the one with w = 0; eps = guided_eps(eps_cond, eps_uncond, w)"
    expect(_close(out, want, rtol=1e-4, atol=1e-4),
           f"eta = 0, w = 3, 4 steps: expected {_fmt(want)}, got {_fmt(out)}. hint: {hint}")

    # eta = 1: the noise, drawn in the stated order
    g = torch.Generator().manual_seed(seed)
    out = _sample(expect, "sample(model, labels, steps=4, eta=1.0, w=1.0, generator)", sample, model, labels, 4, 1.0, 1.0, g)
    want, state = _expected(model, labels, 4, 1.0, 1.0, seed)
    hint = ("draw x_T first, then, only when eta > 0, z = torch.randn(x.shape, generator=generator) at every step but the "
            "last (the one to t_prev = -1, where sigma = 0), after x_T and in the order of the steps")
    if _close(out, _expected(model, labels, 4, 1.0, 1.0, seed, noise=False)[0], rtol=1e-4, atol=1e-4):
        hint = "with eta > 0 the step needs fresh noise: z = torch.randn(x.shape, generator=generator), not zeros"
    elif _close(out, _expected(model, labels, 4, 0.0, 1.0, seed)[0], rtol=1e-4, atol=1e-4):
        hint = "pass eta on to ddim_step, with fresh noise z = torch.randn(x.shape, generator=generator) at each step"
    expect(_close(out, want, rtol=1e-4, atol=1e-4),
           f"eta = 1, w = 1, 4 steps: expected {_fmt(want)}, got {_fmt(out)}. hint: {hint}")
    hint = ("draw x_T, then one z per step that does not end at t_prev = -1 (so steps - 1 of them when eta > 0, none when "
            "eta = 0), all from the generator you were given, and nothing else")
    if torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=_expected(model, labels, 4, 1.0, 1.0, seed, last_noise=True)[1])):
        hint = "no z for the last step (t_prev = -1): sigma is 0 there; draw steps - 1 of them, as the package's ddim_sample"
    g_again, state_again = torch.Generator().manual_seed(seed), _expected(model, labels, 4, 1.0, 1.0, seed)[1]
    _sample(expect, "sample(..., eta=1.0, ...) again", sample, model, labels, 4, 1.0, 1.0, g_again)
    expect(torch.equal(torch.rand(3, generator=g_again), torch.rand(3, generator=state_again)),
           f"with eta = 1 and 4 steps the generator gives x_T and then 3 z's. hint: {hint}")
    g0 = torch.Generator().manual_seed(seed)
    _sample(expect, "sample(..., eta=0.0, ...)", sample, model, labels, 4, 0.0, 0.0, g0)
    _, state0 = _expected(model, labels, 4, 0.0, 0.0, seed)
    expect(torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=state0)),
           "with eta = 0 draw x_T from the generator and nothing else (the steps are deterministic). hint: draw z only "
           "when eta > 0; pass torch.zeros_like(x) as the noise otherwise")

    # clip_x0=True is passed on to ddim_step
    out = _sample(expect, "sample(model, labels, steps=4, eta=0.5, w=2.0, generator, clip_x0=True)", sample, model, labels, 4,
                  0.5, 2.0, torch.Generator().manual_seed(seed), clip_x0=True)
    want, _ = _expected(model, labels, 4, 0.5, 2.0, seed, clip_x0=True)
    hint = "pass clip_x0 on to every ddim_step: ddim_step(x, eps, t, t_prev, alphas_cumprod, eta, z, clip_x0=clip_x0)"
    expect(_close(out, want, rtol=1e-4, atol=1e-4),
           f"clip_x0=True, eta = 0.5, w = 2, 4 steps: expected {_fmt(want)}, got {_fmt(out)}. hint: {hint}")

    # one step, and no generator
    out = _sample(expect, "sample(model, labels, steps=1, eta=0.0, w=0.0, generator)", sample, model, labels[:2], 1, 0.0, 0.0,
                  torch.Generator().manual_seed(seed))
    want, _ = _expected(model, labels[:2], 1, 0.0, 0.0, seed)
    expect(_close(out, want, rtol=1e-4, atol=1e-4),
           f"steps = 1: one step, from index T - 1 = 19 straight to t_prev = -1 (x_0 = x0_hat, clipped); expected "
           f"{_fmt(want)}, got {_fmt(out)}")
    out = _sample(expect, "sample(model, labels, steps=3, eta=0.5, w=2.0, generator=None)", sample, model, labels, 3, 0.5, 2.0, None)
    expect(bool(torch.isfinite(out).all()) and float(out.abs().max()) <= 1,
           "generator=None must work too (the global random state), and give finite images in [-1, 1]")
