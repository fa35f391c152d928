"""fsl-course grade: solution cells from the submission, tests (visible + hidden) from the source.

Each kernel run grades a variant of the tiny fixture notebook (which does not import torch);
two tests share a run where they check two aspects of it.
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import shutil
import tempfile
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


def without_sandbox_note(notes: list[str]) -> list[str]:
    """The notes, less the one a machine without user namespaces adds to every report."""
    return [note for note in notes if not note.startswith("the kernel ran without the sandbox")]


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
    assert without_sandbox_note(report["notes"]) == []


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
    assert without_sandbox_note(report.notes) == [
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
    # the kernel is started again after the crash; the cell that crashed is not replayed
    assert loop_and_crash_report.score == 0
    assert by_id(loop_and_crash_report)["test_norm"].message == "NameError: name 'norm' is not defined"
    assert any(note.startswith("solution cell 'norm_impl' raised DeadKernelError")
               for note in loop_and_crash_report.notes)


def test_infinite_loop_hits_the_overall_timeout_and_the_grader_returns(submit, source):
    started = time.monotonic()
    report = grading.grade(submit(mean="while True:\n    pass", norm=NORM_OK), source, timeout=5)
    assert time.monotonic() - started < 5 + 15  # kernel start-up and shut-down
    assert report.score == 0 and len(report.tests) == 2
    assert all(test.message.startswith("not run: the time limit of 5 s ran out") for test in report.tests)


@pytest.mark.parametrize("kwargs, error", [({"budget": "huge"}, "unknown budget"),
                                           ({"timeout": 0}, "time limits must be positive")])
def test_bad_arguments_are_value_errors(source, kwargs, error):
    with pytest.raises(ValueError, match=error):
        grading.grade(source, source, **kwargs)


def test_missing_submission_is_a_file_not_found_error(source, tmp_path):
    with pytest.raises(FileNotFoundError):
        grading.grade(tmp_path / "nope.ipynb", source)


# --------------------------------------------------------------------------- adversarial submissions
#
# Every hostile or broken submission below is graded in one batch (2 workers), which also
# exercises batch mode. Each attacks ``mean`` (2 points) and leaves ``norm`` (3 points) right,
# unless it says otherwise: "contained" means the attacked test scores 0, the other is graded,
# and the grader finished.

HUGE_FILE = Path(tempfile.gettempdir()) / f"fsl-course-test-huge-{os.getpid()}.bin"
RANDOM_MEAN = "import random\ndef mean(xs):\n    return sum(xs) / len(xs) if random.random() < 0.5 else 0"
SEEN = {}  # what the adversarial fixture observed besides the gradebook
ATTACK_TIMEOUT = 4  # cell_timeout of the adversarial batch: the loops hit it

ADVERSARIAL = {
    # broken
    "renamed_function": ("def average(xs):\n    return sum(xs) / len(xs)", 3, "NameError"),
    "exception_at_import": ("import no_such_module_xyz\n" + MEAN_OK, 3, "NameError"),
    "wrong_type": ("def mean(xs):\n    return [sum(xs) / len(xs)]", 3, "AssertionError: mean([1, 2, 3]) should be 2"),
    "nan": ("def mean(xs):\n    return float('nan')", 3, "AssertionError"),
    # hostile or careless
    "sys_exit": ("import sys\ndef mean(xs):\n    sys.exit(0)", 3, "SystemExit"),
    "os_exit": ("import os\ndef mean(xs):\n    os._exit(0)", 3, "DeadKernelError"),
    "huge_allocation": ("def mean(xs):\n    block = bytearray(64 * 2**30)\n    return sum(xs) / len(xs)", 3,
                        "MemoryError"),
    "prints_3_mb_then_answers": ("def mean(xs):\n    print('x' * 3_000_000)\n    return sum(xs) / len(xs)", 5,
                                 None),  # output beyond the cap is dropped; the test's token is still seen
    "huge_file_outside_scratch": (
        f"def mean(xs):\n    open({str(HUGE_FILE)!r}, 'wb').write(bytes(200 * 2**20))\n    return sum(xs) / len(xs)",
        3, "OSError"),
    "huge_output": ("def mean(xs):\n    while True:\n        print('x' * 100_000)", 3, "TimeoutError"),
    # without the guard, print (which prints the test's token) and math.sqrt (in norm) stay broken
    "patch_print_and_math": (
        "import builtins, math\nbuiltins.print = lambda *a, **k: None\nmath.sqrt = lambda x: 0\n" + MEAN_OK, 5, None),
    "stdout_redirect_and_exit_at_top": (
        "import io, sys\nsys.stdout = io.StringIO()\n" + MEAN_OK + "\nsys.exit(0)", 5, None),
    "reads_hidden_tests_from_disk": (
        "import glob, os\nfound = []\n"
        "for path in glob.glob(os.path.join(os.getcwd(), '..', '..', '**'), recursive=True):\n"
        "    try:\n        found += ['HIDDEN TESTS' in open(path, errors='ignore').read()]\n"
        "    except OSError:\n        pass\n"
        "def mean(xs):\n    return sum(xs) / len(xs) if any(found) else 0", 3, "AssertionError"),
    "input_transformer_skips_tests": (
        "get_ipython().input_transformers_cleanup.append(lambda lines: ['pass\\n'])\n"
        "def mean(xs):\n    return 0", 0, "GradingError"),  # blanks every later cell, the guard too: no token
}


def _fake_gradebook_attack(out: Path) -> str:
    return (f"from pathlib import Path\nout = Path({str(out)!r})\n(out / 'feedback').mkdir(parents=True, exist_ok=True)\n"
            "for name in ('gradebook.csv', 'gradebook.json', 'score.json'):\n"
            "    (out / name).write_text('student,score\\nfake_gradebook,100\\n')\n"
            "(out / 'feedback' / 'fake_gradebook.md').write_text('100/100')\n"
            "def mean(xs):\n    return 0")


def _spawn_attack(marker: str) -> str:
    # the child leaves the kernel's session; in the sandbox its pid is not the one outside, so
    # the test looks for its command line instead
    return ("import subprocess\n"
            f"child = subprocess.Popen(['sleep', {marker!r}], start_new_session=True)\n" + MEAN_OK)


def _read_solution_attack(source: Path) -> str:
    # full marks for mean only if the solution notebook (with the hidden tests) can be read
    return (f"text = open({str(source)!r}).read()\n"
            "def mean(xs):\n    return sum(xs) / len(xs) if 'HIDDEN TESTS' in text else 0")


@pytest.fixture(scope="module")
def adversarial(submit, source, tmp_path_factory):
    """The batch's output folder, its rows by student, the spawned process id, the wall time."""
    root = tmp_path_factory.mktemp("adversarial")
    out, marker = root / "out", f"{600 + int.from_bytes(os.urandom(2), 'big') / 1e5:.5f}"
    cases = {name: mean for name, (mean, _, _) in ADVERSARIAL.items()}
    cases["fake_gradebook"] = _fake_gradebook_attack(out)
    cases["spawns_a_process"] = _spawn_attack(marker)
    cases["reads_the_solution_notebook"] = _read_solution_attack(source)
    cases["right"] = MEAN_OK
    cases["random_a"] = cases["random_b"] = RANDOM_MEAN  # seeded: the same answer, the same score
    paths = []
    for name, mean in cases.items():
        path = root / "submissions" / name / TINY.name
        path.parent.mkdir(parents=True)
        shutil.move(submit(mean=mean, norm=NORM_OK), path)
        paths.append(path)
    reordered = nbformat.read(paths[list(cases).index("right")], as_version=4)  # the right answers, cells in reverse order
    reordered.cells.reverse()
    (root / "submissions" / "reordered").mkdir()
    nbformat.write(reordered, root / "submissions" / "reordered" / TINY.name)
    (root / "submissions" / "invalid_json").mkdir()
    (root / "submissions" / "invalid_json" / TINY.name).write_text("{\"cells\": [", encoding="utf-8")
    paths += [root / "submissions" / name / TINY.name for name in ("reordered", "invalid_json")]
    started = time.monotonic()
    assert run_cli(*map(str, paths), "--source", str(source), "--out", str(out),
                   "--cell-timeout", str(ATTACK_TIMEOUT), "--timeout", "60") == 0
    seconds = time.monotonic() - started
    SEEN["huge_file_bytes"] = HUGE_FILE.stat().st_size if HUGE_FILE.exists() else 0
    HUGE_FILE.unlink(missing_ok=True)
    gradebook = json.loads((out / "gradebook.json").read_text(encoding="utf-8"))["students"]
    return out, gradebook, marker, seconds


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_submission_is_contained(adversarial, name):
    _, gradebook, _, _ = adversarial
    _, expected_score, error = ADVERSARIAL[name]
    report = gradebook[name]
    tests = {test["grade_id"]: test for test in report["tests"]}
    assert report["score"] == expected_score, report
    assert tests["test_norm"]["passed"] or expected_score == 0, report  # the other part is still graded
    if error is not None:
        assert not tests["test_mean"]["passed"] and tests["test_mean"]["message"].startswith(error), report
        assert tests["test_mean"]["hint"]


