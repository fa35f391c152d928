"""``fsl-course doctor``: what this machine will run the course with.

Prints the Python and library versions, the device ``fsl_course.device()`` picks (and what
CUDA and MPS report), the budget preset, the cache directory and its size, and which
datasets are ready. Paste its output into a bug report. ``--json`` gives the same as JSON.

Exit code 0 when everything needed is in place, 1 when it found a problem (each problem is
listed with what to do about it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

PACKAGES = (  # (label, import name)
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("matplotlib", "matplotlib"),
    ("PIL", "PIL"),
    ("einops", "einops"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return str(getattr(module, "__version__", "unknown"))


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:  # removed while walking
                pass
    return total


def _human(n_bytes: int) -> str:
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cuda_report(torch) -> dict[str, Any]:
    built = torch.version.cuda  # None for a CPU-only build
    report: dict[str, Any] = {"built_with": built, "available": False, "devices": []}
    if built is None:
        report["detail"] = "this torch build has no CUDA support"
        return report
    report["available"] = bool(torch.cuda.is_available())
    if report["available"]:
        report["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["detail"] = f"{len(report['devices'])} device(s): {', '.join(report['devices'])}"
    else:
        report["detail"] = f"built with CUDA {built}, but no usable GPU or driver was found"
    return report


def _mps_report(torch) -> dict[str, Any]:
    mps = getattr(torch.backends, "mps", None)
    built = bool(mps is not None and mps.is_built())
    available = bool(built and mps.is_available())
    if available:
        detail = "available (Apple GPU)"
    elif built:
        detail = "built, but not available on this machine"
    else:
        detail = "not built into this torch (only on macOS)"
    return {"built": built, "available": available, "detail": detail}


def collect() -> dict[str, Any]:
    """The report as a JSON-able dict, with a list of ``problems`` (empty when all is well)."""
    import torch

    import fsl_course
    from fsl_course import data

    # the module, not the function of the same name that fsl_course re-exports
    budget_mod = importlib.import_module("fsl_course.budgets")

    problems: list[str] = []
    report: dict[str, Any] = {
        "fsl_course": fsl_course.__version__,
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "packages": {label: _version(module) for label, module in PACKAGES},
    }
    for label, version in report["packages"].items():
        if version is None:
            problems.append(f"{label} is not installed: run `python course.py setup` (or pip install -e .)")

    forced = os.environ.get("FSL_COURSE_DEVICE") or None
    try:
        chosen = str(fsl_course.device())
    except ValueError as err:
        chosen = None
        problems.append(str(err))
    report["device"] = {
        "chosen": chosen,
        "override": forced,
        "cuda": _cuda_report(torch),
        "mps": _mps_report(torch),
        "torch_threads": torch.get_num_threads(),
    }

    env_budget = os.environ.get(budget_mod.ENV_VAR) or None
    try:
        chosen_budget = fsl_course.budget().name
    except ValueError as err:
        chosen_budget = None
        problems.append(str(err))
    report["budget"] = {"name": chosen_budget, "from_env": env_budget is not None, "env_value": env_budget}

    cache = fsl_course.cache_dir()
    report["cache"] = {
        "path": str(cache),
        "from_env": bool(os.environ.get("FSL_COURSE_CACHE")),
        "bytes": _dir_size(cache),
    }

    report["datasets"] = [dict(entry) for entry in data.status()]
    from fsl_course import sandbox

    report["grading_sandbox"] = sandbox.probe()  # not a problem when missing: grading still works, less isolated
    report["problems"] = problems
    return report


def format_report(report: dict[str, Any]) -> str:
    dev = report["device"]
    lines = [
        f"fsl-course {report['fsl_course']}",
        f"  Python      {report['python']['version']}  ({report['python']['executable']})",
        f"  Platform    {report['platform']}",
        "  Packages    " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in report["packages"].items()),
        "",
        f"Device        {dev['chosen'] or 'INVALID'}"
        + (f"  (forced by FSL_COURSE_DEVICE={dev['override']})" if dev["override"] else "  (fsl_course.device())"),
        f"  CUDA        {'yes' if dev['cuda']['available'] else 'no'}: {dev['cuda']['detail']}",
        f"  MPS         {'yes' if dev['mps']['available'] else 'no'}: {dev['mps']['detail']}",
        f"  CPU threads {dev['torch_threads']} (torch.get_num_threads())",
        "",
    ]
    b = report["budget"]
    if b["from_env"]:
        source = f"from FSL_COURSE_BUDGET={b['env_value']}"
    else:
        source = "default; set FSL_COURSE_BUDGET=smoke|standard|full to change it"
    lines.append(f"Budget        {b['name'] or 'INVALID'}  ({source})")
    c = report["cache"]
    lines.append(
        f"Cache         {c['path']}  ({_human(c['bytes'])}"
        + (", from FSL_COURSE_CACHE)" if c["from_env"] else "; set FSL_COURSE_CACHE to move it)")
    )
    lines.append(f"Grading       kernels {report['grading_sandbox']} (fsl_course.sandbox)")
    lines.append("")
    lines.append("Datasets")
    width = max([len(d["name"]) for d in report["datasets"]] + [8])
    for d in report["datasets"]:
        state = "available    " if d["available"] else "not available"
        lines.append(f"  {d['name']:<{width}}  {state}  {d['description']}")
        if d.get("detail"):
            lines.append(f"  {'':<{width}}  {'':<13}  {d['detail']}")
    lines.append("")
    if report["problems"]:
        lines.append("Problems")
        lines.extend(f"  - {p}" for p in report["problems"])
    else:
        lines.append("No problems found.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 1 if report["problems"] else 0
