"""fsl-course grade: solution cells from the submission, tests (visible + hidden) from the source.

Each kernel run grades a variant of the tiny fixture notebook (which does not import torch);
two tests share a run where they check two aspects of it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from fsl_course import exercises, grading

TINY = Path(__file__).parent / "fixtures" / "notebooks" / "01_tiny.ipynb"
MEAN_OK = "def mean(xs):\n    return sum(xs) / len(xs)"
NORM_OK = "def norm(xs):\n    return math.sqrt(sum(x * x for x in xs))"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the tiny solution notebook, with its exercise built beside it."""
    path = tmp_path_factory.mktemp("grading") / "solutions" / TINY.name
    path.parent.mkdir()
    shutil.copy(TINY, path)
    exercises.build(path.parent, path.parent.parent / "exercises")
    return path


@pytest.fixture(scope="module")
def submit(source):
    """``submit(mean=..., norm=...)`` writes the exercise with those answers filled in.

    An answer is a cell's source, None to drop the cell, or a list of sources to duplicate it.
    """
    exercise, numbers = source.parent.parent / "exercises" / TINY.name, itertools.count()

    def write(**answers):
        nb = nbformat.read(exercise, as_version=4)
        cells = {exercises.nbgrader_meta(cell).get("grade_id"): cell for cell in nb.cells}
        for name, answer in answers.items():
            cell = cells[f"{name}_impl"]
            texts = [] if answer is None else [answer] if isinstance(answer, str) else answer
            copies = [nbformat.from_dict({**cell, "source": text, "id": f"{cell.id}-{n}"})
                      for n, text in enumerate(texts)]
            position = nb.cells.index(cell)
            nb.cells[position:position + 1] = copies
        path = source.parent.parent / f"submission_{next(numbers)}.ipynb"
        nbformat.write(nb, path)
        return path

    return write


def by_id(report):
    return {test.grade_id: test for test in report.tests}


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    grading.add_arguments(parser)
    return grading.run(parser.parse_args(argv))


