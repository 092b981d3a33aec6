"""Parse request bodies into feature columns, with errors that name the problem.

Every parser returns a dict of NumPy arrays, one per model input, in request
order. Missing values are valid: `?`, an empty field, JSON null or an absent key
become the missing marker for categories and NaN for numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from tabmodel import schema

MAX_PAYLOAD_BYTES = 6 * 1024 * 1024
CSV = "text/csv"
JSON = "application/json"
JSON_LINES = "application/jsonlines"
CONTENT_TYPES = (CSV, JSON, JSON_LINES, "application/x-jsonlines", "application/jsonl")


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
            f"Unsupported content type {media_type or '(none)'!r}.",
            expected=", ".join(CONTENT_TYPES[:3]),
        )
    if not body.strip():
        raise RequestError(
            400, "The request body is empty.", expected="one row or more"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(
            400, f"The body is not valid UTF-8 (byte {error.start})."
        ) from error
    if media_type == CSV:
        return columns_from_rows(_csv_rows(text))
    if media_type == JSON:
        return columns_from_records(_json_records(text))
    return columns_from_records(_json_lines_records(text))


def _csv_rows(text: str) -> list[list[str]]:
    rows = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    if rows and rows[0] and rows[0][0].strip().lower() == "age":
        rows = rows[1:]
    if not rows:
        raise RequestError(
            400, "The CSV body has no data rows.", expected="one row or more"
        )
    return rows


def _json_records(text: str) -> list:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(
            400,
            f"Malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}.",
        ) from error
    if isinstance(document, dict) and "instances" in document:
        document = document["instances"]
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list) or not document:
        raise RequestError(
            400,
            "The JSON body must be a non-empty list of records or "
            '{"instances": [...]}.',
            received=type(document).__name__,
        )
    return document


def _json_lines_records(text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise RequestError(
                400, f"Malformed JSON on line {number}: {error.msg}.", row=number - 1
            ) from error
    return records


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
                received=type(record).__name__,
            )
        row = [None] * len(schema.FEATURE_COLUMNS)
        for key, value in record.items():
            try:
                name = schema.normalize_name(str(key))
            except ValueError:
                raise RequestError(
                    400,
                    f"Row {index} has an unknown column {str(key)[:64]!r}.",
                    row=index,
                    column=str(key)[:64],
                    expected=", ".join(schema.FEATURE_COLUMNS),
                ) from None
            if name == schema.LABEL:
                continue
            row[schema.FEATURE_COLUMNS.index(name)] = value
        rows.append(row)
    return columns_from_rows(rows)


def columns_from_rows(rows: list[list]) -> dict[str, np.ndarray]:
    """Convert rows of the 14 feature columns, in file order, to model inputs."""
    width = len(schema.FEATURE_COLUMNS)
    categorical = {name: [] for name in schema.CATEGORICAL_FEATURES}
    numeric = {name: [] for name in schema.NUMERIC_FEATURES}
    for index, row in enumerate(rows):
        if len(row) != width:
            raise RequestError(
                400,
                f"Row {index} has {len(row)} columns; expected {width}.",
                row=index,
                received=len(row),
                expected=f"{width} columns: {', '.join(schema.FEATURE_COLUMNS)}",
            )
        for name, value in zip(schema.FEATURE_COLUMNS, row, strict=True):
            if name in categorical:
                categorical[name].append(_category(value))
            elif name in numeric:
                numeric[name].append(_number(value, index, name))
    columns = {
        name: np.asarray(values, dtype=object) for name, values in categorical.items()
    }
    columns.update(
        {name: np.asarray(values, dtype=np.float32) for name, values in numeric.items()}
    )
    return columns


def _category(value) -> str:
    if value is None:
        return schema.MISSING
    text = str(value).strip()
    return text or schema.MISSING


def _number(value, index: int, name: str) -> float:
    if value is None:
        return math.nan
    text = str(value).strip()
    if isinstance(value, str) and text in ("", schema.MISSING):
        return math.nan
    number = None
    if not isinstance(value, bool | list | dict):
        try:
            number = float(text)
        except (ValueError, OverflowError):
            number = None
    if number is None or math.isinf(number):
        raise RequestError(
            400,
            f"Row {index}, column {name}: expected a number, received {text[:64]!r}.",
            row=index,
            column=name,
            received=text[:64],
            expected="a number, or empty or ? for a missing value",
        )
    return number
