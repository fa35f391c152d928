"""The visible checks in fsl_course.checks: they pass on the solutions, fail with a hint on
typical mistakes, and are what every exercise's check cell runs."""

from __future__ import annotations

import ast
import importlib
import math
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from fsl_course import exercises
from fsl_course.checks import CheckFailed, visible_check
from solution_notebook import SolutionNotebook, solution_functions

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob(exercises.NOTEBOOK_GLOB))
CHECK_CALL = re.compile(r"^check\.(?P<check>\w+)\((?P<function>\w+)\)$")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_every_check_cell_calls_the_bank_and_the_solution_passes(path, capsys):
    """Each test cell's visible part is ``check.NAME(NAME)`` with ``check`` = fsl_course.checks.exNN."""
    nb = nbformat.read(path, as_version=4)
    bank = importlib.import_module(f"fsl_course.checks.ex{path.name[:2]}")
    namespace = solution_functions(path)
    tests = [cell for cell in nb.cells if exercises.is_test_cell(cell)]
    assert tests
    for cell in tests:
        visible = cell.source.split("### BEGIN HIDDEN TESTS")[0].strip().splitlines()
        calls = [CHECK_CALL.match(line) for line in visible]
        assert calls and all(calls), f"{exercises.nbgrader_meta(cell)['grade_id']}: visible part must be check calls"
        for call in calls:
            getattr(bank, call["check"])(namespace[call["function"]])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == sum(len(c.source.split("### BEGIN")[0].strip().splitlines()) for c in tests)
    assert all(line.startswith("✓ ") and "visible checks passed" in line for line in printed), printed


def test_the_exercise_shows_only_the_check_calls():
    exercise = nbformat.read(ROOT / "exercises" / SOLUTIONS[0].name, as_version=4)
    for cell in exercise.cells:
        if exercises.is_test_cell(cell):
            assert all(CHECK_CALL.match(line) for line in cell.source.strip().splitlines()), cell.source


# --------------------------------------------------------------------------- typical mistakes, exercise 01

ex01 = importlib.import_module("fsl_course.checks.ex01")
SOLUTION_01 = solution_functions(ROOT / "solutions" / "01_few_shot_tasks.ipynb")


def episode_with_repeated_classes(images, way, shot, query, generator):
    classes = torch.arange(way) // 2  # what torch.randint may do: 0, 0, 1
    chosen = images[classes, : shot + query]
    support_x, query_x = chosen[:, :shot].flatten(0, 1), chosen[:, shot:].flatten(0, 1)
    return support_x, torch.arange(way).repeat_interleave(shot), query_x, torch.arange(way).repeat_interleave(query)


def episode_with_global_seed(images, way, shot, query, generator):
    return SOLUTION_01["sample_episode"](images, way, shot, query, torch.Generator().manual_seed(int(torch.randint(99, ()))))


def float_labels(images, way, shot, query, generator):
    sx, sy, qx, qy = SOLUTION_01["sample_episode"](images, way, shot, query, generator)
    return sx, sy.float(), qx, qy.float()


def positive_distances(support_x, support_y, query_x):
    return -SOLUTION_01["prototype_logits"](support_x, support_y, query_x)


def ci_with_ddof_0(accuracies):
    a = np.asarray(accuracies, dtype=np.float64)
    if len(a) < 2:
        raise ValueError("too few")
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def ci_returning_tensors(accuracies):
    mean, h = SOLUTION_01["mean_ci95"](accuracies)
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(h, dtype=torch.float64)


# --------------------------------------------------------------------------- typical mistakes, exercise 03

ex03 = importlib.import_module("fsl_course.checks.ex03")


def cvae_loss_with_the_standard_normal_prior(model, x, y, generator=None):
    """Lesson 02's KL(q || N(0, I)) where the CVAE's conditional prior p(z | y) belongs."""
    mu, logvar = model.encode(x, y)
    model.prior(y)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    nll = torch.nn.functional.binary_cross_entropy_with_logits(model.decode(z, y), x, reduction="none").flatten(1).sum(1)
    return (nll + 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(1)).mean()


# --------------------------------------------------------------------------- typical mistakes, exercise 04

ex04 = importlib.import_module("fsl_course.checks.ex04")
softplus = torch.nn.functional.softplus


def d_star_swapped(p_data, p_model):
    return p_model / (p_data + p_model)


def d_star_without_the_zero_case(p_data, p_model):
    return p_data / (p_data + p_model)  # 0 / 0 = NaN where both densities vanish


def d_star_with_an_epsilon(p_data, p_model):
    total = p_data + p_model
    return torch.where(total > 0, p_data / (total + 1e-12), torch.full_like(total, 0.5))


def d_loss_with_log_sigmoid(real_logits, fake_logits):
    return -torch.log(torch.sigmoid(real_logits)).mean() - torch.log(1 - torch.sigmoid(fake_logits)).mean()


def d_loss_with_the_wrong_sign(real_logits, fake_logits):
    return torch.log(torch.sigmoid(real_logits)).mean() + torch.log(torch.sigmoid(-fake_logits)).mean()  # V, not -V


def d_loss_summed(real_logits, fake_logits):
    return softplus(-real_logits).sum() + softplus(fake_logits).sum()


def d_loss_one_mean_over_both_batches(real_logits, fake_logits):
    return torch.cat([softplus(-real_logits), softplus(fake_logits)]).mean()


def d_loss_swapped(real_logits, fake_logits):
    return softplus(real_logits).mean() + softplus(-fake_logits).mean()


def g_loss_non_saturating(fake_logits):
    return softplus(-fake_logits).mean()


