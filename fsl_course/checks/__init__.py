"""The visible checks of the exercises: one module per exercise (``ex01``, ``ex02``, ...).

An exercise's check cell calls the check of the function just written,

>>> from fsl_course.checks import ex01 as check        # doctest: +SKIP
>>> check.sample_episode(sample_episode)                # doctest: +SKIP
✓ sample_episode: 8 visible checks passed

and a failed check prints one line, what was checked and a hint, instead of a traceback:

    ✗ sample_episode: check 3 failed: labels are 0..N-1 grouped by class ... hint: ...

The same checks run, unchanged, when ``fsl-course grade`` (or nbgrader) grades the cell; its
hidden tests come after them in the solution notebook and never ship with the package.
A check is a function decorated with :func:`visible_check` that receives the learner's
function and an :class:`Expect`; each ``expect(condition, message)`` is one check.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable


class CheckFailed(AssertionError):
    """A visible check failed. IPython shows only the one-line message (``_render_traceback_``)."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m✗ {self}\x1b[0m"]


class Expect:
    """``expect(condition, message)``: one check. Counts the checks that passed."""

    def __init__(self):
        self.passed = 0

    def __call__(self, condition, message: str) -> None:
        if not bool(condition):
            raise AssertionError(message)
        self.passed += 1


def visible_check(check: Callable) -> Callable:
    """Turn ``check(function, expect)`` into ``check(function)``, which prints
    ``✓ name: n visible checks passed`` or raises :class:`CheckFailed` with ``✗ name: check k
    failed: message``. Errors raised by the learner's function itself (``NotImplementedError``,
    a shape error from torch) pass through unchanged: they are the most useful message."""

    @functools.wraps(check)
    def run(function: Callable) -> None:
        if not callable(function):
            raise CheckFailed(f"{check.__name__}: expected your function, got {type(function).__name__}; "
                              f"hint: pass the function itself, e.g. check.{check.__name__}({check.__name__})")
        expect = Expect()
        try:
            check(function, expect)
        except AssertionError as err:
            raise CheckFailed(f"{check.__name__}: check {expect.passed + 1} failed: {err}") from None
        print(f"✓ {check.__name__}: {expect.passed} visible checks passed")

    return run


_MISSING = object()


@contextmanager
def bound_in_globals_of(function: Callable, values: dict):
    """Bind ``values`` (name -> object) in ``function``'s module globals (for a learner's function:
    the notebook) while the block runs, then restore what was there (or remove names that were not).
    Used to grade a later part of an exercise with right answers for the earlier parts it calls.
    Does nothing for a callable without ``__globals__``."""
    namespace = getattr(function, "__globals__", None)
    if not isinstance(namespace, dict):
        yield
        return
    saved = {name: namespace.get(name, _MISSING) for name in values}
    namespace.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                namespace.pop(name, None)
            else:
                namespace[name] = value
