"""Latency and throughput of the inference server against a naive baseline.

    .venv/bin/python bench/serving_latency.py [--model PACKAGE_DIR]

Both servers run as processes on 127.0.0.1 and score the same model package:

- server: `python -m serving --model PACKAGE` (one worker), which calls the
  package's SavedModel signature.
- baseline: http.server with a handler that parses the same CSV and calls the
  Keras model's `predict` per request, with no warm-up.

One keep-alive HTTP connection sends the requests one after another, and every
latency is measured end to end by the client: median and p99 for 1-row
requests, rows/s for 1,000-row requests. Without --model, a package with the
default configuration is trained for one epoch on 2,000 rows (scores do not
matter here, only model size).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROW = (
    b"39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, "
    b"Not-in-family, White, Male, 2174, 0, 40, United-States\n"
)
BATCH_ROWS = 1000
STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_package(directory: Path) -> Path:
    from tabmodel.data import load_adult
    from tabmodel.packaging import write_package
    from tabmodel.training import DEFAULT_PARAMS, train_model

    train = load_adult("bundled").train.sample(2000, seed=0)
    result = train_model(DEFAULT_PARAMS, train, epochs=1, seed=0)
    return write_package(result.model, directory, {"run": "bench/serving_latency"})


def run_baseline(port: int, package: str) -> None:
    """Serve /ping and /invocations with Keras `model.predict` per request."""
    import tensorflow as tf

    from serving.parsing import RequestError, parse_body
    from tabmodel.packaging import load_keras_model

    model = load_keras_model(package)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def do_GET(self):
            self._send(200, b"{}")

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                columns = parse_body(body, self.headers.get("Content-Type", ""))
            except RequestError as error:
                self._send(error.status, json.dumps(error.body).encode())
                return
            inputs = {
                name: tf.constant(values.reshape(-1, 1))
                for name, values in columns.items()
            }
            probabilities = model.predict(inputs, verbose=0).reshape(-1)
            predictions = [{"probability": float(p)} for p in probabilities]
            self._send(200, json.dumps({"predictions": predictions}).encode())

        def _send(self, status, payload):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def start(command: list[str], port: int, log_path: Path) -> subprocess.Popen:
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited:\n{log_path.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                connection.close()
                return process
            connection.close()
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise TimeoutError(f"{command} not ready after {STARTUP_TIMEOUT_S} s")


def measure(port: int, body: bytes, count: int) -> list[float]:
    """Send `body` `count` times over one connection; return seconds each."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "text/csv", "Accept": "application/json"}
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("POST", "/invocations", body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            latencies.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
    finally:
        connection.close()
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bench(name: str, port: int, one_row: int, batches: int) -> dict:
    measure(port, ROW, 20)  # warm the connection and the model
    latencies = measure(port, ROW, one_row)
    batch_latencies = measure(port, ROW * BATCH_ROWS, batches)
    result = {
        "name": name,
        "median_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "rows_per_s": BATCH_ROWS * batches / sum(batch_latencies),
        "one_row_requests": one_row,
        "batch_requests": batches,
    }
    print(
        f"{name:9s} 1-row median {result['median_ms']:7.2f} ms  "
        f"p99 {result['p99_ms']:7.2f} ms  ({one_row} requests)   "
        f"1,000-row batches {result['rows_per_s']:9.0f} rows/s ({batches} requests)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="unpacked model package (default: train one)")
    parser.add_argument("--requests", type=int, default=2000, help="1-row requests")
    parser.add_argument(
        "--baseline-requests", type=int, default=200, help="1-row baseline requests"
    )
    parser.add_argument("--batches", type=int, default=50, help="1,000-row requests")
    parser.add_argument("--baseline-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline(int(args.baseline_server[0]), args.baseline_server[1])
        return

    work = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    package = Path(args.model) if args.model else build_package(work / "package")
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"package {package}",
        flush=True,
    )
    server_port, baseline_port = free_port(), free_port()
    python = sys.executable
    server = start(
        [python, "-m", "serving", "--model", str(package), "--port", str(server_port)],
        server_port,
        work / "server.log",
    )
    try:
        ours = bench("server", server_port, args.requests, args.batches)
    finally:
        server.terminate()
        server.wait(timeout=30)
    baseline = start(
        [python, __file__, "--baseline-server", str(baseline_port), str(package)],
        baseline_port,
        work / "baseline.log",
    )
    try:
        naive = bench(
            "baseline", baseline_port, args.baseline_requests, max(5, args.batches // 5)
        )
    finally:
        baseline.terminate()
        baseline.wait(timeout=30)
    speedup = naive["median_ms"] / ours["median_ms"]
    print(
        f"server vs baseline: 1-row median {speedup:.1f}x faster, "
        f"p99 {naive['p99_ms'] / ours['p99_ms']:.1f}x faster, "
        f"throughput {ours['rows_per_s'] / naive['rows_per_s']:.1f}x higher"
    )


if __name__ == "__main__":
    main()