def g_loss_saturating(fake_logits):
    return -softplus(fake_logits).mean()


def g_loss_saturating_with_log(fake_logits):
    return torch.log(1 - torch.sigmoid(fake_logits)).mean()


def g_loss_non_saturating_with_log(fake_logits):
    return -torch.log(torch.sigmoid(fake_logits)).mean()


def g_loss_non_saturating_detached(fake_logits):
    return torch.tensor(softplus(-fake_logits).mean().item())


@pytest.mark.parametrize("check, wrong, message", [
    (ex04.optimal_discriminator, d_star_swapped, "check 2 failed: p_data = [0.3, 0.1, 0.2], p_model = [0.1, 0.3, 0.2] give "
     "D* = [0.75, 0.25, 0.5], got [0.25, 0.75, 0.5]. hint: D* is the probability that x is *real*: p_data goes on top"),
    (ex04.optimal_discriminator, lambda p_data, p_model: torch.full_like(p_data, 0.5), "hint: 1/2 is D* only where p_data = p_model"),
    (ex04.optimal_discriminator, d_star_without_the_zero_case, "check 3 failed: where only the data has mass D* = 1"),
    (ex04.optimal_discriminator, d_star_with_an_epsilon, "check 5 failed: D* depends only on the ratio of the densities"),
    (ex04.discriminator_loss, d_loss_with_log_sigmoid, "got inf. hint: torch.log(torch.sigmoid(l)) gives log(0) = -inf for l = -200"),
    (ex04.discriminator_loss, d_loss_with_the_wrong_sign, "got -1.38629. hint: the sign: the discriminator *maximises* V"),
    (ex04.discriminator_loss, d_loss_summed, "hint: average over each batch (.mean()), do not sum"),
    (ex04.discriminator_loss, d_loss_one_mean_over_both_batches, "one mean over the concatenated logits halves the loss"),
    (ex04.discriminator_loss, d_loss_swapped, "check 3 failed: real logits [2, -1], fake logits [0.5, -3] give "
     "mean(softplus(-l_real)) + mean(softplus(l_fake)) = 1.2314, got 2.98143. hint: real and fake are swapped"),
    (ex04.generator_loss_saturating, g_loss_non_saturating, "hint: this is the non-saturating loss; the saturating (minimax) loss is"),
    (ex04.generator_loss_saturating, g_loss_saturating_with_log, "check 4 failed: fake logits [200, 0] give -100.3466, got -inf. "
     "hint: torch.log(1 - torch.sigmoid(200)) is log(0)"),
    (ex04.generator_loss_saturating, lambda fake_logits: -g_loss_saturating(fake_logits), "hint: the sign: the generator *minimises*"),
    (ex04.generator_loss_nonsaturating, g_loss_saturating, "hint: this is the saturating (minimax) loss; the non-saturating loss is"),
    (ex04.generator_loss_nonsaturating, g_loss_non_saturating_with_log, "got inf. hint: torch.log(torch.sigmoid(-200)) is log(0)"),
    (ex04.generator_loss_nonsaturating, lambda fake_logits: softplus(fake_logits).mean(),
     "hint: log D(G(z)) and log(1 - D(G(z))) are mixed up"),
    (ex04.generator_loss_nonsaturating, g_loss_non_saturating_detached, "check 5 failed: dL_G/dl = -(1 - sigmoid(l)) / B"),
    (ex04.generator_loss_nonsaturating, lambda fake_logits: softplus(-fake_logits).sum(), "hint: average over the batch (.mean()), do not sum"),
])
def test_a_typical_gan_mistake_fails_with_one_line_and_a_hint(check, wrong, message):
    with pytest.raises(CheckFailed) as failed:
        check(wrong)
    text = str(failed.value)
    assert text.startswith(f"{check.__name__}: check ") and message in text and "\n" not in text


def test_the_gan_checks_pass_on_the_package_reference_too(capsys):
    from fsl_course import gan

    for name in ("optimal_discriminator", "discriminator_loss", "generator_loss_saturating", "generator_loss_nonsaturating"):
        getattr(ex04, name)(getattr(gan, name))
    assert capsys.readouterr().out.count("visible checks passed") == 4


# --------------------------------------------------------------------------- typical mistakes, exercise 05

ex05 = importlib.import_module("fsl_course.checks.ex05")
SOLUTION_05 = solution_functions(ROOT / "solutions" / "05_stable_and_conditional_gans.ipynb")


def penalty_variant(*, eps="per_sample", real_first=True, detach=True, scores="sum", create_graph=True,
                    norm="per_sample", squared=False, one_sided=False, fixed_weight=None):
    """The gradient penalty with one typical mistake (the defaults are the right answer)."""

    def gradient_penalty(critic, real, fake, generator=None, weight=10.0):
        batch, ones = len(real), (1,) * (real.ndim - 1)
        shape = {"per_sample": (batch,) + ones, "normal": (batch,) + ones, "batch": (1,) + ones,
                 "pixel": tuple(real.shape), "matrix": (batch, 1)}[eps]
        draw = torch.randn if eps == "normal" else torch.rand
        e = draw(shape, generator=generator, dtype=real.dtype)
        e = e if real_first else 1 - e
        r, f = (real.detach(), fake.detach()) if detach else (real, fake)
        x_hat = (e * r + (1 - e) * f).requires_grad_(True)
        s = critic(x_hat)
        (grad,) = torch.autograd.grad(s.sum() if scores == "sum" else s.mean(), x_hat, create_graph=create_graph)
        n = {"per_sample": grad.flatten(1).norm(dim=1), "batch": grad.norm(), "last": grad.norm(dim=-1)}[norm]
        n = n**2 if squared else n
        d = (n - 1).clamp(min=0) if one_sided else n - 1
        return (weight if fixed_weight is None else fixed_weight) * d.pow(2).mean()

    return gradient_penalty


