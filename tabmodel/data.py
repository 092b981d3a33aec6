"""Read the Adult files from any source, verify them and parse them with polars.

A source is the copy bundled with this package (`bundled`), a local directory,
an `http(s)://` prefix or an `s3://` prefix. Each contains `adult.data` and
`adult.test`, plain or gzip-compressed (`adult.data.gz`).

Run `python -m tabmodel.data --data SOURCE` to check a source from the shell.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import polars as pl

from tabmodel import schema

# Named explicitly so the name stays the same under `python -m tabmodel.data`.
log = logging.getLogger("tabmodel.data")

BUNDLED = "bundled"
FILE_NAMES = ("adult.data", "adult.test")
# Hosts whose files are the UCI originals, so a checksum mismatch is an error.
UCI_HOSTS = ("archive.ics.uci.edu",)
HTTP_TIMEOUT_S = 60
# Exit status of the command line for invalid data, the same as argparse uses
# for invalid arguments.
EXIT_INVALID_DATA = 2
_GZIP_MAGIC = b"\x1f\x8b"
_HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")
_COMMENT_PREFIX = "|"
# Maximum length, in characters, of a line excerpt quoted in an error message.
_MAX_QUOTED = 120
_FIX_ROW = " Correct or remove the row, then run again."


class AdultDataError(ValueError):
    """An Adult file is missing, unreadable or does not match the schema."""


@dataclass
class RawFile:
    """The decompressed bytes of one file and where they came from."""

    name: str
    location: str
    content: bytes
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.content).hexdigest()


@dataclass
class AdultData:
    """Parsed training and test frames with a record of how they were read."""

    train: pl.DataFrame
    test: pl.DataFrame
    provenance: dict


def uci_checksums() -> dict[str, str]:
    """Return the SHA-256 of the UCI originals, keyed by file name."""
    text = resources.files("tabmodel").joinpath("data/SHA256SUMS").read_text()
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name] = digest
    return sums


def load_adult(data: str = BUNDLED) -> AdultData:
    """Read, verify and parse `adult.data` and `adult.test` from `data`.

    Raises:
        AdultDataError: a file is missing, corrupted or fails validation.
    """
    raw = [read_raw(data, name) for name in FILE_NAMES]
    checksum = verify_checksums(data, raw)
    train = parse_adult(raw[0].content, raw[0].location)
    test = parse_adult(raw[1].content, raw[1].location)
    provenance = {
        "source": data,
        "files": {f.name: f.location for f in raw},
        "sha256": {f.name: f.sha256 for f in raw},
        "checksum": checksum,
        "rows": {"adult.data": train.height, "adult.test": test.height},
    }
    return AdultData(train=train, test=test, provenance=provenance)


def verify_checksums(data: str, raw: list[RawFile]) -> str:
    """Compare each file with the UCI original and log which case applied.

    Returns `verified` when every file is the UCI original, or `skipped` for a
    user's own export, which still goes through every validation in parsing.

    Raises:
        AdultDataError: the bundled copy or a download from the UCI host differs
            from the original.
    """
    expected = uci_checksums()
    matches = [f.sha256 == expected[f.name] for f in raw]
    if all(matches):
        log.info("Data is the UCI original: SHA-256 verified for %s", data)
        return "verified"
    if data == BUNDLED or _is_uci_url(data):
        bad = [f for f, ok in zip(raw, matches, strict=True) if not ok]
        details = "; ".join(
            f"{f.location} has SHA-256 {f.sha256}, expected {expected[f.name]}"
            for f in bad
        )
        fix = (
            "Reinstall the package to restore the bundled copy."
            if data == BUNDLED
            else "Download the files again."
        )
        raise AdultDataError(f"Checksum mismatch: {details}. {fix}")
    log.info(
        "Data at %s is not the UCI original (user export): checksum skipped, "
        "every row validated",
        data,
    )
    return "skipped"


def _is_uci_url(data: str) -> bool:
    return urllib.parse.urlsplit(data).hostname in UCI_HOSTS


def read_raw(data: str, name: str) -> RawFile:
    """Fetch `name` (or `name.gz`) from the source `data` and decompress it.

    Raises:
        AdultDataError: the file is missing, the download failed, the gzip data
            is truncated or corrupted, or the file is an HTML page.
    """
    if data == BUNDLED:
        path = resources.files("tabmodel").joinpath(f"data/{name}.gz")
        return _decompress(name, f"bundled {name}", path.read_bytes())
    if data.startswith(("https://", "http://")):
        return _read_http(data, name)
    if data.startswith("s3://"):
        return _read_s3(data, name)
    return _read_directory(Path(data).expanduser(), name)


def _read_directory(directory: Path, name: str) -> RawFile:
    if not directory.is_dir():
        raise AdultDataError(
            f"Data directory {str(directory)!r} not found. Pass --data a directory "
            f"that contains {' and '.join(FILE_NAMES)}, an https:// or s3:// prefix, "
            f"or {BUNDLED!r} for the copy shipped with the package."
        )
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return _decompress(name, str(candidate), candidate.read_bytes())
    raise AdultDataError(
        f"File {name} (or {name}.gz) not found in {str(directory)!r}. "
        f"The directory must contain both {' and '.join(FILE_NAMES)}."
    )


def _read_http(prefix: str, name: str) -> RawFile:
    base = prefix.rstrip("/")
    for candidate in (f"{base}/{name}", f"{base}/{name}.gz"):
        content = _download(candidate)
        if content is not None:
            return _decompress(name, candidate, content)
    raise AdultDataError(
        f"File {name} (or {name}.gz) not found under {base}: both returned "
        "HTTP 404. Check the URL prefix passed to --data."
    )


def _download(url: str) -> bytes | None:
    """Return the body at `url`, or None when the server returns HTTP 404."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise AdultDataError(
            f"Download of {url} failed with HTTP {error.code}. "
            "Check the URL prefix passed to --data."
        ) from error
    except urllib.error.URLError as error:
        raise AdultDataError(
            f"Download of {url} failed: {error.reason}. "
            "Check the network and the URL prefix passed to --data."
        ) from error
    except (http.client.HTTPException, OSError) as error:
        # IncompleteRead (the body is shorter than Content-Length), a reset
        # connection or a read timeout after the headers arrived.
        raise AdultDataError(
            f"Download of {url} failed before the whole body arrived: {error!r}. "
            "Download the file again."
        ) from error


