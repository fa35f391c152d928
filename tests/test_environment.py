"""The ways in: pyproject.toml, environment.yml, constraints.txt, README.md, course.py,
.ci/run and the notebook-test rules (tests/conftest.py, tests/nbval_sanitize.cfg) must agree.

pyproject.toml is read with ``tomllib`` (``tomli`` on Python 3.10) and environment.yml with
PyYAML, both in the dev extra.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# pip name -> conda-forge name, where they differ. Everything else has the same name on both.
CONDA_NAMES = {"torch": "pytorch"}


# --------------------------------------------------------------------------- readers


def load_pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def load_environment() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(requirement: str) -> tuple[str, str]:
    """``"Torch >= 2.2"`` -> ``("torch", ">=2.2")`` (name canonicalised, spaces removed)."""
    match = REQUIREMENT.match(requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    return canonical(match.group(1)), re.sub(r"\s+", "", match.group(3))


def pip_requirements() -> dict[str, str]:
    project = load_pyproject()["project"]
    requirements = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    return dict(split_requirement(r) for r in requirements)


def conda_sections() -> tuple[dict[str, str], list[str]]:
    """(conda dependencies name -> spec, pip section lines) from environment.yml."""
    conda: dict[str, str] = {}
    pip: list[str] = []
    for entry in load_environment()["dependencies"]:
        if isinstance(entry, dict):
            pip.extend(entry.get("pip", []))
        else:
            name, spec = split_requirement(entry)
            conda[name] = spec
    return conda, pip


def readme_quick_start_commands() -> list[str]:
    """The shell commands in the code blocks of README.md's "Quick start" section."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    in_code, level, commands = False, None, []
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
            continue
        heading = None if in_code else re.match(r"(#+)\s+(.*?)\s*$", line)
        if heading:
            if level is not None and len(heading.group(1)) <= level:
                break  # the next section
            if heading.group(2).lower() == "quick start":
                level = len(heading.group(1))
            continue
        if level is not None and in_code:
            command = re.sub(r"^\$\s*", "", line.split(" #", 1)[0].strip())
            if command and not command.startswith("#"):
                commands.append(command)
    assert level is not None, "README.md has no 'Quick start' section"
    return commands


# --------------------------------------------------------------------------- the readers themselves


def test_requirement_parsing():
    assert split_requirement("Torch >= 2.2") == ("torch", ">=2.2")
    assert split_requirement("scikit_learn>=1.2,<2") == ("scikit-learn", ">=1.2,<2")
    assert split_requirement("nbval[x]>=0.11 ; python_version>'3'") == ("nbval", ">=0.11")
    assert split_requirement("pip") == ("pip", "")


# --------------------------------------------------------------------------- the files agree


def test_environment_yml_has_the_same_dependencies_as_pyproject():
    conda, _ = conda_sections()
    conda.pop("python", None)
    conda.pop("pip", None)
    expected = {canonical(CONDA_NAMES.get(name, name)): spec for name, spec in pip_requirements().items()}
    missing = sorted(set(expected) - set(conda))
    extra = sorted(set(conda) - set(expected))
    assert not missing and not extra, (
        f"environment.yml and pyproject.toml (dependencies + dev extra) differ: missing from "
        f"environment.yml: {missing}; only in environment.yml: {extra} (name map: {CONDA_NAMES})"
    )
    different = {n: (expected[n], conda[n]) for n in expected if expected[n] != conda[n]}
    assert not different, f"version specifiers differ (pyproject, environment.yml): {different}"


def test_environment_yml_installs_python_pip_and_the_package():
    conda, pip = conda_sections()
    requires_python = load_pyproject()["project"]["requires-python"]
    assert conda.get("python") == requires_python.replace(" ", "")
    assert "pip" in conda
    assert pip == ["-e ."], "the pip section should install only the course package, editable"
    assert load_environment()["channels"] == ["conda-forge"]


def _constraints() -> dict[str, str]:
    pins = {}
    for raw in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!*-]+)", line)
        assert match, f"constraints.txt: {raw!r} is not an exact pin `name==version`"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def test_constraints_pin_only_dependencies():
    pins = _constraints()
    deps = pip_requirements()
    strays = sorted(set(pins) - set(deps))
    assert not strays, f"constraints.txt pins packages that are not dependencies in pyproject.toml: {strays}"
    assert "torch" in pins, "constraints.txt should pin the torch version the course is tested with"


def test_pinned_versions_satisfy_pyproject():
    specifiers = pytest.importorskip("packaging.specifiers")
    deps = pip_requirements()
    for name, version in _constraints().items():
        assert specifiers.SpecifierSet(deps[name]).contains(version, prereleases=True), (
            f"constraints.txt pins {name}=={version}, outside pyproject.toml's {name}{deps[name]}"
        )


def test_readme_quick_start_is_exactly_two_commands():
    assert readme_quick_start_commands() == ["python course.py lab", "python course.py test"]