def dagan_variant(*, penalty=True, no_grad=True, fake_order="u_first", noise_generator=True, penalty_generator=True,
                  units="standard", swapped=False):
    """The DAGAN critic loss with one typical mistake (the defaults are the right answer)."""
    critic_loss, gradient_penalty = SOLUTION_05["critic_loss"], SOLUTION_05["gradient_penalty"]

    def dagan_critic_loss(critic, generator_net, u, u_other, generator):
        real = torch.cat([u, u_other], dim=1)
        with torch.set_grad_enabled(not no_grad):
            z = generator_net.noise(len(u), generator if noise_generator else None)
            second = generator_net.forward_standard(u, z) if units == "standard" else generator_net(u, z)
            fake = torch.cat([u, second] if fake_order == "u_first" else [second, u], dim=1)
        real_scores, fake_scores = critic(real), critic(fake)
        loss = critic_loss(fake_scores, real_scores) if swapped else critic_loss(real_scores, fake_scores)
        if penalty:
            loss = loss + gradient_penalty(critic, real, fake, generator if penalty_generator else None)
        return loss

    return dagan_critic_loss


def augment_variant(*, layout="grouped", labels_layout=None, real_rows="first", no_grad=True, units="raw", noise="one_call"):
    """augment_support with one typical mistake (the defaults are the right answer)."""

    def augment_support(generator_net, features, labels, n, generator):
        with torch.set_grad_enabled(not no_grad):
            sources = features.repeat_interleave(n, 0) if layout == "grouped" else features.repeat(n, 1)
            if noise == "one_call":
                z = generator_net.noise(len(sources), generator)
            else:  # one draw per support feature
                z = torch.cat([generator_net.noise(n, generator) for _ in range(len(features))])
            generated = generator_net(sources, z) if units == "raw" else generator_net.forward_standard(sources, z)
        order = labels_layout or layout
        generated_labels = labels.repeat_interleave(n) if order == "grouped" else labels.repeat(n)
        if real_rows == "none":
            return generated, generated_labels
        if real_rows == "last":
            return torch.cat([generated, features]), torch.cat([generated_labels, labels])
        return torch.cat([features, generated]), torch.cat([labels, generated_labels])

    return augment_support


def constant(value: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value.item())  # the number, cut off from the graph


