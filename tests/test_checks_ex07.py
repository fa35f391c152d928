"""Exercise 07 (sampling and conditioning): the visible checks in fsl_course.checks.ex07 and the hidden
tests of solutions/07_sampling_and_conditioning.ipynb pass on the solution and on other right answers,
and fail on typical mistakes (the visible check with one line and a hint)."""

from __future__ import annotations

import importlib
from pathlib import Path

import nbformat
import pytest
import torch

from fsl_course import exercises
from fsl_course.checks import CheckFailed
from solution_notebook import SolutionNotebook

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_07_PATH = ROOT / "solutions" / "07_sampling_and_conditioning.ipynb"
ex07 = importlib.import_module("fsl_course.checks.ex07")
NAMES = ("ddim_timesteps", "ddim_step", "guided_eps", "sample")


SOL07 = SolutionNotebook("07_sampling_and_conditioning.ipynb")
SOLUTION_07 = SOL07.functions


@pytest.fixture(autouse=True)
def keep_the_global_random_state():
    """The hidden tests and the small models here seed torch's global generator: restore it afterwards, so that the
    tests of other modules that run later in the same process see the state they would see alone."""
    with torch.random.fork_rng(devices=[]):
        yield


notebook_07, hidden_tests_07, run_hidden_07, wrong_07 = SOL07.notebook, SOL07.hidden_tests, SOL07.run_hidden, SOL07.wrong


TIMESTEPS = """
def ddim_timesteps(num_steps, steps):
    return {body}
"""
TIMESTEPS_RIGHT = "torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round().long()"

STEP = """
def ddim_step(xt, eps, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False):
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    t, t_prev = t.cpu(), t_prev.cpu()
    abar_t = abar[t]
    abar_prev = {abar_prev}
    sigma = {sigma}
    x0_hat = {x0_hat}
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
        {clip_eps}
    direction = {direction}
    return {ret}
"""
STEP_RIGHT = dict(abar_prev="torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(abar_t))",
                  sigma="eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()",
                  x0_hat="(xt - per_sample((1 - abar_t).sqrt(), xt) * eps) / per_sample(abar_t.sqrt(), xt)",
                  direction="(1 - abar_prev - sigma**2).clamp(min=0).sqrt()",
                  clip_eps="eps = (xt - per_sample(abar_t.sqrt(), xt) * x0_hat) / per_sample((1 - abar_t).sqrt(), xt)",
                  ret="per_sample(abar_prev.sqrt(), xt) * x0_hat + per_sample(direction, xt) * eps + per_sample(sigma, xt) * noise")


def step_variant(**changes) -> str:
    return STEP.format(**{**STEP_RIGHT, **changes})


GUIDED = """
def guided_eps(eps_cond, eps_uncond, w):
    return {body}
"""

SAMPLE = """
@torch.no_grad()
def sample(model, labels, steps, eta=0.0, w=0.0, generator=None, clip_x0=False):
    alphas_cumprod = model.schedule.alphas_cumprod
    batch, device = len(labels), labels.device
    x = {x_T}
    null = torch.full_like(labels, {null})
    timesteps = ddim_timesteps(len(alphas_cumprod), steps).tolist()
    for i, k in enumerate(timesteps):
        k_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        {last}
        t = torch.full((batch,), k, dtype=torch.long, device=device)
        t_prev = torch.full((batch,), k_prev, dtype=torch.long, device=device)
        {predict}
        z = {z}
        x = ddim_step(x, eps, t, t_prev, alphas_cumprod, eta, z, {clip})
    return {ret}
"""
SAMPLE_RIGHT = dict(x_T="torch.randn((batch, 1, 28, 28), generator=generator).to(device)", null="model.n_classes", last="pass",
                    predict="eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat([labels, null]))"
                            ".chunk(2); eps = guided_eps(eps_cond, eps_uncond, w)",
                    z="torch.randn(x.shape, generator=generator).to(device) if eta > 0 and k_prev >= 0 else torch.zeros_like(x)",
                    ret="x.clamp(-1, 1)", clip="clip_x0=clip_x0")


