"""Grade a submitted exercise notebook against the hidden tests of its solution notebook.

Threat model: the submission is untrusted code; nothing it does may raise its score.

**Who runs what.** The trusted parent (``grade``, this process) reads the source notebook
(``solutions/NN_x.ipynb``, with the hidden tests) and the submission, and drives a fresh
IPython kernel itself over the Jupyter protocol (``jupyter_client``): it sends the source's
cells one at a time, with each solution cell's code taken from the submission's cell of the
same nbgrader ``grade_id``. Results (status, errors, output) come back over the protocol and
stay in the parent's memory; no results file exists that the kernel could write, and the
gradebook and feedback files are written by the parent after every kernel is dead. The hidden
tests never touch the disk: the kernel's working directory is an empty scratch directory, the
notebook is never written there, and a test cell's hidden part is only sent after the
student's code has run.

**When a test passes.** A test cell is sent as three executions: a trusted *guard*, the
visible part, then the hidden part followed by ``print(TOKEN)``. ``TOKEN`` is a fresh random
string (``secrets.token_hex``) made by the parent for that test at grading time, so the kernel
cannot know it before the cell arrives. The test passes only if the parent sees every part
finish with status ``ok`` *and* the token on that execution's stdout. ``sys.exit(0)`` (an
error reply), ``os._exit(0)`` or a crash (the kernel dies), or an exception anywhere stop the
cell before its last line, so they cannot pass a test.

**Tampering inside the kernel.** Before the first student cell, a trusted *prelude* seeds
``random``/NumPy/torch, snapshots the namespaces of ``builtins``, ``math``, ``operator``,
``random``, NumPy, torch (``torch.testing``, ``torch.nn.functional``, ``torch.Tensor``) as far
as the notebook uses them, IPython's input/AST transformers, ``sys.stdout``/``stderr``; the
guard restores all of them and clears ``sys.settrace``/``setprofile`` before every test cell.
So ``torch.allclose = lambda *a, **k: True``, a patched ``builtins.print``/``abs``/``isinstance``,
a replaced ``sys.stdout``, or a trace hook are undone before the tests run.

**The package's reference implementation.** The prelude replaces every ``fsl_course``
function whose name a solution cell defines (``mean_ci95`` -> ``fsl_course.evaluation.mean_ci95``)
by a stub that raises ``ImportError("... is the course's reference implementation ...")`` when
called from a function defined in a notebook cell; package code and the top level of a test
cell (hidden tests compare with the reference) still reach it. The guard also fails a test
whose graded name *is* the reference (``from fsl_course.evaluation import mean_ci95``,
through ``functools.partial``/``__wrapped__`` too).

**Limits.** The kernel is started (in its own session) through :mod:`fsl_course.sandbox`,
which sets ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_FSIZE`` and ``RLIMIT_CORE`` and, on Linux,
puts it in new user, mount, PID and network namespaces: the folders of the solution notebook
and of every submission of the batch (and the ``.git`` above them) are covered by empty mounts,
every file system but the kernel's scratch folder is read-only (the dataset cache too, built
beforehand by :func:`prepare_caches`), no other process is visible and there is no network.
Those mounts are locked: code in the kernel cannot undo them. Where unprivileged namespaces are
not allowed, grading goes on without them and the report says so in a note (``fsl-course
doctor`` shows which it is). The kernel runs on the CPU (``FSL_COURSE_DEVICE=cpu``): results are
the same on every machine and CUDA never starts under the address-space limit. Each execution
gets at most ``cell_timeout`` seconds (then the kernel is interrupted, the cell scores zero, and
grading goes on), the whole notebook at most ``timeout`` seconds (then the remaining cells are
not run); captured output is capped at ``OUTPUT_LIMIT`` bytes per cell (the rest is drained and
dropped). At the end the parent kills the kernel's whole process tree (its descendants found
with psutil, then ``os.killpg`` on its session).

**What this does not stop.** Copies of the solutions elsewhere on the machine that the
grader's user can read (without the sandbox: all of them), and code written against this
grader's internals (rewriting the guard, an input transformer installed by a test-time object),
which the guard does not undo. The parent therefore flags, for review by hand, solution cells
that mention ``fsl_course``, ``_fsl_``, transformers, trace hooks, ``gc``, ``ctypes``,
``builtins`` or ``sys.modules``. Hidden tests should also check types (``isinstance(x, float)``)
so that an object whose ``__eq__`` always returns True does not pass an ``==`` assertion.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import functools
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from fsl_course.budgets import PRESETS, Budget
from fsl_course.exercises import is_solution_cell, is_test_cell, load_source, nbgrader_meta

MISSING_CELL = 'raise NotImplementedError("cell {grade_id} missing from submission")'
MESSAGE_CHARS = 200
OUTPUT_LIMIT = 1_000_000  # bytes of output kept per cell
MEMORY_MB = 6144  # RLIMIT_AS of the kernel (torch alone maps a few GB of address space)
FILE_MB = 64  # RLIMIT_FSIZE: the largest file the kernel may write
MAX_RESTARTS = 3  # kernels started again after a crash, per submission
INTERRUPT_GRACE_S = 2  # how long an interrupted cell may take to stop before the kernel is killed
SEED = 0
HIDDEN_BEGIN, HIDDEN_END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
CELL_TIMEOUT_ERROR = {
    "ename": "TimeoutError",
    "evalue": "the cell did not finish within its time limit (an infinite loop?)",
}
KERNEL_DIED_ERROR = {
    "ename": "DeadKernelError",
    "evalue": "the kernel died while running this cell (out of memory, or the code ended the process?)",
}
NO_TOKEN_ERROR = {
    "ename": "GradingError",
    "evalue": "the test cell did not run to its end (did the code exit or hide its output?)",
}
SUSPICIOUS = re.compile(r"fsl_course|_fsl_|input_transformers|ast_transformers|settrace|setprofile|"
                        r"\bgc\b|ctypes|builtins|sys\.modules|__wrapped__")
HINTS = {
    "TimeoutError": "look for a loop that never ends or a much too slow computation",
    "DeadKernelError": "the process died: too much memory, or a call to sys.exit/os._exit/quit",
    "NameError": "keep the function name and signature given in the exercise cell",
    "SyntaxError": "run your cell in the notebook: it does not parse",
    "NotImplementedError": "the exercise cell has not been filled in",
    "MemoryError": "the code allocates far too much memory",
    "ImportError": "write the function yourself; the course's reference implementation is not available",
    "ReferenceUsed": "write the function yourself; the course's reference implementation is not available",
    "GradingError": "do not exit, patch or redirect output in your solution",
    "SystemExit": "do not call sys.exit/exit/quit in your solution",
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
    hint: str = ""  # for a failed test: what to look at


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

    def to_markdown(self, student: str) -> str:
        """The student's feedback: one line per test (what was checked, what went wrong, a hint)."""
        lines = [f"# Feedback for {student}", "", f"Notebook: `{Path(self.submission).name}`; "
                 f"score **{self.score:g}/{self.max_score:g}**.", "",
                 "| test | points | result |", "|---|---|---|"]
        for test in self.tests:
            result = "passed" if test.passed else f"{test.message} (hint: {test.hint})"
            lines.append(f"| `{test.grade_id}` | {test.points:g}/{test.max_points:g} | "
                         f"{result.replace('|', '/')} |")
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    __str__ = to_text