@pytest.mark.parametrize("check, wrong, message", [
    (ex05.critic_loss, lambda real, fake: real.mean() - fake.mean(),
     "check 3 failed: real scores [1, 2, 3, 2] (mean 2) and fake scores [0.5, 1.5, 1, 1] (mean 1) give 1 - 2 = -1, got 1. "
     "hint: the sign: the critic maximises the Wasserstein estimate"),
    (ex05.critic_loss, lambda real, fake: fake.sum() - real.sum(), "got -4. hint: average over each batch (.mean()), do not sum"),
    (ex05.critic_loss, lambda real, fake: softplus(-real).mean() + softplus(fake).mean(),
     "check 2 failed: scores 0 for every sample give 0, got 1.38629. hint: this is the GAN discriminator's loss"),
    (ex05.critic_loss, lambda real, fake: (fake - real).mean(), "check 4 failed: 3 real and 2 fake scores raised RuntimeError: "),
    (ex05.critic_loss, lambda real, fake: torch.cat([fake, -real]).mean(), "got -0.5. hint: average each batch separately"),
    (ex05.critic_loss, lambda real, fake: constant(fake.mean() - real.mean()), "check 6 failed: the gradient must flow"),
    (ex05.wgan_generator_loss, lambda fake: fake.mean(), "hint: the sign: the generator wants the critic to score its fakes *high*"),
    (ex05.wgan_generator_loss, lambda fake: -fake.sum(), "check 3 failed: fake scores [1, 2, 3] give -mean = -2, got -6. hint: average"),
    (ex05.wgan_generator_loss, lambda fake: softplus(-fake).mean(), "got 0.693147. hint: this is a GAN generator loss"),
    (ex05.wgan_generator_loss, lambda fake: constant(-fake.mean()), "check 5 failed: dL_G/df(G(z_j)) = -1 / B"),
    (ex05.gradient_penalty, penalty_variant(norm="batch"), "check 2 failed: a linear critic f(x) = <w, x> with w = [3, 4] has the "
     "gradient w at every x_hat, of norm 5, so GP = 10 * (5 - 1)^2 = 160 for any eps; got 810. hint: one norm for the whole batch"),
    (ex05.gradient_penalty, penalty_variant(squared=True), "got 5760. hint: the norm, not the squared norm"),
    (ex05.gradient_penalty, penalty_variant(scores="mean"), "hint: take the gradient of critic(x_hat).sum(), not of .mean()"),
    (ex05.gradient_penalty, penalty_variant(fixed_weight=1.0), "got 16. hint: multiply by weight (here 10)"),
    (ex05.gradient_penalty, penalty_variant(one_sided=True), "check 3 failed: w = [0.18, 0.24] (norm 0.3) gives 10 * (0.3 - 1)^2 = 4.9, "
     "got 0. hint: the penalty is two-sided"),
    (ex05.gradient_penalty, penalty_variant(create_graph=False), "check 4 failed: the penalty must be differentiable in the critic's "
     "parameters (it is part of the critic's loss), but it has no gradient. "
     "hint: torch.autograd.grad(scores.sum(), x_hat, create_graph=True)"),
    (ex05.gradient_penalty, penalty_variant(eps="normal"), "hint: eps ~ U(0, 1) is torch.rand, not torch.randn"),
    (ex05.gradient_penalty, penalty_variant(eps="pixel"), "one eps per sample, shared by all its coordinates: found different eps"),
    (ex05.gradient_penalty, penalty_variant(eps="batch"), "one eps per sample, not one for the whole batch"),
    (ex05.gradient_penalty, penalty_variant(real_first=False), "hint: eps multiplies the real samples"),
    (ex05.gradient_penalty, penalty_variant(eps="matrix"), "images of shape (3, 1, 2, 2) raised RuntimeError: "),
    (ex05.gradient_penalty, penalty_variant(norm="last"), "got 1.71573. hint: the norm over all non-batch dimensions"),
    (ex05.gradient_penalty, penalty_variant(fixed_weight=10.0), "weight=1 gives 1 * (5 - 1)^2 = 16, got 160. hint: multiply by the "
     "argument weight, do not hard-code 10"),
    (ex05.gradient_penalty, penalty_variant(detach=False), "the penalty must not send gradients into real or fake"),
    (ex05.dagan_critic_loss, dagan_variant(penalty=False), "hint: add the gradient penalty"),
    (ex05.dagan_critic_loss, dagan_variant(swapped=True), "hint: real and fake are swapped"),
    (ex05.dagan_critic_loss, dagan_variant(fake_order="u_second"), "hint: a pair is [u, second]: u first"),
    (ex05.dagan_critic_loss, dagan_variant(no_grad=False), "the critic's step must not send gradients into the generator"),
    (ex05.dagan_critic_loss, dagan_variant(noise_generator=False), "check 2 failed: draw the noise once, z = generator_net.noise(len(u), "
     "generator), with the generator you were given; the calls were [(4, None)]"),
    (ex05.dagan_critic_loss, dagan_variant(penalty_generator=False), "hint: pass generator to gradient_penalty too"),
    (ex05.dagan_critic_loss, dagan_variant(units="raw"),
     "check 1 failed: with stand-ins for the generator and the critic: the DAGAN game is played in standard units"),
    (ex05.dagan_critic_loss,
     lambda critic, generator_net, u, u_other, generator: SOLUTION_05["critic_loss"](critic(u), critic(u_other)),
     "check 1 failed: with stand-ins for the generator and the critic: the critic scores pairs: one (B, 2D) = (B, 4) tensor per call"),
    (ex05.augment_support, augment_variant(layout="tiled"),
     "hint: grouped by source: rows S + i n .. S + i n + n - 1 come from features[i]"),
    (ex05.augment_support, augment_variant(layout="tiled", labels_layout="grouped"),
     "hint: grouped by source: einops.repeat(features, 's d -> (s n) d', n=n), not tiled copies of the support set"),
    (ex05.augment_support, augment_variant(real_rows="none"), "give S (1 + n) = 9 rows: features (9, 2) and labels (9,), got (6, 2) "
     "and (6,). hint: the real features come first"),
    (ex05.augment_support, augment_variant(real_rows="last"), "check 4 failed: the first S rows are the support features"),
    (ex05.augment_support, augment_variant(no_grad=False), "hint: compute the generated features under torch.no_grad()"),
    (ex05.augment_support, augment_variant(units="standard"), "augment_support works in raw feature units"),
    (ex05.augment_support, augment_variant(noise="per_source"), "draw all the noise in one call, z = generator_net.noise(S * n, generator), "
     "S * n = 6; the calls asked for [2, 2, 2] noise vectors"),
])
def test_a_typical_wgan_or_dagan_mistake_fails_with_one_line_and_a_hint(check, wrong, message):
    with pytest.raises(CheckFailed) as failed:
        check(wrong)
    text = str(failed.value)
    assert text.startswith(f"{check.__name__}: check ") and message in text and "\n" not in text, text


def test_the_solution_variants_above_are_right_with_their_defaults(capsys):
    ex05.gradient_penalty(penalty_variant())
    ex05.dagan_critic_loss(dagan_variant())
    ex05.augment_support(augment_variant())
    assert capsys.readouterr().out.count("visible checks passed") == 3


def test_the_wgan_and_dagan_checks_pass_on_the_package_reference_too(capsys):
    from types import SimpleNamespace

    from fsl_course import dagan, gan

    for name in ("critic_loss", "wgan_generator_loss", "gradient_penalty"):
        getattr(ex05, name)(getattr(gan, name))

    def package_dagan_critic_loss(critic, generator_net, u, u_other, generator):  # a critic step of train_feature_gan
        real = dagan.pair(u, u_other)
        with torch.no_grad():
            fake = dagan.fake_pairs(generator_net, u, generator)
        return gan.critic_loss(critic(real), critic(fake)) + gan.gradient_penalty(critic, real, fake, generator)

    def package_augment_support(generator_net, features, labels, n, generator):  # DAGANLearner.finetune_head's data
        learner = SimpleNamespace(generator=generator_net)
        fake, fake_labels = dagan.DAGANLearner.generate_features(learner, features, labels, n, generator)
        return torch.cat([features, fake]), torch.cat([labels, fake_labels])

    ex05.dagan_critic_loss(package_dagan_critic_loss)
    ex05.augment_support(package_augment_support)
    assert capsys.readouterr().out.count("visible checks passed") == 5


