"""Exercise 11 (model-based meta-learning): the visible checks in fsl_course.checks.ex11 and the hidden tests of
solutions/11_model_based.ipynb pass the solution and other right answers, and fail typical mistakes (the visible
checks with one line and a hint); Part B is graded on its own."""

from __future__ import annotations

import pytest
import torch

from fsl_course.checks import CheckFailed, ex11
from solution_notebook import SolutionNotebook

PARTS = ("shift_labels", "mann_inputs", "generate_classifier")

SOL11 = SolutionNotebook("11_model_based.ipynb")
run_hidden_11 = SOL11.run_hidden


@pytest.fixture(autouse=True)
def _own_random_state():
    """The hidden tests seed torch's global generator; keep that from leaking into tests that run later."""
    with torch.random.fork_rng(devices=[]):
        yield


# --------------------------------------------------------------------------- answers

SHIFT = """
def shift_labels(labels, n_slots):
    one_hot = {one_hot}
    return {body}
"""
SHIFT_RIGHT = dict(one_hot="F.one_hot(labels, n_slots).float()", body="torch.cat([torch.zeros_like(one_hot[:1]), one_hot[:-1]])")


def shift_variant(**changes) -> str:
    return SHIFT.format(**{**SHIFT_RIGHT, **changes})


INPUTS = """
def mann_inputs(features, labels, n_slots):
    return {body}
"""

CLASSIFIER = """
def generate_classifier(protos, delta):
    D = protos.shape[1]
    weight = {weight}
    bias = {bias}
    return {out}
"""
CLASSIFIER_RIGHT = dict(weight="protos + delta[:, :D]", bias="-0.5 * protos.pow(2).sum(dim=1) + delta[:, D]", out="weight, bias")


def classifier_variant(**changes) -> str:
    return CLASSIFIER.format(**{**CLASSIFIER_RIGHT, **changes})


