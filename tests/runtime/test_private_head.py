"""The local Ray head that `gptoss-ray serve` starts lives and dies as one: ended under it
(what `ray stop` does to its GCS and raylet), nothing of it stays; a record whose pid now
belongs to another process is not taken for it; the next start is clean."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from gptoss_ray.cluster.runtime import ray_instance
from gptoss_ray.cluster.runtime.head_supervisor import _running, descendants


def names(pids: list[int]) -> dict[int, str]:
    """The command lines of those of `pids` that still run (a zombie waits for its parent
    to reap it: it runs no more)."""
    out = {}
    for pid in filter(_running, pids):
        with contextlib.suppress(OSError):  # gone meanwhile
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return out


def gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not names(pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_the_head_ends_whole_when_its_gcs_and_raylet_are_killed_and_starts_again():
    head = ray_instance.start_head(num_cpus=1)
    pids: list[int] = []
    try:
        pids = [head["pid"], *descendants(head["pid"])]
        procs = names(pids)
        assert any("gcs_server" in cmd for cmd in procs.values()), procs
        # What `ray stop` does, to this instance alone: SIGTERM to the processes its list
        # names (raylet first, GCS last), not to `ray start --block`, which takes exits by
        # SIGTERM as graceful and would block on for ever, nor to the reaper
        from ray.autoscaler._private.constants import RAY_PROCESSES

        stopped = []
        for keyword, by_name in RAY_PROCESSES:
            for pid, cmd in names(pids).items():
                with contextlib.suppress(OSError):  # gone meanwhile
                    comm = Path(f"/proc/{pid}/comm").read_text().strip() if by_name else ""
                    if pid != head["pid"] and keyword in (comm if by_name else cmd):
                        os.kill(pid, signal.SIGTERM)
                        stopped.append(pid)
        gone(stopped, 16)  # `ray stop`'s grace period, then SIGKILL to what is left
        for pid in names(stopped):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert gone(pids, 15), names(pids)  # the supervisor, `ray start` and every helper
        assert ray_instance.running_head() is None  # its record is dropped as stale

        again = ray_instance.start_head(num_cpus=1)
        pids = [again["pid"], *descendants(again["pid"])]
        assert ray_instance.running_head() == again
        assert ray_instance.stop_head() == again
        assert gone(pids, 15), names(pids)
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_record_whose_pid_another_process_holds_is_stale():
    path = ray_instance._head_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "token": "f00d", "address": "x:1", "log": "l"}
    path.write_text(json.dumps(record))
    assert ray_instance.running_head() is None  # this process lives, but it is not ours
    assert not path.exists()