@pytest.mark.parametrize("check, wrong, message", [
    (ex03.cvae_loss, cvae_loss_with_the_standard_normal_prior, "hint: the prior is (m, s) = model.prior(y), not N(0, I)"),
    (ex01.sample_episode, float_labels, "check 2 failed: labels must be int64. hint: torch.long"),
    (ex01.sample_episode, episode_with_repeated_classes, "check 4 failed: the N classes must be distinct"),
    (ex01.sample_episode, episode_with_global_seed, "hint: draw every random number from `generator`"),
    (ex01.prototype_logits, positive_distances, "check 2 failed: got [[9.0, 36.0], [81.0, "),
    (ex01.mean_ci95, ci_with_ddof_0, "check 2 failed: h should be 0.2263"),
    (ex01.mean_ci95, ci_returning_tensors, "check 3 failed: return Python floats"),
])
def test_a_typical_mistake_fails_with_one_line_and_a_hint(check, wrong, message):
    with pytest.raises(CheckFailed) as failed:
        check(wrong)
    text = str(failed.value)
    assert text.startswith(f"{check.__name__}: check ") and message in text and "\n" not in text
    assert failed.value._render_traceback_() == [f"\x1b[31m✗ {text}\x1b[0m"]


def test_errors_from_the_learners_function_pass_through():
    def unfinished(accuracies):
        raise NotImplementedError("return the mean and 1.96 * s / sqrt(E)")

    with pytest.raises(NotImplementedError, match="return the mean"):
        ex01.mean_ci95(unfinished)
    with pytest.raises(CheckFailed, match="expected your function, got int"):
        ex01.mean_ci95(3)


def test_visible_check_counts_the_checks(capsys):
    @visible_check
    def two(function, expect):
        expect(function(1) == 2, "doubles")
        expect(function(2) == 4, "doubles again")

    two(lambda x: 2 * x)
    assert capsys.readouterr().out == "✓ two: 2 visible checks passed\n"
    with pytest.raises(CheckFailed, match=r"^two: check 2 failed: doubles again$"):
        two(lambda x: {1: 2}.get(x, 0))


def test_every_bank_module_belongs_to_a_solution():
    import fsl_course.checks

    modules = {p.stem for p in Path(fsl_course.checks.__file__).parent.glob("ex*.py")}
    assert modules == {f"ex{p.name[:2]}" for p in SOLUTIONS}
    assert all(ast.parse((Path(fsl_course.checks.__file__).parent / f"{m}.py").read_text()) for m in modules)


# --------------------------------------------------------------------------- typical mistakes, exercise 06

ex06 = importlib.import_module("fsl_course.checks.ex06")
SOLUTION_06_PATH = ROOT / "solutions" / "06_ddpm_from_the_variational_bound.ipynb"
SOL06 = SolutionNotebook("06_ddpm_from_the_variational_bound.ipynb")
SOLUTION_06 = SOL06.functions


notebook_06, hidden_tests_06, run_hidden_06, wrong_06 = SOL06.notebook, SOL06.hidden_tests, SOL06.run_hidden, SOL06.wrong


MAKE_SCHEDULE = """
def make_schedule(num_steps, kind="linear"):
    if kind == "linear":
        betas = {linear}
    else:
        s = {s}
        steps = torch.arange({grid}, dtype=torch.float64)
        f = {f}
        abar = f / f[0]
        {cosine_betas}
    {ret}
"""
SCHEDULE_RIGHT = dict(linear="torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)", s="0.008", grid="num_steps + 1",
                      f="torch.cos((steps / num_steps + s) / (1 + s) * math.pi / 2) ** 2",
                      cosine_betas="betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)",
                      ret="return betas, torch.cumprod(1 - betas, dim=0)")


def schedule_variant(**changes) -> str:
    return MAKE_SCHEDULE.format(**{**SCHEDULE_RIGHT, **changes})


Q_SAMPLE = """
def q_sample(x0, t, noise, alphas_cumprod):
    {body}
"""
POSTERIOR = """
def posterior_mean_variance(x0, xt, t, betas, alphas_cumprod):
    abar_prev = {abar_prev}
    coef_x0 = {coef_x0}
    coef_xt = {coef_xt}
    variance = {variance}
    mean = per_sample(coef_x0, t, x0) * x0 + per_sample(coef_xt, t, x0) * xt
    return mean, {variance_out}
"""
POSTERIOR_RIGHT = dict(abar_prev="torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])",
                       coef_x0="betas * abar_prev.sqrt() / (1 - alphas_cumprod)",
                       coef_xt="(1 - abar_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)",
                       variance="betas * (1 - abar_prev) / (1 - alphas_cumprod)",
                       variance_out="per_sample(variance, t, x0).expand_as(x0)")


def posterior_variant(**changes) -> str:
    return POSTERIOR.format(**{**POSTERIOR_RIGHT, **changes})


LOSS = """
def noise_prediction_loss(eps_model, x0, alphas_cumprod, generator=None):
    {draws}
    xt = q_sample(x0, t, eps, alphas_cumprod)
    return {loss}
"""
LOSS_RIGHT = dict(draws="t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator); "
                        "eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)",
                  loss="F.mse_loss(eps_model(xt, t), eps)")


def loss_variant(**changes) -> str:
    return LOSS.format(**{**LOSS_RIGHT, **changes})


STEP = """
def ancestral_step(eps, xt, t, betas, alphas_cumprod, noise):
    beta, abar = per_sample(betas, t, xt), per_sample(alphas_cumprod, t, xt)
    mean = {mean}
    later = {later}
    return mean + later * {sigma} * noise
"""
STEP_RIGHT = dict(mean="(xt - beta / (1 - abar).sqrt() * eps) / (1 - beta).sqrt()",
                  later="(t > 0).to(xt.dtype).reshape(-1, *([1] * (xt.ndim - 1)))", sigma="beta.sqrt()")


