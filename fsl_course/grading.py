"""Grade a submitted exercise notebook against the hidden tests of its solution notebook.

The work is split between two processes:

* the trusted **parent** (``grade``) reads the source notebook (``solutions/NN_x.ipynb``,
  with the hidden tests) and the submission, builds the notebook to run (the source, with
  each solution cell's code taken from the submission's cell of the same nbgrader
  ``grade_id``), starts the child, and scores each test cell from the child's results;
* the untrusted **child** (``python -m fsl_course.grading JOB.json``) runs that notebook with
  nbclient in a fresh kernel (working directory: a scratch directory, ``FSL_COURSE_BUDGET``
  set), and after every cell writes each cell's status (ok, or the error) to a results file.

A test cell earns its points iff it ran without an error. Time limits: each cell gets at most
``cell_timeout`` seconds (then the kernel is interrupted and the next cell runs), the whole
run at most ``timeout`` seconds (then the remaining cells are not run), and the parent kills
a child that is still running ``CHILD_GRACE_S`` seconds after that. Student code runs only in
the child's kernel, so that is where limits on untrusted code belong.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from fsl_course.budgets import PRESETS, Budget
from fsl_course.exercises import is_solution_cell, is_test_cell, load_source, nbgrader_meta

MISSING_CELL = 'raise NotImplementedError("cell {grade_id} missing from submission")'
CHILD_GRACE_S = 30  # start-up and kernel shut-down time the parent allows the child
MESSAGE_CHARS = 200
# What the child records for a cell that ran out of time, or during which the kernel died.
CELL_TIMEOUT_ERROR = {
    "ename": "TimeoutError",
    "evalue": "the cell did not finish within its time limit (an infinite loop?)",
    "traceback": [],
}
KERNEL_DIED_ERROR = {
    "status": "error",
    "ename": "DeadKernelError",
    "evalue": "the kernel died while running this cell (out of memory, or the code ended the process?)",
}


class InvalidSubmission(ValueError):
    """The submission file is not a notebook we can read."""


@dataclass
class GradedTest:
    """The result of one test cell."""

    grade_id: str
    points: float
    max_points: float
    passed: bool
    message: str  # "passed", the error ("AssertionError: first line"), or why the cell did not run


@dataclass
class GradeReport:
    """Per-test points for one submission, with notes for the student."""

    submission: str
    source: str
    tests: list[GradedTest]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(test.points for test in self.tests)

    @property
    def max_score(self) -> float:
        return sum(test.max_points for test in self.tests)

    def to_dict(self) -> dict:
        return {"score": self.score, "max_score": self.max_score, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_text(self) -> str:
        """A readable report: one line per test, the total, then the notes."""
        width = max((len(test.grade_id) for test in self.tests), default=0)
        lines = [f"{self.submission} (graded against {self.source})"]
        for test in self.tests:
            verdict = "passed" if test.passed else "FAILED"
            detail = "" if test.passed else f"  {test.message}"
            points = f"{test.points:g}/{test.max_points:g}"
            lines.append(f"  {verdict}  {test.grade_id:<{width}}  {points}{detail}")
        lines.append(f"total: {self.score:g}/{self.max_score:g}  ({self.seconds:.1f} s)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    __str__ = to_text


# --------------------------------------------------------------------------- parent


def grade(submission: str | Path, source: str | Path, *, timeout: float = 300, cell_timeout: float = 60,
          budget: str = "smoke") -> GradeReport:
    """Grade the notebook ``submission`` against the tests in the solution notebook ``source``.

    A broken submission (invalid JSON, syntax errors, missing cells, a crashing kernel,
    infinite loops) scores zero on the affected tests, with a message; it never raises.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a malformed
    source notebook or bad arguments: those are the grader's mistakes, not the student's.
    """
    started = time.monotonic()
    source_nb = load_source(source)
    Budget(budget)  # raises ValueError for an unknown preset
    if timeout <= 0 or cell_timeout <= 0:
        raise ValueError(f"time limits must be positive, got timeout={timeout}, cell_timeout={cell_timeout}")
    try:
        answers = read_answers(submission)
    except InvalidSubmission as err:
        tests = score_tests(source_nb, {}, f"not graded: {err}")
        return GradeReport(str(submission), str(source), tests, time.monotonic() - started)
    nb, notes = assemble(source_nb, answers)
    results, stopped = execute(nb, timeout=timeout, cell_timeout=cell_timeout, budget=budget)
    notes += solution_errors(nb, results)
    if stopped:
        notes.append(f"the run stopped early: {stopped}")
    tests = score_tests(nb, results, f"not run: {stopped}")
    return GradeReport(str(submission), str(source), tests, time.monotonic() - started, notes)


def read_answers(path: str | Path) -> dict[str, list[str]]:
    """The submission's cell sources by grade_id (more than one where a cell was duplicated)."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    try:
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # nbformat raises JSON, schema and conversion errors
        raise InvalidSubmission(f"{path} is not a valid notebook ({_first_line(str(err))})") from err
    answers = {}
    for cell in nb.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        if isinstance(grade_id, str):
            answers.setdefault(grade_id, []).append(cell.source)
    return answers