def test_solution_graded_against_itself_gets_full_marks(source, capsys):
    assert run_cli(str(source), "--source", str(source), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["score"] == report["max_score"] == 5
    assert [(t["grade_id"], t["points"], t["passed"]) for t in report["tests"]] == [
        ("test_mean", 2, True), ("test_norm", 3, True)]
    assert report["notes"] == []


def test_generated_exercise_scores_zero_but_reports_every_test(submit, source):
    report = grading.grade(submit(), source)
    assert (report.score, report.max_score) == (0, 5)
    assert {test.grade_id: test.message for test in report.tests} == {
        "test_mean": "NotImplementedError: return the mean of the list xs",
        "test_norm": "NotImplementedError: write your solution here",
    }


@pytest.fixture(scope="module")
def partial_report(submit, source):
    # mean passes the visible check mean([1, 2, 3]) == 2 but not the hidden mean([5]) == 5;
    # norm is right, and only counts when the grader passes FSL_COURSE_BUDGET=full to the kernel
    norm = "import os\nassert os.environ['FSL_COURSE_BUDGET'] == 'full', 'budget not passed'\n" + NORM_OK
    return grading.grade(submit(mean="def mean(xs):\n    return 2", norm=norm), source, budget="full")


def test_partial_credit_and_hidden_tests_count(partial_report):
    tests = by_id(partial_report)
    assert (partial_report.score, partial_report.max_score) == (3, 5)
    assert not tests["test_mean"].passed and tests["test_mean"].points == 0
    assert tests["test_mean"].message == "AssertionError: hidden: a single value is its own mean"
    text = partial_report.to_text()
    assert "FAILED  test_mean  0/2  AssertionError: hidden" in text and "total: 3/5" in text


def test_budget_reaches_the_kernel(partial_report):
    assert by_id(partial_report)["test_norm"].passed, partial_report.notes


def test_syntax_error_in_one_cell_leaves_the_others_graded(submit, source):
    report = grading.grade(submit(mean="def mean(xs):\n    return sum(xs) /", norm=NORM_OK), source)
    tests = by_id(report)
    assert report.score == 3 and tests["test_norm"].passed
    assert tests["test_mean"].message == "NameError: name 'mean' is not defined"
    assert any(note.startswith("solution cell 'mean_impl' raised SyntaxError") for note in report.notes)


def test_missing_cell_scores_zero_for_its_tests_and_a_duplicated_cell_counts_once(submit, source):
    report = grading.grade(submit(mean=[MEAN_OK, "def mean(xs):\n    return 0"], norm=None), source)
    tests = by_id(report)
    assert report.score == 2 and tests["test_mean"].passed
    assert tests["test_norm"].message == "NameError: name 'norm' is not defined"
    assert report.notes == [
        "the submission has 2 cells with grade_id 'mean_impl'; the first one was graded",
        "solution cell 'norm_impl' raised NotImplementedError: cell norm_impl missing from submission",
    ]


def test_tests_come_from_the_source_not_the_submission(submit, source):
    path = submit(mean=MEAN_OK, norm=NORM_OK)
    submission = nbformat.read(path, as_version=4)
    for cell in submission.cells:
        if exercises.is_test_cell(cell):
            cell.source = "pass  # no tests: full marks?"
    nbformat.write(submission, path)
    original = nbformat.read(source, as_version=4)
    assembled, notes = grading.assemble(original, grading.read_answers(path))
    assert notes == []
    for ours, theirs in zip(assembled.cells, original.cells, strict=True):
        if ours.cell_type == "code" and exercises.is_solution_cell(ours):
            assert ours.source in (MEAN_OK, NORM_OK)
        else:  # test cells (hidden tests included), setup code and markdown, as in the source
            assert ours.source == theirs.source
    assert sum("### BEGIN HIDDEN TESTS" in cell.source for cell in assembled.cells) == 2


def test_invalid_json_gets_zero_and_a_message(source, tmp_path):
    path = tmp_path / "submission.ipynb"
    path.write_text('{"cells": [', encoding="utf-8")
    report = grading.grade(path, source)
    assert (report.score, report.max_score) == (0, 5) and len(report.tests) == 2
    assert all(test.message.startswith(f"not graded: {path} is not a valid notebook") for test in report.tests)
    assert json.loads(report.to_json())["score"] == 0


@pytest.fixture(scope="module")
def loop_and_crash_report(submit, source):
    # mean never returns, so test_mean hangs; then the norm cell kills the kernel
    submission = submit(mean="def mean(xs):\n    while True:\n        pass", norm="import os\nos._exit(1)")
    return grading.grade(submission, source, cell_timeout=2)


def test_infinite_loop_hits_the_cell_timeout(loop_and_crash_report):
    message = by_id(loop_and_crash_report)["test_mean"].message
    assert message == "TimeoutError: the cell did not finish within its time limit (an infinite loop?)"


def test_cells_after_a_timeout_still_run_and_a_kernel_crash_scores_zero(loop_and_crash_report):
    assert loop_and_crash_report.score == 0
    assert by_id(loop_and_crash_report)["test_norm"].message == "not run: the kernel died in cell 4"
    assert any(note.startswith("solution cell 'norm_impl' raised DeadKernelError")
               for note in loop_and_crash_report.notes)


def test_infinite_loop_hits_the_overall_timeout_and_the_grader_returns(submit, source):
    started = time.monotonic()
    report = grading.grade(submit(mean="while True:\n    pass", norm=NORM_OK), source, timeout=5)
    assert time.monotonic() - started < 5 + grading.CHILD_GRACE_S  # the child stopped itself
    assert report.score == 0 and len(report.tests) == 2
    assert all(test.message.startswith("not run: the time limit of 5 s ran out") for test in report.tests)


def test_a_child_that_overstays_is_killed(submit, source, monkeypatch):
    monkeypatch.setattr(grading, "CHILD_GRACE_S", 0)
    report = grading.grade(submit(mean=MEAN_OK, norm=NORM_OK), source, timeout=0.5)
    assert report.score == 0 and len(report.tests) == 2
    assert all(test.message == "not run: the grader killed the run after 0.5 s" for test in report.tests)


@pytest.mark.parametrize("kwargs, error", [({"budget": "huge"}, "unknown budget"),
                                           ({"timeout": 0}, "time limits must be positive")])
def test_bad_arguments_are_value_errors(source, kwargs, error):
    with pytest.raises(ValueError, match=error):
        grading.grade(source, source, **kwargs)


def test_missing_submission_is_a_file_not_found_error(source, tmp_path):
    with pytest.raises(FileNotFoundError):
        grading.grade(tmp_path / "nope.ipynb", source)