def s3_client_options() -> dict:
    """Return the boto3 client options from Metaflow's S3 configuration.

    The environment variables METAFLOW_S3_ENDPOINT_URL and
    METAFLOW_S3_VERIFY_CERTIFICATE are read on each call, so a change after
    `metaflow.metaflow_config` was imported still applies. When they are unset,
    the values from the Metaflow configuration file apply.
    """
    from metaflow import metaflow_config

    endpoint = os.environ.get(
        "METAFLOW_S3_ENDPOINT_URL", metaflow_config.S3_ENDPOINT_URL
    )
    verify = os.environ.get(
        "METAFLOW_S3_VERIFY_CERTIFICATE", metaflow_config.S3_VERIFY_CERTIFICATE
    )
    options = {}
    if endpoint:
        options["endpoint_url"] = endpoint
    if verify:
        options["verify"] = verify
    return options


def _read_s3(prefix: str, name: str) -> RawFile:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key_prefix = prefix.removeprefix("s3://").partition("/")
    if not bucket:
        raise AdultDataError(
            f"--data {prefix!r} names no bucket. Expected s3://BUCKET or "
            "s3://BUCKET/PREFIX."
        )
    key_prefix = key_prefix.strip("/")
    options = s3_client_options()
    endpoint = options.get("endpoint_url", "the AWS default")
    log.info("Reading s3://%s/%s through endpoint %s", bucket, key_prefix, endpoint)
    # A new session resolves the credentials again, where boto3's default
    # session keeps the first ones it found for the life of the process.
    client = boto3.session.Session().client(
        "s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}), **options
    )
    for key_name in (name, f"{name}.gz"):
        key = f"{key_prefix}/{key_name}" if key_prefix else key_name
        location = f"s3://{bucket}/{key}"
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                continue
            raise AdultDataError(
                f"Reading {location} failed: {code or error}. Check the bucket "
                f"name, the credentials and METAFLOW_S3_ENDPOINT_URL ({endpoint})."
            ) from error
        except BotoCoreError as error:
            raise AdultDataError(
                f"Reading {location} failed: {error}. Check METAFLOW_S3_ENDPOINT_URL "
                f"({endpoint}) and the AWS credentials."
            ) from error
        return _decompress(name, location, body)
    raise AdultDataError(
        f"File {name} (or {name}.gz) not found under {prefix} through endpoint "
        f"{endpoint}."
    )


