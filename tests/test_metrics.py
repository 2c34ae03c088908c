"""Metrics, request logs and lifecycle through litestar's test client (one process).

Each test builds its own app, hence its own registry: counts are exact.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

import datasets
from serving import sample
from service import find_issues, logs, metrics
from service.app import create_app
from service.settings import Settings, SettingsError

# name -> (type, label names) of every labelq metric family, as parsed from a scrape
FAMILIES = {
    "labelq_requests": ("counter", {"route", "method", "status"}),
    "labelq_request_duration_seconds": ("histogram", {"route", "method"}),
    "labelq_request_body_bytes": ("histogram", {"route"}),
    "labelq_requests_in_flight": ("gauge", set()),
    "labelq_examples_per_request": ("histogram", {"dataset"}),
    "labelq_classes_per_request": ("histogram", {"dataset"}),
    "labelq_kernel_duration_seconds": ("histogram", {"filter_by"}),
    "labelq_flagged_ratio": ("histogram", {"dataset", "filter_by"}),
    "labelq_warmup_complete": ("gauge", set()),
    "labelq_warmup_duration_seconds": ("gauge", set()),
    "labelq_build_info": ("gauge", {"version", "numba", "numpy", "python"}),
    # service/limits.py
    "labelq_rejected_requests": ("counter", {"reason"}),
    "labelq_inflight_reserved_bytes": ("gauge", set()),
    "labelq_inflight_budget_bytes": ("gauge", set()),
}


def make_client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(warmup=False, **settings)))  # type: ignore[arg-type]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        c.app.state.labelq.ready.wait(10)
        yield c


def payload(n: int = 200, k: int = 4, seed: int = 5) -> tuple[np.ndarray, np.ndarray, dict]:
    labels, P = datasets.make(datasets.Spec(seed=seed, n=n, k=k))
    return labels, P, {"labels": labels.tolist(), "pred_probs": P.tolist()}


def scrape(client: TestClient) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200
    return r.text


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The request log lines, formatted as in production."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(logs.ACCESS_LOGGER)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ---------------------------------------------------------------- the scrape


def test_scrape_has_every_family_with_its_type_and_labels(client):
    labels, P, body = payload()
    assert client.post("/find-issues", json=body).status_code == 200
    r = client.get("/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert set(families) == set(FAMILIES), "no other (or _created) series"
    for name, (type_, label_names) in FAMILIES.items():
        assert families[name].type == type_, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == label_names, (name, s)
    want = find_issues(labels, P)
    text = r.text
    assert sample(text, "labelq_requests_total", route="/find-issues", method="POST", status="200") == 1
    assert sample(text, "labelq_examples_per_request_sum", dataset="none") == 200
    assert sample(text, "labelq_classes_per_request_sum", dataset="none") == 4
    frac = sample(text, "labelq_flagged_ratio_sum", dataset="none", filter_by="prune_by_noise_rate")
    assert frac == pytest.approx(want.num_label_issues / 200)
    assert sample(text, "labelq_kernel_duration_seconds_count", filter_by="prune_by_noise_rate") == 1
    assert sample(text, "labelq_request_body_bytes_count", route="/find-issues") == 1
    assert sample(text, "labelq_request_body_bytes_sum", route="/find-issues") > 200 * 4 * 5
    assert sample(text, "labelq_requests_in_flight") == 1  # the scrape itself
    assert sample(text, "labelq_warmup_complete") == 1
    build = [s for s in families["labelq_build_info"].samples]
    assert len(build) == 1 and build[0].value == 1 and build[0].labels["numba"] and build[0].labels["python"]


def test_openmetrics_on_request(client):
    r = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.endswith("# EOF\n")


def test_latency_buckets_span_sub_millisecond_to_a_minute():
    assert metrics.LATENCY_BUCKETS[0] < 0.001 and metrics.LATENCY_BUCKETS[-1] >= 30
    assert list(metrics.LATENCY_BUCKETS) == sorted(metrics.LATENCY_BUCKETS)


def test_routes_are_templates_and_unmatched_paths_fold(client):
    for i in range(30):
        assert client.get(f"/no/such/path/{i}").status_code == 404
    assert client.post("/health/live").status_code == 405
    assert client.request("BREW", "/find-issues").status_code in (404, 405)
    assert client.post("/find-issues", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    text = scrape(client)
    routes = {
        s.labels["route"]
        for f in text_string_to_metric_families(text)
        if f.name == "labelq_requests"
        for s in f.samples
    }
    assert routes <= {"unmatched", "/health/live", "/find-issues"}, routes
    assert sample(text, "labelq_requests_total", route="unmatched", method="GET", status="404") == 30
    assert "BREW" not in text
    assert sample(text, "labelq_requests_total", route="/find-issues", method="POST", status="400") == 1
    # no result, no per-result observation
    assert sample(text, "labelq_examples_per_request_count", dataset="none") is None


def test_invalid_input_is_counted_but_not_observed(client):
    r = client.post("/find-issues", json={"labels": [0, 5], "pred_probs": [[0.5, 0.5], [0.5, 0.5]]})
    assert r.status_code == 422
    text = scrape(client)
    assert sample(text, "labelq_requests_total", route="/find-issues", method="POST", status="422") == 1
    assert "labelq_flagged_ratio_count" not in text


# ---------------------------------------------------------------- dataset tag


def test_dataset_tags_fold_into_other():
    tags = metrics.DatasetTags(limit=2)
    assert [tags(v) for v in ["a", "b", "c", "a", None, "", " b ", "bad value", "other", "x" * 65]] == [
        "a",
        "b",
        "other",
        "a",
        "none",
        "none",
        "b",
        "other",
        "other",
        "other",
    ]
    allow = metrics.DatasetTags(["vendor-a", "vendor-b"], limit=100)
    assert [allow(v) for v in ["vendor-a", "vendor-c", "vendor-b", None]] == ["vendor-a", "other", "vendor-b", "none"]


def test_dataset_header_labels_the_result_metrics():
    _, _, body = payload(60, 3)
    with make_client(dataset_tag_limit=2) as c:
        # requests without a result take no slot
        c.get("/health/live", headers={"X-Labelq-Dataset": "probe"})
        bad = c.post("/find-issues", json={"labels": [9], "pred_probs": [[1, 0]]}, headers={"X-Labelq-Dataset": "junk"})
        assert bad.status_code == 422
        for tag in ["alpha", "beta", "gamma", "delta", "alpha"]:
            assert c.post("/find-issues", json=body, headers={"X-Labelq-Dataset": tag}).status_code == 200
        text = scrape(c)
    assert sample(text, "labelq_examples_per_request_count", dataset="alpha") == 2
    assert sample(text, "labelq_examples_per_request_count", dataset="beta") == 1
    assert sample(text, "labelq_examples_per_request_count", dataset="other") == 2
    assert "gamma" not in text and "delta" not in text
    with make_client(dataset_tags=("vendor-a",)) as c:
        c.post("/find-issues", json=body, headers={"X-Labelq-Dataset": "vendor-a"})
        c.post("/find-issues", json=body, headers={"X-Labelq-Dataset": "alpha"})
        text = scrape(c)
    assert sample(text, "labelq_flagged_ratio_count", dataset="vendor-a", filter_by="prune_by_noise_rate") == 1
    assert sample(text, "labelq_flagged_ratio_count", dataset="other", filter_by="prune_by_noise_rate") == 1


def test_observe_result_outside_a_request_is_a_no_op():
    metrics.observe_result(filter_by="both", n=10, k=2, flagged=1, kernel_seconds=0.1)


# ---------------------------------------------------------------- logs


def test_one_json_line_per_request_with_request_id_and_no_data(client, access_log):
    _, P, body = payload(50, 3, seed=9)
    r = client.post("/find-issues", json=body, headers={"X-Request-ID": "job-17.batch-3"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "job-17.batch-3"
    r2 = client.get("/health/live", headers={"X-Request-ID": "not a token\n"})
    generated = r2.headers["x-request-id"]
    assert len(generated) == 32 and generated != "not a token\n"
    client.get("/nowhere")
    lines = [json.loads(line) for line in access_log.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert first["message"] == "request" and first["level"] == "info" and first["pid"] == os.getpid()
    assert first["request_id"] == "job-17.batch-3"
    assert first["route"] == "/find-issues" and first["method"] == "POST" and first["status"] == 200
    assert first["n"] == 50 and first["k"] == 3 and first["dataset"] == "none"
    assert first["filter_by"] == "prune_by_noise_rate" and isinstance(first["flagged"], int)
    assert 0 < first["duration_s"] < 60 and first["body_bytes"] == len(json.dumps(body, separators=(",", ":")))
    assert lines[1]["request_id"] == generated and lines[1]["route"] == "/health/live"
    assert lines[2]["route"] == "unmatched" and lines[2]["status"] == 404
    text = access_log.getvalue()
    assert "pred_probs" not in text and "labels" not in text
    assert repr(float(P[0, 0]))[:8] not in text  # no probabilities


def test_formatter_adds_exceptions_and_extras():
    record = logging.LogRecord("labelq", logging.ERROR, __file__, 1, "boom %s", ("x",), None)
    record.route = "/find-issues"
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    out = json.loads(logs.JsonFormatter().format(record))
    assert out["message"] == "boom x" and out["route"] == "/find-issues" and "ValueError: bad" in out["exc"]


# ---------------------------------------------------------------- lifecycle


def test_ready_is_503_while_draining(client):
    assert client.get("/health/ready").json() == {"status": "ok"}
    client.app.state.labelq.draining.set()
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json() == {"status": "draining"}
    assert client.get("/health/live").status_code == 200


def test_metrics_route_is_not_in_the_openapi_schema(client):
    assert "/metrics" not in client.get("/schema/openapi.json").json()["paths"]


def test_new_settings_from_the_environment():
    s = Settings.from_env(
        {"LABELQ_GRACE_SECONDS": "12.5", "LABELQ_DATASET_TAGS": "vendor-a, vendor-b", "LABELQ_DATASET_TAG_LIMIT": "5"}
    )
    assert s.grace_seconds == 12.5 and s.dataset_tags == ("vendor-a", "vendor-b") and s.dataset_tag_limit == 5
    assert Settings().grace_seconds == 30 and Settings().dataset_tags == () and Settings().dataset_tag_limit == 20
    for env, name in [
        ({"LABELQ_GRACE_SECONDS": "0"}, "LABELQ_GRACE_SECONDS"),
        ({"LABELQ_GRACE_SECONDS": "soon"}, "LABELQ_GRACE_SECONDS"),
        ({"LABELQ_DATASET_TAGS": "ok,not ok"}, "LABELQ_DATASET_TAGS"),
        ({"LABELQ_DATASET_TAGS": "other"}, "LABELQ_DATASET_TAGS"),
        ({"LABELQ_DATASET_TAG_LIMIT": "-1"}, "LABELQ_DATASET_TAG_LIMIT"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)


# ---------------------------------------------------------------- multiprocess files


def test_multiprocess_dir_is_fresh_and_removed(tmp_path, monkeypatch):
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    with metrics.multiprocess_dir() as path:
        assert os.environ[metrics.MULTIPROC_ENV] == path and os.path.isdir(path)
    assert not os.path.exists(path) and metrics.MULTIPROC_ENV not in os.environ
    given = tmp_path / "prom"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(given))
    with metrics.multiprocess_dir() as path:
        assert path == str(given) and list(given.iterdir()) == []


def test_dead_workers_live_gauges_are_dropped(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in [f"gauge_livesum_{dead.pid}.db", f"gauge_livesum_{os.getpid()}.db", f"counter_{dead.pid}.db"]:
        (tmp_path / name).write_bytes(b"")
    metrics.mark_dead_workers(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"gauge_livesum_{os.getpid()}.db", f"counter_{dead.pid}.db"]  # counters of dead workers still count
    )
