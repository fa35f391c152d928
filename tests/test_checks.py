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

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob(exercises.NOTEBOOK_GLOB))
CHECK_CALL = re.compile(r"^check\.(?P<check>\w+)\((?P<function>\w+)\)$")


def solution_functions(path: Path) -> dict:
    """The functions that the solution notebook's solution cells define (run with its imports)."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code" and (exercises.is_solution_cell(cell) or
                                         exercises.nbgrader_meta(cell).get("grade_id") == "imports"):
            exec(compile(cell.source, f"{path.name}:{exercises.nbgrader_meta(cell).get('grade_id')}", "exec"), namespace)
    return namespace


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
