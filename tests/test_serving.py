"""The inference server as a real process on 127.0.0.1: content types, errors,
concurrency, readiness, hot reload, graceful shutdown and fuzzed requests.

One small model (2,000 rows, one epoch, a tiny configuration) is trained per
session; its scores are only compared with the same package scored in-process.
"""

from __future__ import annotations

import concurrent.futures
import csv
import http.client
import io
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, ServerProcess, post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import registry
from serving.parsing import MAX_PAYLOAD_BYTES, parse_body
from tabmodel import schema

TINY_PARAMS = {
    "num_layers": 1,
    "num_heads": 2,
    "embedding_dims": 8,
    "mlp_hidden_layers": 1,
    "mlp_multiple_0": 1,
}
LOAD_DELAY_S = 3
ROWS = 60
CSV_TYPE = "text/csv"
JSON_TYPE = "application/json"


@pytest.fixture(scope="session")
def model_package(tmp_path_factory):
    """An unpacked model package trained on 2,000 rows for one epoch."""
    from tabmodel.data import load_adult
    from tabmodel.packaging import write_package
    from tabmodel.training import DEFAULT_PARAMS, train_model

    train = load_adult("bundled").train.sample(2000, seed=0)
    result = train_model({**DEFAULT_PARAMS, **TINY_PARAMS}, train, epochs=1, seed=0)
    directory = tmp_path_factory.mktemp("package") / "v1"
    return write_package(result.model, directory, {"run": "tests/serving"})


@pytest.fixture(scope="session")
def test_rows() -> list[list[str]]:
    """Rows of adult.test as the 14 feature fields, `?` for missing values."""
    from tabmodel.data import load_adult

    frame = load_adult("bundled").test.head(ROWS)
    rows = []
    for record in frame.iter_rows(named=True):
        row = []
        for name in schema.FEATURE_COLUMNS:
            value = record[name]
            if value is None:
                row.append(schema.MISSING)
            elif isinstance(value, float):
                row.append(str(int(value)) if value.is_integer() else str(value))
            else:
                row.append(value)
        rows.append(row)
    return rows


@pytest.fixture(scope="session")
def reference(model_package, test_rows) -> np.ndarray:
    """Probabilities of `test_rows` scored in-process with the same package."""
    from serving.predictor import Predictor

    predictor = Predictor(model_package)
    return predictor.predict(parse_body(csv_body(test_rows), CSV_TYPE))


