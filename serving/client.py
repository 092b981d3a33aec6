"""Score a CSV or JSON file on a running server or a SageMaker endpoint.

    python -m serving.client adult.test.csv --url http://127.0.0.1:8080 -o out.csv
    python -m serving.client rows.json --endpoint-name income -o out.csv

The input is sent in batches that each stay under the 6 MB payload limit, and
the output file gets one `probability,label` line per input row, in input
order. CSV input may carry a header row (first field `age`); JSON input is a
list of records, {"instances": [...]}, or JSON Lines (`.jsonl` files).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import logging
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("serving.client")

# Batches stay this far under the server's 6 MiB limit, which leaves room for
# the JSON list brackets and separators.
DEFAULT_BATCH_BYTES = 5 * 1024 * 1024
TIMEOUT_S = 60


def csv_batches(path: Path, max_bytes: int) -> Iterator[bytes]:
    """Yield CSV bodies of whole lines from `path`, each at most `max_bytes`."""
    batch, size = [], 0
    with open(path, "rb") as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            if number == 0 and line.lstrip(b"\xef\xbb\xbf").strip().lower().startswith(
                b"age"
            ):
                continue
            if not line.endswith(b"\n"):
                line += b"\n"
            if len(line) > max_bytes:
                raise ValueError(f"Line {number + 1} is longer than {max_bytes} bytes.")
            if size + len(line) > max_bytes:
                yield b"".join(batch)
                batch, size = [], 0
            batch.append(line)
            size += len(line)
    if batch:
        yield b"".join(batch)


def json_records(path: Path) -> list:
    """Read the records of a JSON list, {"instances": [...]} or a JSON Lines file."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix in (".jsonl", ".jsonlines", ".ndjson"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    document = json.loads(text)
    if isinstance(document, dict):
        document = document.get("instances", [document])
    if not isinstance(document, list):
        raise ValueError(
            f"Invalid input {path}: expected a JSON list of records, "
            f"found a JSON {type(document).__name__}."
        )
    return document


def json_batches(records: list, max_bytes: int) -> Iterator[bytes]:
    """Yield JSON list bodies of `records`, each at most `max_bytes`."""
    batch, size = [], 2
    for number, record in enumerate(records):
        encoded = json.dumps(record, separators=(",", ":")).encode()
        if len(encoded) + 2 > max_bytes:
            raise ValueError(f"Record {number} is longer than {max_bytes} bytes.")
        if batch and size + len(encoded) + 1 > max_bytes:
            yield b"[" + b",".join(batch) + b"]"
            batch, size = [], 2
        batch.append(encoded)
        size += len(encoded) + 1
    if batch:
        yield b"[" + b",".join(batch) + b"]"


class HttpScorer:
    """Sends batches to `URL/invocations` over one keep-alive connection."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"Invalid server URL {url!r}; expected http://HOST:PORT.")
        connection_class = (
            http.client.HTTPSConnection
            if parsed.scheme == "https"
            else http.client.HTTPConnection
        )
        self.connection = connection_class(
            parsed.hostname, parsed.port, timeout=TIMEOUT_S
        )
        self.path = parsed.path.rstrip("/") + "/invocations"

    def score(self, body: bytes, content_type: str) -> bytes:
        headers = {"Content-Type": content_type, "Accept": "text/csv"}
        self.connection.request("POST", self.path, body=body, headers=headers)
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(
                f"The server returned HTTP {response.status}: "
                f"{payload[:500].decode('utf-8', 'replace')}"
            )
        return payload

    def close(self) -> None:
        self.connection.close()


class SageMakerScorer:
    """Sends batches to a SageMaker endpoint with InvokeEndpoint."""

    def __init__(self, endpoint_name: str):
        import boto3

        self.runtime = boto3.client("sagemaker-runtime")
        self.endpoint_name = endpoint_name

    def score(self, body: bytes, content_type: str) -> bytes:
        response = self.runtime.invoke_endpoint(
            EndpointName=self.endpoint_name,
            ContentType=content_type,
            Accept="text/csv",
            Body=body,
        )
        return response["Body"].read()

    def close(self) -> None:
        pass


def predictions_from_csv(payload: bytes) -> list[list[str]]:
    """Return the `probability,label` rows of a CSV response, header removed."""
    rows = list(csv.reader(io.StringIO(payload.decode("utf-8"))))
    if not rows or rows[0] != ["probability", "label"]:
        raise RuntimeError(
            "The response is not probability,label CSV: "
            f"{payload[:200].decode('utf-8', 'replace')!r}"
        )
    return rows[1:]


def score_file(
    scorer, path: Path, output: Path, *, max_bytes: int = DEFAULT_BATCH_BYTES
) -> int:
    """Score every row of `path`, write `output`, and return the row count."""
    if path.suffix.lower() == ".csv":
        batches, content_type = csv_batches(path, max_bytes), "text/csv"
    else:
        batches = json_batches(json_records(path), max_bytes)
        content_type = "application/json"
    rows = 0
    with open(output, "w", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["probability", "label"])
        for number, body in enumerate(batches):
            predictions = predictions_from_csv(scorer.score(body, content_type))
            writer.writerows(predictions)
            rows += len(predictions)
            log.info(
                "batch %d: %d rows (%d bytes)", number, len(predictions), len(body)
            )
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument("input", type=Path, help="a .csv, .json or .jsonl file")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8080")
    target.add_argument(
        "--endpoint-name",
        help="SageMaker endpoint name; region and credentials come from the "
        "usual AWS environment variables and files",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="CSV file to write: probability,label per input row",
    )
    parser.add_argument(
        "--batch-bytes",
        type=int,
        default=DEFAULT_BATCH_BYTES,
        help=f"maximum request body size in bytes (default {DEFAULT_BATCH_BYTES})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    scorer = HttpScorer(args.url) if args.url else SageMakerScorer(args.endpoint_name)
    try:
        rows = score_file(scorer, args.input, args.output, max_bytes=args.batch_bytes)
    except (OSError, ValueError, RuntimeError, http.client.HTTPException) as error:
        log.error("scoring %s failed: %s", args.input, error)
        return 1
    finally:
        scorer.close()
    log.info("wrote %d predictions to %s", rows, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
