"""Tests for reading, verifying and parsing the Adult files from every source."""

from __future__ import annotations

import gzip
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from servers import (
    QuietFileHandler,
    require_rclone,
    start_http_server,
    start_s3_server,
)

from tabmodel import schema
from tabmodel.data import (
    AdultDataError,
    load_adult,
    parse_adult,
    positives,
    read_raw,
    s3_client_options,
)

PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)
BUCKET = "adult-bucket"


@pytest.fixture(autouse=True)
def local_network_only(monkeypatch, tmp_path):
    """Keep urllib and boto3 on 127.0.0.1: no proxies, metadata or AWS config."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-creds"))


@pytest.fixture(scope="module")
def original() -> dict[str, bytes]:
    """Decompressed bytes of the bundled UCI files, keyed by file name."""
    return {
        name: read_raw("bundled", name).content for name in ("adult.data", "adult.test")
    }


@pytest.fixture(scope="module")
def adult():
    return load_adult()


def write_files(directory: Path, files: dict[str, bytes], compress: bool) -> Path:
    """Write each file to `directory`, gzip-compressed under NAME.gz if asked."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / name).write_bytes(content)
    return directory


def replace_line(content: bytes, line: int, text: str) -> bytes:
    """Replace the 1-based line `line` of `content` with `text`."""
    lines = content.split(b"\n")
    lines[line - 1] = text.encode()
    return b"\n".join(lines)


def replace_field(content: bytes, line: int, column: str, value: str) -> bytes:
    """Replace the field of `column` on line `line` with `value`."""
    lines = content.split(b"\n")
    fields = lines[line - 1].decode().split(",")
    fields[[c.name for c in schema.COLUMNS].index(column)] = f" {value}"
    lines[line - 1] = ",".join(fields).encode()
    return b"\n".join(lines)


def line_text(content: bytes, line: int) -> str:
    return content.split(b"\n")[line - 1].decode()


# Parsing the bundled originals


@pytest.mark.parametrize(
    ("split", "rows", "positive_rows"),
    [("train", 32_561, 7_841), ("test", 16_281, 3_846)],
)
def test_bundled_row_counts(adult, split, rows, positive_rows):
    frame = getattr(adult, split)
    assert frame.height == rows
    assert positives(frame) == positive_rows


def test_bundled_checksum_verified(adult):
    assert adult.provenance["checksum"] == "verified"


@pytest.mark.parametrize("split", ["train", "test"])
def test_columns_follow_schema(adult, split):
    frame = getattr(adult, split)
    assert frame.columns == [c.name for c in schema.COLUMNS]
    for column in schema.COLUMNS:
        expected = pl.Float64 if column.kind == schema.NUMERIC else pl.String
        assert frame.schema[column.name] == expected, column.name


@pytest.mark.parametrize("split", ["train", "test"])
def test_categories_have_no_surrounding_spaces(adult, split):
    frame = getattr(adult, split)
    for name in schema.CATEGORICAL_FEATURES + (schema.LABEL,):
        values = frame[name].drop_nulls()
        assert not values.str.starts_with(" ").any(), name
        assert not values.str.ends_with(" ").any(), name


def test_test_labels_have_no_trailing_dot(adult):
    assert set(adult.test[schema.LABEL].unique()) == set(schema.CLASSES)


@pytest.mark.parametrize(
    ("split", "name"), [("train", "adult.data"), ("test", "adult.test")]
)
def test_question_mark_becomes_null(adult, original, split, name):
    frame = getattr(adult, split)
    rows = [
        [field.strip() for field in line.split(",")]
        for line in original[name].decode().splitlines()
        if "," in line
    ]
    for index, column in enumerate(c.name for c in schema.COLUMNS):
        question_marks = sum(row[index] == "?" for row in rows)
        if column in schema.CATEGORICAL_FEATURES:
            assert frame[column].null_count() == question_marks, column
            assert not (frame[column] == "?").any(), column
        else:
            assert question_marks == 0, column


def test_question_marks_present_in_original(adult):
    # The null checks above mean something only if the originals have `?`.
    assert adult.train["workclass"].null_count() == 1_836


def test_skipped_lines_are_logged(original, caplog):
    caplog.set_level(logging.INFO, logger="tabmodel.data")
    parse_adult(original["adult.test"], "adult.test")
    assert "skipped 1 blank lines and 1 comment lines" in caplog.text