def _decompress(name: str, location: str, content: bytes) -> RawFile:
    if content.startswith(_GZIP_MAGIC):
        content = _gunzip(location, content)
    _reject_html(location, content)
    return RawFile(name=name, location=location, content=content)


def _gunzip(location: str, content: bytes) -> bytes:
    """Decompress every gzip member of `content`, reporting where a cut stream ends."""
    parts = []
    remaining = content
    while remaining.startswith(_GZIP_MAGIC):
        decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        try:
            parts.append(decompressor.decompress(remaining))
        except zlib.error as error:
            raise AdultDataError(
                f"{location}: gzip data is corrupted ({error}). "
                "Copy or download the file again."
            ) from error
        if not decompressor.eof:
            text = b"".join(parts)
            line = text.count(b"\n") + 1
            tail = text[text.rfind(b"\n") + 1 :].decode("utf-8", "replace")
            raise AdultDataError(
                f"{location}: gzip data is truncated. The stream ends after "
                f"{len(text)} decompressed bytes, inside line {line}, which reads "
                f"{_quote(tail)}. Copy or download the file again."
            )
        remaining = decompressor.unused_data
    if remaining.strip(b"\0"):
        raise AdultDataError(
            f"{location}: {len(remaining)} bytes after the gzip data are not a gzip "
            "member. Copy or download the file again."
        )
    return b"".join(parts)


def _reject_html(location: str, content: bytes) -> None:
    if content[:512].lstrip().lower().startswith(_HTML_STARTS):
        first_line = content[:_MAX_QUOTED].split(b"\n")[0].decode("utf-8", "replace")
        raise AdultDataError(
            f"{location}, line 1: received {_quote(first_line)}, an HTML or XML "
            "page, expected comma-separated data. The server probably returned an "
            "error page: check the URL."
        )


def parse_adult(content: bytes, location: str) -> pl.DataFrame:
    """Parse one Adult file into a frame with the schema's columns and types.

    Handles the quirks of the originals: no header row, a space after each
    comma, the `|1x3 Cross validator` comment line, a trailing dot on test
    labels, `?` for a missing category, and blank lines. A user export may add
    a header row naming the columns and double quotes around fields, as R's
    write.csv does. Skipped lines are counted in the log. Missing categories
    (`?` or an empty field) become nulls, and numbers become Float64.

    Raises:
        AdultDataError: naming the file, line, column, value and the fix.
    """
    text = _decode(content, location)
    raw_lines = text.split("\n")
    lines = pl.DataFrame(
        {
            "line": pl.Series(range(1, len(raw_lines) + 1), dtype=pl.Int64),
            "text": pl.Series(raw_lines, dtype=pl.String).str.strip_chars_end("\r"),
        }
    )
    blank = pl.col("text").str.strip_chars() == ""
    comment = pl.col("text").str.starts_with(_COMMENT_PREFIX)
    lines = _drop_skipped_lines(lines, blank, comment, location, text)
    if lines.height == 0:
        raise AdultDataError(
            f"{location}: the file has no data rows. Expected comma-separated rows "
            f"of the {len(schema.COLUMNS)} Adult columns."
        )

    names, lines = _column_order(lines, location)
    if lines.height == 0:
        raise AdultDataError(
            f"{location}: the file has a header row but no data rows. Expected "
            f"comma-separated rows of the {len(schema.COLUMNS)} Adult columns."
        )
    last_line = lines["line"][-1] if not text.endswith("\n") else None
    fields = lines.select(
        "line", "text", pl.col("text").str.split(",").alias("fields")
    ).with_columns(pl.col("fields").list.len().alias("count"))
    _check_field_counts(fields, len(names), location, last_line)

    frame = fields.select(
        "line",
        *[
            _unquote(pl.col("fields").list.get(i)).alias(name)
            for i, name in enumerate(names)
        ],
    )
    frame = _convert_numeric(frame, location)
    frame = _convert_categorical(frame)
    frame = _convert_label(frame, location, last_line)
    ordered = [c.name for c in schema.COLUMNS]
    return frame.select(ordered)


