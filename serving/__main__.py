"""Start the inference server: `python -m serving` or the `serve` command.

Locally it binds 127.0.0.1:8080 and serves the current version of a local
endpoint. Started as `serve` inside a SageMaker container, it binds
0.0.0.0:8080 and serves the package SageMaker unpacked under /opt/ml/model.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from serving import registry
from serving.app import LOG_FORMAT

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
# Overrides /opt/ml/model in serve mode, so the container entry point can run
# outside a container (tests point it at an unpacked package).
MODEL_DIR_ENV = "TABMODEL_SERVING_MODEL_DIR"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument(
        "mode",
        nargs="?",
        choices=["serve"],
        help="`serve` as SageMaker passes it: bind 0.0.0.0, read /opt/ml/model "
        f"(or ${MODEL_DIR_ENV}) and start one worker per CPU",
    )
    parser.add_argument(
        "--host", help="address to bind (default 127.0.0.1, or 0.0.0.0 in serve mode)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("SAGEMAKER_BIND_TO_PORT", 8080)),
        help="TCP port (default 8080)",
    )
    parser.add_argument(
        "--model",
        help="an unpacked model package directory or a "
        "model.tar.gz; default: the current version of --endpoint",
    )
    parser.add_argument(
        "--endpoint",
        default=registry.DEFAULT_ENDPOINT,
        help="local endpoint name whose current version is served "
        "and reloaded when a new one is deployed (default: income)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.environ.get("SAGEMAKER_MODEL_SERVER_WORKERS"),
        help="server processes, each with its own model copy (default "
        "$SAGEMAKER_MODEL_SERVER_WORKERS, else 1, or one per CPU in serve mode)",
    )
    parser.add_argument("--log-level", default="info", help="log level (default info)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = args.model
    host = args.host or "127.0.0.1"
    workers = args.workers or 1
    if args.mode == "serve":
        host = args.host or "0.0.0.0"
        model = model or os.environ.get(MODEL_DIR_ENV) or SAGEMAKER_MODEL_DIR
        workers = args.workers or os.cpu_count() or 1
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    os.environ["TABMODEL_SERVING_LOG_LEVEL"] = args.log_level
    os.environ["TABMODEL_SERVING_MODEL"] = model or ""
    os.environ["TABMODEL_SERVING_ENDPOINT"] = args.endpoint
    # uvicorn shuts down gracefully on SIGTERM or SIGINT, then raises the
    # signal again so the previous handler runs. These handlers make that a
    # normal exit with status 0, which is what SageMaker and the tests expect.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _stopped)
    uvicorn.run(
        "serving.app:create_app_from_env",
        factory=True,
        host=host,
        port=args.port,
        workers=workers,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=25,
    )


def _stopped(signal_number: int, frame) -> None:
    logging.getLogger("serving").info(
        "stopped by %s", signal.Signals(signal_number).name
    )


if __name__ == "__main__":
    main()