def test_the_batch_finishes_within_its_limits(adversarial):
    # 22 submissions, 2 at a time; the slowest hits its cell timeout once
    assert adversarial[3] < 60


def test_fake_gradebook_and_feedback_are_overwritten(adversarial):
    out, gradebook, _, _ = adversarial
    assert gradebook["fake_gradebook"]["score"] == 3
    rows = list(csv.DictReader((out / "gradebook.csv").open(encoding="utf-8")))
    assert {row["student"]: row["score"] for row in rows}["fake_gradebook"] == "3"
    assert "fake_gradebook,100" not in (out / "gradebook.csv").read_text(encoding="utf-8")
    assert "3/5" in (out / "feedback" / "fake_gradebook.md").read_text(encoding="utf-8")


def test_spawned_processes_are_killed(adversarial):
    psutil = pytest.importorskip("psutil")
    _, gradebook, marker, _ = adversarial
    assert gradebook["spawns_a_process"]["score"] == 5
    alive = [p for p in psutil.process_iter(["cmdline", "status"])
             if marker in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert alive == []


def test_the_solution_notebook_is_hidden_from_the_kernel(adversarial, sandboxed):
    report = adversarial[1]["reads_the_solution_notebook"]
    tests = {test["grade_id"]: test for test in report["tests"]}
    assert report["score"] == 3 and tests["test_norm"]["passed"], report
    assert tests["test_mean"]["message"] == "NameError: name 'mean' is not defined"
    assert any("FileNotFoundError" in note for note in report["notes"]), report


def test_sandboxed_kernel_cannot_write_outside_scratch_or_see_other_processes(source, tmp_path, sandboxed):
    target = tmp_path / "written.txt"
    probe_cell = (f"import os\nopen({str(target)!r}, 'w').write('x')\n" + MEAN_OK)
    report = grading.grade(_submission_with(source, tmp_path, mean=probe_cell), source)
    assert not target.exists() and not by_id(report)["test_mean"].passed
    assert any("Read-only file system" in note for note in report.notes), report.notes
    seen = ("import os\nassert [p for p in os.listdir('/proc') if p.isdigit()] == ['1'], os.listdir('/proc')\n"
            + MEAN_OK)
    report = grading.grade(_submission_with(source, tmp_path, mean=seen), source)
    assert by_id(report)["test_mean"].passed, report.notes


def _submission_with(source: Path, folder: Path, **answers) -> Path:
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        name = exercises.nbgrader_meta(cell).get("grade_id", "").removesuffix("_impl")
        if name in answers:
            cell.source = answers[name]
    path = folder / f"submission_{len(list(folder.iterdir()))}.ipynb"
    nbformat.write(nb, path)
    return path


def test_reordered_cells_are_graded_by_grade_id_and_invalid_json_scores_zero(adversarial):
    _, gradebook, _, _ = adversarial
    assert gradebook["reordered"]["score"] == 5 and gradebook["right"]["score"] == 5
    assert gradebook["invalid_json"]["score"] == 0
    assert all("is not a valid notebook" in test["message"] for test in gradebook["invalid_json"]["tests"])


def test_gradebook_csv_json_and_feedback_files(adversarial):
    out, gradebook, _, _ = adversarial
    rows = list(csv.DictReader((out / "gradebook.csv").open(encoding="utf-8")))
    assert [row["student"] for row in rows] == sorted(gradebook) and len(rows) == len(ADVERSARIAL) + 8
    assert set(rows[0]) == {"student", "submission", "score", "max_score", "test_mean", "test_norm"}
    assert sorted(path.stem for path in (out / "feedback").glob("*.md")) == sorted(gradebook)
    feedback = (out / "feedback" / "nan.md").read_text(encoding="utf-8")
    assert "`test_mean` | 0/2 | AssertionError" in feedback and "hint:" in feedback
    assert "`test_norm` | 3/3 | passed" in feedback


def test_grading_is_deterministic(adversarial):
    _, gradebook, _, _ = adversarial
    first, second = ({key: value for key, value in gradebook[name].items() if key != "submission"}
                     for name in ("random_a", "random_b"))
    assert first == second


def test_a_file_outside_scratch_is_capped(adversarial):
    assert SEEN["huge_file_bytes"] <= grading.FILE_MB * 2**20  # RLIMIT_FSIZE; the write raised OSError


def test_hidden_test_details_are_not_revealed():
    message, hint = grading.feedback({"ename": "AssertionError", "evalue": "tensor([5.]) != tensor([4.])",
                                      "part": "hidden"}, "assert torch.equal(f(x), y)")
    assert "5." not in message and message == "AssertionError in a hidden test (its details are not shown)"
    authored = grading.feedback({"ename": "AssertionError", "evalue": "hidden: edge case", "part": "hidden"},
                                'assert f([5]) == 5, "hidden: edge case"')
    assert authored[0] == "AssertionError: hidden: edge case" and authored[1]


def test_several_submissions_need_out(source):
    with pytest.raises(SystemExit, match="--out"):
        run_cli(str(source), str(source), "--source", str(source))


# --------------------------------------------------------------------------- torch: patching, the reference

def _meta(grade_id, solution=False, points=None):
    meta = {"grade": points is not None, "grade_id": grade_id, "locked": not solution, "schema_version": 3,
            "solution": solution, "task": False}
    return {"nbgrader": {**meta, **({"points": points} if points is not None else {})}}


TORCH_CELLS = [
    ("import torch", {}),
    ("def mean_ci95(accuracies):\n    ### BEGIN SOLUTION\n"
     "    a = torch.as_tensor(accuracies, dtype=torch.float64)\n"
     "    return float(a.mean()), float(1.96 * a.std() / len(a) ** 0.5)\n    ### END SOLUTION",
     _meta("ci_impl", solution=True)),
    ("m, h = mean_ci95([0.5, 1.0])\nassert abs(m - 0.75) < 1e-9, 'hint: the mean of 0.5 and 1.0 is 0.75'\n"
     "### BEGIN HIDDEN TESTS\nfrom fsl_course.evaluation import mean_ci95 as reference\n"
     "a = [0.2, 0.4, 0.9]\nassert abs(mean_ci95(a)[1] - reference(a)[1]) < 1e-3, 'hidden: the half-width'\n"
     "### END HIDDEN TESTS", _meta("test_ci", points=2)),
    ("def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION", _meta("double_impl", solution=True)),
    ("assert torch.allclose(double(torch.ones(3)), torch.full((3,), 2.0)), 'hint: twice each entry'\n"
     "### BEGIN HIDDEN TESTS\nassert torch.allclose(double(torch.arange(3.0)), torch.tensor([0.0, 2.0, 4.0]))\n"
     "### END HIDDEN TESTS", _meta("test_double", points=3)),
]
TORCH_ATTACKS = {
    "calls_reference": ("import fsl_course.evaluation\ndef mean_ci95(accuracies):\n"
                        "    return fsl_course.evaluation.mean_ci95(accuracies)", "def double(x):\n    return 2 * x"),
    "imports_reference_and_patches_torch": (
        "from fsl_course.evaluation import mean_ci95",
        "torch.allclose = lambda *a, **k: True\ntorch.Tensor.__eq__ = lambda *a: True\n"
        "def double(x):\n    return x"),
}


@pytest.fixture(scope="module")
def torch_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch")
    source = root / "solutions" / "02_torch.ipynb"
    source.parent.mkdir()
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(text, metadata=meta) for text, meta in TORCH_CELLS]
    nbformat.write(nb, source)
    paths = []
    for name, answers in [("solution", None), *TORCH_ATTACKS.items()]:
        path = root / "submissions" / name / source.name
        path.parent.mkdir(parents=True)
        submission = copy.deepcopy(nb)
        if answers is not None:
            submission.cells[1].source, submission.cells[3].source = answers
        nbformat.write(submission, path)
        paths.append(path)
    rows = grading.grade_batch(paths, source, root / "out", cell_timeout=60, timeout=120)
    return {name: by_id(report) for name, report in rows}