def csv_body(rows: list[list[str]], header: bool = False, sep: str = ", ") -> bytes:
    lines = [sep.join(schema.FEATURE_COLUMNS)] if header else []
    lines += [sep.join(row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def records(rows: list[list[str]]) -> list[dict]:
    return [dict(zip(schema.FEATURE_COLUMNS, row, strict=True)) for row in rows]


class ContainerServer(ServerProcess):
    """The container entry point: `python -m serving serve` with 2 workers and
    a model directory in place of /opt/ml/model."""

    def __init__(self, model_dir):
        super().__init__(
            "serve",
            "--host",
            "127.0.0.1",
            "--workers",
            "2",
            env={
                "TABMODEL_SERVING_MODEL_DIR": str(model_dir),
                "TABMODEL_SERVING_LOAD_DELAY": str(LOAD_DELAY_S),
            },
        )
        self.pings: list[tuple[int | None, float]] = []

    def record_pings_until_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.output()}")
            started = time.monotonic()
            status = self.ping_status()
            self.pings.append((status, time.monotonic() - started))
            if status == 200 and self._all_workers_ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def _all_workers_ready(self) -> bool:
        # Each /ping reaches one of the workers; a run of successes makes it
        # very likely that both loaded their model.
        return all(self.ping_status() == 200 for _ in range(20))


@pytest.fixture(scope="module")
def server(model_package):
    process = ContainerServer(model_package)
    try:
        process.record_pings_until_ready()
        yield process
    finally:
        exit_code = process.stop()
    assert exit_code == 0, process.output()


def invoke(server, body: bytes, content_type: str, accept: str | None = None):
    status, headers, payload = post(
        server.url + "/invocations", body, content_type, accept
    )
    headers = {name.lower(): value for name, value in headers.items()}
    return status, headers, payload


def probabilities(payload: bytes) -> np.ndarray:
    predictions = json.loads(payload)["predictions"]
    return np.array([p["probability"] for p in predictions])


# Readiness and the container entry point


def test_ping_503_while_loading(server):
    statuses = [status for status, _ in server.pings]
    assert 503 in statuses, statuses
    assert statuses[-1] == 200
    first_ready = statuses.index(200)
    assert all(status in (None, 503) for status in statuses[:first_ready])


def test_ping_answers_within_2s(server):
    answered = [seconds for status, seconds in server.pings if status is not None]
    assert max(answered) < 2.0


def test_ping_body_names_version(server, model_package):
    status, _, payload = get(server, "/ping")
    assert status == 200
    assert json.loads(payload)["version"] == model_package.name


def get(server, path: str):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


# Content types and Accept


def test_csv_scores_match_reference(server, test_rows, reference):
    status, headers, payload = invoke(server, csv_body(test_rows), CSV_TYPE)
    assert status == 200
    assert headers["content-type"].startswith(JSON_TYPE)
    np.testing.assert_allclose(probabilities(payload), reference, atol=1e-5)


def test_csv_header_and_no_spaces(server, test_rows, reference):
    body = csv_body(test_rows, header=True, sep=",")
    status, _, payload = invoke(server, body, "text/csv; charset=utf-8")
    assert status == 200
    np.testing.assert_allclose(probabilities(payload), reference, atol=1e-5)


def test_csv_accept_csv(server, test_rows, reference):
    status, headers, payload = invoke(server, csv_body(test_rows), CSV_TYPE, "text/csv")
    assert status == 200
    assert headers["content-type"].startswith(CSV_TYPE)
    rows = list(csv.reader(io.StringIO(payload.decode())))
    assert rows[0] == ["probability", "label"]
    assert len(rows) == ROWS + 1
    scores = np.array([float(row[0]) for row in rows[1:]])
    np.testing.assert_allclose(scores, reference, atol=1e-5)
    for score, (_, label) in zip(scores, rows[1:], strict=True):
        expected = schema.POSITIVE_CLASS if score >= 0.5 else schema.NEGATIVE_CLASS
        assert label == expected


@pytest.mark.parametrize(
    "accept",
    ["application/json", "*/*", "application/*", "text/html, application/json;q=0.9"],
)
def test_accept_json_variants(server, test_rows, accept):
    status, headers, _ = invoke(server, csv_body(test_rows[:2]), CSV_TYPE, accept)
    assert status == 200
    assert headers["content-type"].startswith(JSON_TYPE)


def test_json_list_of_records(server, test_rows, reference):
    body = json.dumps(records(test_rows)).encode()
    status, _, payload = invoke(server, body, JSON_TYPE)
    assert status == 200
    np.testing.assert_allclose(probabilities(payload), reference, atol=1e-5)


def test_json_instances(server, test_rows, reference):
    body = json.dumps({"instances": records(test_rows)}).encode()
    status, _, payload = invoke(server, body, JSON_TYPE)
    assert status == 200
    np.testing.assert_allclose(probabilities(payload), reference, atol=1e-5)


def test_json_value_lists(server, test_rows, reference):
    body = json.dumps({"instances": test_rows}).encode()
    status, _, payload = invoke(server, body, JSON_TYPE)
    assert status == 200
    np.testing.assert_allclose(probabilities(payload), reference, atol=1e-5)


@pytest.mark.parametrize(
    "content_type",
    ["application/jsonlines", "application/x-jsonlines", "application/jsonl"],
)
def test_json_lines(server, test_rows, reference, content_type):
    body = "\n".join(json.dumps(record) for record in records(test_rows)).encode()
    status, _, payload = invoke(server, body, content_type)
    assert status == 200
    np.testing.assert_allclose(probabilities(payload), reference, atol=1e-5)


def test_json_accept_csv(server, test_rows):
    body = json.dumps(records(test_rows[:3])).encode()
    status, headers, payload = invoke(server, body, JSON_TYPE, "text/csv")
    assert status == 200
    assert headers["content-type"].startswith(CSV_TYPE)
    assert payload.decode().splitlines()[0] == "probability,label"


def test_unseen_and_missing_values_valid(server):
    body = json.dumps(
        [
            {"age": None, "workclass": "Astronaut", "native_country": "Atlantis"},
            {},
            {"age": "?", "sex": "", "hours_per_week": "NaN", "income": ">50K"},
        ]
    ).encode()
    status, _, payload = invoke(server, body, JSON_TYPE)
    assert status == 200
    scores = probabilities(payload)
    assert scores.shape == (3,)
    assert np.all((scores >= 0) & (scores <= 1))


def test_csv_missing_fields_valid(server):
    status, _, payload = invoke(
        server, b",,,,,,,,,,,,,\n?,?,?,?,?,?,?,?,?,?,?,?,?,?", CSV_TYPE
    )
    assert status == 200
    assert probabilities(payload).shape == (2,)


def test_large_batch_one_request(server, test_rows, reference):
    repeats = 100
    status, _, payload = invoke(server, csv_body(test_rows * repeats), CSV_TYPE)
    assert status == 200
    scores = probabilities(payload)
    assert scores.shape == (ROWS * repeats,)
    np.testing.assert_allclose(scores, np.tile(reference, repeats), atol=1e-5)


def test_response_headers(server, test_rows, model_package):
    status, headers, _ = invoke(server, csv_body(test_rows[:1]), CSV_TYPE)
    assert status == 200
    assert headers["x-model-version"] == model_package.name
    assert headers["x-request-id"]


# Errors


def check_error(response, status: int, **fields):
    code, headers, payload = response
    assert code == status, payload[:500]
    assert headers["content-type"].startswith(JSON_TYPE)
    body = json.loads(payload)
    assert body["error"]
    assert body["request_id"]
    for name, value in fields.items():
        assert body[name] == value, body
    return body


def test_wrong_column_count(server, test_rows):
    body = csv_body(test_rows[:2]) + b"1,2,3\n"
    check_error(invoke(server, body, CSV_TYPE), 400, row=2, received=3)


def test_non_numeric_value(server, test_rows):
    row = list(test_rows[0])
    row[0] = "forty"
    body = check_error(
        invoke(server, csv_body([row]), CSV_TYPE),
        400,
        row=0,
        column="age",
        received="forty",
    )
    assert "number" in body["expected"]


@pytest.mark.parametrize("content_type", [CSV_TYPE, JSON_TYPE, "application/jsonlines"])
def test_empty_body(server, content_type):
    body = check_error(invoke(server, b"", content_type), 400)
    assert "empty" in body["error"]


def test_malformed_json(server):
    body = check_error(invoke(server, b'[{"age": 3', JSON_TYPE), 400)
    assert "Malformed JSON" in body["error"]


def test_malformed_json_line(server):
    body = b'{"age": 30}\n{"age": \n'
    checked = check_error(invoke(server, body, "application/jsonlines"), 400)
    assert "line 2" in checked["error"]


def test_unknown_json_column(server):
    body = json.dumps([{"age": 30, "shoe_size": 9}]).encode()
    check_error(invoke(server, body, JSON_TYPE), 400, row=0, column="shoe_size")


def test_payload_too_large(server):
    body = b"1" * (MAX_PAYLOAD_BYTES + 1)
    checked = check_error(invoke(server, body, CSV_TYPE), 413)
    assert str(MAX_PAYLOAD_BYTES) in checked["expected"]


def test_payload_too_large_chunked(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunk = b"9" * (1024 * 1024)
    try:
        connection.request(
            "POST",
            "/invocations",
            body=iter([chunk] * 7),
            headers={"Content-Type": CSV_TYPE},
            encode_chunked=True,
        )
        response = connection.getresponse()
        assert response.status == 413
        assert "limit" in json.loads(response.read())["error"]
    finally:
        connection.close()


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", ""])
def test_unsupported_content_type(server, content_type):
    checked = check_error(invoke(server, b"1,2", content_type), 415)
    assert "text/csv" in checked["expected"]


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "text/csv;q=0"])
def test_unsupported_accept(server, test_rows, accept):
    response = invoke(server, csv_body(test_rows[:1]), CSV_TYPE, accept)
    check_error(response, 406, received=accept)