def _unquote(field: pl.Expr) -> pl.Expr:
    """Strip spaces and one pair of double quotes, as R's write.csv adds."""
    stripped = field.str.strip_chars()
    quoted = stripped.str.starts_with('"') & stripped.str.ends_with('"')
    return (
        pl.when(quoted & (stripped.str.len_chars() >= 2))
        .then(stripped.str.slice(1, stripped.str.len_chars() - 2).str.strip_chars())
        .otherwise(stripped)
    )


def _decode(content: bytes, location: str) -> str:
    _reject_html(location, content)
    try:
        # utf-8-sig drops the byte order mark that spreadsheet exports add.
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = content[: error.start].count(b"\n") + 1
        raise AdultDataError(
            f"{location}, line {line}: byte {content[error.start]:#04x} is not valid "
            "UTF-8 text. Expected a plain-text CSV file; save it as UTF-8."
        ) from error


def _drop_skipped_lines(
    lines: pl.DataFrame, blank: pl.Expr, comment: pl.Expr, location: str, text: str
) -> pl.DataFrame:
    """Drop blank and `|` comment lines and log how many were dropped."""
    blank_count = lines.filter(blank).height
    if text.endswith("\n"):
        # The empty string after the final newline is not a line of the file.
        blank_count -= 1
    comment_count = lines.filter(comment & ~blank).height
    if blank_count or comment_count:
        log.info(
            "%s: skipped %d blank lines and %d comment lines starting with %r",
            location,
            blank_count,
            comment_count,
            _COMMENT_PREFIX,
        )
    return lines.filter(~blank & ~comment)


def _column_order(lines: pl.DataFrame, location: str) -> tuple[list[str], pl.DataFrame]:
    """Return the column order, read from a header row if the file has one."""
    first = lines.row(0, named=True)
    cells = [_unquote_cell(c) for c in first["text"].split(",")]
    if _is_number(cells[0]):
        return [c.name for c in schema.COLUMNS], lines

    where = f"{location}, line {first['line']}"
    names, unknown = [], []
    for cell in cells:
        try:
            names.append(schema.normalize_name(cell))
        except ValueError:
            unknown.append(cell)

    if cells[0] in unknown:
        raise AdultDataError(
            f"{where}, column {schema.COLUMNS[0].name}: received {_quote(cells[0])}, "
            "expected a number, or a header row that names the columns."
        )

    duplicates = sorted({n for n in names if names.count(n) > 1})
    missing = [c.name for c in schema.COLUMNS if c.name not in names]
    if unknown or duplicates or missing:
        problems = []
        if unknown:
            problems.append(f"unknown names {', '.join(map(repr, unknown))}")
        if duplicates:
            problems.append(f"columns named twice {', '.join(duplicates)}")
        if missing:
            problems.append(f"missing columns {', '.join(missing)}")
        raise AdultDataError(
            f"{where}: invalid header row {_quote(first['text'])}: "
            f"{'; '.join(problems)}. Expected each of the {len(schema.COLUMNS)} "
            f"columns once. {schema.accepted_names()}"
        )

    log.info("%s: header row found, columns mapped by name", location)
    return names, lines.slice(1)


def _unquote_cell(cell: str) -> str:
    cell = cell.strip()
    if len(cell) >= 2 and cell.startswith('"') and cell.endswith('"'):
        return cell[1:-1].strip()
    return cell


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _check_field_counts(
    fields: pl.DataFrame, expected: int, location: str, last_line: int | None
) -> None:
    bad = fields.filter(pl.col("count") != expected)
    if bad.height == 0:
        return
    row = bad.row(0, named=True)
    raise AdultDataError(
        f"{location}, line {row['line']}: received {row['count']} comma-separated "
        f"fields in {_quote(row['text'])}, expected {expected}."
        f"{_row_fix(row['line'], last_line)}{_more(bad.height)}"
    )


