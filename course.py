#!/usr/bin/env python3
"""Set up the course and run it: the only two commands a learner needs.

    python course.py lab              # set up, then open JupyterLab on notebooks/
    python course.py test             # set up, then run the complete test suite
    python course.py test -- -x -k vae    # arguments after `--` go to pytest
    python course.py setup            # only set up (venv, packages, dataset cache)

"Set up" means: create ./.venv if it is missing, install this package with its
dependencies into it (editable, with the dev extra, pinned by constraints.txt), and build
the glyph dataset cache. Every step is skipped when it is already done, so a second run
starts in seconds. The install is redone when pyproject.toml or constraints.txt change
(a stamp file in .venv records their hash).

Standard library only, Python 3.10+, Linux / macOS / Windows.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import NoReturn

MIN_PYTHON = (3, 10)
ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fsl-course-install"
# Bump to force a reinstall everywhere when the install recipe below changes.
INSTALL_RECIPE = "1"
# Imported by nothing at install time, only looked up: cheap proof that the venv is usable.
REQUIRED_MODULES = ("fsl_course", "torch", "numpy", "pytest", "nbval", "jupyterlab", "ipykernel")

# The test command. README.md's quick start and .ci/run use exactly `python course.py test`.
PYTEST_ARGS = ["--nbval-lax", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg"]
TEST_PATHS = ["tests", "notebooks", "solutions"]


def say(message: str) -> None:
    print(f"[course] {message}", flush=True)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"[course] error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def run(cmd: list[str], *, check: bool = True, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` from the repository root, echoing it; stop the script if it fails."""
    shown = " ".join(str(c) if " " not in str(c) else f'"{c}"' for c in cmd)
    say(f"$ {shown}")
    try:
        code = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=env)
    except KeyboardInterrupt:
        code = 130
    if check and code != 0:
        fail(f"command failed with exit code {code}: {shown}", code)
    return code


def install_hash() -> str:
    digest = hashlib.sha256(f"recipe {INSTALL_RECIPE}\n".encode())
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()


def ensure_venv() -> Path:
    python = venv_python()
    if python.exists():
        return python
    if VENV.exists():
        say(f"{VENV} exists but has no {python.relative_to(VENV)}; recreating it")
    else:
        say(f"creating a virtual environment in {VENV}")
    venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    if not python.exists():
        fail(f"could not create a virtual environment in {VENV} (is the venv module installed? "
             "On Debian/Ubuntu: sudo apt install python3-venv)")
    return python


