"""Which Ray instance a command runs on.

- An engine of its own (`Engine.start()`, `gptoss-ray demo`, `generate --shards`, `bench`)
  without an address gets a private local Ray instance, sized for its shards and ended
  with it, even when another Ray runs on this machine: that one is left alone. A running
  instance is only joined when asked: an address ('auto': the one `ray start` or `ray up`
  made on this machine; 'host:port'; 'ray://...') or RAY_ADDRESS, which `ray job submit`
  sets for its entrypoints. Joining by default would put CPU shards into an instance
  whose logical CPUs may be taken (by a served engine, say), where the engine would wait
  for placement instead of running.
- `gptoss-ray serve` needs an instance that outlives it, so it joins the one on this
  machine, or starts a local head (`ray start --head --block` under our supervisor in the
  background, `head_supervisor`; its pid and a token recorded under the cache folder). `gptoss-ray stop --ray` ends that head alone: `ray
  stop` would end every Ray instance on the machine, private ones included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray

NAMESPACE = "gptoss-ray"
OBJECT_STORE_BYTES = 256 * 2**20
HEAD_START_TIMEOUT_S = 120


class EngineNotFound(RuntimeError):
    """No Ray instance (or no engine) where one was asked for."""


def _init(address: str | None, **kwargs: Any) -> None:
    ray.init(
        address=address,
        namespace=NAMESPACE,
        log_to_driver=False,
        configure_logging=False,
        **kwargs,
    )


def connect(address: str | None = "auto") -> None:
    """Joins a running Ray instance: `address`, else RAY_ADDRESS, else ('auto') the one
    that `ray start` (or `serve`) registered on this machine. Raises EngineNotFound at
    once where there is none, or where the address no longer answers (Ray would wait for
    it for minutes)."""
    if ray.is_initialized():
        return
    address = address or "auto"
    target = _resolve(address)
    if target is None:
        raise EngineNotFound(
            "no Ray instance was started on this machine with `ray start` or `gptoss-ray "
            "serve` (an engine's private instance is not joined); start one with "
            "`gptoss-ray serve`, or give an address"
        )
    if target and not target.startswith("ray://") and not _answers(target):
        raise EngineNotFound(
            f"no Ray instance answers at {target} (asked for {address!r}); start one with "
            f"`gptoss-ray serve`, or `ray start --head`"
        )
    try:
        # 'auto' goes to Ray as 'auto': only an instance it finds on this machine itself
        # gets the local token (token authentication, Ray's default); where a registered
        # instance answers, Ray's own search finds that one
        _init(address)
    except ConnectionError as exc:
        hint = ""
        if address != "auto" and not os.environ.get("RAY_AUTH_MODE"):
            hint = (
                "; Ray sends its token only to an instance it finds itself: with an "
                "explicit address, set RAY_AUTH_MODE=token (Ray's default for new clusters)"
            )
        raise EngineNotFound(
            f"no Ray cluster at {address!r} ({exc}){hint}; start one with `gptoss-ray serve`"
        ) from None


def init_for_engine(address: str | None, num_cpus: int) -> bool:
    """Connects this process to Ray for an engine of its own (see the module's rules).
    True when it started a private instance, which the caller shuts down with the
    engine."""
    if ray.is_initialized():
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        start_private(num_cpus)
        return True
    connect(address)
    return False


def start_private(num_cpus: int) -> None:
    """A local Ray instance for this process alone (Ray's address 'local': a new one even
    where another runs), gone when this process calls ray.shutdown() or exits."""
    _init(
        "local",
        num_cpus=max(os.cpu_count() or 1, num_cpus),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
    )


def _resolve(address: str) -> str | None:
    """host:port that `address` stands for; for 'auto', only an instance registered by
    `ray start` (Ray's own search would also take any instance it sees running, such as
    another engine's private one, gone when that engine ends); None where there is none,
    '' where Ray's internals moved and ray.init must decide alone."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.services import canonicalize_bootstrap_address, find_bootstrap_address

        registered = find_bootstrap_address(None)
        return canonicalize_bootstrap_address(registered) if registered else None
    except (ImportError, AttributeError):
        return ""


def _answers(host_port: str, timeout: float = 2.0) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


# -- the local head that `serve` starts -----------------------------------------------
def _head_file() -> Path:
    from gptoss_ray.model.model_folder import cache_dir

    return cache_dir() / "local-ray.json"


def ensure_cluster(address: str | None, num_cpus: int) -> None:
    """For `serve`: joins `address` (or RAY_ADDRESS), or else the instance on this
    machine; where there is none, starts a local head that outlives this process and
    joins it."""
    if address is not None or os.environ.get("RAY_ADDRESS"):
        connect(address)
        return
    with contextlib.suppress(EngineNotFound):
        connect("auto")
        return
    head = start_head(num_cpus)
    print(
        f"started a local Ray instance at {head['address']} (pid {head['pid']}); "
        "`gptoss-ray stop --ray` ends it",
        file=sys.stderr,
    )
    connect("auto")  # `ray start` registered it: 'auto' finds it


# What the head that `serve` starts leaves out, each waking its process all the time for
# nothing an engine uses (idle CPU of the whole served stack, RESULTS.md 2026-12-05
# "idle served stack"): the dashboard UI, usage stats and the log monitor (which streams
# workers' output to drivers; the serving processes' logs stay in the session's logs
# folder). Kept: the dashboard's API server and agent (`ray job submit`, `ray list`,
# `serve status`), the autoscaler monitor (`ray status`) and the Ray Client server
# (`ray start` has no way to leave it out).
PLAIN_HEAD_FLAGS = ("--include-dashboard=false", "--disable-usage-stats")
LEAN_HEAD_FLAGS = (*PLAIN_HEAD_FLAGS, "--include-log-monitor=false")
# Serve's controller runs its loop 10 times a second and the proxy and replicas export
# their metrics as often: once a second is enough for an engine's front (our /metrics
# are its own), and deploying or replacing a replica is noticed within that second.
LEAN_HEAD_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def start_head(num_cpus: int, lean: bool = True) -> dict[str, Any]:
    """A local Ray head that outlives this process: `ray start --head --block` under our
    supervisor (`head_supervisor`), in a session of its own, which ends the instance, all
    of it and nothing else, on SIGTERM, and ends itself when the instance is ended under
    it (`ray stop`). Only what serving needs is started (`LEAN_HEAD_FLAGS`,
    `LEAN_HEAD_ENV`; lean=False: `PLAIN_HEAD_FLAGS` alone, which
    `gptoss-ray bench idle --served` compares with). Returns {"pid", "token", "address",
    "log"}."""
    port = _free_port()
    log = _head_file().with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    ray_start = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        *(LEAN_HEAD_FLAGS if lean else PLAIN_HEAD_FLAGS),
        f"--object-store-memory={OBJECT_STORE_BYTES}",
    ]
    supervisor = [sys.executable, "-m", "gptoss_ray.cluster.runtime.head_supervisor"]
    cmd = [*supervisor, "--token", token, "--port", str(port), "--", *ray_start]
    env = (LEAN_HEAD_ENV if lean else {}) | os.environ  # the user's settings win
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in this terminal must not end the instance
        )
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while not _started(log):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)  # it ends its own processes
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"`ray start --head` did not come up ({log}):\n{tail}")
        time.sleep(0.2)
    head = {"pid": proc.pid, "token": token, "address": f"{_node_ip()}:{port}", "log": str(log)}
    _head_file().write_text(json.dumps(head))
    return head


