"""Parse request bodies into feature columns, with errors that name the problem.

Every parser returns a dict of NumPy arrays, one per model input, in request
order: UTF-8 bytes for categorical features and float32 for numeric ones.
Missing values are valid: `?`, an empty field, JSON null or an absent key
become the missing marker for categories and NaN for numbers. Any category,
seen in training or not, is valid.

Every invalid body raises `RequestError`; no other exception escapes
`parse_body`.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from tabmodel import schema

# SageMaker's InvokeEndpoint payload limit (6 MB, counted here as 6 MiB).
MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
CSV = "text/csv"
JSON = "application/json"
JSON_LINES = "application/jsonlines"
CONTENT_TYPES = (CSV, JSON, JSON_LINES, "application/x-jsonlines", "application/jsonl")

# JSON integers longer than this stay strings, so a huge integer is reported
# as an invalid number instead of hitting Python's int conversion limit.
MAX_INT_DIGITS = 40
# Maximum length of a received value's excerpt in an error body or log line.
EXCERPT_CHARS = 64

_WIDTH = len(schema.FEATURE_COLUMNS)
_MISSING_BYTES = schema.MISSING.encode()


class RequestError(Exception):
    """A client error, sent back as JSON with an HTTP status code."""

    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **details}


def parse_body(body: bytes, content_type: str) -> dict[str, np.ndarray]:
    """Parse `body` according to its media type (parameters are ignored).

    Raises:
        RequestError: 400 for an invalid body, 415 for an unsupported type.
    """
    media_type = content_type.split(";")[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise RequestError(
            415,
            f"Unsupported content type {_excerpt(media_type or '(none)')!r}.",
            received=_excerpt(media_type),
            expected=", ".join(CONTENT_TYPES[:3]),
        )
    if not body.strip():
        raise RequestError(
            400, "The request body is empty.", expected="one row or more"
        )
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise RequestError(
            400,
            f"The body is not valid UTF-8 (invalid byte at offset {error.start}).",
            expected="a UTF-8 encoded body",
        ) from None
    if media_type == CSV:
        return columns_from_rows(_csv_rows(text))
    if media_type == JSON:
        return columns_from_records(_json_records(text))
    return columns_from_records(_json_lines_records(text))


def _excerpt(text: str) -> str:
    return text[:EXCERPT_CHARS]


def _csv_rows(text: str) -> list[list[str]]:
    reader = csv.reader(io.StringIO(text))
    try:
        # A blank line is skipped, but a line of empty fields (",,,") is a row
        # of missing values.
        rows = [row for row in reader if len(row) > 1 or (row and row[0].strip())]
    except csv.Error as error:
        raise RequestError(
            400,
            f"Malformed CSV at line {reader.line_num}: {error}.",
            row=max(0, reader.line_num - 1),
            expected=f"{_WIDTH} comma-separated values per line",
        ) from None
    if rows and rows[0] and rows[0][0].strip().lower() == "age":
        rows = rows[1:]
    if not rows:
        raise RequestError(
            400, "The CSV body has no data rows.", expected="one row or more"
        )
    return rows


def _parse_json_int(text: str):
    return int(text) if len(text) <= MAX_INT_DIGITS else text


def _parse_json_float(text: str):
    number = float(text)
    # Keep the original text of an out-of-range number (1e999) so the error
    # names what the client sent instead of "inf".
    return number if math.isfinite(number) else text


def _loads(text: str, where: str):
    try:
        return json.loads(
            text, parse_int=_parse_json_int, parse_float=_parse_json_float
        )
    except json.JSONDecodeError as error:
        raise RequestError(
            400,
            f"Malformed JSON {where}at line {error.lineno}, column {error.colno}: "
            f"{error.msg}.",
            expected="valid JSON",
        ) from None
    except RecursionError:
        raise RequestError(
            400, f"The JSON {where}is nested too deeply.", expected="flat records"
        ) from None


def _json_records(text: str) -> list:
    document = _loads(text, "")
    if isinstance(document, dict) and "instances" in document:
        document = document["instances"]
    elif isinstance(document, dict):
        document = [document]
    if not isinstance(document, list) or not document:
        raise RequestError(
            400,
            "The JSON body must be a non-empty list of records or "
            '{"instances": [...]}.',
            received=_json_type(document),
            expected='a list of records or {"instances": [...]}',
        )
    return document


def _json_lines_records(text: str) -> list:
    records = []
    # Split on "\n" only: str.splitlines() also splits on characters such as
    # U+2028 that may occur inside a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        records.append(_loads(line, f"on line {number} "))
    if not records:
        raise RequestError(
            400, "The JSON Lines body has no records.", expected="one record per line"
        )
    return records


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    return "number"


def columns_from_records(records: list) -> dict[str, np.ndarray]:
    """Convert JSON records (objects keyed by column, or 14-value lists)."""
    rows = []
    for index, record in enumerate(records):
        if isinstance(record, list):
            rows.append(record)
            continue
        if not isinstance(record, dict):
            raise RequestError(
                400,
                f"Row {index} is not a JSON object or list.",
                row=index,
                received=_json_type(record),
                expected="an object keyed by column name, or a list of "
                f"{_WIDTH} values",
            )
        rows.append(_row_from_record(record, index))
    return columns_from_rows(rows)


def _row_from_record(record: dict, index: int) -> list:
    row = [None] * _WIDTH
    for key, value in record.items():
        try:
            name = schema.normalize_name(str(key))
        except ValueError:
            raise RequestError(
                400,
                f"Row {index} has an unknown column {_excerpt(str(key))!r}.",
                row=index,
                column=_excerpt(str(key)),
                expected=", ".join(schema.FEATURE_COLUMNS),
            ) from None
        if name == schema.LABEL:
            continue
        row[schema.FEATURE_COLUMNS.index(name)] = value
    return row


def columns_from_rows(rows: list[list]) -> dict[str, np.ndarray]:
    """Convert rows of the 14 feature columns, in file order, to model inputs."""
    if not rows:
        raise RequestError(400, "The body has no rows.", expected="one row or more")
    categorical = {name: [] for name in schema.CATEGORICAL_FEATURES}
    numeric = {name: [] for name in schema.NUMERIC_FEATURES}
    for index, row in enumerate(rows):
        if len(row) != _WIDTH:
            raise RequestError(
                400,
                f"Row {index} has {len(row)} columns; expected {_WIDTH}.",
                row=index,
                received=len(row),
                expected=f"{_WIDTH} columns: {', '.join(schema.FEATURE_COLUMNS)}",
            )
        for name, value in zip(schema.FEATURE_COLUMNS, row, strict=True):
            if name in categorical:
                categorical[name].append(_category(value, index, name))
            elif name in numeric:
                numeric[name].append(_number(value, index, name))
    columns = {
        name: np.asarray(values, dtype=object) for name, values in categorical.items()
    }
    columns.update(
        {name: np.asarray(values, dtype=np.float32) for name, values in numeric.items()}
    )
    return columns


def _category(value, index: int, name: str) -> bytes:
    if value is None:
        return _MISSING_BYTES
    if isinstance(value, dict | list):
        raise RequestError(
            400,
            f"Row {index}, column {name}: expected a category, received a JSON "
            f"{_json_type(value)}.",
            row=index,
            column=name,
            received=_json_type(value),
            expected="a string, or null or ? for a missing value",
        )
    # "replace" turns a lone surrogate from a JSON escape such as "\ud800" into
    # "?", which is valid input (an unseen or missing category).
    text = str(value).strip().encode("utf-8", "replace")
    return text or _MISSING_BYTES


def _number(value, index: int, name: str) -> float:
    if value is None:
        return math.nan
    number = None
    if isinstance(value, bool | list | dict):
        received = _json_type(value)
    else:
        text = str(value).strip()
        if text in ("", schema.MISSING):
            return math.nan
        received = _excerpt(text)
        try:
            number = float(text)
        except (ValueError, OverflowError):
            number = None
    if number is None or math.isinf(number):
        raise RequestError(
            400,
            f"Row {index}, column {name}: expected a number, received {received!r}.",
            row=index,
            column=name,
            received=received,
            expected="a finite number, or empty, null or ? for a missing value",
        )
    # NaN ("nan" in CSV, NaN in JSON) is read as a missing value.
    return number