def step_variant(**changes) -> str:
    return STEP.format(**{**STEP_RIGHT, **changes})


# (function name, wrong source, a piece of the visible check's message or None where the visible checks pass)
MISTAKES_06 = [
    # Part A
    ("make_schedule", schedule_variant(linear="torch.linspace(0.02, 1e-4, num_steps, dtype=torch.float64)"),
     "check 3 failed: linear, T = 3: betas = linspace(1e-4, 0.02, 3) = [0.0001, 0.01005, 0.02], got [0.02, 0.01005, 0.0001]. "
     "hint: the betas grow"),
    ("make_schedule", schedule_variant(linear="torch.linspace(1e-4, 0.02, num_steps)",
                                       grid="num_steps + 1", s="0.008").replace("dtype=torch.float64", "dtype=torch.float32"),
     "check 5 failed: the schedule is computed and returned in float64, got torch.float32 and torch.float32"),
    ("make_schedule", schedule_variant(linear="1e-4 + (0.02 - 1e-4) * torch.arange(num_steps, dtype=torch.float64) / num_steps"),
     "hint: T values from 1e-4 to 0.02, both included"),
    ("make_schedule", schedule_variant(ret="return betas, 1 - betas"), "hint: that is alpha_t = 1 - beta_t; abar_t is the running product"),
    ("make_schedule", schedule_variant(ret="return betas, torch.cumprod(betas, dim=0)"), "hint: the cumulative product of the alphas"),
    ("make_schedule", schedule_variant(ret="return betas, torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)[:-1]])"),
     "hint: 0-based: alphas_cumprod[0] is abar_1 = 1 - beta_1"),
    ("make_schedule", schedule_variant(cosine_betas="betas = 1 - abar[1:] / abar[:-1]"), "hint: clip the betas at 0.999"),
    ("make_schedule", schedule_variant(cosine_betas="betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999); return betas, abar[1:]"),
     "hint: recompute alphas_cumprod = torch.cumprod(1 - betas, dim=0) *after* clipping"),
    ("make_schedule", schedule_variant(grid="num_steps", cosine_betas="betas = (1 - abar / torch.cat([abar[:1], abar[:-1]])).clamp(max=0.999)"),
     "hint: beta_1 is 0: abar(t) for t = 1..T is what the schedule stores"),
    ("make_schedule", schedule_variant(s="0.0"), "hint: the offset s = 0.008 inside the cosine"),
    ("make_schedule", schedule_variant(f="torch.cos((steps / num_steps + s) / (1 + s) * math.pi / 2)"),
     "check 8 failed: cosine, T = 2: f(0) = 0.999845, f(1) = 0.493767, f(2) = cos(pi / 2)^2 = 0, so beta_1 = 1 - f(1) / f(0) = 0.506156"),
    ("make_schedule", schedule_variant().replace('kind="linear"', 'kind="cosine"'), None),  # hidden: the default kind
    # Part B
    ("q_sample", Q_SAMPLE.format(body="abar = per_sample(alphas_cumprod, t, x0); return abar * x0 + (1 - abar) * noise"),
     "hint: the square roots: the coefficients are standard deviations"),
    ("q_sample", Q_SAMPLE.format(body="abar = per_sample(alphas_cumprod, t - 1, x0); return abar.sqrt() * x0 + (1 - abar).sqrt() * noise"),
     "hint: 0-based timesteps: sample 0 has t = 1, so abar = alphas_cumprod[1] = 0.36"),
    ("q_sample", Q_SAMPLE.format(body="abar = per_sample(alphas_cumprod, t + 1, x0); return abar.sqrt() * x0 + (1 - abar).sqrt() * noise"),
     "raised IndexError: index 2 is out of bounds for dimension 0 with size 2. hint: timesteps are 0-based"),
    ("q_sample", Q_SAMPLE.format(body="abar = per_sample(alphas_cumprod, t, x0); return (1 - abar).sqrt() * x0 + abar.sqrt() * noise"),
     "hint: sqrt(abar_t) multiplies x_0 and sqrt(1 - abar_t) the noise"),
    ("q_sample", Q_SAMPLE.format(body="abar = alphas_cumprod[t[0]].to(x0.dtype); return abar.sqrt() * x0 + (1 - abar).sqrt() * noise"),
     "hint: one abar per sample, alphas_cumprod[t] with the whole (B,) tensor t"),
    ("q_sample", Q_SAMPLE.format(body="abar = alphas_cumprod[t].to(x0.dtype); return abar.sqrt() * x0 + (1 - abar).sqrt() * noise"),
     "raised RuntimeError: The size of tensor a (2) must match the size of tensor b (3) at non-singleton dimension 1. hint: "
     "schedule values picked at t have shape (B,); reshape them to (B, 1, ..., 1)"),
    ("q_sample", Q_SAMPLE.format(body="abar = alphas_cumprod[t].to(x0.dtype)[:, None]; return abar.sqrt() * x0 + (1 - abar).sqrt() * noise"),
     "check 6 failed: q_sample on images (3, 1, 2, 2) raised RuntimeError"),
    ("q_sample", Q_SAMPLE.format(body="abar = alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1))); return abar.sqrt() * x0 + (1 - abar).sqrt() * noise"),
     "check 3 failed: float32 data with the float64 schedule gives float32 x_t, got torch.float64"),
    # Part C
    ("posterior_mean_variance", posterior_variant(coef_x0=POSTERIOR_RIGHT["coef_xt"], coef_xt=POSTERIOR_RIGHT["coef_x0"]),
     "hint: the two coefficients are swapped"),
    ("posterior_mean_variance", posterior_variant(abar_prev="alphas_cumprod"), "hint: abar_{t-1} is the previous step's"),
    ("posterior_mean_variance", posterior_variant(coef_xt="(1 - abar_prev) * (1 - betas) / (1 - alphas_cumprod)"),
     "hint: sqrt(alpha_t) in the coefficient of x_t, not alpha_t"),
    ("posterior_mean_variance", posterior_variant(variance="betas"), "hint: that is beta_t, the forward step's variance"),
    ("posterior_mean_variance", posterior_variant(variance="(betas * (1 - abar_prev) / (1 - alphas_cumprod)).sqrt()"),
     "hint: return the variance beta~_t, not the standard deviation"),
    ("posterior_mean_variance", posterior_variant(abar_prev="alphas_cumprod.roll(1)"),
     "hint: alphas_cumprod[k - 1] with k = 0 is alphas_cumprod[-1], the *last* step's abar"),
    ("posterior_mean_variance", posterior_variant(variance_out="per_sample(variance, t, x0)"),
     "check 2 failed: x0 and xt of shape (3, 2) give a mean and a variance of shape (3, 2), got (3, 2) and (3, 1)"),
    ("posterior_mean_variance", posterior_variant(variance_out="variance[t]"),
     "got (3, 2) and (3,). hint: the coefficients are (B, 1, ..., 1) (per_sample)"),
    ("posterior_mean_variance", posterior_variant(variance_out="per_sample(variance, t, x0).expand_as(x0)").replace(
        "return mean,", "return mean.double(),"), "check 6 failed: float32 data with the float64 schedule gives float32 results"),
    # Part D
    ("noise_prediction_loss", loss_variant(loss="((eps_model(xt, t) - eps) ** 2).sum()"), "hint: the mean, not the sum"),
    ("noise_prediction_loss", loss_variant(loss="((eps_model(xt, t) - eps) ** 2).flatten(1).sum(1).mean()"),
     "hint: the mean over every element (F.mse_loss), not the per-sample sum"),
    ("noise_prediction_loss", loss_variant(loss="F.mse_loss(eps_model(xt, t), x0)"), "hint: the model predicts the noise eps, not x_0"),
    ("noise_prediction_loss", loss_variant(loss="F.mse_loss(eps_model(xt, t), eps).sqrt()"), "hint: the mean of the squared errors, no square root"),
    ("noise_prediction_loss", loss_variant(draws="eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype); "
                                                 "t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator)"),
     "hint: draw t first, with the generator you were given"),
    ("noise_prediction_loss", loss_variant(draws="t = torch.randint(len(alphas_cumprod), (len(x0),)); eps = torch.randn(x0.shape, dtype=x0.dtype)"),
     "check 4 failed: with this generator, t = torch.randint(T, (B,), generator=generator) gives"),
    ("noise_prediction_loss", loss_variant(draws="t = torch.randint(1, len(alphas_cumprod) + 1, (len(x0),), generator=generator); "
                                                 "eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)"),
     "t must hold 0-based timesteps 0..1, got values in [1, 2]"),
    ("noise_prediction_loss", loss_variant(draws="t = torch.randint(len(alphas_cumprod), (1,), generator=generator).expand(len(x0)); "
                                                 "eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)"),
     "check 4 failed: with this generator, t = torch.randint(T, (B,), generator=generator) gives"),
    ("noise_prediction_loss", loss_variant(loss="F.mse_loss(eps_model(x0, t), eps)"), "check 5 failed: the model must see x_t"),
    ("noise_prediction_loss", loss_variant(loss="F.mse_loss(eps_model(xt, t).detach(), eps)"),
     "the loss must be differentiable in the model's parameters"),
    ("noise_prediction_loss", loss_variant(draws="t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator); "
                                                 "eps = torch.randn(x0.shape, generator=generator)"),
     "check 12 failed: float64 data: the model must see a float64 x_t made with float64 noise"),
    # Part E
    ("ancestral_step", step_variant(mean="xt - beta / (1 - abar).sqrt() * eps"), "hint: divide by sqrt(alpha_t)"),
    ("ancestral_step", step_variant(mean="(xt - (1 - abar).sqrt() * eps) / abar.sqrt()"),
     "hint: the coefficient of eps is beta_t / sqrt(1 - abar_t), not sqrt(1 - abar_t)"),
    ("ancestral_step", step_variant(mean="(xt - beta / (1 - abar) * eps) / (1 - beta).sqrt()"), "hint: sqrt(1 - abar_t) under beta_t"),
    ("ancestral_step", step_variant(later="1"), "hint: no noise at t = 0 (the paper's t = 1): the last step returns the mean"),
    ("ancestral_step", step_variant(sigma="beta"), "hint: sigma_t is the standard deviation sqrt(beta_t)"),
    ("ancestral_step", step_variant(sigma="(beta * (1 - torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]]))[t].to(xt.dtype)"
                                          ".reshape(-1, *([1] * (xt.ndim - 1))) / (1 - abar)).sqrt()"),
     "hint: here sigma_t^2 = beta_t (Ho et al.'s first choice), not the posterior's beta~_t"),
    ("ancestral_step", step_variant(later="float(t[0] > 0)"), "hint: no noise at t = 0 (the paper's t = 1)"),
    ("ancestral_step", step_variant(later="float(t[0] > 0)").replace(
        "per_sample(betas, t, xt), per_sample(alphas_cumprod, t, xt)", "betas[t[0]].to(xt.dtype), alphas_cumprod[t[0]].to(xt.dtype)"),
     "hint: per sample: each sample uses its own t"),
    ("ancestral_step", step_variant(later="float(bool((t > 0).all()))"), "hint: drop the noise only where t = 0"),
    ("ancestral_step", step_variant().replace("per_sample(betas, t, xt), per_sample(alphas_cumprod, t, xt)",
                                              "per_sample(betas, t - 1, xt), per_sample(alphas_cumprod, t - 1, xt)"),
     "hint: 0-based: t = 1 is index 1 of the schedule"),
    ("ancestral_step", step_variant().replace("per_sample(betas, t, xt), per_sample(alphas_cumprod, t, xt)",
                                              "betas[t].reshape(-1, *([1] * (xt.ndim - 1))), alphas_cumprod[t].reshape(-1, *([1] * (xt.ndim - 1)))"),
     "check 5 failed: float32 x_t with the float64 schedule gives a float32 x_(t-1), got torch.float64"),
    ("ancestral_step", step_variant(mean="posterior_mean_variance(((xt - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1), xt, t, "
                                         "betas, alphas_cumprod)[0]"),
     "check 2 failed: zero noise at index 1 (the paper's t = 2)"),
]


