"""exercises/ is generated from solutions/: stubs, hidden tests, cleared outputs, sync check."""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import nbformat
import pytest

from fsl_course import exercises
from fsl_course.exercises import ExerciseSourceError

TINY = Path(__file__).parent / "fixtures" / "notebooks" / "01_tiny.ipynb"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dirs(tmp_path):
    """(solutions, exercises) directories holding the tiny solution notebook and nothing built yet."""
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    shutil.copy(TINY, solutions / TINY.name)
    return solutions, tmp_path / "exercises"


@pytest.fixture
def exercise(dirs):
    """The exercise notebook built from the tiny solution notebook."""
    (path,) = exercises.build(*dirs)
    return nbformat.read(path, as_version=4)


def cell_by_id(nb, grade_id):
    (cell,) = [c for c in nb.cells if exercises.nbgrader_meta(c).get("grade_id") == grade_id]
    return cell


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser()
    exercises.add_arguments(parser)
    return exercises.run(parser.parse_args(argv))


# --------------------------------------------------------------------------- build


def test_stub_raises_not_implemented_with_the_task(exercise):
    source = cell_by_id(exercise, "mean_impl").source
    assert "total / len(xs)" not in source and "BEGIN SOLUTION" not in source
    assert "    # TASK: return the mean of the list xs\n" in source  # the task comment stays
    assert '"""The arithmetic mean' in source  # so does the docstring
    namespace = {}
    exec(source, namespace)
    with pytest.raises(NotImplementedError, match="^return the mean of the list xs$"):
        namespace["mean"]([1, 2, 3])


def test_stub_without_task_uses_the_default_at_the_region_indentation(exercise):
    lines = cell_by_id(exercise, "norm_impl").source.splitlines()
    assert lines[-1] == '    raise NotImplementedError("write your solution here")'


@pytest.mark.parametrize("indent", ["", "    ", "        "])
def test_stub_keeps_the_indentation_of_the_region(indent):
    cell = nbformat.v4.new_code_cell(
        f"def f():\n    for i in range(3):\n{indent}# TASK: say \"hi\"\n{indent}### BEGIN SOLUTION\n"
        f"{indent}print('hi')\n{indent}### END SOLUTION\n    return 1")
    lines = exercises.exercise_source(cell).splitlines()
    assert lines[3] == indent + r'raise NotImplementedError("say \"hi\"")'
    assert lines[2] == indent + '# TASK: say "hi"' and lines[4] == "    return 1"


def test_hidden_tests_are_removed_and_visible_checks_kept(exercise):
    for grade_id in ("test_mean", "test_norm"):
        source = cell_by_id(exercise, grade_id).source
        assert "HIDDEN" not in source and "hidden:" not in source
        assert source.startswith("assert ") and not source.endswith("\n")


def test_markdown_solution_becomes_a_prompt(exercise):
    source = cell_by_id(exercise, "why_empty").source
    assert source == "Why is the mean of an empty list undefined?\n\nYOUR ANSWER HERE"


def test_outputs_and_run_metadata_are_cleared_and_nbgrader_metadata_kept(dirs, exercise):
    solution = nbformat.read(TINY, as_version=4)
    assert any(cell.get("outputs") for cell in solution.cells)  # the fixture does have outputs
    for before, after in zip(solution.cells, exercise.cells, strict=True):
        if after.cell_type == "code":
            assert after.outputs == [] and after.execution_count is None
        assert "execution" not in after.metadata
        assert after.metadata.get("nbgrader") == before.metadata.get("nbgrader")
        assert after.id == before.id
    assert exercise.metadata == solution.metadata


def test_build_is_deterministic(dirs, tmp_path):
    first = exercises.build(*dirs)[0].read_bytes()
    second = exercises.build(*dirs)[0].read_bytes()
    elsewhere = exercises.build(dirs[0], tmp_path / "elsewhere")[0].read_bytes()
    assert first == second == elsewhere
    assert first.endswith(b"}\n")


def test_build_leaves_the_solution_untouched(dirs):
    before = (dirs[0] / TINY.name).read_bytes()
    exercises.build(*dirs)
    assert (dirs[0] / TINY.name).read_bytes() == before


# --------------------------------------------------------------------------- check


def test_check_is_clean_after_build(dirs):
    exercises.build(*dirs)
    assert exercises.check(*dirs) == []


def test_check_detects_a_hand_edited_exercise(dirs):
    (path,) = exercises.build(*dirs)
    nb = nbformat.read(path, as_version=4)
    cell_by_id(nb, "mean_impl").source += "\n# my notes"
    nbformat.write(nb, path)
    (problem,) = exercises.check(*dirs)
    assert problem.startswith("out of date:") and str(path) in problem


def test_check_detects_a_missing_exercise(dirs):
    (problem,) = exercises.check(*dirs)
    assert problem.startswith("missing:") and "01_tiny.ipynb" in problem


def test_check_detects_an_extra_exercise(dirs):
    exercises.build(*dirs)
    shutil.copy(dirs[1] / TINY.name, dirs[1] / "02_orphan.ipynb")
    (problem,) = exercises.check(*dirs)
    assert problem.startswith("extra:") and "02_orphan.ipynb" in problem


def test_a_missing_solutions_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no solutions directory"):
        exercises.check(tmp_path / "nope", tmp_path / "exercises")


# --------------------------------------------------------------------------- malformed sources