def modules_missing(python: Path) -> list[str]:
    probe = (
        "import importlib.util, sys\n"
        f"missing = [m for m in {REQUIRED_MODULES!r} if importlib.util.find_spec(m) is None]\n"
        "print(' '.join(missing))\n"
    )
    out = subprocess.run([str(python), "-c", probe], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return list(REQUIRED_MODULES)
    return out.stdout.split()


def pip_supports_editable_pyproject(python: Path) -> bool:
    """PEP 660 editable installs need pip >= 21.3 (Python 3.10.0 shipped 21.2)."""
    out = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        return False
    try:
        major, minor = (int(x) for x in out.stdout.split()[1].split(".")[:2])
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (21, 3)


def ensure_installed(python: Path) -> None:
    wanted = install_hash()
    recorded = STAMP.read_text().strip() if STAMP.exists() else ""
    if recorded == wanted:
        missing = modules_missing(python)
        if not missing:
            say("packages are installed and up to date (pyproject.toml and constraints.txt unchanged)")
            return
        say(f"the stamp says installed, but these modules are missing: {', '.join(missing)}; reinstalling")
    elif recorded:
        say("pyproject.toml or constraints.txt changed since the last install; updating packages")
    else:
        say("installing the course package and its dependencies (first run: a few minutes, torch is large)")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if not pip_supports_editable_pyproject(python):
        run([python, "-m", "pip", "install", "--upgrade", "pip>=21.3"], env=env)
    start = time.monotonic()
    run([python, "-m", "pip", "install", "-c", "constraints.txt", "-e", ".[dev]"], env=env)
    STAMP.write_text(wanted + "\n")
    say(f"installed in {time.monotonic() - start:.0f} s")


def ensure_dataset(python: Path) -> None:
    say("checking the glyph dataset cache (the first time it is rendered, which takes a while)")
    start = time.monotonic()
    run([python, "-c", "import fsl_course.data as d; d.load('glyphs','train')"])
    say(f"glyph dataset ready ({time.monotonic() - start:.0f} s)")
    say("checking the feature net of the generative metrics (trained once, then cached)")
    start = time.monotonic()
    run([python, "-c", "import fsl_course.metrics as m; m.feature_extractor(progress=False)"])
    say(f"feature net ready ({time.monotonic() - start:.0f} s)")


def setup() -> Path:
    if sys.version_info < MIN_PYTHON:
        fail(f"Python {'.'.join(map(str, MIN_PYTHON))}+ is needed, this is {sys.version.split()[0]}")
    python = ensure_venv()
    ensure_installed(python)
    ensure_dataset(python)
    return python


def cmd_setup(extra: list[str]) -> int:
    if extra:
        fail("`setup` takes no extra arguments")
    setup()
    say("ready: `python course.py lab` opens the notebooks, `python course.py test` runs the tests")
    return 0


def cmd_lab(extra: list[str]) -> int:
    python = setup()
    # Serve the whole repository (so exercises/ and solutions/ are reachable) but open on notebooks/.
    cmd = [python, "-m", "jupyterlab", f"--ServerApp.root_dir={ROOT}",
           "--LabApp.default_url=/lab/tree/notebooks"]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and "--allow-root" not in extra:
        say("running as root (a container?): passing --allow-root to JupyterLab")
        cmd.append("--allow-root")
    cmd += extra
    say("starting JupyterLab on notebooks/ (stop it with Ctrl-C)")
    return run(cmd, check=False)


# pytest options whose value is the next argument (so that value is not a path to test)
_OPTIONS_WITH_VALUE = {
    "-k", "-m", "-p", "-c", "-o", "-W", "--tb", "--maxfail", "--durations", "--deselect", "--ignore",
    "--ignore-glob", "--rootdir", "--basetemp", "--junitxml", "--nb-budget", "--nb-time-limit",
    "--nbval-cell-timeout", "--nbval-kernel-name", "--nbval-sanitize-with",
}


def _test_paths_given(extra: list[str]) -> bool:
    """Whether the pytest arguments name files or folders to test (``tests/x.py::test_y`` too)."""
    for previous, arg in zip([""] + extra, extra):
        if arg.startswith("-") or previous in _OPTIONS_WITH_VALUE:
            continue
        if (ROOT / arg.split("::", 1)[0]).exists():
            return True
    return False


def cmd_test(extra: list[str]) -> int:
    python = setup()
    if _test_paths_given(extra):
        # Only what was asked for. tests/conftest.py (which pytest collects nothing from) is
        # named so that it still loads: it sets the smoke budget and the notebook rules.
        paths = ["tests/conftest.py"]
        say("running only the test paths you gave")
    else:
        # git keeps no empty folders: a fresh clone may lack notebooks/ or solutions/ early on.
        paths = [p for p in TEST_PATHS if (ROOT / p).is_dir()]
        for missing in sorted(set(TEST_PATHS) - set(paths)):
            say(f"no {missing}/ folder: nothing to test there")
        say("running the test suite: unit tests, then every notebook and solution (smoke budget unless --nb-budget)")
    cmd = [python, "-m", "pytest", *PYTEST_ARGS, *paths, *extra]
    start = time.monotonic()
    code = run(cmd, check=False)
    say(f"pytest exited with code {code} after {time.monotonic() - start:.0f} s")
    return code


COMMANDS = {
    "setup": (cmd_setup, "create .venv, install the package, build the dataset cache"),
    "lab": (cmd_lab, "set up, then open JupyterLab on notebooks/"),
    "test": (cmd_test, "set up, then run the complete test suite (pytest + notebooks)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    else:
        extra = []
    parser = argparse.ArgumentParser(
        prog="python course.py",
        description="Set up the few-shot learning course and run it. "
        "Arguments after `--` are passed on (to pytest for `test`, to JupyterLab for `lab`).",
    )
    parser.add_argument("command", choices=COMMANDS, help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][0](extra)


if __name__ == "__main__":
    sys.exit(main())