PARSER_CASES = [
    ("float overflow", b'[{"age": 1e999}]', 400, "1e999"),
    ("negative overflow", b'[{"age": -1e999}]', 400, "-1e999"),
    ("huge integer", b'[{"age": ' + b"9" * 5000 + b"}]", 400, "9" * 64),
    ("boolean number", b'[{"age": true}]', 400, "boolean"),
    ("nested object", b'[{"age": {"years": 3}}]', 400, "object"),
    ("nested category", b'[{"sex": ["F"]}]', 400, "array"),
    ("string infinity", b'[{"age": "inf"}]', 400, "inf"),
    ("json infinity", b'[{"age": Infinity}]', 400, None),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("deep nesting open", b"[" * 200_000, 400, None),
    ("scalar document", b"42", 400, "number"),
    ("empty list", b"[]", 400, "array"),
    ("empty instances", b'{"instances": []}', 400, "array"),
    ("instances scalar", b'{"instances": 5}', 400, "number"),
    ("row scalar", b"[1, 2]", 400, "number"),
    ("non utf-8", b"\xff\xfe[{}]", 400, None),
    ("lone surrogate", b'[{"sex": "\\ud800"}]', 200, None),
    ("json nan", b'[{"age": NaN}]', 200, None),
    ("boolean category", b'[{"sex": false}]', 200, None),
    ("number category", b'[{"sex": 12}]', 200, None),
]