def sample_variant(**changes) -> str:
    return SAMPLE.format(**{**SAMPLE_RIGHT, **changes})


# (function name, wrong source, a piece of the visible check's message or None where the visible checks pass)
MISTAKES_07 = [
    # Part A
    ("ddim_timesteps", TIMESTEPS.format(body="torch.linspace(0, num_steps - 1, steps, dtype=torch.float64).round().long()"),
     "check 2 failed: T = 10, 4 steps: linspace(9, 0, 4) = [9, 6, 3, 0], got [0, 3, 6, 9]. hint: descending"),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.linspace(num_steps, 0, steps, dtype=torch.float64).round().long()"),
     "hint: 0-based: the noisiest step is index T - 1 = 9"),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).long()"),
     "hint: round before converting to integers"),
    ("ddim_timesteps", TIMESTEPS.format(body="(torch.arange(steps) * (num_steps // steps)).flip(0)"),
     "hint: evenly spaced with both ends included, from index T - 1 = 9"),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.arange(0, num_steps, num_steps // steps).flip(0)"),
     "check 1 failed: ddim_timesteps(10, 4) returns a (4,) int64 tensor of 0-based timesteps, got (5,)"),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round()"),
     "returns a (4,) int64 tensor of 0-based timesteps, got (4,) (torch.float64)"),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.floor(torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64) + 0.5).long()"),
     "hint: round with torch.round, which rounds halves to the even neighbour (4.5 -> 4)"),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.linspace(num_steps - 1, 0, steps + 1, dtype=torch.float64).round().long()[:-1]"),
     "hint: both ends included: the last timestep is index 0"),
    # Part B
    ("ddim_step", step_variant(x0_hat="((xt - per_sample((1 - abar_t).sqrt(), xt) * eps) / per_sample(abar_t.sqrt(), xt)).clamp(-1, 1)"),
     "hint: no clipping of x0_hat here"),
    ("ddim_step", step_variant(clip_eps="pass"), "hint: after clipping x0_hat, replace eps by"),
    ("ddim_step", step_variant(clip_eps="eps = (xt - per_sample(abar_t.sqrt(), xt) * x0_hat) / per_sample((1 - abar_t).sqrt(), xt)").replace(
        "        x0_hat = x0_hat.clamp(-1, 1)\n", ""), "hint: with clip_x0=True, clip x0_hat to [-1, 1]"),
    ("ddim_step", step_variant(abar_prev="abar[t_prev]"), "hint: alphas_cumprod[-1] is the *last* step's abar"),
    ("ddim_step", step_variant(abar_prev="abar[t - 1]"), "hint: DDIM may jump over steps"),
    ("ddim_step", step_variant(sigma="eta * (1 - abar_t / abar_prev).sqrt()"), "hint: sigma has two factors"),
    ("ddim_step", step_variant(sigma="eta * (1 - abar_t / abar_prev).sqrt()", direction="(1 - abar_prev - sigma**2).sqrt()"),
     "hint: NaN: 1 - abar_prev - sigma^2 < 0"),
    ("ddim_step", step_variant(direction="(1 - abar_prev).sqrt()"), "hint: the direction to x_t is sqrt(1 - abar_prev - sigma^2) eps"),
    ("ddim_step", step_variant(ret="per_sample(abar_prev.sqrt(), xt) * x0_hat + per_sample(direction, xt) * eps"),
     "hint: add the fresh noise"),
    ("ddim_step", step_variant(ret="per_sample(abar_prev.sqrt(), xt) * x0_hat + per_sample(direction, xt) * eps + per_sample(sigma**2, xt) * noise"),
     "hint: sigma multiplies z"),
    ("ddim_step", step_variant(sigma="((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()"),
     "hint: with eta = 0, sigma = eta (...) = 0: the noise z must not change x_prev"),
    ("ddim_step", step_variant(x0_hat="(xt - per_sample(abar_t.sqrt(), xt) * eps) / per_sample((1 - abar_t).sqrt(), xt)"),
     "hint: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): sqrt(abar_t) divides"),
    ("ddim_step", step_variant(direction="(1 - abar_prev - sigma**2).clamp(min=0)", sigma="eta * 0 * abar_t"),
     "hint: the square roots"),
    ("ddim_step", step_variant(x0_hat="(xt - (1 - abar_t).sqrt().to(xt.dtype) * eps) / abar_t.sqrt().to(xt.dtype)"),
     "raised RuntimeError: The size of tensor a (3) must match the size of tensor b (2) at non-singleton dimension 1. hint: "
     "schedule values picked at t have shape (B,)"),
    ("ddim_step", step_variant(ret="abar_prev.sqrt()[:, None] * x0_hat + direction[:, None] * eps + sigma[:, None] * noise"),
     "check 3 failed: float32 x_t with a float64 schedule gives a float32 x_prev, got torch.float64"),
    ("ddim_step", step_variant(x0_hat="(xt - (1 - abar_t).sqrt().to(xt.dtype)[:, None] * eps) / abar_t.sqrt().to(xt.dtype)[:, None]",
                               ret="(abar_prev.sqrt().to(xt.dtype)[:, None] * x0_hat + direction.to(xt.dtype)[:, None] * eps "
                                   "+ sigma.to(xt.dtype)[:, None] * noise)"),
     "check 16 failed: ddim_step on float64 images (3, 1, 2, 2) raised RuntimeError"),
    # Part C
    ("guided_eps", GUIDED.format(body="w * eps_cond + (1 - w) * eps_uncond"), "hint: you used the other convention, s = w"),
    ("guided_eps", GUIDED.format(body="eps_uncond + w * (eps_cond - eps_uncond)"), "hint: you used the other convention, s = w"),
    ("guided_eps", GUIDED.format(body="(1 + w) * eps_uncond - w * eps_cond"), "hint: eps_cond and eps_uncond are swapped"),
    ("guided_eps", GUIDED.format(body="(1 + w) * eps_cond + w * eps_uncond"), "hint: (1 + w) eps_cond minus w eps_uncond"),
    ("guided_eps", GUIDED.format(body="eps_cond.mul_(1 + w).sub_(w * eps_uncond)"), "do not modify eps_cond or eps_uncond in place"),
    ("guided_eps", GUIDED.format(body="torch.stack([(1 + w) * eps_cond, - w * eps_uncond]).sum(0).float()"),
     "check 6 failed: float64 images (3, 1, 4, 4), w = 1.5: 2.5 eps_cond - 1.5 eps_uncond in float64"),
    # Part D
    ("sample", sample_variant(ret="x"), "hint: clip the result to [-1, 1] at the end"),
    ("sample", sample_variant(predict="eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat([labels, null]))"
                                      ".chunk(2); eps = w * eps_cond + (1 - w) * eps_uncond"),
     "hint: with w = 0 you sampled the unconditional model"),
    ("sample", sample_variant(predict="eps = model(x, t, labels=labels)"),
     "check 7 failed: with w = 3 the model must also give the unconditional prediction at every step, with the null label"),
    ("sample", sample_variant(predict="eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat([labels, null]))"
                                      ".chunk(2); eps = eps_cond"), "hint: use w: the sample with w = 3 equals the one with w = 0"),
    ("sample", sample_variant(null="0", predict="eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), "
                                                "labels=torch.cat([labels, null])).chunk(2); eps = guided_eps(eps_cond, eps_uncond, w)"),
     "with the null label model.n_classes = 3 for every image"),
    ("sample", sample_variant(predict="eps = model(x, t)"), "the model needs labels: model(x, t, labels=labels)"),
    ("sample", sample_variant(z="torch.randn(x.shape, generator=generator).to(device) if eta > 0 else torch.zeros_like(x)"),
     "hint: no z for the last step (t_prev = -1)"),
    ("sample", sample_variant(z="torch.randn(x.shape, generator=generator).to(device) if k_prev >= 0 else torch.zeros_like(x)"),
     "with eta = 0 draw x_T from the generator and nothing else"),
    ("sample", sample_variant(z="torch.zeros_like(x)"), "hint: with eta > 0 the step needs fresh noise"),
    ("sample", sample_variant(predict="eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), labels=torch.cat([labels, null]))"
                                      ".chunk(2); eps = guided_eps(eps_cond, eps_uncond, w); eta = 0.0"),
     "hint: pass eta on to ddim_step, with fresh noise"),
    ("sample", sample_variant(x_T="torch.randn((batch, 1, 28, 28)).to(device)"), "check 4 failed: eta = 0, w = 0, 4 steps on a stand-in model"),
    ("sample", sample_variant(last="if k_prev < 0: break"),
     "check 2 failed: T = 20, 4 steps: the model is evaluated at the DDIM timesteps ddim_timesteps(20, 4) = [19, 13, 6, 0], "
     "in that order, got the steps [19, 13, 6]. hint: the last step goes from the last timestep, 0, to t_prev = -1"),
    ("sample", sample_variant(clip=""), "hint: pass clip_x0 on to every ddim_step"),
    ("sample", sample_variant(ret="x.clamp(-1, 1).double()"), "check 5 failed: float32 images, got torch.float64"),
]