# --------------------------------------------------------------------------- parent


def grade(submission: str | Path, source: str | Path, *, timeout: float = 300, cell_timeout: float = 60,
          budget: str = "smoke", memory_mb: int = MEMORY_MB, sandbox: bool = True,
          hide: list[str | Path] = ()) -> GradeReport:
    """Grade the notebook ``submission`` against the tests in the solution notebook ``source``.

    A broken or hostile submission (invalid JSON, syntax errors, missing cells, a crashing
    kernel, infinite loops, tampering) scores zero on the affected tests, with a message; it
    never raises. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a
    malformed source notebook or bad arguments: those are the grader's mistakes.

    With ``sandbox`` (Linux) the kernel runs in :mod:`fsl_course.sandbox`: the folder of
    ``source``, of ``submission``, the ``.git`` above them and the ``hide`` paths are hidden
    from it, and everything but its scratch folder is read-only. Where that is not possible
    the report says so in a note and grading goes on with the other limits.
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
    notes += suspicious_notes(nb)
    hidden = paths_to_hide([source, submission, *hide]) if sandbox else None
    results, stopped, sandboxed = execute(nb, timeout=timeout, cell_timeout=cell_timeout, budget=budget,
                                          memory_mb=memory_mb, graded=graded_names(source_nb), hide=hidden)
    if sandbox and sandboxed != "sandboxed":
        notes.append(f"the kernel ran without the sandbox ({sandboxed}): it could read the solution "
                     "notebook and write outside its scratch folder")
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
        if isinstance(grade_id, str) and cell.cell_type == "code":
            answers.setdefault(grade_id, []).append(cell.source)
    return answers


def assemble(source_nb, answers: dict[str, list[str]]):
    """The notebook to run, and notes on duplicated cells.

    It is ``source_nb`` with each solution cell's code replaced by the submission's cell with
    the same grade_id (the first, if duplicated), or by a ``raise`` if there is none. Cell
    order, tests and setup code always come from the source.
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


