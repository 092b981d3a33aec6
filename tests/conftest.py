"""Shared fixtures: an isolated Metaflow datastore, one small flow run per
session, and a real inference server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOW_FILE = REPO / "flows" / "income_flow.py"

# Every test session gets its own datastore, metadata and local endpoints, set
# before anything imports metaflow (its configuration is read at import).
_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="tabmodel-tests-"))
os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = str(_SESSION_ROOT)
os.environ["TABMODEL_HOME"] = str(_SESSION_ROOT / "home")
# Metaflow ignores the user name root, as CI and containers often have.
os.environ.setdefault("METAFLOW_USER", "tester")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

# Settings of the session's small flow run: quick, on the real data.
SMALL_RUN = {"sample_rows": 4000, "workers": 2, "trials": 4, "max_epochs": 2}


def require_service(name: str, available: bool, reason: str) -> None:
    """Skip a test whose service is missing, or fail it when running in CI."""
    if available:
        return
    message = f"{name} is not available: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must provide it)")
    pytest.skip(message)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def session_root() -> Path:
    """The directory that contains this session's datastore and endpoints."""
    return _SESSION_ROOT


@pytest.fixture(scope="session")
def small_run():
    """Run the flow once on a 4,000-row sample and return the finished Run."""
    from metaflow import Runner

    with Runner(str(FLOW_FILE), show_output=False, cwd=str(_SESSION_ROOT)) as runner:
        result = runner.run(**SMALL_RUN)
        if result.status != "successful":
            pytest.fail(
                f"flow run failed ({result.status}):\n{result.stdout[-4000:]}\n"
                f"{result.stderr[-4000:]}"
            )
        return result.run


class ServerProcess:
    """A `python -m serving` process on a free port of 127.0.0.1."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(
            prefix="server-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", str(self.port), *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ping_status(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.output()}")
            if self.ping_status() == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="session")
def deployed_server(small_run):
    """A server process serving the small run's locally deployed model."""
    server = ServerProcess()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def post(url: str, body: bytes, content_type: str, accept: str | None = None):
    """POST `body` and return (status, headers, body bytes), errors included."""
    headers = {"Content-Type": content_type}
    if accept:
        headers["Accept"] = accept
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
