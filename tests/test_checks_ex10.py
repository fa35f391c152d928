"""Exercise 10 (optimisation-based meta-learning): the visible checks in fsl_course.checks.ex10 and the hidden tests of
solutions/10_optimisation_based.ipynb pass the solution and other right answers, and fail typical mistakes (the
visible checks with one line and a hint); Part B is graded on its own."""

from __future__ import annotations

import pytest
import torch

from fsl_course.checks import CheckFailed, ex10
from solution_notebook import SolutionNotebook

PARTS = ("inner_adapt", "maml_meta_loss", "reptile_update")

SOL10 = SolutionNotebook("10_optimisation_based.ipynb")
notebook_10 = SOL10.notebook
run_hidden_10 = SOL10.run_hidden


@pytest.fixture(autouse=True)
def _own_random_state():
    """The hidden tests seed torch's global generator; keep that from leaking into tests that run later."""
    with torch.random.fork_rng(devices=[]):
        yield


# --------------------------------------------------------------------------- answers

INNER = """
def inner_adapt(model, params, support_x, support_y, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
    def support_loss(p):
        return {support_loss}

    adapted = dict(params)
    for _ in range({steps}):
        grads = grad(support_loss)({at})
        adapted = {{name: {update} for name, value in adapted.items()}}
    return adapted
"""
INNER_RIGHT = dict(support_loss="loss_fn(functional_call(model, p, (support_x,)), support_y)", steps="steps", at="adapted",
                   update="value - inner_lr * (grads[name].detach() if first_order else grads[name])")


def inner_variant(**changes) -> str:
    return INNER.format(**{**INNER_RIGHT, **changes})


AUTOGRAD = """
def inner_adapt(model, params, support_x, support_y, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
    adapted = dict(params)
    for _ in range(steps):
        loss = loss_fn({prediction}, support_y)
        grads = torch.autograd.grad(loss, list(adapted.values()){create_graph})
        adapted = {{name: value - inner_lr * {gradient} for (name, value), g in zip(adapted.items(), grads)}}
    return adapted
"""
AUTOGRAD_RIGHT = dict(prediction="functional_call(model, adapted, (support_x,))", create_graph=", create_graph=not first_order",
                      gradient="g")


def autograd_variant(**changes) -> str:
    return AUTOGRAD.format(**{**AUTOGRAD_RIGHT, **changes})


MAML = """
def maml_meta_loss(model, params, tasks, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
    losses = []
    for support_x, support_y, query_x, query_y in tasks:
        adapted = inner_adapt(model, params, support_x, support_y, steps={steps}, inner_lr={lr}, first_order={fo},
                              loss_fn={inner_loss})
        losses.append({query_loss}(functional_call(model, {at}, ({qx},)), {qy}))
    return {reduce}
"""
MAML_RIGHT = dict(steps="steps", lr="inner_lr", fo="first_order", inner_loss="loss_fn", query_loss="loss_fn", at="adapted",
                  qx="query_x", qy="query_y", reduce="torch.stack(losses).mean()")


def maml_variant(**changes) -> str:
    return MAML.format(**{**MAML_RIGHT, **changes})


REPTILE = """
def reptile_update(params, adapted, epsilon):
    with torch.no_grad():
        for name, value in params.items():
            {body}
    return {returned}
"""
REPTILE_RIGHT = dict(body="value.add_(epsilon * (adapted[name] - value))", returned="params")


def reptile_variant(**changes) -> str:
    return REPTILE.format(**{**REPTILE_RIGHT, **changes})


