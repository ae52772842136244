"""A local S3-compatible server (moto's `moto_server`) for tests and benchmarks.

moto is a test dependency: this module only starts its executable, installed beside the
running Python, and never imports it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_s3_server(log_path: Path, timeout_s: float = 60) -> Iterator[str]:
    """Runs `moto_server` on 127.0.0.1 at a free port and yields its endpoint URL; the server
    is stopped on exit. Clients need credentials and a region (any values) in the environment."""
    with local_s3_server_process(log_path, timeout_s) as (endpoint, _):
        yield endpoint


@contextlib.contextmanager
def local_s3_server_process(
    log_path: Path, timeout_s: float = 60
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`local_s3_server`, yielding its process too, for tests that stop or kill it."""
    executable = Path(sys.executable).with_name("moto_server")
    if not executable.is_file():
        raise FileNotFoundError(
            f"{executable}: moto_server not found beside the running Python; install the test "
            "extras (pip install -e '.[test]')"
        )
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(executable), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(endpoint, server, log_path, timeout_s)
        yield endpoint, server
    finally:
        server.send_signal(signal.SIGCONT)  # a test may have left it stopped
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_up(
    endpoint: str, server: subprocess.Popen, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"moto_server exited with code {server.returncode} before answering; its log "
                f"({log_path}):\n{log_path.read_text()[-2000:]}"
            )
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(
        f"moto_server did not answer at {endpoint} within {timeout_s} s; see {log_path}"
    )
