"""Holds the local Ray head that `gptoss-ray serve` starts, and ends with it.

    python -m gptoss_ray.cluster.runtime.head_supervisor --token T --port P -- ray start ...

It runs `ray start --head --block` as its child and stays until one of three things
happens, then leaves no process of that instance behind:
- SIGTERM or SIGINT (`gptoss-ray stop --ray`): the child is asked to stop, and whatever of
  the instance is left after STOP_GRACE_S is killed;
- the instance's raylet or GCS process ends (`ray stop`, which ends every raylet and GCS
  on the machine but leaves `ray start --block` behind: it takes exits by SIGTERM as
  graceful and blocks on for ever): the child and what is left of the instance are
  killed;
- the child ends: so does this process.
The token on its command line tells our supervisor apart from whatever process later
gets its pid (`ray_instance.running_head`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
STOP_GRACE_S = 20.0


def descendants(root: int) -> list[int]:
    """Every process under `root` (Linux /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _core(root: int) -> list[int]:
    """The instance's GCS server and raylet among root's descendants (until both run, [])."""
    found = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                program = f.read().split(b"\0")[0]
        except OSError:
            continue
        for name in (b"gcs_server", b"raylet"):
            if program.endswith(name):
                found[name] = pid
    return list(found.values()) if len(found) == 2 else []


def _running(pid: int) -> bool:
    """Alive and not a zombie (which waits to be reaped: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _become_subreaper() -> None:
    """Orphans of the instance (its processes, once `ray start` is gone) become our
    children, not init's: `descendants` still finds them, and we reap them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # not Linux: orphans go to init, as they would
        pass


def _signal_all(sig: int) -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # gone meanwhile
            os.kill(pid, sig)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def supervise(cmd: list[str]) -> int:
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _become_subreaper()
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    core: list[int] = []
    while child.poll() is None:
        if stopping:
            child.terminate()  # `ray start --block` ends its instance
            deadline = time.monotonic() + STOP_GRACE_S
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            break
        if not core:
            core = _core(child.pid)
        elif not all(_running(pid) for pid in core):  # ended under it (`ray stop`)
            break
        time.sleep(POLL_S)
    deadline = time.monotonic() + STOP_GRACE_S
    while descendants(os.getpid()) and time.monotonic() < deadline:
        _signal_all(signal.SIGKILL)  # what is left of the instance, `ray start` included
        time.sleep(0.1)
        _reap()
    child.wait()
    _reap()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", required=True, help="tells this process apart from others")
    parser.add_argument("--port", type=int, required=True, help="the head's GCS port (a label)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- ray start --head --block ...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return supervise(cmd)


if __name__ == "__main__":
    sys.exit(main())