def assemble(source_nb, answers: dict[str, list[str]]):
    """The notebook to run, and notes on duplicated cells.

    It is ``source_nb`` with each solution cell's code replaced by the submission's cell with
    the same grade_id (the first, if duplicated), or by a ``raise`` if there is none.
    """
    nb, notes = copy.deepcopy(source_nb), []
    for cell in nb.cells:
        if cell.cell_type == "code" and is_solution_cell(cell):
            grade_id = nbgrader_meta(cell)["grade_id"]
            submitted = answers.get(grade_id) or [MISSING_CELL.format(grade_id=grade_id)]
            cell.source = submitted[0]
            if len(submitted) > 1:
                notes.append(f"the submission has {len(submitted)} cells with grade_id {grade_id!r}; "
                             "the first one was graded")
    return nb, notes


def execute(nb, *, timeout: float, cell_timeout: float, budget: str) -> tuple[dict[str, dict], str | None]:
    """Run ``nb`` in a child process; return the per-cell results and why it stopped early (or None).

    Results map a cell index (as a string) to ``{"status": "ok"}`` or
    ``{"status": "error", "ename": ..., "evalue": ...}``; cells that did not run are absent.
    """
    with tempfile.TemporaryDirectory(prefix="fsl-course-grade-", ignore_cleanup_errors=True) as scratch:
        scratch = Path(scratch)
        (scratch / "work").mkdir()
        nbformat.write(nb, scratch / "notebook.ipynb")
        job = {"notebook": str(scratch / "notebook.ipynb"), "results": str(scratch / "results.json"),
               "workdir": str(scratch / "work"), "timeout": timeout, "cell_timeout": cell_timeout}
        (scratch / "job.json").write_text(json.dumps(job), encoding="utf-8")
        stopped = _run_child(scratch, timeout=timeout, budget=budget)
        results_path = Path(job["results"])
        results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.exists() else {}
    return results.get("cells", {}), stopped or results.get("stopped")


def _run_child(scratch: Path, *, timeout: float, budget: str) -> str | None:
    """Run the child on ``scratch/job.json``; return why it failed, or None when it exited normally."""
    env = {**os.environ, "FSL_COURSE_BUDGET": budget}
    command = [sys.executable, "-m", "fsl_course.grading", str(scratch / "job.json")]
    log_path = scratch / "child.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, cwd=scratch / "work", env=env, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = child.wait(timeout=timeout + CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return f"the grader killed the run after {timeout + CHILD_GRACE_S:g} s"
    if returncode != 0:
        log_lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        last_line = log_lines[-1] if log_lines else "no output"
        return f"the grading process failed (exit code {returncode}): {last_line}"
    return None


