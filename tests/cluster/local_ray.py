"""A real Ray cluster on this machine, for the `ray job submit` tests: `ray start` head and
worker nodes, the dashboard's job server, all reached on 127.0.0.1.

The cluster lives in Linux namespaces of its own (`unshare`): a network namespace with only
a loopback interface, so every Ray process advertises and connects to 127.0.0.1 (on the
host's network Ray picks the machine's outward address) and no port can collide with another
Ray instance on the machine; and a PID namespace, so that tearing it down is one kill: when
the namespace's first process dies the kernel ends every process in it. `ray stop` is never
used: it stops every Ray process of the user, other tests' clusters included. A user
namespace makes this work without root where the kernel allows unprivileged namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8265"
GCS_ADDRESS = "127.0.0.1:6379"
# Ray's object store is shared memory (/dev/shm, the host's); the jobs here need little.
OBJECT_STORE_BYTES = 200 * 2**20
_PR_SET_PDEATHSIG = 1


class LoopbackCluster:
    """Ray nodes started with the `ray` CLI inside the namespaces held by `holder`."""

    def __init__(self, holder: subprocess.Popen, init_pid: int, temp_dir: Path, env: dict):
        self.holder = holder
        self.init_pid = init_pid
        self.temp_dir = temp_dir
        self.env = env
        self.logs = temp_dir / "cli"
        self.logs.mkdir()
        self._background: list[subprocess.Popen] = []

    def command(self, args: list[str]) -> list[str]:
        """`args` as run inside the cluster's namespaces."""
        return [
            "nsenter",
            f"--target={self.init_pid}",
            "--user",
            "--net",
            "--pid",
            "--mount",
            "--preserve-credentials",
            f"--wd={REPO}",
            "--",
            *args,
        ]

    def run(self, args: list[str], timeout: float, check: bool = True) -> str:
        """Runs a command in the cluster's namespaces, from the repository root; returns its
        output (stdout and stderr), which also goes to a log file under the temp dir."""
        name = f"{len(list(self.logs.iterdir())):02d}-{'-'.join(args[:2])}.log".replace("/", "_")
        try:
            done = subprocess.run(
                self.command(args),
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            output = error.output.decode() if isinstance(error.output, bytes) else error.output
            raise AssertionError(
                f"{' '.join(args)} did not finish in {timeout:.0f} s; its output:\n{output}"
            ) from None
        (self.logs / name).write_text(done.stdout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited with {done.returncode}; its output:\n"
                f"{done.stdout[-6000:]}"
            )
        return done.stdout

    def start_background(self, args: list[str], log_name: str) -> None:
        """Starts a long-running process in the namespaces; it ends with the cluster."""
        with open(self.logs / log_name, "wb") as log:
            self._background.append(
                subprocess.Popen(self.command(args), env=self.env, stdout=log, stderr=log)
            )

    def start_head(self, num_cpus: int) -> None:
        self.run(
            [
                "ray",
                "start",
                "--head",
                f"--port={GCS_ADDRESS.split(':')[1]}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={DASHBOARD.rsplit(':', 1)[1]}",
                f"--num-cpus={num_cpus}",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                f"--temp-dir={self.temp_dir / 'ray'}",
                "--disable-usage-stats",
            ],
            timeout=120,
        )

    def add_node(self, num_cpus: int) -> None:
        """Another Ray node, as `ray up` starts one on a worker machine."""
        self.run(
            [
                "ray",
                "start",
                f"--address={GCS_ADDRESS}",
                f"--num-cpus={num_cpus}",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                "--disable-usage-stats",
            ],
            timeout=120,
        )

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list <kind>` (nodes, actors, jobs, ...) as records, finished ones included."""
        args = ["ray", "list", kind, "--address", DASHBOARD, "--detail", "--format", "json"]
        for item in filters:
            args += ["--filter", item]
        output = self.run([*args, "--limit", "1000"], timeout=60)
        # The CLI may print a warning line before the JSON array.
        return json.loads(output[output.index("[") :])

    def close(self) -> None:
        for process in self._background:
            process.kill()
        # SIGKILL, not SIGTERM: `unshare --kill-child` then kills the namespace's first
        # process, and with it, everything in the PID namespace.
        self.holder.kill()
        self.holder.wait(timeout=30)
        for process in self._background:
            process.wait(timeout=30)


def _die_with_parent() -> None:
    # If pytest itself is killed, the holder (and so the whole cluster) goes with it.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _require_job_server() -> None:
    """`ray job submit` talks to the dashboard's job server, which only `ray[default]` has."""
    missing = [name for name in ("aiohttp", "aiohttp_cors") if not find_spec(name)]
    if missing:
        pytest.fail(
            f"Ray's dashboard and job server need ray[default] (missing: {missing}); "
            "install it: pip install 'ray[default]'"
        )


def _namespaces_available() -> str | None:
    """None if this machine can make the namespaces, else why not."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` (util-linux / iproute2) is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create user/network/PID namespaces here: {probe.stderr.strip()}"
    return None


def _wait_for_init(holder: subprocess.Popen, timeout: float = 30) -> int:
    """The PID (on the host) of the namespace's first process, once it is up and the loopback
    interface with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            raise RuntimeError(
                f"unshare exited with {holder.returncode} before the cluster started"
            )
        children = psutil.Process(holder.pid).children()
        # `sh` execs `sleep` once `ip link set lo up` has succeeded.
        if children and children[0].name() == "sleep":
            return children[0].pid
        time.sleep(0.1)
    raise RuntimeError(f"the namespace's first process did not start in {timeout} s")


@contextlib.contextmanager
def loopback_cluster(
    keep_logs: Path, extra_env: dict[str, str] | None = None
) -> Iterator[LoopbackCluster]:
    """A new, empty set of namespaces; start nodes with `start_head` and `add_node`. At the
    end, the commands' output and Ray's logs are copied to `keep_logs` (a test's tmp_path)."""
    _require_job_server()
    reason = _namespaces_available()
    if reason is not None:
        pytest.skip(f"the local Ray cluster tests need Linux namespaces: {reason}")
    # Short: Ray's Unix socket paths under it must stay within 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ulm-ray-", dir="/tmp"))
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_", "AWS_")) and key != "PYTHONPATH"
    }
    env.update(
        {
            # `ray`, and the `python` of job entrypoints, are this virtual environment's.
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            # Token authentication as Ray >= 2.5x sets it up for new clusters, with a token of
            # this cluster's own (a ~/.ray/auth_token left by other runs plays no part).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            **(extra_env or {}),
        }
    )
    holder = subprocess.Popen(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "sh",
            "-c",
            "ip link set lo up && exec sleep infinity",
        ],
        preexec_fn=_die_with_parent,
    )
    cluster = None
    try:
        cluster = LoopbackCluster(holder, _wait_for_init(holder), temp_dir, env)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        else:
            holder.kill()
            holder.wait(timeout=30)
        for source, name in (
            (temp_dir / "cli", "cli"),
            (temp_dir / "ray/session_latest/logs", "ray"),
        ):
            if source.is_dir():
                shutil.copytree(source, keep_logs / name, dirs_exist_ok=True, symlinks=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