RIGHT_07 = [  # other right answers: they pass the visible checks and the hidden tests
    ("ddim_timesteps", TIMESTEPS.format(body="torch.round(torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64)).to(torch.int64)")),
    ("ddim_timesteps", TIMESTEPS.format(body="torch.linspace(num_steps - 1, 0, steps, dtype=torch.float64).round().to(torch.long)")),
    ("ddim_step", """
        def ddim_step(xt, eps, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False):  # per_sample first; append a 1
            abar = torch.cat([alphas_cumprod, alphas_cumprod.new_ones(1)]).to(torch.float64)
            abar_t, abar_prev = per_sample(abar[t], xt.double()), per_sample(abar[t_prev], xt.double())
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t)) * torch.sqrt(1 - abar_t / abar_prev)
            x0_hat = (xt - torch.sqrt(1 - abar_t).to(xt.dtype) * eps) / torch.sqrt(abar_t).to(xt.dtype)
            if clip_x0:
                x0_hat = torch.clamp(x0_hat, -1, 1)
                eps = (xt - torch.sqrt(abar_t).to(xt.dtype) * x0_hat) / torch.sqrt(1 - abar_t).to(xt.dtype)
            return (torch.sqrt(abar_prev).to(xt.dtype) * x0_hat + torch.sqrt(1 - abar_prev - sigma**2).to(xt.dtype) * eps
                    + sigma.to(xt.dtype) * noise)
    """),
    ("ddim_step", """
        def ddim_step(xt, eps, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False):  # in the data's dtype, with the clamp
            abar = alphas_cumprod.to(xt.dtype)
            abar_t = per_sample(abar[t], xt)
            abar_prev = per_sample(torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], 1.0), xt)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t)) * torch.sqrt(1 - abar_t / abar_prev)
            x0_hat = (xt - torch.sqrt(1 - abar_t) * eps) / torch.sqrt(abar_t)
            if clip_x0:
                x0_hat = x0_hat.clamp(-1, 1)
                eps = (xt - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
            return torch.sqrt(abar_prev) * x0_hat + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps + sigma * noise
    """),
    ("guided_eps", GUIDED.format(body="eps_cond + w * (eps_cond - eps_uncond)")),
    ("sample", sample_variant(predict="eps = guided_eps(model(x, t, labels=labels), model(x, t, labels=null), w) if w != 0 "
                                      "else model(x, t, labels=labels)")),
]