def _convert_numeric(frame: pl.DataFrame, location: str) -> pl.DataFrame:
    for name in (c.name for c in schema.COLUMNS if c.kind == schema.NUMERIC):
        parsed = pl.col(name).cast(pl.Float64, strict=False)
        # is_finite is null for a failed cast and false for nan and inf.
        bad = frame.filter(~parsed.is_finite().fill_null(False)).select("line", name)
        if bad.height:
            line, value = bad.row(0)
            raise AdultDataError(
                f"{location}, line {line}, column {name}: received {_quote(value)}, "
                f"expected a finite number.{_FIX_ROW}{_more(bad.height)}"
            )
        frame = frame.with_columns(parsed)
        if name in schema.NON_NEGATIVE:
            negative = frame.filter(pl.col(name) < 0).select("line", name)
            if negative.height:
                line, value = negative.row(0)
                raise AdultDataError(
                    f"{location}, line {line}, column {name}: received {value:g}, "
                    f"expected a number >= 0.{_FIX_ROW}{_more(negative.height)}"
                )
    return frame


def _convert_categorical(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        pl.when(pl.col(name).is_in([schema.MISSING, ""]))
        .then(None)
        .otherwise(pl.col(name))
        .alias(name)
        for name in schema.CATEGORICAL_FEATURES
    )


def _convert_label(
    frame: pl.DataFrame, location: str, last_line: int | None
) -> pl.DataFrame:
    label = pl.col(schema.LABEL).str.strip_suffix(".")
    frame = frame.with_columns(label)
    bad = frame.filter(~pl.col(schema.LABEL).is_in(schema.CLASSES)).select(
        "line", schema.LABEL
    )
    if bad.height:
        line, value = bad.row(0)
        raise AdultDataError(
            f"{location}, line {line}, column {schema.LABEL}: received "
            f"{_quote(value)}, expected one of {' or '.join(schema.CLASSES)} (a "
            "trailing dot is accepted)."
            f"{_row_fix(line, last_line)}{_more(bad.height)}"
        )
    return frame


def _row_fix(line: int, last_line: int | None) -> str:
    """Return the fix for a bad row, or advice to fetch the file again when the
    row is the unterminated last line."""
    if line != last_line:
        return _FIX_ROW
    return (
        " The file ends inside this line without a newline, so it is probably "
        "truncated: copy or download it again."
    )


def _quote(value: str) -> str:
    if len(value) > _MAX_QUOTED:
        value = value[:_MAX_QUOTED] + "..."
    return repr(value)


def _more(count: int) -> str:
    return f" ({count - 1} more lines have the same problem.)" if count > 1 else ""


def positives(frame: pl.DataFrame) -> int:
    """Count rows whose label is the positive class."""
    return int((frame[schema.LABEL] == schema.POSITIVE_CLASS).sum())


def main(argv: list[str] | None = None) -> int:
    """Load a source, then print row counts and provenance as JSON.

    Returns the exit status: 0, or EXIT_INVALID_DATA with the message on stderr
    when the data is missing or invalid.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tabmodel.data",
        description="Read, verify and parse adult.data and adult.test.",
    )
    parser.add_argument(
        "--data",
        default=BUNDLED,
        help=(
            f"source of adult.data and adult.test: {BUNDLED!r} (the copy in the "
            "package, default), a local directory, an http(s):// prefix, or an "
            "s3:// prefix read through METAFLOW_S3_ENDPOINT_URL"
        ),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        data = load_adult(args.data)
    except AdultDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID_DATA
    for name, frame in zip(FILE_NAMES, (data.train, data.test), strict=True):
        print(
            f"{name}: {frame.height} rows, {positives(frame)} {schema.POSITIVE_CLASS}"
        )
    print(json.dumps(data.provenance, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