def _duplicate_grade_id(nb):
    exercises.nbgrader_meta(nb.cells[4])["grade_id"] = "mean_impl"


def _unclosed_solution(nb):
    nb.cells[2].source = nb.cells[2].source.replace("    ### END SOLUTION", "")


def _end_without_begin(nb):
    nb.cells[5].source = nb.cells[5].source.replace("### BEGIN HIDDEN TESTS", "")


def _nested_regions(nb):
    nb.cells[2].source = nb.cells[2].source.replace("    total", "    ### BEGIN SOLUTION\n    total")


def _test_without_points(nb):
    del exercises.nbgrader_meta(nb.cells[3])["points"]


def _solution_without_region(nb):
    nb.cells[4].source = "def norm(xs):\n    return 0"


def _solution_region_in_a_plain_cell(nb):
    nb.cells[1].source = "### BEGIN SOLUTION\nimport math\n### END SOLUTION"


def _hidden_tests_in_a_solution_cell(nb):
    nb.cells[4].source += "\n### BEGIN HIDDEN TESTS\nassert True\n### END HIDDEN TESTS"


def _wrong_schema_version(nb):
    exercises.nbgrader_meta(nb.cells[3])["schema_version"] = 1


MALFORMED = [
    (_duplicate_grade_id, "cell 4 (grade_id 'mean_impl'): grade_id is also used by cell 2"),
    (_unclosed_solution, "cell 2 (grade_id 'mean_impl'): unbalanced markers: line 4:"),
    (_end_without_begin, "cell 5 (grade_id 'test_norm'): unbalanced markers: line 5: '### END HIDDEN TESTS' w"),
    (_nested_regions, "cell 2 (grade_id 'mean_impl'): unbalanced markers: line 5: '### BEGIN SOLUTION' inside"),
    (_test_without_points, "cell 3 (grade_id 'test_mean'): test cell needs positive 'points', got None"),
    (_solution_without_region, "cell 4 (grade_id 'norm_impl'): solution cell without a ### BEGIN SOLUTION"),
    (_solution_region_in_a_plain_cell, "cell 1: has solution markers but no nbgrader metadata"),
    (_hidden_tests_in_a_solution_cell, "cell 4 (grade_id 'norm_impl'): hidden tests belong in a test cell"),
    (_wrong_schema_version, "cell 3 (grade_id 'test_mean'): nbgrader schema_version is 1, expected 3"),
]


@pytest.mark.parametrize("corrupt, expected", MALFORMED, ids=[c.__name__.strip("_") for c, _ in MALFORMED])
def test_malformed_sources_give_clear_errors(dirs, corrupt, expected):
    path = dirs[0] / TINY.name
    nb = nbformat.read(path, as_version=4)
    corrupt(nb)
    path.write_text(nbformat.writes(nb), encoding="utf-8")
    for action in (exercises.build, exercises.check):
        with pytest.raises(ExerciseSourceError) as info:
            action(*dirs)
        assert f"{path}, {expected}" in str(info.value)
    assert not dirs[1].exists()  # nothing was written


def test_valid_source_has_no_problems():
    assert exercises.validate(nbformat.read(TINY, as_version=4), "tiny") == []


def test_invalid_json_source_is_a_clear_error(dirs):
    (dirs[0] / "02_broken.ipynb").write_text("{not json", encoding="utf-8")
    with pytest.raises(ExerciseSourceError, match=r"02_broken.ipynb: not a readable notebook"):
        exercises.build(*dirs)


def test_exercise_source_rejects_unbalanced_markers():
    cell = nbformat.v4.new_code_cell("### END SOLUTION")
    with pytest.raises(ValueError, match="without a matching BEGIN marker"):
        exercises.exercise_source(cell)


def test_validate_does_not_modify_the_notebook():
    nb = nbformat.read(TINY, as_version=4)
    before = copy.deepcopy(nb)
    exercises.validate(nb, "tiny")
    exercises.make_exercise(nb)
    assert nb == before


# --------------------------------------------------------------------------- command line


def test_cli_build_then_check(dirs, capsys):
    solutions, exercises_dir = map(str, dirs)
    assert run_cli("build", "--solutions", solutions, "--exercises", exercises_dir) == 0
    assert "built 1 exercise notebooks" in capsys.readouterr().out
    assert run_cli("check", "--solutions", solutions, "--exercises", exercises_dir) == 0
    assert capsys.readouterr().out.strip() == f"{exercises_dir}/ is in sync with {solutions}/ (1 notebooks)"


def test_cli_check_fails_with_the_problems_and_a_hint(dirs, capsys):
    assert run_cli("check", "--solutions", str(dirs[0]), "--exercises", str(dirs[1])) == 1
    out = capsys.readouterr().out
    assert "missing:" in out and "run `fsl-course exercises build`" in out


# --------------------------------------------------------------------------- the repository itself


def test_repository_exercises_are_in_sync_with_solutions():
    solutions, exercises_dir = REPO / "solutions", REPO / "exercises"
    if not solutions.is_dir():  # a fresh checkout before the first solution notebook exists
        assert not list(exercises_dir.glob("*.ipynb")), "exercises/ has notebooks but there is no solutions/"
        return
    problems = exercises.check(solutions, exercises_dir)
    assert problems == [], "\n".join(problems) + "\nrun `fsl-course exercises build`"