@pytest.mark.parametrize("name, source, message", [m for m in MISTAKES_07 if m[2] is not None],
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_07) if m[2] is not None])
def test_ex07_a_typical_mistake_fails_the_visible_check_with_one_line_and_a_hint(name, source, message):
    _, wrong = wrong_07(name, source)
    with pytest.raises(CheckFailed) as failed:
        getattr(ex07, name)(wrong)
    text = str(failed.value)
    assert text.startswith(f"{name}: check ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("name, source", [m[:2] for m in MISTAKES_07], ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_07)])
def test_ex07_a_typical_mistake_fails_the_hidden_tests(name, source):
    namespace, _ = wrong_07(name, source)
    with pytest.raises(Exception):  # an assertion, or the wrong function's own error
        run_hidden_07(name, namespace)


@pytest.mark.parametrize("name, source", RIGHT_07, ids=[f"{r[0]}-{i}" for i, r in enumerate(RIGHT_07)])
def test_ex07_other_right_answers_pass_the_visible_checks_and_the_hidden_tests(name, source, capsys):
    namespace, right = wrong_07(name, source)
    getattr(ex07, name)(right)
    assert "visible checks passed" in capsys.readouterr().out
    run_hidden_07(name, namespace)


def test_the_solution_07_passes_its_visible_checks_and_hidden_tests(capsys):
    for name in NAMES:
        getattr(ex07, name)(SOLUTION_07[name])
        run_hidden_07(name, dict(SOLUTION_07))
    assert capsys.readouterr().out.count("visible checks passed") == len(NAMES)


def test_the_checks_pass_on_the_package_reference_too(capsys):
    """The bank agrees with fsl_course.diffusion (Parts A and B; C and D through small adapters)."""
    from fsl_course import diffusion

    ex07.ddim_timesteps(diffusion.ddim_timesteps)

    def package_step(xt, eps, t, t_prev, alphas_cumprod, eta, noise, clip_x0=False):
        schedule = diffusion.NoiseSchedule(len(alphas_cumprod))
        schedule._float64["alphas_cumprod"] = alphas_cumprod.double()
        abar = alphas_cumprod.double()
        for name, value in (("sqrt_alphas_cumprod", abar.sqrt()), ("sqrt_one_minus_alphas_cumprod", (1 - abar).sqrt())):
            schedule._float64[name] = value
            setattr(schedule, name, value.float())
        return diffusion.ddim_step(xt, eps, t, t_prev, schedule, eta, noise, clip_x0=clip_x0)

    ex07.ddim_step(package_step)
    assert capsys.readouterr().out.count("visible checks passed") == 2


def test_ex07_part_d_is_graded_on_its_own(capsys):
    """Wrong Parts A to C in the notebook cost nothing in Part D, visible and hidden, and are back in place afterwards."""
    nb = nbformat.read(SOLUTION_07_PATH, as_version=4)
    (cell,) = [c for c in nb.cells if exercises.nbgrader_meta(c).get("grade_id") == "sample"]
    broken = (TIMESTEPS.format(body="torch.arange(steps)") + GUIDED.format(body="eps_uncond")
              + step_variant(abar_prev="abar[t_prev]", direction="(1 - abar_prev).sqrt()"))
    namespace = notebook_07(broken)
    parts = tuple(namespace[name] for name in NAMES[:3])
    exec(compile(cell.source, "<sample>", "exec"), namespace)
    ex07.sample(namespace["sample"])
    assert "visible checks passed" in capsys.readouterr().out
    assert tuple(namespace[name] for name in NAMES[:3]) == parts
    run_hidden_07("sample", namespace)
    assert tuple(namespace[name] for name in NAMES[:3]) == parts


def test_the_solution_07_samples_a_real_conditional_model_like_the_package():
    """The solution's sampler on a small ConditionalDDPM equals the package's DDIM sampler with guidance."""
    from fsl_course.diffusion import ConditionalDDPM, ddim_sample

    torch.manual_seed(0)
    model = ConditionalDDPM(5, num_steps=200, schedule="cosine", channels=(8, 16))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape))
    labels = torch.tensor([0, 3, 4])
    for eta, w, clip_x0 in ((0.0, 3.0, False), (1.0, 0.0, False), (0.5, 2.0, True)):
        got = SOLUTION_07["sample"](model, labels, 8, eta, w, torch.Generator().manual_seed(5), clip_x0=clip_x0)
        expected = ddim_sample(model, (3, 1, 28, 28), model.schedule, 8, eta=eta, labels=labels, guidance=w,
                               generator=torch.Generator().manual_seed(5), clip_x0=clip_x0).clamp(-1, 1)
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