def test_readme_syllabus_marks_the_lessons_that_exist():
    rows = re.findall(r"^\|\s*(\d\d)\s*\|.*\|\s*([\w ]+?)\s*\|\s*$", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert [n for n, _ in rows] == [f"{i:02d}" for i in range(12)], "README's syllabus should list lessons 00-11"
    for number, status in rows:
        exists = any((ROOT / "notebooks").glob(f"{number}_*.ipynb"))
        assert (status == "available") == exists, (
            f"README.md marks lesson {number} as {status!r}, but notebooks/{number}_*.ipynb "
            f"{'exists' if exists else 'does not exist'}: update the syllabus table"
        )


def test_ci_runs_the_readme_test_command():
    script = ROOT / ".ci" / "run"
    text = script.read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines()]
    assert lines[0] in ("#!/usr/bin/env bash", "#!/bin/bash"), ".ci/run must be a bash script"
    assert "set -euo pipefail" in lines
    if os.name != "nt":
        assert os.access(script, os.X_OK), ".ci/run must be executable (chmod +x .ci/run)"
    readme_test = shlex.split(next(c for c in readme_quick_start_commands() if c.endswith(" test")))
    calls = [shlex.split(ln) for ln in lines if ln and not ln.startswith("#") and "course.py" in ln]
    assert len(calls) == 1, f".ci/run should call course.py exactly once, found {calls}"
    (call,) = calls
    # README says `python`, CI may say `python3`: the same command with whichever Python is on PATH.
    assert call[0] in ("python", "python3") and call[1:] == readme_test[1:], (
        f".ci/run runs {' '.join(call)!r}, README's quick start says {' '.join(readme_test)!r}"
    )


# --------------------------------------------------------------------------- course.py


