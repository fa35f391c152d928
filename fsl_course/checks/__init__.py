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
import inspect
from contextlib import contextmanager
from typing import Callable

import torch


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
    A decorated function (e.g. ``@torch.no_grad()``) is unwrapped first (``inspect.unwrap``), so the
    names land in the learner's notebook, not in the decorator's module. Does nothing for a
    callable without ``__globals__``."""
    namespace = getattr(inspect.unwrap(function), "__globals__", None)
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


# --------------------------------------------------------------------------- small helpers of the check banks


class Misuse(Exception):
    """A check's stand-in was called the wrong way; the check turns it into a failed expectation."""


def first_line(err: BaseException) -> str:
    """``Type: first line of the message``, at most 160 characters: an error inside a learner's function, for a message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:160]


def close64(value, target: torch.Tensor, rtol: float = 1e-6, atol: float = 1e-7) -> bool:
    """``value`` is a floating tensor of ``target``'s shape, close to it (compared in float64 on the CPU)."""
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == tuple(target.shape)
            and bool(torch.allclose(value.detach().to("cpu", torch.float64), target.to(torch.float64), rtol=rtol, atol=atol)))


def fmt_values(values, digits: int = 4) -> str:
    """A short rendering of a tensor's first values (or of what the value is), for messages."""
    if not isinstance(values, torch.Tensor):
        return type(values).__name__
    flat = values.detach().reshape(-1).tolist()
    text = ", ".join(f"{v:.{digits}g}" for v in flat[:8])
    return f"[{text}{', ...' if len(flat) > 8 else ''}]"


def dtype_name(value) -> str:
    """A tensor's dtype, else the value's type name, for messages."""
    return str(value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__


def call_checked(expect, what: str, function, args=(), kwargs=None, *, index_hint: str, per_sample_call: str):
    """``function(*args, **kwargs)`` for a check of a diffusion exercise: a misused stand-in (:class:`Misuse`),
    an index out of range (an off-by-one timestep: ``index_hint``) or tensors that do not broadcast (a ``(B,)``
    coefficient against ``(B, ...)`` data: reshape with ``per_sample_call``) fail the check through ``expect``
    with a message and a hint instead of a traceback. Other errors pass through unchanged."""
    try:
        return function(*args, **(kwargs or {}))
    except Misuse as err:
        expect(False, f"{what}: {err}")
    except IndexError as err:
        expect(False, f"{what} raised {first_line(err)}. hint: {index_hint}")
    except RuntimeError as err:
        if "size of tensor" not in str(err) and "broadcast" not in str(err):
            raise
        expect(False, f"{what} raised {first_line(err)}. hint: schedule values picked at t have shape (B,); reshape "
                      "them to (B, 1, ..., 1) so that they multiply each sample of (B, ...) data, for any number of "
                      f"dimensions: {per_sample_call}")
