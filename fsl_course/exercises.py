"""Generate the student notebooks in ``exercises/`` from the single source in ``solutions/``.

A solution notebook carries nbgrader (schema v3) metadata on its exercise cells:

* a *solution cell* (``"solution": true``) holds the reference code between
  ``### BEGIN SOLUTION`` and ``### END SOLUTION``. In the exercise the region becomes
  ``raise NotImplementedError("<task>")`` at the region's indentation, where ``<task>`` comes
  from a ``# TASK: ...`` comment directly above the region (the comment stays);
* a *test cell* (``"grade": true``, with ``"points"``) holds visible checks and, between
  ``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``, hidden ones that the exercise
  does not contain (``fsl-course grade`` runs them).

Hidden tests may compare with the package's reference implementation of a graded function, but
only in top-level statements of the test cell: while grading, a call from any function defined
in a notebook cell (a comprehension or a lambda is one) raises ``ImportError`` (see
:mod:`fsl_course.grading`), so write ``expected = reference(x)`` on its own line first.

``build`` writes the exercises, ``check`` reports any that are missing, extra or stale, and
``validate`` explains what is wrong with a malformed source notebook.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from fsl_course.cache import atomic_write

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
MARKERS = {BEGIN_SOLUTION: "solution", END_SOLUTION: "solution", BEGIN_HIDDEN: "hidden", END_HIDDEN: "hidden"}

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"  # solutions/NN_name.ipynb
TASK_LINE = re.compile(r"^\s*#\s*TASK:\s*(?P<task>.*?)\s*$")
DEFAULT_TASK = "write your solution here"
MARKDOWN_ANSWER = "YOUR ANSWER HERE"
# Cell metadata written by a run (nbclient's timings, the ExecuteTime extension), not by the author.
RUN_METADATA = ("execution", "ExecuteTime")


class ExerciseSourceError(ValueError):
    """A solution notebook that cannot be turned into an exercise (its problems, one a line)."""


@dataclass(frozen=True)
class Region:
    """Lines ``begin``..``end`` (inclusive, 0-based; the marker lines) of a cell's source."""

    kind: str  # "solution" or "hidden"
    begin: int
    end: int


# --------------------------------------------------------------------------- parsing


def nbgrader_meta(cell) -> dict:
    """The cell's nbgrader metadata, or ``{}`` for an ordinary cell."""
    meta = cell.get("metadata", {}).get("nbgrader")
    return meta if isinstance(meta, dict) else {}


def is_solution_cell(cell) -> bool:
    return bool(nbgrader_meta(cell).get("solution"))


def is_test_cell(cell) -> bool:
    return bool(nbgrader_meta(cell).get("grade"))


def find_regions(source: str) -> list[Region]:
    """The marked regions of a cell's source, in order.

    Raises ``ValueError`` when the markers are unbalanced or nested.
    """
    regions, opened = [], None  # opened: (kind, line) of the region we are inside
    for number, line in enumerate(source.split("\n")):
        marker = line.strip()
        if marker not in MARKERS:
            continue
        kind, is_begin = MARKERS[marker], marker.startswith("### BEGIN")
        if is_begin and opened:
            raise ValueError(f"line {number + 1}: {marker!r} inside the region opened on line "
                             f"{opened[1] + 1} (regions cannot be nested)")
        if not is_begin and (not opened or opened[0] != kind):
            raise ValueError(f"line {number + 1}: {marker!r} without a matching BEGIN marker")
        if is_begin:
            opened = (kind, number)
        else:
            regions.append(Region(kind, opened[1], number))
            opened = None
    if opened:
        raise ValueError(f"line {opened[1] + 1}: region opened here is never closed (missing END marker)")
    return regions


def task_description(lines: list[str], begin: int) -> str:
    """The ``# TASK: ...`` text on the line directly above line ``begin``, or the default."""
    match = TASK_LINE.match(lines[begin - 1]) if begin > 0 else None
    return match.group("task") if match and match.group("task") else DEFAULT_TASK


# --------------------------------------------------------------------------- validation


def validate(nb, name: str) -> list[str]:
    """Problems that stop ``nb`` (called ``name`` in messages) from being a solution notebook.

    Each problem names the notebook, the cell index and the cell's grade_id.
    """
    problems, first_use = [], {}
    for index, cell in enumerate(nb.cells):
        meta = nbgrader_meta(cell)
        grade_id = meta.get("grade_id")
        where = f"{name}, cell {index}" + (f" (grade_id {grade_id!r})" if meta else "")
        if isinstance(grade_id, str) and grade_id in first_use:
            problems.append(f"{where}: grade_id is also used by cell {first_use[grade_id]}; "
                            "grade_ids must be unique")
        elif isinstance(grade_id, str):
            first_use[grade_id] = index
        problems += [f"{where}: {problem}" for problem in cell_problems(cell, meta)]
    return problems