# Sources


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_directory_source(tmp_path, original, compress, caplog):
    caplog.set_level(logging.INFO, logger="tabmodel.data")
    data = load_adult(str(write_files(tmp_path, original, compress)))
    suffix = ".gz" if compress else ""
    assert data.provenance["rows"] == {"adult.data": 32_561, "adult.test": 16_281}
    assert data.provenance["files"]["adult.data"] == str(
        tmp_path / f"adult.data{suffix}"
    )
    assert data.provenance["checksum"] == "verified"
    assert "SHA-256 verified" in caplog.text


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_http_source(tmp_path, original, compress):
    write_files(tmp_path / "adult", original, compress)
    with start_http_server(tmp_path) as base_url:
        data = load_adult(f"{base_url}/adult/")
    suffix = ".gz" if compress else ""
    assert data.provenance["rows"] == {"adult.data": 32_561, "adult.test": 16_281}
    assert (
        data.provenance["files"]["adult.test"] == f"{base_url}/adult/adult.test{suffix}"
    )


def test_http_missing_file(tmp_path):
    with start_http_server(tmp_path) as base_url:
        with pytest.raises(AdultDataError, match="not found under .*HTTP 404"):
            load_adult(f"{base_url}/nothing")


def test_http_error_page(tmp_path):
    (tmp_path / "adult.data").write_text("<!DOCTYPE html>\n<html><body>Not here</body>")
    (tmp_path / "adult.test").write_text("")
    with start_http_server(tmp_path) as base_url:
        with pytest.raises(AdultDataError) as error:
            load_adult(base_url)
    assert f"{base_url}/adult.data, line 1" in str(error.value)
    assert "'<!DOCTYPE html>'" in str(error.value)


class ShortBodyHandler(QuietFileHandler):
    """File handler that announces 1000 more bytes than the body it sends."""

    def send_header(self, keyword, value):
        if keyword == "Content-Length":
            value = str(int(value) + 1000)
        super().send_header(keyword, value)


def test_http_cut_connection(tmp_path, original):
    write_files(tmp_path, original, compress=False)
    with start_http_server(tmp_path, handler_class=ShortBodyHandler) as base_url:
        with pytest.raises(AdultDataError, match="before the whole body arrived"):
            load_adult(base_url)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory, original):
    rclone = require_rclone()
    root = tmp_path_factory.mktemp("s3")
    write_files(root / BUCKET / "plain", original, compress=False)
    write_files(root / BUCKET / "gzip", original, compress=True)
    with start_s3_server(root, rclone=rclone) as server:
        yield server


@pytest.fixture
def s3_env(monkeypatch, s3_server):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.mark.service
@pytest.mark.parametrize("prefix", ["plain", "gzip"])
def test_s3_source(s3_env, prefix):
    data = load_adult(f"s3://{BUCKET}/{prefix}")
    suffix = ".gz" if prefix == "gzip" else ""
    assert data.provenance["rows"] == {"adult.data": 32_561, "adult.test": 16_281}
    assert data.provenance["files"]["adult.data"] == (
        f"s3://{BUCKET}/{prefix}/adult.data{suffix}"
    )
    assert data.provenance["checksum"] == "verified"


@pytest.mark.service
@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        (f"s3://{BUCKET}/missing", "adult.data.gz.* not found under"),
        ("s3://no-such-bucket/plain", "NoSuchBucket"),
        ("s3://", "names no bucket"),
    ],
    ids=["missing-key", "missing-bucket", "no-bucket"],
)
def test_s3_read_errors(s3_env, prefix, message):
    with pytest.raises(AdultDataError, match=message):
        load_adult(prefix)


