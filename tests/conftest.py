"""Test-suite configuration, including the rules for running notebooks with nbval.

The complete suite is ``python course.py test``, which runs

    pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg tests notebooks solutions

* ``--nbval-lax`` collects every ``.ipynb`` under the given paths; each cell must run
  without error, and only cells marked ``# NBVAL_CHECK_OUTPUT`` are compared with their
  committed outputs (after the sanitizers in ``tests/nbval_sanitize.cfg``).
* ``FSL_COURSE_BUDGET`` is set to ``smoke`` here, before any kernel starts, so every notebook
  kernel inherits it. ``--nb-budget standard`` (or ``full``) runs them at that budget instead,
  e.g. on a GPU: ``python course.py test -- --nb-budget standard``.
* At the smoke budget a notebook may take at most 60 s (kernel start included); the cell
  that crosses the limit fails with the notebook's name and time. ``--nb-time-limit`` changes
  the limit (0 turns it off); it does not apply at the standard and full budgets.
* Every cell also has a timeout (``--nbval-cell-timeout``; default by budget, see
  ``CELL_TIMEOUT_S``), kernels run in this interpreter (``--nbval-current-env``), and
  ``exercises/`` (generated, full of ``NotImplementedError``) and ``tests/fixtures/`` are
  never collected.

The notebook rules live in a plugin object registered from ``pytest_configure``: a
conftest's own hooks only see items below its directory, and notebooks live in
``notebooks/`` and ``solutions/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = ("smoke", "standard", "full")
SANITIZE_CFG = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
SMOKE_NOTEBOOK_LIMIT_S = 60.0
# Per-cell timeouts by budget, used unless --nbval-cell-timeout is given.
CELL_TIMEOUT_S = {"smoke": 60.0, "standard": 900.0, "full": 4 * 3600.0}
NBVAL_DEFAULT_CELL_TIMEOUT = 2000.0  # nbval's own default, i.e. "not given on the command line"
# Never collected: generated exercises (they raise NotImplementedError by design) and test data.
IGNORED_DIRS = (ROOT / "exercises", ROOT / "tests" / "fixtures")

collect_ignore = ["fixtures"]  # relative to tests/; the plugin below also covers other invocations


def pytest_addoption(parser):
    group = parser.getgroup("fsl-course", "fsl-course notebook runs")
    group.addoption(
        "--nb-budget",
        choices=BUDGETS,
        default=None,
        help="FSL_COURSE_BUDGET for the notebook kernels and tests (default: smoke). "
        "Use standard or full on a GPU to check the real runs.",
    )
    group.addoption(
        "--nb-time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"wall-clock limit per notebook (default: {SMOKE_NOTEBOOK_LIMIT_S:g} s at the smoke budget, "
        "none at standard/full; 0 turns it off)",
    )


def notebook_time_limit(budget: str, option: float | None) -> float | None:
    """The per-notebook limit in seconds, or None for no limit."""
    if option is not None:
        return option if option > 0 else None
    return SMOKE_NOTEBOOK_LIMIT_S if budget == "smoke" else None


def pytest_configure(config):
    budget = config.getoption("nb_budget") or "smoke"
    # Before any kernel starts: kernels are child processes and inherit os.environ.
    os.environ["FSL_COURSE_BUDGET"] = budget

    opt = config.option
    if hasattr(opt, "nbval_cell_timeout"):  # nbval is installed
        if float(opt.nbval_cell_timeout) == NBVAL_DEFAULT_CELL_TIMEOUT:
            opt.nbval_cell_timeout = CELL_TIMEOUT_S[budget]
        if not opt.nbval_sanitize_with and SANITIZE_CFG.is_file():
            opt.nbval_sanitize_with = str(SANITIZE_CFG)
        if not opt.nbval_kernel_name and not getattr(opt, "current_env", False):
            # Run kernels with this interpreter, not whatever "python3" kernelspec is installed.
            opt.nbval_current_env = True

    limit = notebook_time_limit(budget, config.getoption("nb_time_limit"))
    config.pluginmanager.register(NotebookPolicy(budget, limit), "fsl-course-notebook-policy")


def _is_notebook_item(item) -> bool:
    return getattr(item, "path", None) is not None and item.path.suffix == ".ipynb"


def _display(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


class NotebookPolicy:
    """Ignores generated/fixture directories; times each notebook and enforces the limit."""

    def __init__(self, budget: str, limit_s: float | None):
        self.budget = budget
        self.limit_s = limit_s
        self.started: dict[Path, float] = {}
        self.elapsed: dict[Path, float] = {}
        self.over_limit: set[Path] = set()

    def pytest_ignore_collect(self, collection_path: Path, config):
        path = Path(collection_path).resolve()
        if path.name == ".ipynb_checkpoints":
            return True
        for ignored in IGNORED_DIRS:
            if path == ignored or ignored in path.parents:
                return True
        return None  # not False: let pytest's own rules (--ignore, norecursedirs) decide

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item):
        # The first cell's setup starts the notebook's kernel, so the clock starts here.
        if _is_notebook_item(item):
            self.started.setdefault(item.path, time.monotonic())

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        result = yield  # a failing cell raises here and keeps its own error
        if _is_notebook_item(item):
            elapsed = time.monotonic() - self.started[item.path]
            self.elapsed[item.path] = elapsed
            if self.limit_s is not None and elapsed > self.limit_s and item.path not in self.over_limit:
                self.over_limit.add(item.path)
                pytest.fail(
                    f"notebook {_display(item.path)} has taken {elapsed:.1f} s at the {self.budget} budget, "
                    f"over the limit of {self.limit_s:g} s per notebook (this cell crossed it). "
                    "Make its smoke preset smaller, e.g. BUDGET.pick(smoke=..., standard=..., full=...).",
                    pytrace=False,
                )
        return result

    def pytest_runtest_teardown(self, item, nextitem):
        if _is_notebook_item(item) and item.path in self.started:
            self.elapsed[item.path] = time.monotonic() - self.started[item.path]

    def pytest_terminal_summary(self, terminalreporter):
        if not self.elapsed:
            return
        limit = f"limit {self.limit_s:g} s each" if self.limit_s is not None else "no time limit"
        terminalreporter.section(f"notebook run times (budget {self.budget}, {limit})")
        for path, seconds in sorted(self.elapsed.items(), key=lambda kv: -kv[1]):
            flag = "  OVER LIMIT" if path in self.over_limit else ""
            terminalreporter.write_line(f"{seconds:7.1f} s  {_display(path)}{flag}")
        terminalreporter.write_line(f"{sum(self.elapsed.values()):7.1f} s  total")


@pytest.fixture(scope="session")
def sandboxed():
    """Skips a test where fsl_course.sandbox cannot isolate a process (no user namespaces)."""
    from fsl_course import sandbox

    status = sandbox.probe()
    if status != "sandboxed":
        pytest.skip(f"no sandbox on this machine ({status})")
