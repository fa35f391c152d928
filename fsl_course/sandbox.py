"""Run one command in a sandbox: resource limits, and on Linux private namespaces.

``python -m fsl_course.sandbox CONFIG_JSON COMMAND...`` applies ``CONFIG_JSON`` and then
``exec``s ``COMMAND``. The grader starts each kernel this way (see :mod:`fsl_course.grading`).
The config is ``{"limits": {...}, "sandbox": {...} | null, "status": PATH}``:

* ``limits``: ``{"RLIMIT_AS": bytes, ...}``, set with ``resource.setrlimit`` (any platform
  with the ``resource`` module).
* ``sandbox`` (Linux, where unprivileged user namespaces are allowed), with keys
  ``writable`` (one folder), ``hide`` (paths) and ``shm_mb``:

  1. new *user*, *mount*, *network* and *PID* namespaces (``unshare(2)``), the caller's uid
     and gid mapped to themselves, so files keep their owners and no privilege is gained;
  2. every ``hide`` path covered: a folder by an empty read-only ``tmpfs``, a file by
     ``/dev/null``;
  3. every mount remounted **read-only** except ``writable`` (bound onto itself first) and a
     fresh private ``tmpfs`` on ``/dev/shm``;
  4. a fork: the child is process 1 of the new PID namespace and mounts a fresh ``/proc``,
     so no process outside the sandbox is visible (``/proc/PID/root`` of the grader would
     otherwise lead around the hidden paths);
  5. one more user and mount namespace, nested, which *locks* those mounts: code inside
     cannot unmount the covers or remount anything writable;
  6. ``exec COMMAND``. The network namespace has no interfaces up, so there is no network;
     a kernel still talks to the grader over Unix sockets in the writable folder.

  The parent (outside the PID namespace) waits and exits with the child's status.
* ``status``: a file the launcher writes *before* the command runs: ``"sandboxed"``, or
  ``"unsandboxed: <why>"`` where namespaces are not available (macOS, a kernel or container
  that forbids unprivileged user namespaces). The caller decides what to do about it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from pathlib import Path

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
# per-mount options that a less privileged namespace must keep when it remounts (mount(2), EPERM)
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
              "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _call(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _enter_user_namespace(libc, flags: int, uid: int, gid: int) -> None:
    """``unshare(CLONE_NEWUSER | flags)`` with uid -> uid and gid -> gid mapped."""
    _call(libc.unshare(CLONE_NEWUSER | flags), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")


def _mount(libc, source, target, fstype, flags, data=None, what="mount") -> None:
    encode = lambda s: None if s is None else str(s).encode()  # noqa: E731
    _call(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"{what} {target}")


def mount_points() -> list[tuple[str, int]]:
    """``(mount point, flags to keep)`` for every mount of this process, from ``/proc/self/mountinfo``."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # "\040" is a space
        kept = sum(KEPT_FLAGS.get(option, 0) for option in fields[5].split(","))
        points.append((point, kept))
    return points


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def enter(writable: str, hide: list[str], shm_mb: int = 64) -> None:
    """Steps 1-5 of the module docstring; returns in the sandboxed child (the parent never returns)."""
    libc, uid, gid = _libc(), os.getuid(), os.getgid()
    writable = os.path.realpath(writable)
    _enter_user_namespace(libc, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID, uid, gid)
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE, what="make private")
    _mount(libc, writable, writable, None, MS_BIND | MS_REC, what="bind")
    for path in map(os.path.realpath, hide):
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0555",
                   what="hide")
        elif os.path.exists(path):
            _mount(libc, "/dev/null", path, None, MS_BIND, what="hide")
    if os.path.isdir("/dev/shm"):
        _mount(libc, "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={shm_mb}m,mode=1777", what="shm")
    for point, kept in mount_points():
        if _inside(point, writable) or point in ("/dev/shm", "/proc") or _inside(point, "/proc/"):
            continue
        try:
            _mount(libc, None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, what="read-only")
        except OSError:
            if not os.path.exists(point):  # covered by a hide mount or gone: unreachable anyway
                continue
            raise
    child = os.fork()
    if child:  # the launcher: wait outside the PID namespace and pass the exit status on
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt is meant for the kernel only
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status) % 256)
    _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, what="proc")
    _enter_user_namespace(libc, CLONE_NEWNS, uid, gid)  # locks the mounts made above


def probe() -> str:
    """Start ``true`` in the sandbox and return its status line (``"sandboxed"`` or why not)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsl-course-sandbox-") as folder:
        status = Path(folder) / "status"
        config = {"sandbox": {"writable": folder, "hide": []}, "status": str(status)}
        true = [sys.executable, "-c", "pass"]
        subprocess.run([sys.executable, "-m", "fsl_course.sandbox", json.dumps(config), *true],
                       check=False, timeout=60, capture_output=True)
        return status.read_text() if status.is_file() else "unsandboxed: the launcher wrote no status"


def main(argv: list[str]) -> None:
    config, command = json.loads(argv[0]), argv[1:]
    if not command:
        raise SystemExit("usage: python -m fsl_course.sandbox CONFIG_JSON COMMAND...")
    for name, value in config.get("limits", {}).items():
        resource.setrlimit(getattr(resource, name), (value, value))
    status = "unsandboxed: not requested"
    if config.get("sandbox"):
        if not sys.platform.startswith("linux"):
            status = f"unsandboxed: namespaces need Linux, this is {sys.platform}"
        else:
            try:
                enter(**config["sandbox"])
                status = "sandboxed"
            except OSError as err:  # before the fork: nothing was changed outside this process
                status = f"unsandboxed: {err.strerror or err}"
    if config.get("status"):
        Path(config["status"]).write_text(status)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