@pytest.mark.parametrize(
    ("body", "status", "received"),
    [case[1:] for case in PARSER_CASES],
    ids=[case[0] for case in PARSER_CASES],
)
def test_json_edge_cases(server, body, status, received):
    code, _, payload = invoke(server, body, JSON_TYPE)
    assert code == status, payload[:300]
    if received is not None:
        assert json.loads(payload)["received"] == received


CSV_CASES = [
    ("long field", b"a" * 200_000, 400),
    ("unterminated quote", b'"39, x', 400),
    ("nul byte", b"3\x009" + b",x" * 13, 400),
    ("only header", b"age,workclass\n", 400),
    ("blank lines", b"\n\n \n", 400),
    ("numeric nan", b"nan" + b",?" * 13, 200),
    ("non utf-8", b"\xc3\x28" + b",x" * 13, 400),
]


@pytest.mark.parametrize(
    ("body", "status"),
    [case[1:] for case in CSV_CASES],
    ids=[case[0] for case in CSV_CASES],
)
def test_csv_edge_cases(server, body, status):
    code, _, payload = invoke(server, body, CSV_TYPE)
    assert code == status, payload[:300]


def test_errors_do_not_echo_payload(server):
    secret = "x" * 500
    body = json.dumps([{"age": secret}]).encode()
    code, _, payload = invoke(server, body, JSON_TYPE)
    assert code == 400
    assert secret not in payload.decode()
    assert secret not in server.output()


# Concurrency and fuzzing


def test_concurrent_requests(server, test_rows, reference):
    def score(index: int) -> tuple[int, float]:
        row = test_rows[index % ROWS]
        status, _, payload = invoke(server, csv_body([row]), CSV_TYPE)
        assert status == 200
        return index, probabilities(payload)[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(score, range(200), timeout=120))
    assert len(results) == 200
    for index, score_value in results:
        assert score_value == pytest.approx(reference[index % ROWS], abs=1e-5)


HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            CSV_TYPE,
            JSON_TYPE,
            "application/jsonlines",
            "application/x-jsonlines",
            "text/csv; charset=utf-8",
            "text/plain",
            "",
        ]
    ),
    HEADER_TEXT,
)
ACCEPTS = st.one_of(
    st.none(),
    st.sampled_from(
        ["application/json", "text/csv", "*/*", "text/html", "text/csv;q=0"]
    ),
    HEADER_TEXT,
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from([*schema.FEATURE_COLUMNS, "income", "other"])
            | st.text(max_size=8),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)
CSV_FIELDS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(str),
    st.sampled_from(["", "?", " Private", "nan", "inf", '"', "a,b", "1e999"]),
    st.text(max_size=10),
)
CSV_BODIES = st.lists(
    st.lists(CSV_FIELDS, min_size=0, max_size=16).map(",".join), min_size=0, max_size=5
).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.lists(JSON_VALUES, max_size=4).map(
        lambda values: "\n".join(json.dumps(v) for v in values).encode()
    ),
    CSV_BODIES,
)


