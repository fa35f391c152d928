"""A solution notebook seen from the tests of its check bank: the functions its solution cells
define, fresh notebook namespaces with a (wrong or other) answer typed in, and its hidden tests
run in this process (without the grader)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

from fsl_course import exercises

ROOT = Path(__file__).resolve().parent.parent


def solution_functions(path: Path) -> dict:
    """The functions that the solution notebook's solution cells define (run with its imports)."""
    nb = nbformat.read(path, as_version=4)
    namespace: dict = {}
    for cell in nb.cells:
        if cell.cell_type == "code" and (exercises.is_solution_cell(cell) or
                                         exercises.nbgrader_meta(cell).get("grade_id") == "imports"):
            exec(compile(cell.source, f"{path.name}:{exercises.nbgrader_meta(cell).get('grade_id')}", "exec"), namespace)
    return namespace


class SolutionNotebook:
    """``solutions/NAME.ipynb``: ``functions`` (its imports and solved functions), :meth:`notebook`,
    :meth:`hidden_tests`, :meth:`run_hidden` and :meth:`wrong`."""

    def __init__(self, name: str):
        self.path = ROOT / "solutions" / name
        self.label = name[:2]
        self.functions = solution_functions(self.path)
        nb = nbformat.read(self.path, as_version=4)
        self.cells = {exercises.nbgrader_meta(c).get("grade_id"): c.source for c in nb.cells if c.cell_type == "code"}

    def notebook(self, source: str = "", **names) -> dict:
        """A fresh notebook namespace (the imports and the solution's functions), with ``names`` bound and
        then ``source`` run in it, as if typed into a solution cell."""
        namespace = dict(self.functions)
        namespace.update(names)
        exec(compile(textwrap.dedent(source), f"<exercise {self.label} cell>", "exec"), namespace)
        return namespace

    def hidden_tests(self, grade_id: str) -> str:
        """The hidden part of the test cell ``grade_id``."""
        return self.cells[grade_id].split("### BEGIN HIDDEN TESTS")[1].split("### END HIDDEN TESTS")[0]

    def run_hidden(self, name: str, namespace: dict) -> None:
        """Run the hidden tests of ``test_NAME`` in ``namespace``."""
        exec(compile(self.hidden_tests(f"test_{name}"), f"<hidden tests of {name}>", "exec"), namespace)

    def wrong(self, name: str, source: str) -> tuple[dict, object]:
        """(the namespace, the function ``name``) of a notebook where ``source`` defines ``name`` (wrongly, or another way)."""
        namespace = self.notebook(source)
        return namespace, namespace[name]
