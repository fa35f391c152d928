"""fsl_course.sandbox on its own: what a command inside can and cannot do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsl_course import sandbox

INSIDE = r'''
import ctypes, errno, json, os, socket, sys
writable, hidden_dir, hidden_file, outside = sys.argv[1:5]
seen = {"pid": os.getpid(), "processes": sorted(p for p in os.listdir("/proc") if p.isdigit()),
        "hidden_dir": os.listdir(hidden_dir), "hidden_file": open(hidden_file).read()}
for name, path in (("inside", os.path.join(writable, "ok")), ("outside", outside)):
    try:
        open(path, "w").write("x")
        seen[name] = "written"
    except OSError as err:
        seen[name] = errno.errorcode[err.errno]
libc = ctypes.CDLL(None, use_errno=True)
seen["umount"] = libc.umount2(hidden_dir.encode(), 2) == 0
seen["remount_rw"] = libc.mount(None, b"/", None, 32 | 4096, None) == 0
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    seen["network"] = "connected"
except OSError as err:
    seen["network"] = errno.errorcode.get(err.errno, str(err))
print(json.dumps(seen))
'''


def run_inside(tmp_path: Path, config: dict) -> subprocess.CompletedProcess:
    secret_dir, secret_file = tmp_path / "solutions", tmp_path / "key.txt"
    secret_dir.mkdir()
    (secret_dir / "hidden.ipynb").write_text("HIDDEN TESTS")
    secret_file.write_text("secret")
    writable = tmp_path / "scratch"
    writable.mkdir()
    if config.get("sandbox"):
        config["sandbox"] = {"writable": str(writable), "hide": [str(secret_dir), str(secret_file)]}
    config["status"] = str(writable / "status")
    command = [sys.executable, "-c", INSIDE, str(writable), str(secret_dir), str(secret_file), str(tmp_path / "out.txt")]
    return subprocess.run([sys.executable, "-m", "fsl_course.sandbox", json.dumps(config), *command],
                          capture_output=True, text=True, timeout=60)


def test_inside_the_sandbox(tmp_path, sandboxed):
    done = run_inside(tmp_path, {"sandbox": True})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (tmp_path / "scratch" / "status").read_text() == "sandboxed"
    assert seen["hidden_dir"] == [] and seen["hidden_file"] == ""
    assert seen["inside"] == "written" and seen["outside"] == "EROFS" and not (tmp_path / "out.txt").exists()
    assert seen["pid"] == 1 and seen["processes"] == ["1"]
    assert not seen["umount"] and not seen["remount_rw"]
    assert seen["network"] in ("ENETUNREACH", "ECONNREFUSED", "EHOSTUNREACH")  # no interface is up
    assert (tmp_path / "solutions" / "hidden.ipynb").read_text() == "HIDDEN TESTS"  # untouched outside


def test_without_the_sandbox_only_the_limits_apply(tmp_path):
    done = run_inside(tmp_path, {"limits": {"RLIMIT_CORE": 0}, "sandbox": None})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (tmp_path / "scratch" / "status").read_text() == "unsandboxed: not requested"
    assert seen["hidden_file"] == "secret" and seen["outside"] == "written"


def test_exit_status_is_passed_on(tmp_path, sandboxed):
    config = {"sandbox": {"writable": str(tmp_path), "hide": []}}
    done = subprocess.run([sys.executable, "-m", "fsl_course.sandbox", json.dumps(config), sys.executable, "-c",
                           "import sys; sys.exit(7)"], timeout=60)
    assert done.returncode == 7


def test_mount_points_parse_this_process():
    if not Path("/proc/self/mountinfo").exists():
        pytest.skip("no /proc/self/mountinfo")
    points = dict(sandbox.mount_points())
    assert "/" in points and all(isinstance(flags, int) for flags in points.values())