def score_tests(nb, results: dict[str, dict], not_run: str) -> list[GradedTest]:
    """One ``GradedTest`` per test cell of ``nb``; cells absent from ``results`` get ``not_run``."""
    tests = []
    for index, cell in enumerate(nb.cells):
        if not is_test_cell(cell):
            continue
        meta, outcome = nbgrader_meta(cell), results.get(str(index))
        passed = outcome is not None and outcome["status"] == "ok"
        message = "passed" if passed else error_message(outcome) if outcome else not_run
        points = meta["points"] if passed else 0
        tests.append(GradedTest(meta["grade_id"], points, meta["points"], passed, message))
    return tests


def solution_errors(nb, results: dict[str, dict]) -> list[str]:
    """Notes on solution cells that raised (a syntax error, say), which explain failing tests."""
    return [f"solution cell {nbgrader_meta(cell)['grade_id']!r} raised {error_message(results[str(index)])}"
            for index, cell in enumerate(nb.cells)
            if is_solution_cell(cell) and results.get(str(index), {}).get("status") == "error"]


def error_message(outcome: dict) -> str:
    """``"ExceptionType: first line of the message"``, shortened."""
    text = outcome.get("ename", "Error")
    if _first_line(outcome.get("evalue", "")):
        text += f": {_first_line(outcome['evalue'])}"
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


# --------------------------------------------------------------------------- child


class _Recorder:
    """The child's results file, rewritten (atomically) after every cell."""

    def __init__(self, path: Path):
        self.path, self.cells, self.stopped = path, {}, None

    def cell(self, index: int, reply: dict) -> None:
        """Record the content of cell ``index``'s execute reply: status ok, error or aborted."""
        status = reply["status"]
        self.cells[str(index)] = {"status": "ok"} if status == "ok" else {
            "status": "error", "ename": str(reply.get("ename", status)),
            "evalue": str(reply.get("evalue", ""))}
        self.save()

    def stop(self, reason: str) -> None:
        self.stopped = reason
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"cells": self.cells, "stopped": self.stopped}), encoding="utf-8")
        os.replace(tmp, self.path)


def _child_main(job_path: str) -> int:
    """Execute the job's notebook cell by cell, recording each cell's status."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    nb = nbformat.read(job["notebook"], as_version=4)
    recorder = _Recorder(Path(job["results"]))
    deadline = time.monotonic() + job["timeout"]

    def cell_time_limit(cell) -> int:
        """``cell_timeout`` seconds, but never past the deadline of the whole run."""
        return max(1, math.ceil(min(job["cell_timeout"], deadline - time.monotonic())))

    def record(cell_index, execute_reply, **_) -> None:
        recorder.cell(cell_index, execute_reply["content"])

    client = NotebookClient(
        nb, kernel_name="python3", allow_errors=True, interrupt_on_timeout=True,
        error_on_timeout=CELL_TIMEOUT_ERROR, shutdown_kernel="immediate", timeout_func=cell_time_limit,
        on_cell_executed=record, resources={"metadata": {"path": job["workdir"]}},
    )
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if time.monotonic() >= deadline:
                recorder.stop(f"the time limit of {job['timeout']:g} s ran out before cell {index}")
                break
            try:
                client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
            except DeadKernelError:
                recorder.cell(index, KERNEL_DIED_ERROR)
                recorder.stop(f"the kernel died in cell {index}")
                break
    recorder.save()  # also when no code cell ran
    return 0


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", metavar="SUBMISSION.ipynb", help="the student's notebook")
    parser.add_argument("--source", required=True, metavar="SOLUTION.ipynb",
                        help="the solution notebook with the hidden tests, e.g. solutions/NN_name.ipynb")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=float, default=300, metavar="S",
                        help="time limit for the whole notebook, in seconds (default: 300)")
    parser.add_argument("--cell-timeout", type=float, default=60, metavar="S",
                        help="time limit for one cell, in seconds (default: 60)")
    parser.add_argument("--budget", choices=PRESETS, default="smoke",
                        help="FSL_COURSE_BUDGET for the run (default: smoke)")


def run(args: argparse.Namespace) -> int:
    report = grade(args.submission, args.source, timeout=args.timeout, cell_timeout=args.cell_timeout,
                   budget=args.budget)
    print(report.to_json() if args.json else report.to_text())
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:]))