class KeepAliveClient:
    """One HTTP/1.1 connection reused across requests, reopened after errors."""

    def __init__(self, port: int):
        self.port = port
        self.connection = None

    def post(self, body: bytes, headers: dict) -> int:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=30
                )
            try:
                self.connection.request(
                    "POST", "/invocations", body=body, headers=headers
                )
                response = self.connection.getresponse()
                response.read()
                if response.will_close:
                    self.close()
                return response.status
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def test_fuzzed_requests_no_server_error(server):
    client = KeepAliveClient(server.port)
    statuses: dict[int, int] = {}

    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=BODIES, content_type=CONTENT_TYPES, accept=ACCEPTS)
    def check(body, content_type, accept):
        headers = {"Content-Type": content_type}
        if accept is not None:
            headers["Accept"] = accept
        status = client.post(body, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (body[:200], content_type, accept)

    try:
        check()
    finally:
        client.close()
    assert sum(statuses.values()) >= 2000
    assert server.ping_status() == 200
    output = server.output()
    assert "Traceback" not in output
    assert "died" not in output.lower()


# The command-line client


def test_client_csv_in_batches(server, test_rows, reference, tmp_path):
    source = tmp_path / "rows.csv"
    source.write_bytes(csv_body(test_rows, header=True))
    output = tmp_path / "scores.csv"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.client",
            str(source),
            "--url",
            server.url,
            "-o",
            str(output),
            "--batch-bytes",
            "2000",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.count("batch ") > 1
    rows = list(csv.reader(io.StringIO(output.read_text())))
    assert rows[0] == ["probability", "label"]
    scores = np.array([float(row[0]) for row in rows[1:]])
    np.testing.assert_allclose(scores, reference, atol=1e-5)


def test_client_json(server, test_rows, reference, tmp_path):
    source = tmp_path / "rows.json"
    source.write_text(json.dumps({"instances": records(test_rows)}))
    output = tmp_path / "scores.csv"
    completed = subprocess.run(
        [sys.executable, "-m", "serving.client", str(source), "--url", server.url]
        + ["-o", str(output), "--batch-bytes", "3000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    scores = np.array(
        [float(line.split(",")[0]) for line in output.read_text().split()[1:]]
    )
    np.testing.assert_allclose(scores, reference, atol=1e-5)


# Hot reload and graceful shutdown of a local endpoint


@pytest.fixture(scope="module")
def endpoint_server(model_package):
    registry.publish(model_package, "reload", "v1")
    process = ServerProcess(
        "--endpoint", "reload", env={"TABMODEL_SERVING_POLL_SECONDS": "0.5"}
    )
    try:
        process.wait_ready()
        yield process
    finally:
        if process.process.poll() is None:
            process.stop()


def test_hot_reload_new_version(endpoint_server, model_package, test_rows, tmp_path):
    status, headers, _ = invoke(endpoint_server, csv_body(test_rows[:1]), CSV_TYPE)
    assert status == 200
    assert headers["x-model-version"] == "v1"
    copy = tmp_path / "v2"
    shutil.copytree(model_package, copy)
    registry.publish(copy, "reload", "v2")
    deadline = time.monotonic() + 60
    version = "v1"
    while version != "v2" and time.monotonic() < deadline:
        time.sleep(0.5)
        status, headers, _ = invoke(endpoint_server, csv_body(test_rows[:1]), CSV_TYPE)
        assert status == 200
        version = headers["x-model-version"]
    assert version == "v2", endpoint_server.output()
    assert endpoint_server.process.poll() is None


def test_sigterm_finishes_in_flight_request(endpoint_server, test_rows):
    body = csv_body(test_rows)
    connection = http.client.HTTPConnection(
        "127.0.0.1", endpoint_server.port, timeout=30
    )
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", CSV_TYPE)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body[:100])
    time.sleep(0.5)
    endpoint_server.process.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    # The server stopped accepting connections but still reads this request.
    assert endpoint_server.process.poll() is None
    connection.send(body[100:])
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    assert response.status == 200
    assert len(json.loads(payload)["predictions"]) == ROWS
    assert endpoint_server.process.wait(timeout=30) == 0