# (part, wrong source, a piece of the visible check's one-line message)
MISTAKES_10 = [
    # Part A
    ("inner_adapt", inner_variant(update="value + inner_lr * (grads[name].detach() if first_order else grads[name])"),
     "hint: step against the gradient"),
    ("inner_adapt", inner_variant(update="value - inner_lr * grads[name].detach()"),  # detached in second order too
     "hint: that is the first-order gradient"),
    ("inner_adapt", inner_variant(update="value - inner_lr * grads[name]"),  # never detached: first order is second order
     "hint: that is the second-order gradient"),
    ("inner_adapt", autograd_variant(create_graph=""), "torch.autograd.grad needs create_graph=True"),
    ("inner_adapt", """
        def inner_adapt(model, params, support_x, support_y, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
            adapted = params  # the caller's dict, changed below
            for _ in range(steps):
                grads = grad(lambda p: loss_fn(functional_call(model, p, (support_x,)), support_y))(dict(adapted))
                for name in list(adapted):
                    adapted[name] = adapted[name] - inner_lr * (grads[name].detach() if first_order else grads[name])
            return adapted
     """, "inner_adapt must not change params"),
    ("inner_adapt", """
        def inner_adapt(model, params, support_x, support_y, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
            adapted = dict(params)
            for _ in range(steps):
                grads = grad(lambda p: loss_fn(functional_call(model, p, (support_x,)), support_y))(adapted)
                for name, value in adapted.items():
                    value.sub_(inner_lr * (grads[name].detach() if first_order else grads[name]))
            return adapted
     """, "hint: do not change the tensors in place"),
    ("inner_adapt", inner_variant(steps="1"), "hint: you took one step"),
    ("inner_adapt", inner_variant(at="params"), "hint: take each step's gradient at the current adapted parameters"),
    ("inner_adapt", inner_variant(steps="max(steps, 1)"), "steps=0 gives params' values back"),
    ("inner_adapt", inner_variant(support_loss="F.mse_loss(functional_call(model, p, (support_x,)), support_y)"),
     "hint: use the loss_fn you are given"),
    ("inner_adapt", inner_variant(update="value - 0.01 * (grads[name].detach() if first_order else grads[name])"),
     "hint: use the inner_lr you are given"),
    ("inner_adapt", inner_variant(support_loss="loss_fn(model(support_x), support_y)"), "nothing moved"),
    ("inner_adapt", autograd_variant(prediction="model(support_x)"), "functional_call(model, params, (x,)), not model(x)"),
    ("inner_adapt", inner_variant(update="(value - inner_lr * grads[name]).detach().requires_grad_() if first_order "
                                         "else value - inner_lr * grads[name]"),
     "hint: first order still back-propagates through theta'"),
    ("inner_adapt", inner_variant(update="value.detach() - inner_lr * grads[name].detach()"),
     "does not depend on params at all"),
    # Part B
    ("maml_meta_loss", maml_variant(at="params"), "hint: evaluate the query loss at the adapted parameters"),
    ("maml_meta_loss", maml_variant(qx="support_x", qy="support_y"), "hint: the outer loss is on the query set"),
    ("maml_meta_loss", maml_variant(reduce="torch.stack(losses).sum()"), "hint: average over the tasks, do not sum"),
    ("maml_meta_loss", maml_variant(fo="False"), "hint: pass first_order on to inner_adapt"),
    ("maml_meta_loss", maml_variant(steps="1"), "hint: pass steps on to inner_adapt"),
    ("maml_meta_loss", maml_variant(lr="0.01"), "hint: pass inner_lr"),
    ("maml_meta_loss", maml_variant(reduce="torch.stack(losses).mean().item()"), "hint: return the tensor, not loss.item()"),
    ("maml_meta_loss", maml_variant(reduce="torch.stack(losses)"), "hint: average the tasks' query losses into one number"),
    ("maml_meta_loss", maml_variant(reduce="torch.stack(losses).mean().detach()"), "the meta-loss depends on params"),
    ("maml_meta_loss", maml_variant(inner_loss="F.mse_loss"), "pass it on to inner_adapt for the support loss"),
    ("maml_meta_loss", maml_variant(query_loss="F.mse_loss"), "hint: use loss_fn for the query loss"),
    # Part C
    ("reptile_update", reptile_variant(body="value.sub_(epsilon * (adapted[name] - value))"), "hint: move towards theta'"),
    ("reptile_update", reptile_variant(body="value.copy_(adapted[name] + epsilon * (value - adapted[name]))"),
     "hint: start from theta"),
    ("reptile_update", """
        def reptile_update(params, adapted, epsilon):  # a new dict: the module does not move
            return {name: (value + epsilon * (adapted[name] - value)).detach() for name, value in params.items()}
     """, "hint: update the tensors of params in place"),
    ("reptile_update", """
        def reptile_update(params, adapted, epsilon):
            with torch.no_grad():
                for name in list(params):
                    params[name] = params[name] + epsilon * (adapted[name] - params[name])
            return params
     """, "params[name] = ... puts a new tensor in the dict"),
    ("reptile_update", """
        def reptile_update(params, adapted, epsilon):
            for name, value in params.items():
                value.add_(epsilon * (adapted[name] - value))
            return params
     """, "hint: change the parameters in place under torch.no_grad()"),
    ("reptile_update", reptile_variant(body="value.copy_(adapted[name])"), "hint: move by epsilon times the difference"),
    ("reptile_update", reptile_variant(body="value.add_(epsilon * adapted[name])"), "hint: move by the difference"),
    ("reptile_update", reptile_variant(returned="None"), "reptile_update returns params itself"),
    ("reptile_update", reptile_variant(body="value.add_(adapted[name].sub_(value).mul_(epsilon))"),
     "do not modify adapted in place"),
]