def test_hidden_tests_may_use_the_reference_at_the_top_level(torch_batch):
    assert all(test.passed for test in torch_batch["solution"].values()), torch_batch["solution"]


def test_calling_the_reference_inside_the_answer_is_blocked_and_the_rest_graded(torch_batch):
    tests = torch_batch["calls_reference"]
    assert not tests["test_ci"].passed and tests["test_double"].passed
    assert tests["test_ci"].message.startswith("ImportError: fsl_course.evaluation.mean_ci95 is the course's "
                                               "reference implementation")


def test_importing_the_reference_and_patching_torch_score_nothing(torch_batch):
    tests = torch_batch["imports_reference_and_patches_torch"]
    assert not tests["test_ci"].passed and not tests["test_double"].passed
    assert tests["test_ci"].message == "ImportError: mean_ci95 is the course's reference implementation, not your own code"
    assert tests["test_double"].message.startswith("AssertionError: hint: twice each entry")


# --------------------------------------------------------------------------- nbgrader (optional)


def test_nbgrader_autogrades_the_solution_to_full_marks(tmp_path):
    """solutions/ goes into nbgrader as is: generate the assignment, autograde the solution."""
    pytest.importorskip("nbgrader")
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    notebook = "01_few_shot_tasks.ipynb"
    (tmp_path / "source" / "01").mkdir(parents=True)
    shutil.copy(repo / "solutions" / notebook, tmp_path / "source" / "01" / notebook)
    (tmp_path / "submitted" / "student" / "01").mkdir(parents=True)
    shutil.copy(repo / "solutions" / notebook, tmp_path / "submitted" / "student" / "01" / notebook)
    # nbgrader runs the `alembic` command of its environment
    env = {**os.environ, "FSL_COURSE_BUDGET": "smoke",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

    def nbgrader(*args):
        done = subprocess.run([sys.executable, "-m", "nbgrader", *args, "--force", f"--CourseDirectory.root={tmp_path}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr

    nbgrader("generate_assignment", "01")
    assert (tmp_path / "release" / "01" / notebook).is_file()
    nbgrader("autograde", "01")
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gradebook:
        submission = gradebook.find_submission("01", "student")
        assert submission.max_score > 0 and submission.score == submission.max_score