# (part, wrong source, a piece of the visible check's one-line message)
MISTAKES_11 = [
    # Part A
    ("shift_labels", shift_variant(body="one_hot"), "hint: this is the one-hot of the step's *own* label, unshifted"),
    ("shift_labels", shift_variant(body="torch.cat([one_hot[1:], torch.zeros_like(one_hot[:1])])"),
     "hint: shifted the wrong way"),
    ("shift_labels", shift_variant(body="one_hot[:-1]"), "hint: keep all T steps"),
    ("shift_labels", shift_variant(body="torch.roll(one_hot, 1, dims=0)"), "hint: torch.roll wraps around"),
    ("shift_labels", shift_variant(one_hot="F.one_hot(labels).float()"), "hint: the width is n_slots"),
    ("shift_labels", shift_variant(one_hot="F.one_hot(labels, n_slots)"), "hint: F.one_hot gives int64"),
    ("shift_labels", shift_variant(one_hot="F.one_hot(labels, n_slots).double()"), "hint: float32, the dtype of the network"),
    ("shift_labels", shift_variant(body="torch.cat([torch.zeros_like(one_hot[:1]), one_hot[:-1]]) if len(one_hot) > 1 else one_hot"),
     "a single step (T = 1) has no previous label"),
    ("shift_labels", """
        def shift_labels(labels, n_slots):
            labels[1:] = labels[:-1].clone()  # shifts the labels in place, then marks step 0 as a label of its own
            out = F.one_hot(labels, n_slots).float()
            out[0] = 0
            return out
     """, "do not modify labels in place"),
    # Part B
    ("mann_inputs", INPUTS.format(body="torch.cat([features, F.one_hot(labels, n_slots).float()], dim=1)"),
     "hint: the label columns hold each step's own label"),
    ("mann_inputs", INPUTS.format(body="torch.cat([shift_labels(labels, n_slots), features], dim=1)"), "hint: the features come first"),
    ("mann_inputs", INPUTS.format(body="torch.cat([features, shift_labels(labels, n_slots)], dim=0)"),
     "hint: per step, the features and the shifted labels sit side by side"),
    ("mann_inputs", INPUTS.format(body="torch.cat([features, shift_labels(labels, n_slots)], dim=1).float()"),
     "float64 features give a float64 input sequence"),
    ("mann_inputs", INPUTS.format(body="torch.cat([features.detach(), shift_labels(labels, n_slots)], dim=1)"),
     "the gradient flows back to the features"),
    ("mann_inputs", INPUTS.format(body="torch.cat([features, shift_labels(labels, int(labels.max()) + 1)], dim=1)"),
     "hint: the label part has n_slots = 3 columns"),
    ("mann_inputs", INPUTS.format(body="torch.cat([features, shift_labels(labels.flip(0), n_slots).flip(0)], dim=1)"),
     "rows are [1, 2, 0, 0, 0]"),
    # Part C
    ("generate_classifier", classifier_variant(weight="delta[:, :D]"), "hint: residual on the prototype"),
    ("generate_classifier", classifier_variant(bias="0.5 * protos.pow(2).sum(dim=1) + delta[:, D]"), "hint: the sign"),
    ("generate_classifier", classifier_variant(bias="delta[:, D]"), "hint: the -||p_c||^2 / 2 term is missing"),
    ("generate_classifier", classifier_variant(bias="-protos.pow(2).sum(dim=1) + delta[:, D]"), "hint: half"),
    ("generate_classifier", classifier_variant(weight="2 * protos + delta[:, :D]", bias="-protos.pow(2).sum(dim=1) + delta[:, D]"),
     "hint: W = p + dW, not 2 p"),
    ("generate_classifier", classifier_variant(bias="-0.5 * protos.pow(2).sum(dim=0) + delta[:, D]"),
     "hint: sum the squares over the features, dim=1"),
    ("generate_classifier", classifier_variant(bias="-0.5 * protos.norm(dim=1) + delta[:, D]"), "hint: the squared norm"),
    ("generate_classifier", classifier_variant(weight="protos + delta[:, 1:]", bias="-0.5 * protos.pow(2).sum(dim=1) + delta[:, 0]"),
     "hint: the first D columns of delta are dW"),
    ("generate_classifier", classifier_variant(bias="-0.5 * protos.pow(2).sum(dim=1) + delta[:, 0]"),
     "hint: the bias correction is the last column of delta"),
    ("generate_classifier", classifier_variant(bias="-0.5 * protos.pow(2).sum(dim=1) + delta[:, D:]"), "hint: b is (N,): delta[:, D]"),
    ("generate_classifier", classifier_variant(bias="-0.5 * protos.detach().pow(2).sum(dim=1) + delta[:, D]"),
     "hint: the bias's -||p_c||^2 / 2 term must be differentiable in p_c too"),
    ("generate_classifier", classifier_variant(out="weight.float(), bias.float()"), "float64 prototypes and delta give float64 W and b"),
    ("generate_classifier", classifier_variant(weight="protos"), "hint: add the MLP's correction"),
    ("generate_classifier", classifier_variant(out="torch.cat([weight, bias[:, None]], dim=1)"), "returns a pair of tensors (W, b)"),
]


def _ids(items):
    return [f"{item[0]}-{i}" for i, item in enumerate(items)]