def cell_problems(cell, meta: dict) -> list[str]:
    """What is wrong with one cell: its nbgrader metadata, and its markers for its role."""
    try:
        kinds = {region.kind for region in find_regions(cell.source)}
    except ValueError as err:
        return [f"unbalanced markers: {err}"]
    if not meta:
        return [f"has {kind} markers but no nbgrader metadata" for kind in sorted(kinds)]
    problems = []
    if meta.get("schema_version") != 3:
        problems.append(f"nbgrader schema_version is {meta.get('schema_version')!r}, expected 3")
    if not isinstance(meta.get("grade_id"), str) or not meta["grade_id"].strip():
        problems.append("nbgrader metadata has no grade_id")
    if meta.get("solution") and meta.get("grade"):
        problems.append("a cell cannot be both a solution and a test cell; put the tests in their own cell")
    elif meta.get("solution"):
        if "solution" not in kinds:
            problems.append(f"solution cell without a {BEGIN_SOLUTION} / {END_SOLUTION} region")
        if "hidden" in kinds:
            problems.append("hidden tests belong in a test cell, not in a solution cell")
    elif meta.get("grade"):
        if cell.cell_type != "code":
            problems.append("test cells must be code cells")
        if not _positive_number(meta.get("points")):
            problems.append(f"test cell needs positive 'points', got {meta.get('points')!r}")
        if "solution" in kinds:
            problems.append("solution regions belong in a solution cell, not in a test cell")
    elif kinds:
        problems.append(f"has {' and '.join(sorted(kinds))} markers but is neither a solution "
                        "nor a test cell")
    return problems


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def load_source(path: str | Path):
    """Read and validate the solution notebook at ``path``.

    Raises ``ExerciseSourceError`` listing every problem found.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # nbformat raises JSON, schema and conversion errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExerciseSourceError(f"{path}: not a readable notebook: {first_line}") from err
    problems = validate(nb, str(path))
    if problems:
        raise ExerciseSourceError("malformed solution notebook:\n  " + "\n  ".join(problems))
    return nb


# --------------------------------------------------------------------------- generation


def exercise_source(cell) -> str:
    """The cell's source with solutions stubbed out and hidden tests removed."""
    lines = cell.source.split("\n")
    kept, start = [], 0
    regions = find_regions(cell.source)
    for region in regions:
        kept += lines[start:region.begin]
        if region.kind == "solution":
            indent = re.match(r"\s*", lines[region.begin]).group()
            kept.append(indent + _stub(cell.cell_type, task_description(lines, region.begin)))
        start = region.end + 1
    kept += lines[start:]
    text = "\n".join(kept)
    # Removing a hidden region at the end of a cell leaves blank lines behind.
    return text.rstrip() if any(region.kind == "hidden" for region in regions) else text


def _stub(cell_type: str, task: str) -> str:
    """What replaces a solution region: a ``raise`` in code, a prompt in Markdown."""
    if cell_type == "markdown":
        return MARKDOWN_ANSWER
    return f"raise NotImplementedError({json.dumps(task, ensure_ascii=False)})"


def make_exercise(nb):
    """The exercise notebook for the (valid) solution notebook ``nb``; ``nb`` is unchanged."""
    exercise = copy.deepcopy(nb)
    for cell in exercise.cells:
        cell.source = exercise_source(cell)
        for key in RUN_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return exercise


def exercise_bytes(solution_path: str | Path) -> bytes:
    """The exact bytes of the exercise generated from ``solution_path`` (stable JSON)."""
    return (nbformat.writes(make_exercise(load_source(solution_path))) + "\n").encode("utf-8")


def solution_notebooks(solutions_dir: str | Path) -> list[Path]:
    """The source notebooks ``solutions_dir/NN_*.ipynb``, sorted."""
    solutions_dir = Path(solutions_dir)
    if not solutions_dir.is_dir():
        raise FileNotFoundError(f"no solutions directory {solutions_dir}")
    return sorted(solutions_dir.glob(NOTEBOOK_GLOB))


def build(solutions_dir: str | Path = "solutions", exercises_dir: str | Path = "exercises") -> list[Path]:
    """Write ``exercises_dir/NN_x.ipynb`` for every ``solutions_dir/NN_x.ipynb``; return the paths.

    Every source is validated before anything is written.
    """
    generated = {path.name: exercise_bytes(path) for path in solution_notebooks(solutions_dir)}
    for name, data in generated.items():
        with atomic_write(Path(exercises_dir) / name) as tmp:
            tmp.write_bytes(data)
    return [Path(exercises_dir) / name for name in generated]


def check(solutions_dir: str | Path = "solutions", exercises_dir: str | Path = "exercises") -> list[str]:
    """Problems with ``exercises_dir`` compared with what ``build`` would write; ``[]`` when in sync.

    Raises ``ExerciseSourceError`` for a malformed source notebook.
    """
    exercises_dir = Path(exercises_dir)
    problems, sources = [], solution_notebooks(solutions_dir)
    for source in sources:
        target, expected = exercises_dir / source.name, exercise_bytes(source)  # validates the source
        if not target.is_file():
            problems.append(f"missing: {target} (generated from {source})")
        elif target.read_bytes() != expected:
            problems.append(f"out of date: {target} differs from what {source} generates "
                            "(edited by hand?)")
    names = {source.name for source in sources}
    for extra in sorted(exercises_dir.glob("*.ipynb")):
        if extra.name not in names:
            problems.append(f"extra: {extra} has no source {Path(solutions_dir) / extra.name}")
    return problems


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (("build", "write exercises/ from solutions/"),
                              ("check", "fail when exercises/ is not what build would write")):
        sub = actions.add_parser(action, help=help_text, description=help_text)
        sub.add_argument("--solutions", default="solutions", metavar="DIR",
                         help="source notebooks (default: solutions)")
        sub.add_argument("--exercises", default="exercises", metavar="DIR",
                         help="generated notebooks (default: exercises)")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        written = build(args.solutions, args.exercises)
        for path in written:
            print(f"wrote {path}")
        print(f"built {len(written)} exercise notebooks from {args.solutions}/")
        return 0
    problems = check(args.solutions, args.exercises)
    if problems:
        print(f"{args.exercises}/ is out of sync with {args.solutions}/:")
        print("\n".join(f"  - {problem}" for problem in problems))
        print("run `fsl-course exercises build` to regenerate it")
        return 1
    count = len(solution_notebooks(args.solutions))
    print(f"{args.exercises}/ is in sync with {args.solutions}/ ({count} notebooks)")
    return 0