def running_head() -> dict[str, Any] | None:
    """The local head that `serve` started, if it still runs (a stale record is removed)."""
    path = _head_file()
    try:
        head = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if _is_head_process(head):
        return head
    path.unlink(missing_ok=True)
    return None


def stop_head(timeout: float = 60) -> dict[str, Any] | None:
    """Ends the local head that `serve` started (None when there is none)."""
    head = running_head()
    if head is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(head["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_head_process(head) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _is_head_process(head):
        raise RuntimeError(f"the local Ray instance (pid {head['pid']}) did not stop")
    _head_file().unlink(missing_ok=True)
    return head


def _is_head_process(head: dict[str, Any]) -> bool:
    """Our supervisor, alive: the process with the recorded pid carries the recorded token
    on its command line (a pid alone can be reused by any process)."""
    pid, token = head.get("pid"), head.get("token")
    if not isinstance(pid, int) or not isinstance(token, str):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): whether the pid lives is all we can tell
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    # a zombie (exited, not yet reaped by its parent) has an empty command line
    return token.encode() in cmdline and b"head_supervisor" in cmdline


def _free_port() -> int:
    # 6379, Ray's default, is tried first: clients that know no better look there
    for port in (6379, 0):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise AssertionError("unreachable: port 0 always binds")


def _started(log: Path) -> bool:
    """`ray start` says so once every process of the head is up. Its GCS port opens
    earlier, and a client that connects then fails (after 20 s); nor can the address
    file tell, since Ray leaves it untouched when the address is the same as before."""
    return b"Ray runtime started" in log.read_bytes()


def _node_ip() -> str:
    from ray.util import get_node_ip_address

    return get_node_ip_address()
