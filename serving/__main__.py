"""Start the inference server: `python -m serving` or the `serve` command.

Locally it binds 127.0.0.1:8080 and serves the current version of a local
endpoint. Started as `serve` inside a SageMaker container, it binds
0.0.0.0:8080 and serves the package SageMaker unpacked under /opt/ml/model.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from serving import registry

SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__)
    parser.add_argument(
        "mode",
        nargs="?",
        choices=["serve"],
        help="`serve` as SageMaker passes it: bind 0.0.0.0 and read /opt/ml/model",
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
        default=int(os.environ.get("SAGEMAKER_MODEL_SERVER_WORKERS", 1)),
        help="server processes, each with its own model copy (default 1)",
    )
    parser.add_argument("--log-level", default="info", help="log level (default info)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = args.model
    host = args.host or "127.0.0.1"
    if args.mode == "serve":
        host = args.host or "0.0.0.0"
        model = model or SAGEMAKER_MODEL_DIR
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ["TABMODEL_SERVING_MODEL"] = model or ""
    os.environ["TABMODEL_SERVING_ENDPOINT"] = args.endpoint
    uvicorn.run(
        "serving.app:create_app_from_env",
        factory=True,
        host=host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=25,
    )


if __name__ == "__main__":
    main()