@pytest.mark.parametrize("name, source, message", [m for m in MISTAKES_06 if m[2] is not None],
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_06) if m[2] is not None])
def test_ex06_a_typical_mistake_fails_the_visible_check_with_one_line_and_a_hint(name, source, message):
    torch.manual_seed(0)  # a mistake that draws from the global generator: make each case deterministic
    _, wrong = wrong_06(name, source)
    with pytest.raises(CheckFailed) as failed:
        getattr(ex06, name)(wrong)
    text = str(failed.value)
    assert text.startswith(f"{name}: check ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("name, source", [m[:2] for m in MISTAKES_06], ids=[f"{m[0]}-{i}" for i, m in enumerate(MISTAKES_06)])
def test_ex06_a_typical_mistake_fails_the_hidden_tests(name, source):
    torch.manual_seed(0)  # some hidden tests draw from the global generator: make each case deterministic
    namespace, _ = wrong_06(name, source)
    with pytest.raises(Exception):  # an assertion, or the wrong function's own error
        run_hidden_06(name, namespace)


RIGHT_06 = [  # other right answers: they pass the visible checks and the hidden tests
    ("make_schedule", schedule_variant(linear="1e-4 + (0.02 - 1e-4) * torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)")),
    ("q_sample", Q_SAMPLE.format(body="abar = alphas_cumprod[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1))); "
                                      "return abar.sqrt() * x0 + (1 - abar).sqrt() * noise")),
    ("posterior_mean_variance", """
        def posterior_mean_variance(x0, xt, t, betas, alphas_cumprod):  # per_sample first, then the formula in x0's dtype
            abar_prev = per_sample(torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]]), t, x0)
            abar, beta = per_sample(alphas_cumprod, t, x0), per_sample(betas, t, x0)
            mean = beta * abar_prev.sqrt() / (1 - abar) * x0 + (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar) * xt
            return mean, (beta * (1 - abar_prev) / (1 - abar)).expand_as(x0)
    """),
    ("noise_prediction_loss", loss_variant(loss="((eps_model(xt, t) - eps) ** 2).mean()")),
    ("ancestral_step", step_variant(mean="posterior_mean_variance((xt - (1 - abar).sqrt() * eps) / abar.sqrt(), xt, t, betas, alphas_cumprod)[0]",
                                    later="(t > 0).to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))")),
]


@pytest.mark.parametrize("name, source", RIGHT_06, ids=[r[0] for r in RIGHT_06])
def test_ex06_other_right_answers_pass_the_visible_checks_and_the_hidden_tests(name, source, capsys):
    namespace, right = wrong_06(name, source)
    getattr(ex06, name)(right)
    assert "visible checks passed" in capsys.readouterr().out
    run_hidden_06(name, namespace)


def test_the_solution_06_passes_its_hidden_tests():
    for name in ("make_schedule", "q_sample", "posterior_mean_variance", "noise_prediction_loss", "ancestral_step"):
        run_hidden_06(name, dict(SOLUTION_06))


BROKEN_Q_SAMPLE = Q_SAMPLE.format(body="return x0 + noise")
BROKEN_POSTERIOR = posterior_variant(coef_x0="betas", variance="betas")


@pytest.mark.parametrize("name", ["noise_prediction_loss", "ancestral_step"])
def test_ex06_parts_d_and_e_are_graded_on_their_own(name, capsys):
    """A wrong q_sample (Part B) or posterior (Part C) in the notebook costs nothing in Parts D and E, visible and
    hidden, and is back in place afterwards."""
    nb = nbformat.read(SOLUTION_06_PATH, as_version=4)
    (cell,) = [c for c in nb.cells if exercises.nbgrader_meta(c).get("grade_id") == name]
    namespace = notebook_06(BROKEN_Q_SAMPLE + BROKEN_POSTERIOR)
    broken = namespace["q_sample"], namespace["posterior_mean_variance"]
    exec(compile(cell.source, f"<{name}>", "exec"), namespace)
    getattr(ex06, name)(namespace[name])
    assert "visible checks passed" in capsys.readouterr().out
    assert (namespace["q_sample"], namespace["posterior_mean_variance"]) == broken
    run_hidden_06(name, namespace)
    assert (namespace["q_sample"], namespace["posterior_mean_variance"]) == broken