@pytest.mark.service
def test_s3_wrong_credentials(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(AdultDataError, match="Check the bucket name, the credentials"):
        load_adult(f"s3://{BUCKET}/plain")


def test_s3_endpoint_read_at_call_time(monkeypatch):
    import metaflow.metaflow_config  # noqa: F401  (imported before the change)

    monkeypatch.setenv("METAFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    assert s3_client_options()["endpoint_url"] == "http://127.0.0.1:9"


# User exports


def export_with_header(
    frame: pl.DataFrame, header: list[str], order: list[str], quote_style: str
) -> bytes:
    """Write `frame` as CSV with the columns in `order` under the names `header`."""
    exported = frame.select(order).with_columns(
        pl.col(name).fill_null(schema.MISSING) for name in schema.CATEGORICAL_FEATURES
    )
    exported.columns = header
    return exported.write_csv(quote_style=quote_style).encode()


ALIASED_ORDER = [
    ("income", "income"),
    ("sex", "gender"),
    ("marital_status", "marital-status"),
    ("education_num", "educational-num"),
    ("native_country", "native-country"),
    ("hours_per_week", "hours-per-week"),
    ("age", "Age"),
    ("workclass", "workclass"),
    ("fnlwgt", "fnlwgt"),
    ("education", "education"),
    ("occupation", "occupation"),
    ("relationship", "relationship"),
    ("race", "race"),
    ("capital_gain", "capital-gain"),
    ("capital_loss", "capital_loss"),
]


@pytest.fixture(scope="module", params=["necessary", "always"], ids=["plain", "quoted"])
def export_dir(request, adult, tmp_path_factory) -> Path:
    """A user export: header row with aliases, another column order, no spaces.

    The quoted variant puts double quotes around every field and header name.
    """
    order = [name for name, _ in ALIASED_ORDER]
    header = [alias for _, alias in ALIASED_ORDER]
    directory = tmp_path_factory.mktemp("export")
    for name, frame in (("adult.data", adult.train), ("adult.test", adult.test)):
        content = export_with_header(frame, header, order, request.param)
        (directory / name).write_bytes(content)
    return directory


def test_export_with_aliases_parses(adult, export_dir):
    exported = load_adult(str(export_dir))
    assert exported.train.equals(adult.train)
    assert exported.test.equals(adult.test)


def test_export_checksum_skipped(export_dir, caplog):
    caplog.set_level(logging.INFO, logger="tabmodel.data")
    exported = load_adult(str(export_dir))
    assert exported.provenance["checksum"] == "skipped"
    assert "checksum skipped" in caplog.text
    assert "columns mapped by name" in caplog.text


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("age, sex, gender", "columns named twice sex"),
        ("age, salary_band", "unknown names 'salary_band'"),
        ("age, sex", "missing columns workclass"),
    ],
    ids=["duplicate", "unknown", "missing"],
)
def test_invalid_header(header, message):
    with pytest.raises(AdultDataError) as error:
        parse_adult(f"{header}\n39, Male\n".encode(), "export.csv")
    assert "export.csv, line 1" in str(error.value)
    assert message in str(error.value)


def test_header_without_rows():
    header = ",".join(c.name for c in schema.COLUMNS)
    with pytest.raises(AdultDataError, match="header row but no data rows"):
        parse_adult(f"{header}\n".encode(), "export.csv")


# Malformed input: each case changes one line of the original adult.data.

MALFORMED = [
    pytest.param(
        lambda c: replace_line(c, 5, line_text(c, 5).rsplit(",", 1)[0]),
        5,
        "received 14 comma-separated fields",
        id="missing-field",
    ),
    pytest.param(
        lambda c: replace_line(c, 6, line_text(c, 6) + ", extra"),
        6,
        "received 16 comma-separated fields",
        id="extra-field",
    ),
    pytest.param(
        lambda c: replace_field(c, 100, "age", "forty"),
        100,
        "column age: received 'forty', expected a finite number",
        id="text-in-numeric",
    ),
    pytest.param(
        lambda c: replace_field(c, 101, "fnlwgt", "?"),
        101,
        "column fnlwgt: received '?', expected a finite number",
        id="question-mark-in-numeric",
    ),
    pytest.param(
        lambda c: replace_field(c, 102, "capital_gain", "inf"),
        102,
        "column capital_gain: received 'inf', expected a finite number",
        id="infinite-number",
    ),
    pytest.param(
        lambda c: replace_field(c, 103, "education_num", ""),
        103,
        "column education_num: received '', expected a finite number",
        id="empty-numeric",
    ),
    pytest.param(
        lambda c: replace_field(c, 7, "age", "-3"),
        7,
        "column age: received -3, expected a number >= 0",
        id="negative-age",
    ),
    pytest.param(
        lambda c: replace_field(c, 9, "hours_per_week", "-40"),
        9,
        "column hours_per_week: received -40, expected a number >= 0",
        id="negative-hours",
    ),
    pytest.param(
        lambda c: replace_field(c, 11, "income", "maybe"),
        11,
        "column income: received 'maybe', expected one of <=50K or >50K",
        id="unknown-label",
    ),
    pytest.param(
        lambda c: replace_field(c, 12, "income", "?"),
        12,
        "column income: received '?'",
        id="missing-label",
    ),
    pytest.param(
        lambda c: replace_field(c, 1, "age", "x"),
        1,
        "column age: received 'x', expected a number, or a header row",
        id="text-age-on-first-line",
    ),
    pytest.param(
        lambda c: c.replace(b"215646, HS-grad", b"215646, HS-gr\xe4d", 1),
        3,
        "byte 0xe4 is not valid UTF-8",
        id="not-utf8",
    ),
]