@pytest.fixture
def course(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fsl_course_bootstrap", ROOT / "course.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_course_py_runs_the_notebooks_the_way_conftest_expects(course):
    assert "--nbval-lax" in course.PYTEST_ARGS
    cfg = course.PYTEST_ARGS[course.PYTEST_ARGS.index("--nbval-sanitize-with") + 1]
    assert (ROOT / cfg).is_file()
    assert course.TEST_PATHS == ["tests", "notebooks", "solutions"]
    assert course.venv_python().name in ("python", "python.exe")


def test_course_py_reinstalls_when_dependencies_change(course, tmp_path, monkeypatch):
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    monkeypatch.setattr(course, "ROOT", tmp_path)
    before = course.install_hash()
    assert course.install_hash() == before  # stable: a second run skips pip
    with open(tmp_path / "constraints.txt", "a") as f:
        f.write("numpy==2.0.0\n")
    assert course.install_hash() != before


def test_course_py_tells_paths_from_options(course):
    assert course._test_paths_given(["tests/test_core.py::test_missing_checkpoint", "-x"])
    assert course._test_paths_given(["-q", "tests"])
    assert not course._test_paths_given(["-x", "-k", "tests", "--nb-budget", "standard"])
    assert not course._test_paths_given(["--deselect", "tests/test_core.py::test_doctor_json"])
    assert not course._test_paths_given(["no_such_file.py"])


def test_course_py_rejects_unknown_commands(course, capsys):
    with pytest.raises(SystemExit) as exit_info:
        course.main(["tset"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- nbval sanitizers


def _sanitize_patterns():
    plugin = pytest.importorskip("nbval.plugin")
    text = (ROOT / "tests" / "nbval_sanitize.cfg").read_text(encoding="utf-8")
    patterns = plugin.get_sanitize_patterns(text)
    # A `regex:` line without its `replace:` line right below is silently ignored by nbval.
    assert len(patterns) == len(re.findall(r"^regex: ", text, re.M)), "a regex in nbval_sanitize.cfg has no replace line"
    return patterns


def sanitize(text: str) -> str:
    for regex, replace in _sanitize_patterns():
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("tensor([0.5000, 0.2500], device='cuda:0')", "tensor([0.5000, 0.2500])"),
        ("tensor(0.1234, device='mps:0', grad_fn=<MeanBackward0>)", "tensor(0.1234, grad_fn=<MeanBackward0>)"),
        ("device(type='cuda', index=0)", "device(DEVICE)"),
        ("running on cuda:1", "running on DEVICE"),
        ("running on mps", "running on DEVICE"),
        ("running on cpu", "running on DEVICE"),
        ("<Model object at 0x7f3a2b1c9d60>", "<Model object at 0xADDRESS>"),
        ("trained in 12.3 s", "trained in TIME"),
        ("Wall time: 850 ms", "Wall time: TIME"),
        ("3 min to go", "TIME to go"),
        ("epoch 3:  40%|####      | 4/10 [00:01<00:02,  3.10it/s]", "PROGRESS"),
        ("100%|##########| 50/50 [00:04<00:00, 11.83it/s, loss=0.123]\ndone", "PROGRESS\ndone"),
        ("speed 45.2 it/s", "speed RATE"),
        ("loss 0.123456789", "loss 0.1234"),
        ("kl 0.000123456", "kl 0.0001234"),
        ("log p(x) = -87.654321", "log p(x) = -87.65"),
        ("sum 123.456789", "sum 123.4"),
        ("eps 1.2345678e-05", "eps 1.234e-05"),
    ],
)
def test_sanitizer_rules(raw, clean):
    assert sanitize(raw) == clean


@pytest.mark.parametrize(
    "text",
    [
        "OK: the ELBO is below log p(x) for all 1000 samples",
        "5-way 1-shot accuracy 0.52",
        "4 cpus, 5 shots, 20 samples",
        "torch 2.13.0, numpy 1.26.4",
        "tensor([0.5000, 0.2500])",
        "seed 0, 600 episodes",
    ],
)
def test_sanitizers_leave_verdicts_alone(text):
    assert sanitize(text) == text


def test_sanitizers_keep_real_differences():
    assert sanitize("max error 0.0012 < 1e-3: FAIL") != sanitize("max error 0.0008 < 1e-3: OK")
    assert sanitize("5-way 1-shot") != sanitize("5-way 5-shot")
    assert sanitize("loss 0.1234") != sanitize("loss 0.1244")


# --------------------------------------------------------------------------- notebook rules, end to end


def _load_conftest():
    spec = importlib.util.spec_from_file_location("fsl_course_conftest_copy", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_time_limit_applies_only_to_smoke():
    limit = _load_conftest().notebook_time_limit
    assert limit("smoke", None) == 60
    assert limit("standard", None) is None and limit("full", None) is None
    assert limit("standard", 300) == 300  # an explicit --nb-time-limit applies at any budget
    assert limit("smoke", 0) is None  # 0 turns it off


def _notebook(path: Path, cells: list[tuple[str, str | None]]) -> None:
    """Write a notebook whose cells have (source, committed stdout or None)."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    for count, (source, stdout) in enumerate(cells, start=1):
        outputs = [] if stdout is None else [nbformat.v4.new_output("stream", name="stdout", text=stdout)]
        nb.cells.append(nbformat.v4.new_code_cell(source, outputs=outputs, execution_count=count))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _run_pytest(where: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FSL_COURSE_BUDGET="standard")  # conftest must override this to smoke
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--nbval-lax", *args],
        cwd=where, env=env, capture_output=True, text=True, timeout=300,
    )


def test_notebook_rules_end_to_end(tmp_path):
    """Kernels inherit the smoke budget, check cells are compared after sanitizing, and a
    notebook over its time limit fails with its name and time."""
    pytest.importorskip("nbval")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "nbval_sanitize.cfg").write_text((ROOT / "tests" / "nbval_sanitize.cfg").read_text())
    _notebook(tmp_path / "budget.ipynb", [
        ("# NBVAL_CHECK_OUTPUT\nimport os\nprint(os.environ['FSL_COURSE_BUDGET'])", "smoke\n"),
    ])
    _notebook(tmp_path / "rules.ipynb", [
        # committed on a GPU at the standard budget; rerun on this machine: equal after sanitizing
        ("# NBVAL_CHECK_OUTPUT\nprint(\"ran on cpu at 0x55d0c0ffee00 in 0.4 s: tensor([0.1235]) loss 0.12345432\")",
         "ran on cuda:0 at 0x7f3a2b1c9d60 in 12.3 s: tensor([0.1235], device='cuda:0') loss 0.123456789\n"),
        # a real difference in a check cell still fails
        ("# NBVAL_CHECK_OUTPUT\nprint('verdict: WRONG')", "verdict: OK\n"),
        # unchecked cells only have to run
        ("print('anything')", "something else\n"),
        ("import time\ntime.sleep(4.5)", None),
    ])
    out = _run_pytest(tmp_path, "--nb-time-limit", "4", "budget.ipynb", "rules.ipynb")
    log = out.stdout + out.stderr
    assert re.search(r"budget\W+ipynb::Cell 0 PASSED", log), log  # the kernel saw FSL_COURSE_BUDGET=smoke
    assert re.search(r"rules\W+ipynb::Cell 1 FAILED", log), log  # verdict: WRONG vs OK
    assert re.search(r"rules\W+ipynb::Cell 2 PASSED", log), log
    details = log.split("short test summary info")[0]  # the summary repeats messages (in full when CI=true)
    assert details.count("over the limit of 4 s per notebook") == 1, log  # reported once, not per later cell
    assert re.search(r"notebook \S*rules\.ipynb has taken \d+\.\d s at the smoke budget", log), log
    assert "notebook run times (budget smoke, limit 4 s each)" in log
    assert out.returncode == 1
    # The sanitized cell passes unless the (loaded) machine crossed the limit on it already.
    assert re.search(r"rules\W+ipynb::Cell 0 PASSED", log) or (re.search(r"rules\W+ipynb::Cell 0 FAILED", log) and "has taken" in log)

    # --nb-budget reaches the kernels too (and lifts the smoke time limit).
    _notebook(tmp_path / "budget.ipynb", [
        ("# NBVAL_CHECK_OUTPUT\nimport os\nprint(os.environ['FSL_COURSE_BUDGET'])", "full\n"),
    ])
    out = _run_pytest(tmp_path, "--nb-budget", "full", "budget.ipynb")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "notebook run times (budget full, no time limit)" in out.stdout