def suspicious_notes(nb) -> list[str]:
    """Notes asking for a review by hand of solution cells that reach for the grader's internals."""
    notes = []
    for cell in nb.cells:
        if cell.cell_type == "code" and is_solution_cell(cell):
            found = sorted(set(SUSPICIOUS.findall(cell.source)))
            if found:
                notes.append(f"review by hand: solution cell {nbgrader_meta(cell)['grade_id']!r} "
                             f"mentions {', '.join(found)}")
    return notes


def graded_names(nb) -> list[str]:
    """Names of the functions the solution cells define (the graded functions; pass the source notebook)."""
    names = []
    for cell in nb.cells:
        if cell.cell_type == "code" and is_solution_cell(cell):
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                continue
            names += [node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    return names


def split_test(source: str) -> tuple[str, str]:
    """A test cell's visible part and its hidden part (everything from ``### BEGIN HIDDEN TESTS``)."""
    at = source.find(HIDDEN_BEGIN)
    return (source, "") if at < 0 else (source[:at], source[at:])


PRELUDE = r'''
def _fsl_prelude(seed, graded, watch):
    import builtins, functools, importlib, os, pkgutil, random, sys, threading
    random.seed(seed)
    modules = {}
    for name in watch:
        try:
            modules[name] = importlib.import_module(name)
        except Exception:
            pass
    if "numpy" in modules:
        modules["numpy"].random.seed(seed)
    if "torch" in modules:
        modules["torch"].manual_seed(seed)
    originals, stubs = {}, {}
    if graded and "fsl_course" in watch:
        import fsl_course
        for info in pkgutil.walk_packages(fsl_course.__path__, "fsl_course."):
            if info.name in ("fsl_course.grading", "fsl_course.cli") or info.name.endswith("__main__"):
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception:
                continue
            for name in graded:
                target = getattr(module, name, None)
                if callable(target) and getattr(target, "__module__", "").startswith("fsl_course"):
                    originals.setdefault(name, set()).add(id(target))
                    stub = stubs.get(id(target)) or _fsl_stub(target, f"{target.__module__}.{name}", sys)
                    stubs[id(target)] = stub
                    setattr(module, name, stub)
    for stub in stubs.values():
        originals.setdefault(stub.__name__, set()).add(id(stub))
    objects = [builtins] + list(modules.values())
    if "torch" in modules:
        objects.append(modules["torch"].Tensor)
    snapshot = [(obj, dict(vars(obj))) for obj in objects]
    shell = get_ipython()
    transformers = (list(shell.input_transformers_cleanup), list(shell.input_transformers_post),
                    list(shell.ast_transformers))
    streams = (sys.stdout, sys.stderr, sys.displayhook, sys.excepthook)

    def unwrap(obj):
        for _ in range(10):
            inner = obj.func if isinstance(obj, functools.partial) else getattr(obj, "__wrapped__", None)
            if inner is None:
                break
            obj = inner
        return obj

    missing = object()

    def guard(namespace, names):
        sys.settrace(None); sys.setprofile(None); threading.settrace(None)
        sys.stdout, sys.stderr, sys.displayhook, sys.excepthook = streams
        shell.input_transformers_cleanup[:], shell.input_transformers_post[:], shell.ast_transformers[:] = (
            list(t) for t in transformers)
        for obj, saved in snapshot:
            current = vars(obj)
            for key, value in saved.items():
                if current.get(key, missing) is not value:
                    try:
                        setattr(obj, key, value) if isinstance(obj, type) else current.__setitem__(key, value)
                    except Exception:
                        pass
        for name, value in modules.items():
            sys.modules[name] = value
        for name in names:
            value = namespace.get(name)
            if value is not None and (id(value) in originals.get(name, ()) or id(unwrap(value)) in originals.get(name, ())):
                raise ImportError(f"{name} is the course's reference implementation, not your own code")
    return guard


def _fsl_stub(target, qualname, sys):
    def stub(*args, **kwargs):
        caller = sys._getframe(1).f_code
        in_cell = "ipykernel_" in caller.co_filename or caller.co_filename.startswith("<ipython-input")
        if in_cell and caller.co_name != "<module>":
            raise ImportError(f"{qualname} is the course's reference implementation of the function you "
                              "are writing; it is not available during grading: write your own")
        return target(*args, **kwargs)
    stub.__name__ = target.__name__
    return stub
'''


def execute(nb, *, timeout: float, cell_timeout: float, budget: str, memory_mb: int = MEMORY_MB,
            graded: list[str] | None = None, hide: list[str] | None = None) -> tuple[dict[str, dict], str | None, str]:
    """Run ``nb`` in a fresh, limited kernel that this process drives; return the results.

    Results map a cell index (as a string) to ``{"status": "ok"}`` or
    ``{"status": "error", "ename": ..., "evalue": ..., "part": "visible"|"hidden"|"guard"}``;
    cells that did not run are absent. The second value says why the run stopped early, or None;
    the third is the sandbox status (``"sandboxed"``, or ``"unsandboxed: why"``). ``hide=None``
    runs without the sandbox; a list runs in it, with those paths hidden.
    """
    text = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    watch = ["math", "operator", "random"] + [name for name in ("numpy", "numpy.testing", "torch", "torch.testing",
                                                                "torch.nn.functional", "fsl_course")
                                             if name.split(".")[0] in text]
    if "fsl_course.checks" in text:  # the visible checks: restored like the other watched modules
        import pkgutil

        import fsl_course.checks

        watch += ["fsl_course.checks"] + [info.name for info in pkgutil.iter_modules(fsl_course.checks.__path__,
                                                                                     "fsl_course.checks.")]
    graded = graded_names(nb) if graded is None else graded  # from the source: the submission may not define them
    deadline = time.monotonic() + timeout
    results, stopped, sandboxed = {}, None, "unsandboxed: not requested"
    if hide is not None:
        prepare_caches()
    with tempfile.TemporaryDirectory(prefix="fsl-course-grade-", ignore_cleanup_errors=True) as scratch:
        kernel, replay, restarts, died = None, [], 0, None
        try:
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                if time.monotonic() >= deadline:
                    stopped = f"the time limit of {timeout:g} s ran out before cell {index}"
                    break
                if kernel is None or kernel.dead:
                    if kernel is not None:
                        kernel.kill()
                        if restarts == MAX_RESTARTS:
                            stopped = f"the kernel died {restarts + 1} times; the last time in cell {died}"
                            break
                        restarts += 1
                    kernel = _start(Path(scratch), budget, memory_mb, graded, watch, timeout, hide)
                    sandboxed = kernel.sandboxed
                    for code in replay:  # the cells before a crash, again (not the cell that crashed)
                        kernel.run(code, min(cell_timeout, deadline - time.monotonic()))
                outcome = _run_cell(kernel, cell, graded, lambda: min(cell_timeout, deadline - time.monotonic()))
                results[str(index)] = outcome
                if kernel.dead:
                    died = index
                elif not is_test_cell(cell):
                    replay.append(cell.source)
        except RuntimeError as err:  # the kernel did not start
            stopped = str(err)
        finally:
            if kernel is not None:
                kernel.kill()
    return results, stopped, sandboxed


def paths_to_hide(paths: list[str | Path]) -> list[str]:
    """What the sandboxed kernel must not see: the folder of each of ``paths`` (the solution
    notebook, the submission) and the ``.git`` folders above them. A folder that holds
    something the kernel needs (this Python, the fsl_course package, the cache) is not hidden;
    only the file itself is."""
    import fsl_course
    from fsl_course.cache import cache_dir

    needed = [Path(p).resolve() for p in (sys.prefix, Path(fsl_course.__file__).parent, cache_dir(),
                                          tempfile.gettempdir(), Path.home())]
    hidden = []
    for path in map(lambda p: Path(p).resolve(), paths):
        folder = path.parent
        hidden.append(path if any(n == folder or folder in n.parents for n in needed) else folder)
        hidden += [git for git in (d / ".git" for d in [folder, *folder.parents]) if git.is_dir()][:1]
    return sorted({str(path) for path in hidden})


@functools.cache
def prepare_caches() -> None:
    """Build, in this process, the dataset caches that exercise notebooks read: the sandboxed
    kernel sees the cache read-only (a submission must not change what the next one reads).
    Once per process: a batch checks them once, not once per submission."""
    from fsl_course import data

    for split in ("train", "val", "test"):
        data.load("glyphs", split)


def _start(scratch: Path, budget: str, memory_mb: int, graded: list[str], watch: list[str],
           timeout: float, hide: list[str] | None) -> _Kernel:
    """A started kernel in a new subfolder of ``scratch``, with the prelude run."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    kernel = _Kernel(folder, budget=budget, memory_mb=memory_mb, hide=hide)
    try:
        kernel.start(timeout=max(30.0, min(timeout, 120.0)))
        prelude = PRELUDE + f"\n_fsl_guard = _fsl_prelude({SEED!r}, {graded!r}, {watch!r})\ndel _fsl_prelude\n"
        outcome = kernel.run(prelude, max(30.0, min(timeout, 120.0)))
    except BaseException:
        kernel.kill()
        raise
    if outcome["status"] != "ok":
        kernel.kill()
        raise RuntimeError(f"the grader's prelude failed: {error_message(outcome)}")
    return kernel


def _run_cell(kernel: _Kernel, cell, graded: list[str], time_limit) -> dict:
    """Run one cell; a test cell as guard, visible part, hidden part + token, all within one time limit."""
    cell_deadline = time.monotonic() + time_limit()

    def limit() -> float:  # what is left of this cell's time
        return cell_deadline - time.monotonic()

    if not is_test_cell(cell):
        return kernel.run(cell.source, limit())
    token = secrets.token_hex(16)
    used = [name for name in graded if re.search(rf"\b{re.escape(name)}\b", cell.source)]
    outcome = kernel.run(f"_fsl_guard(get_ipython().user_ns, {used!r})", limit())
    if outcome["status"] != "ok":
        return {**outcome, "part": "guard"}
    visible, hidden = split_test(cell.source)
    parts = [("visible", visible), ("hidden", hidden)] if hidden else [("visible", visible)]
    for n, (part, code) in enumerate(parts):
        last = n == len(parts) - 1
        outcome = kernel.run(code + (f"\nprint({token!r})" if last else ""), limit())
        if outcome["status"] != "ok":
            return {**outcome, "part": part}
    if token not in outcome.get("tail", "").splitlines():
        return {"status": "error", **NO_TOKEN_ERROR, "part": "hidden"}
    return {"status": "ok"}


class _Kernel:
    """An IPython kernel in its own session, with resource limits, that the parent drives."""

    def __init__(self, scratch: Path, *, budget: str, memory_mb: int, hide: list[str] | None):
        self.scratch, self.hide = scratch, hide
        self.sandboxed = "unsandboxed: not requested"
        self.work = scratch / "work"
        self.work.mkdir()
        self.runtime = scratch / "runtime"
        self.runtime.mkdir()
        self.budget, self.memory_mb = budget, memory_mb
        self.manager = self.client = None
        self.dead = False

    def start(self, timeout: float) -> None:
        from jupyter_client import KernelManager

        status = self.runtime / "sandbox"
        config = json.dumps({
            "limits": {"RLIMIT_AS": self.memory_mb * 2**20, "RLIMIT_FSIZE": FILE_MB * 2**20, "RLIMIT_CORE": 0},
            "sandbox": None if self.hide is None else {"writable": str(self.scratch), "hide": self.hide},
            "status": str(status)})

        class LimitedKernelManager(KernelManager):
            def format_kernel_cmd(self, extra_arguments=None):
                command = super().format_kernel_cmd(extra_arguments)
                return [sys.executable, "-m", "fsl_course.sandbox", config, *command]

        env = {key: value for key, value in os.environ.items() if not key.startswith(("JPY_", "JUPYTER_"))}
        # Grading runs on the CPU: deterministic, the same everywhere, and no CUDA start-up
        # under the address-space limit.
        env.update(FSL_COURSE_BUDGET=self.budget, FSL_COURSE_DEVICE="cpu", CUDA_VISIBLE_DEVICES="",
                   PYTHONHASHSEED=str(SEED), MPLBACKEND="Agg", JUPYTER_RUNTIME_DIR=str(self.runtime),
                   TMPDIR=str(self.work), IPYTHONDIR=str(self.scratch / "ipython"), PYDEVD_DISABLE_FILE_VALIDATION="1")
        self.manager = LimitedKernelManager(kernel_name="python3", transport="ipc",
                                            connection_file=str(self.runtime / "kernel.json"))
        try:
            self.manager.start_kernel(cwd=str(self.work), env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.client = self.manager.client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=timeout)
        except Exception as err:
            raise RuntimeError(f"the kernel did not start ({_first_line(str(err)) or type(err).__name__})") from err
        # written by the launcher before the kernel existed, read before any student code runs
        self.sandboxed = status.read_text() if status.is_file() else "unsandboxed: no status from the launcher"

    def run(self, code: str, limit: float) -> dict:
        """Execute ``code``; the reply status, error and stdout (capped), as observed here."""
        if self.dead:
            return {"status": "error", **KERNEL_DIED_ERROR}
        limit = max(limit, 0.5)
        msg_id = self.client.execute(code, store_history=False, allow_stdin=False, stop_on_error=False)
        deadline, interrupted = time.monotonic() + limit, False
        stdout, size, idle, reply, tail = [], 0, False, None, ""
        next_check = time.monotonic() + 0.5
        while not (idle and reply is not None):
            if time.monotonic() > deadline:
                if interrupted:  # the interrupt did not stop it: kill
                    self.kill()
                    return {"status": "error", **CELL_TIMEOUT_ERROR}
                self.manager.interrupt_kernel()
                interrupted, deadline = True, time.monotonic() + INTERRUPT_GRACE_S
            try:
                msg = self.client.iopub_channel.get_msg(timeout=0.1)
            except queue.Empty:
                msg = None
            if (msg is None or time.monotonic() > next_check) and not self.manager.is_alive():
                self.dead = True
                return {"status": "error", **KERNEL_DIED_ERROR}
            if time.monotonic() > next_check:
                next_check = time.monotonic() + 0.5
            if msg is not None and msg.get("parent_header", {}).get("msg_id") == msg_id:
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream" and content.get("name") == "stdout":
                    tail = (tail + content.get("text", ""))[-4096:]
                if kind == "stream" and content.get("name") == "stdout" and size < OUTPUT_LIMIT:
                    piece = content.get("text", "")[: OUTPUT_LIMIT - size]
                    stdout.append(piece)
                    size += len(piece)
                elif kind == "status" and content.get("execution_state") == "idle":
                    idle = True
            if idle and reply is None:
                try:
                    answer = self.client.shell_channel.get_msg(timeout=1)
                except queue.Empty:
                    continue
                if answer.get("parent_header", {}).get("msg_id") == msg_id:
                    reply = answer["content"]
        if interrupted:
            return {"status": "error", **CELL_TIMEOUT_ERROR}
        if reply.get("status") == "ok":
            return {"status": "ok", "stdout": "".join(stdout), "tail": tail}
        return {"status": "error", "ename": str(reply.get("ename", reply.get("status"))),
                "evalue": str(reply.get("evalue", ""))}

    def kill(self) -> None:
        """Kill the kernel and every process it started (its session, and any descendant)."""
        self.dead = True
        if self.client is not None:
            self.client.stop_channels()
        provisioner = getattr(self.manager, "provisioner", None)
        process = getattr(provisioner, "process", None)
        if process is not None:
            _kill_tree(process.pid)
        if self.manager is not None:
            try:
                self.manager.shutdown_kernel(now=True)
            except Exception:
                pass
            self.manager.cleanup_resources()


def _kill_tree(pid: int) -> None:
    """SIGKILL the process ``pid``, its session (process group) and all its descendants."""
    import psutil

    try:
        victims = psutil.Process(pid).children(recursive=True)  # also those that left the session
    except psutil.Error:
        victims = []
    try:
        os.killpg(pid, signal.SIGKILL)  # the kernel was started in a new session: pgid == pid
    except OSError:
        pass
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass


def score_tests(nb, results: dict[str, dict], not_run: str) -> list[GradedTest]:
    """One ``GradedTest`` per test cell of ``nb``; cells absent from ``results`` get ``not_run``."""
    tests = []
    for index, cell in enumerate(nb.cells):
        if not is_test_cell(cell):
            continue
        meta, outcome = nbgrader_meta(cell), results.get(str(index))
        passed = outcome is not None and outcome["status"] == "ok"
        if passed:
            message, hint = "passed", ""
        elif outcome is None:
            message, hint = not_run, "an earlier cell stopped the run; fix that first"
        else:
            message, hint = feedback(outcome, split_test(cell.source)[1])
        points = meta["points"] if passed else 0
        tests.append(GradedTest(meta["grade_id"], points, meta["points"], passed, message, hint))
    return tests


def feedback(outcome: dict, hidden: str) -> tuple[str, str]:
    """The message and hint for a failed test; hidden details only where the author wrote them."""
    ename, evalue = outcome.get("ename", "Error"), _first_line(outcome.get("evalue", ""))
    if outcome.get("part") == "hidden" and ename not in HINTS:
        authored = ename == "AssertionError" and evalue and (f'"{evalue}"' in hidden or f"'{evalue}'" in hidden)
        message = error_message(outcome) if authored else (
            f"{ename} in a hidden test (its details are not shown)")
        hint = "the visible checks pass but a hidden case fails: think about edge cases, shapes, dtypes"
        if ename == "AssertionError" and not authored and "hint:" in evalue:
            hint = evalue[evalue.index("hint:") + 5:].strip()
        return message, hint
    hint = HINTS.get(ename)
    if hint is None:
        hint = evalue[evalue.index("hint:") + 5:].strip() if "hint:" in evalue else \
            "run the visible check in your notebook and read the error"
    return error_message(outcome), hint


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


# --------------------------------------------------------------------------- batch


def student_names(submissions: list[Path]) -> list[str]:
    """``submissions/alice/01_x.ipynb`` -> ``alice``; the file stem where folders repeat."""
    names = [path.parent.name or path.stem for path in submissions]
    if len(set(names)) < len(names):
        names = [f"{path.parent.name}_{path.stem}" if path.parent.name else path.stem for path in submissions]
    if len(set(names)) < len(names):
        names = [f"{name}_{n}" for n, name in enumerate(names)]
    return names


def grade_batch(submissions: list[str | Path], source: str | Path, out: str | Path, *, workers: int = 2,
                **limits) -> list[tuple[str, GradeReport]]:
    """Grade ``submissions`` (``workers`` at a time); write the gradebook and feedback into ``out``.

    The files are written after every kernel is dead, replacing whatever is there.
    """
    load_source(source)  # fail early on a bad source
    paths = [Path(path) for path in submissions]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(path)
    names = student_names(paths)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # each kernel also loses sight of the other students' submissions
        reports = list(pool.map(lambda path: grade(path, source, hide=paths, **limits), paths))
    rows = sorted(zip(names, reports, strict=True), key=lambda row: row[0])
    out = Path(out)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    test_ids = [test.grade_id for test in rows[0][1].tests] if rows else []
    with open(out / "gradebook.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["student", "submission", "score", "max_score", *test_ids])
        for name, report in rows:
            writer.writerow([name, report.submission, f"{report.score:g}", f"{report.max_score:g}",
                             *(f"{test.points:g}" for test in report.tests)])
    gradebook = {"source": str(source), "students": {
        name: {key: value for key, value in report.to_dict().items() if key != "seconds"} for name, report in rows}}
    (out / "gradebook.json").write_text(json.dumps(gradebook, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, report in rows:
        (out / "feedback" / f"{name}.md").write_text(report.to_markdown(name), encoding="utf-8")
    return rows


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("submission", nargs="+", metavar="SUBMISSION.ipynb",
                        help="the students' notebooks (e.g. submissions/*/NN_name.ipynb)")
    parser.add_argument("--source", required=True, metavar="SOLUTION.ipynb",
                        help="the solution notebook with the hidden tests, e.g. solutions/NN_name.ipynb")
    parser.add_argument("--out", metavar="DIR", help="write gradebook.csv, gradebook.json and "
                        "feedback/STUDENT.md here (needed for more than one submission)")
    parser.add_argument("--workers", type=int, default=2, help="submissions graded in parallel (default: 2)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=float, default=300, metavar="S",
                        help="time limit for the whole notebook, in seconds (default: 300)")
    parser.add_argument("--cell-timeout", type=float, default=60, metavar="S",
                        help="time limit for one cell, in seconds (default: 60)")
    parser.add_argument("--memory-mb", type=int, default=MEMORY_MB, metavar="MB",
                        help=f"address-space limit of the kernel, in MiB (default: {MEMORY_MB})")
    parser.add_argument("--budget", choices=PRESETS, default="smoke",
                        help="FSL_COURSE_BUDGET for the run (default: smoke)")
    parser.add_argument("--no-sandbox", dest="sandbox", action="store_false",
                        help="run kernels without the Linux namespace sandbox (fsl_course.sandbox)")


def run(args: argparse.Namespace) -> int:
    limits = {"timeout": args.timeout, "cell_timeout": args.cell_timeout, "budget": args.budget,
              "memory_mb": args.memory_mb, "sandbox": args.sandbox}
    if args.out is None:
        if len(args.submission) > 1:
            raise SystemExit("fsl-course grade: give --out DIR to grade more than one submission")
        report = grade(args.submission[0], args.source, **limits)
        print(report.to_json() if args.json else report.to_text())
        return 0
    rows = grade_batch(args.submission, args.source, args.out, workers=args.workers, **limits)
    for name, report in rows:
        print(f"{name}: {report.score:g}/{report.max_score:g}")
    print(f"wrote {Path(args.out) / 'gradebook.csv'}, gradebook.json and {len(rows)} feedback files")
    return 0