@pytest.mark.parametrize(("corrupt", "line", "message"), MALFORMED)
def test_malformed_line(original, corrupt, line, message):
    with pytest.raises(AdultDataError) as error:
        parse_adult(corrupt(original["adult.data"]), "adult.data")
    assert f"adult.data, line {line}" in str(error.value)
    assert message in str(error.value)


def test_field_count_error_quotes_line(original):
    content = replace_line(original["adult.data"], 5, "39, State-gov, 77516")
    with pytest.raises(AdultDataError, match="in '39, State-gov, 77516', expected 15"):
        parse_adult(content, "adult.data")


def test_repeated_problem_counted(original):
    content = replace_field(original["adult.data"], 20, "age", "-1")
    content = replace_field(content, 30, "age", "-2")
    with pytest.raises(AdultDataError, match=r"line 20.*\(1 more lines"):
        parse_adult(content, "adult.data")


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n", b"|1x3 Cross validator\n"],
    ids=["empty", "blank-lines", "comment-only"],
)
def test_file_without_rows(content):
    with pytest.raises(AdultDataError, match="adult.test: the file has no data rows"):
        parse_adult(content, "adult.test")


@pytest.mark.parametrize(
    "content",
    [b"<!DOCTYPE html>\n<html>", b"  <html><head>", b'<?xml version="1.0"?><Error>'],
    ids=["doctype", "html", "xml"],
)
def test_html_file(content):
    with pytest.raises(AdultDataError) as error:
        parse_adult(content, "adult.data")
    assert "adult.data, line 1: received" in str(error.value)
    assert content.split(b"\n")[0].decode() in str(error.value)


def test_truncated_plain_file(tmp_path, original):
    content = original["adult.data"]
    cut = len(content) // 2 + 40
    if content[cut - 1 : cut] == b"\n":
        cut += 10
    write_files(
        tmp_path,
        {"adult.data": content[:cut], "adult.test": original["adult.test"]},
        False,
    )
    line = content[:cut].count(b"\n") + 1
    tail = content[:cut].rsplit(b"\n", 1)[1].decode()
    with pytest.raises(AdultDataError) as error:
        load_adult(str(tmp_path))
    assert f"adult.data, line {line}" in str(error.value)
    assert tail[:60] in str(error.value)
    assert "probably truncated" in str(error.value)


def test_truncated_gzip_file(tmp_path, original):
    content = original["adult.data"]
    compressed = gzip.compress(content)
    (tmp_path / "adult.data.gz").write_bytes(compressed[: len(compressed) // 2])
    write_files(tmp_path, {"adult.test": original["adult.test"]}, compress=True)
    with pytest.raises(AdultDataError) as error:
        load_adult(str(tmp_path))
    message = str(error.value)
    assert "adult.data.gz: gzip data is truncated" in message
    found = re.search(r"inside line (\d+), which reads '([^']*)'", message)
    assert found is not None, message
    line, tail = int(found.group(1)), found.group(2)
    assert line_text(content, line).startswith(tail)


def test_corrupted_gzip_file(tmp_path, original):
    compressed = bytearray(gzip.compress(original["adult.data"]))
    compressed[len(compressed) // 2] ^= 0xFF
    (tmp_path / "adult.data.gz").write_bytes(bytes(compressed))
    write_files(tmp_path, {"adult.test": original["adult.test"]}, compress=True)
    with pytest.raises(AdultDataError, match="adult.data.gz: gzip data is corrupted"):
        load_adult(str(tmp_path))


def test_missing_directory(tmp_path):
    with pytest.raises(AdultDataError, match="Data directory .* not found"):
        load_adult(str(tmp_path / "absent"))


def test_missing_file_in_directory(tmp_path, original):
    write_files(tmp_path, {"adult.data": original["adult.data"]}, compress=False)
    with pytest.raises(
        AdultDataError, match=r"File adult.test \(or adult.test.gz\) not found"
    ):
        load_adult(str(tmp_path))


# Command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "tabmodel.data", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_prints_counts(export_dir):
    result = run_cli("--data", str(export_dir))
    assert result.returncode == 0, result.stderr
    assert "adult.data: 32561 rows, 7841 >50K" in result.stdout
    assert '"checksum": "skipped"' in result.stdout


def test_cli_invalid_data_exits_2(tmp_path, original):
    content = replace_field(original["adult.data"], 7, "age", "-3")
    write_files(
        tmp_path, {"adult.data": content, "adult.test": original["adult.test"]}, False
    )
    result = run_cli("--data", str(tmp_path))
    assert result.returncode == 2
    assert (
        f"error: {tmp_path / 'adult.data'}, line 7, column age: received -3"
        in result.stderr
    )
    assert result.stdout == ""