@pytest.mark.parametrize("name, source, message", MISTAKES_11, ids=_ids(MISTAKES_11))
def test_ex11_a_typical_mistake_fails_the_visible_check_with_one_line_and_a_hint(name, source, message):
    _, wrong = SOL11.wrong(name, source)
    with pytest.raises(CheckFailed) as failed:
        getattr(ex11, name)(wrong)
    text = str(failed.value)
    assert text.startswith(f"{name}: check ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("name, source", [m[:2] for m in MISTAKES_11], ids=_ids(MISTAKES_11))
def test_ex11_a_typical_mistake_fails_the_hidden_tests(name, source):
    namespace = SOL11.notebook(source)
    with pytest.raises(Exception):  # an assertion, or the wrong answer's own error
        run_hidden_11(name, namespace)


RIGHT_11 = [  # other right answers: they pass the visible checks and the hidden tests
    ("shift_labels", """
        def shift_labels(labels, n_slots):  # zeros, then ones where the previous label points
            out = torch.zeros(len(labels), n_slots)
            out[torch.arange(1, len(labels)), labels[:-1]] = 1
            return out
    """),
    ("shift_labels", """
        def shift_labels(labels, n_slots):  # rows of the identity matrix, padded
            return F.pad(torch.eye(n_slots)[labels[:-1]], (0, 0, 1, 0))
    """),
    ("shift_labels", """
        def shift_labels(labels, n_slots):  # shift the labels, with an extra "no label" slot that is then dropped
            previous = torch.cat([torch.tensor([n_slots]), labels[:-1]])
            return F.one_hot(previous, n_slots + 1)[:, :n_slots].to(torch.float32)
    """),
    ("mann_inputs", INPUTS.format(body="torch.hstack([features, shift_labels(labels, n_slots).to(features.dtype)])")),
    ("mann_inputs", """
        def mann_inputs(features, labels, n_slots):  # the shift written out again, not Part A's function
            previous = F.one_hot(labels[:-1], n_slots).to(features.dtype)
            return torch.cat([features, torch.cat([previous.new_zeros(1, n_slots), previous])], dim=-1)
    """),
    ("generate_classifier", classifier_variant(weight="protos + delta[..., :-1]", bias="delta[..., -1] - (protos * protos).sum(-1) / 2")),
    ("generate_classifier", """
        def generate_classifier(protos, delta):  # split delta, with the norm from torch.linalg
            dW, db = delta.split([protos.shape[1], 1], dim=1)
            return protos + dW, db.squeeze(1) - 0.5 * torch.linalg.vector_norm(protos, dim=1) ** 2
    """),
]


@pytest.mark.parametrize("name, source", RIGHT_11, ids=_ids(RIGHT_11))
def test_ex11_other_right_answers_pass_the_visible_checks_and_the_hidden_tests(name, source, capsys):
    namespace = SOL11.notebook(source)
    getattr(ex11, name)(namespace[name])
    assert "visible checks passed" in capsys.readouterr().out
    run_hidden_11(name, namespace)


def test_the_solution_11_passes_its_checks_and_hidden_tests(capsys):
    namespace = SOL11.notebook()
    for name in PARTS:
        getattr(ex11, name)(namespace[name])
        run_hidden_11(name, namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(PARTS) and all(line.startswith("✓ ") for line in printed), printed


BROKEN_SHIFT = shift_variant(body="one_hot")  # no shift: Part A is wrong


def test_ex11_part_b_is_graded_on_its_own(capsys):
    """A wrong shift_labels (Part A) in the notebook costs nothing in Part B, visible and hidden, and is back in place
    afterwards."""
    namespace = SOL11.notebook(BROKEN_SHIFT)
    broken = namespace["shift_labels"]
    with pytest.raises(CheckFailed):
        ex11.shift_labels(broken)
    ex11.mann_inputs(namespace["mann_inputs"])
    assert "visible checks passed" in capsys.readouterr().out
    assert namespace["shift_labels"] is broken
    run_hidden_11("mann_inputs", namespace)
    assert namespace["shift_labels"] is broken


def test_ex11_hidden_tests_of_part_b_restore_a_missing_shift_labels():
    namespace = SOL11.notebook()
    del namespace["shift_labels"]
    run_hidden_11("mann_inputs", namespace)
    assert "shift_labels" not in namespace


def test_ex11_a_misused_part_a_fails_part_b_with_a_message():
    """mann_inputs that calls shift_labels with the arguments swapped fails with the stand-in's message, not a traceback."""
    _, wrong = SOL11.wrong("mann_inputs", INPUTS.format(body="torch.cat([features, shift_labels(n_slots, labels)], dim=1)"))
    with pytest.raises(CheckFailed, match=r"shift_labels\(labels, n_slots\): labels is the \(T,\) int64 tensor"):
        ex11.mann_inputs(wrong)


def test_ex11_the_package_reference_does_not_pass_for_the_learners_shift():
    namespace = SOL11.notebook("from fsl_course.meta.mann import shifted_labels as shift_labels")
    ex11.shift_labels(namespace["shift_labels"])  # the visible check cannot tell; the hidden tests do
    with pytest.raises(AssertionError, match="write the function yourself"):
        run_hidden_11("shift_labels", namespace)


def test_ex11_checks_leave_the_global_random_state_alone():
    namespace = SOL11.notebook()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for name in PARTS:
        getattr(ex11, name)(namespace[name])
    assert torch.equal(torch.rand(3), expected)


def test_ex11_the_unsolved_stubs_raise_their_task_through_the_checks():
    """NotImplementedError from a stub passes through the visible checks unchanged (its task is the best message)."""
    for name in PARTS:
        _, stub = SOL11.wrong(name, f"def {name}(*args):\n    raise NotImplementedError('the task of {name}')\n")
        with pytest.raises(NotImplementedError, match=f"the task of {name}"):
            getattr(ex11, name)(stub)