def _id(mistake, index):
    return f"{mistake[0]}-{index}"


@pytest.mark.parametrize("name, source, message", MISTAKES_10, ids=[_id(m, i) for i, m in enumerate(MISTAKES_10)])
def test_ex10_a_typical_mistake_fails_the_visible_check_with_one_line_and_a_hint(name, source, message):
    wrong = notebook_10(source)[name]
    with pytest.raises(CheckFailed) as failed:
        getattr(ex10, name)(wrong)
    text = str(failed.value)
    assert text.startswith(f"{name}: check ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("name, source", [m[:2] for m in MISTAKES_10], ids=[_id(m, i) for i, m in enumerate(MISTAKES_10)])
def test_ex10_a_typical_mistake_fails_the_hidden_tests(name, source):
    namespace = notebook_10(source)
    with pytest.raises(Exception):  # an assertion, or the wrong answer's own error
        run_hidden_10(name, namespace)


def test_ex10_there_are_many_typical_mistakes_in_every_part():
    counts = {part: sum(m[0] == part for m in MISTAKES_10) for part in PARTS}
    assert sum(counts.values()) >= 30 and min(counts.values()) >= 9, counts


RIGHT_10 = [  # other right answers: they pass the visible checks and the hidden tests
    ("inner_adapt", autograd_variant()),  # torch.autograd.grad with create_graph=not first_order
    ("inner_adapt", autograd_variant(create_graph=", create_graph=True",  # always a graph, detached for first order
                                     gradient="(g.detach() if first_order else g)")),
    ("inner_adapt", """
        def inner_adapt(model, params, support_x, support_y, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
            names = list(params)
            values = [params[name] for name in names]
            for _ in range(steps):  # torch.func.grad_and_value over a tuple of tensors
                def loss_of(*tensors):
                    return loss_fn(functional_call(model, dict(zip(names, tensors)), (support_x,)), support_y)
                grads, _ = torch.func.grad_and_value(loss_of, argnums=tuple(range(len(names))))(*values)
                if first_order:
                    grads = [g.detach() for g in grads]
                values = [v - inner_lr * g for v, g in zip(values, grads)]
            return dict(zip(names, values))
     """),
    ("maml_meta_loss", """
        def maml_meta_loss(model, params, tasks, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
            losses = [loss_fn(functional_call(model, inner_adapt(model, params, sx, sy, steps=steps, inner_lr=inner_lr,
                                                                 first_order=first_order, loss_fn=loss_fn), (qx,)), qy)
                      for sx, sy, qx, qy in tasks]
            return sum(losses) / len(losses)
     """),
    ("maml_meta_loss", """
        def maml_meta_loss(model, params, tasks, steps=1, inner_lr=0.01, first_order=False, loss_fn=F.mse_loss):
            total = 0.0
            for task in tasks:  # positional arguments to inner_adapt
                adapted = inner_adapt(model, params, task[0], task[1], steps, inner_lr, first_order, loss_fn)
                total = total + loss_fn(functional_call(model, adapted, (task[2],)), task[3])
            return total / len(tasks)
     """),
    ("reptile_update", """
        def reptile_update(params, adapted, epsilon):
            for name, value in params.items():  # through .data, without no_grad
                value.data.add_(epsilon * (adapted[name].data - value.data))
            return params
     """),
    ("reptile_update", reptile_variant(body="value.lerp_(adapted[name], epsilon)")),
    ("reptile_update", reptile_variant(body="value.mul_(1 - epsilon).add_(epsilon * adapted[name])")),
    ("reptile_update", reptile_variant(body="value.copy_(value + epsilon * (adapted[name].detach() - value))")),
]


@pytest.mark.parametrize("name, source", RIGHT_10, ids=[f"{r[0]}-{i}" for i, r in enumerate(RIGHT_10)])
def test_ex10_other_right_answers_pass_the_visible_checks_and_the_hidden_tests(name, source, capsys):
    namespace = notebook_10(source)
    getattr(ex10, name)(namespace[name])
    assert "visible checks passed" in capsys.readouterr().out
    run_hidden_10(name, namespace)


def test_the_solution_10_passes_its_checks_and_hidden_tests(capsys):
    namespace = notebook_10()
    for name in PARTS:
        getattr(ex10, name)(namespace[name])
        run_hidden_10(name, namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(PARTS) and all(line.startswith("✓ ") for line in printed), printed


BROKEN_INNER = inner_variant(update="value + 0.5 * grads[name].detach()", steps="1")


def test_ex10_part_b_is_graded_on_its_own(capsys):
    """A wrong inner_adapt (Part A) in the notebook costs nothing in Part B, visible and hidden, and is back in place
    afterwards."""
    namespace = notebook_10(BROKEN_INNER)
    broken = namespace["inner_adapt"]
    with pytest.raises(CheckFailed):
        ex10.inner_adapt(broken)
    with pytest.raises(Exception):
        run_hidden_10("inner_adapt", namespace)
    ex10.maml_meta_loss(namespace["maml_meta_loss"])
    assert "visible checks passed" in capsys.readouterr().out
    assert namespace["inner_adapt"] is broken
    run_hidden_10("maml_meta_loss", namespace)
    assert namespace["inner_adapt"] is broken


def test_ex10_hidden_tests_of_part_b_restore_a_missing_inner_adapt():
    namespace = notebook_10()
    del namespace["inner_adapt"]
    run_hidden_10("maml_meta_loss", namespace)
    assert "inner_adapt" not in namespace


@pytest.mark.parametrize("name", ["inner_adapt", "reptile_update"])
def test_ex10_the_package_reference_does_not_pass_the_hidden_tests(name):
    namespace = notebook_10(f"from fsl_course.meta.maml import {name}")
    with pytest.raises(AssertionError, match="yourself"):
        run_hidden_10(name, namespace)


def test_ex10_the_right_answer_of_part_a_in_the_bank_is_the_reference():
    """check.inner_adapt_of_part_a, which grades Part B, agrees with fsl_course.meta.maml.inner_adapt (values and
    meta-gradients, both orders)."""
    from torch.func import functional_call

    from fsl_course.meta.maml import inner_adapt

    for first_order in (False, True):
        model, params, sx, sy, qx, qy, loss_fn = ex10.tiny_problem("classifier", seed=5)
        ours = ex10.inner_adapt_of_part_a(model, params, sx, sy, steps=2, inner_lr=0.5, first_order=first_order,
                                          loss_fn=loss_fn)
        theirs = inner_adapt(model, params, sx, sy, steps=2, inner_lr=0.5, first_order=first_order, loss_fn=loss_fn)
        for name in params:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12)
        g_ours = torch.autograd.grad(loss_fn(functional_call(model, ours, (qx,)), qy), list(params.values()))
        g_theirs = torch.autograd.grad(loss_fn(functional_call(model, theirs, (qx,)), qy), list(params.values()))
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ex10_the_checks_leave_the_global_random_state_alone():
    namespace = notebook_10()
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    for name in PARTS:
        getattr(ex10, name)(namespace[name])
    assert torch.equal(torch.rand(3), expected)
