"""Optional API-key authentication: in process (every route, the schema, the settings) and served (the logs)."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

import httpx
import pytest
from litestar.testing import TestClient
from serving import sample, serve

from service import auth, limits
from service.app import create_app
from service.settings import Settings, SettingsError

KEY_ENV = "env-key-0123456789abcdef"
KEY_FILE = "file-key_ABCDEFGHIJKLMNOP+/=="
WRONG = "not-a-key-0123456789abcdef"
GOOD = {"labels": [0, 1, 1], "pred_probs": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(f"# rotated 2026-11\n\n  {KEY_FILE}  \n")
    return path


@pytest.fixture()
def client(keys_file: Path):
    settings = Settings.from_env({"LABELQ_API_KEYS": KEY_ENV, "LABELQ_API_KEYS_FILE": str(keys_file),
                                  "LABELQ_WARMUP": "false"})  # fmt: skip
    with TestClient(create_app(settings)) as c:
        yield c


def assert_401(r: httpx.Response, error: str | None = None) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["www-authenticate"].startswith("Bearer")
    if error:
        assert f'error="{error}"' in r.headers["www-authenticate"]
    p = r.json()
    assert p["status"] == 401 and p["field"] == "Authorization" and p["type"].endswith("/unauthorized"), p


def test_requests_need_a_valid_key(client: TestClient) -> None:
    assert_401(client.post("/find-issues", json=GOOD))
    assert_401(client.post("/find-issues", json=GOOD, headers=bearer(WRONG)), "invalid_token")
    assert_401(client.post("/find-issues", json=GOOD, headers=bearer(KEY_ENV + "x")), "invalid_token")
    assert_401(client.post("/find-issues", json=GOOD, headers=bearer(KEY_ENV[:-1])), "invalid_token")
    assert_401(client.post("/find-issues", json=GOOD, headers={"Authorization": f"Basic {KEY_ENV}"}))
    assert_401(client.post("/find-issues", json=GOOD, headers={"Authorization": "Bearer "}))
    assert_401(client.post("/find-issues", json=GOOD, headers={"Authorization": KEY_ENV}))
    for key in (KEY_ENV, KEY_FILE):
        r = client.post("/find-issues", json=GOOD, headers=bearer(key))
        assert r.status_code == 200, r.text
    r = client.post("/find-issues", json=GOOD, headers={"Authorization": f"bearer   {KEY_ENV}"})  # scheme any case
    assert r.status_code == 200, r.text


def test_probes_and_metrics_are_open(client: TestClient) -> None:
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code in (200, 503)
    r = client.get("/metrics")
    assert r.status_code == 200
    assert sample(r.text, "labelq_requests_total", route="/find-issues", method="POST", status="401") is None
    client.post("/find-issues", json=GOOD)
    after = client.get("/metrics").text
    assert sample(after, "labelq_requests_total", route="/find-issues", method="POST", status="401") == 1


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "x", path)


def test_every_other_route_is_protected_by_default(client: TestClient) -> None:
    """Whatever routes the app has (others are added over time: batched endpoints...), every method of
    every one answers 401 without a key unless its path is in auth.OPEN_PATHS or auth.PAGE_PATHS."""
    checked = 0
    for route in client.app.routes:
        for method in sorted(route.methods):
            r = client.request(method, _concrete(route.path))
            if auth.is_open(route.path):
                assert r.status_code != 401, (method, route.path)
            else:
                assert r.status_code == 401, (method, route.path, r.status_code)
                checked += 1
    assert checked >= 6  # at least the three POST endpoints and the schema pages


def test_the_report_page_is_open_and_its_api_calls_are_not(client: TestClient) -> None:
    """The page and its files hold no data (a browser cannot send a key to load them); the page sends the
    key typed into it with its calls to the API, which need it like any client's."""
    paths = [p for p in auth.PAGE_PATHS if any(r.path == p for r in client.app.routes)]
    if not paths:
        pytest.skip("this build has no report page")
    for path in paths:
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code)
    assert_401(client.post("/dataset-health", json=GOOD))
    assert client.post("/dataset-health", json=GOOD, headers=bearer(KEY_FILE)).status_code == 200


def test_auth_comes_before_the_memory_budget(client: TestClient) -> None:
    """A request without a key is refused as such, reserving nothing, even when the budget is in use."""
    app_limits: limits.Limits = client.app.state.limits
    other = limits.Reservation(app_limits.budget)
    other.resize(app_limits.budget.limit, "body", "everything")
    try:
        assert_401(client.post("/find-issues", json=GOOD))
        assert client.post("/find-issues", json=GOOD, headers=bearer(KEY_ENV)).status_code == 503
    finally:
        other.release()


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = auth.ApiKeys(["a" * 16, "b" * 40, "c" * 20])
    for token, ok in [("a" * 16, True), ("c" * 20, True), ("x", False), ("b" * 4000, False)]:
        calls.clear()
        assert keys.check(token) is ok
        assert calls == [(32, 32)] * 3  # every key, always, on fixed-length digests
    assert "a" * 16 not in repr(keys)


def test_schema_declares_the_bearer_scheme(client: TestClient) -> None:
    spec = client.get("/schema/openapi.json", headers=bearer(KEY_ENV)).json()
    assert spec["components"]["securitySchemes"][auth.SCHEME] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"][auth.SCHEME][
            "description"]}  # fmt: skip
    assert spec["security"] == [{auth.SCHEME: []}]
    for path, item in spec["paths"].items():
        for op in item.values():
            if auth.is_open(path):
                assert op["security"] == [] and "401" not in op["responses"]
            else:
                assert "security" not in op and "401" in op["responses"]


def test_without_keys_there_is_no_auth() -> None:
    with TestClient(create_app(Settings(warmup=False))) as c:
        assert c.post("/find-issues", json=GOOD).status_code == 200
        spec = c.get("/schema/openapi.json").json()
        assert "security" not in spec and "securitySchemes" not in spec["components"]
        assert all("401" not in op["responses"] for item in spec["paths"].values() for op in item.values())


# ---------------------------------------------------------------- settings


def test_keys_file_format(tmp_path: Path, keys_file: Path) -> None:
    s = Settings.from_env({"LABELQ_API_KEYS_FILE": str(keys_file)})
    assert s.bearer_keys() == (KEY_FILE,)
    s = Settings.from_env({"LABELQ_API_KEYS": f"{KEY_ENV}, {KEY_FILE}", "LABELQ_API_KEYS_FILE": str(keys_file)})
    assert s.bearer_keys() == (KEY_ENV, KEY_FILE)  # once each
    assert KEY_ENV not in repr(s) and KEY_ENV not in str(s)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LABELQ_API_KEYS": "short-key"}, "LABELQ_API_KEYS: Value error, key 1 of 1 is not a bearer token"),
        ({"LABELQ_API_KEYS": f"{KEY_ENV},bad key with spaces"}, "key 2 of 2"),
        ({"LABELQ_API_KEYS": " , "}, "holds no key"),  # set but empty: never silently open
        ({"LABELQ_API_KEYS_FILE": "/nonexistent/keys"}, "cannot read the API keys file"),
    ],
)
def test_bad_keys_stop_the_start_without_echoing_them(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(env)
    assert message in str(exc.value)
    for value in env.values():
        for part in value.split(","):
            if len(part.strip()) > 3:
                assert part.strip() not in str(exc.value) or part.startswith("/")


def test_bad_keys_file_stops_the_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n\n")
    with pytest.raises(SettingsError, match="holds no key"):
        Settings.from_env({"LABELQ_API_KEYS_FILE": str(empty)})
    bad = tmp_path / "bad"
    bad.write_text(f"{KEY_ENV}\nsecret value with spaces\n")
    with pytest.raises(SettingsError, match="line 2 is not a bearer token") as exc:
        Settings.from_env({"LABELQ_API_KEYS_FILE": str(bad)})
    assert "secret value" not in str(exc.value) and KEY_ENV not in str(exc.value)


# ---------------------------------------------------------------- served


def test_served_with_keys_never_logs_them(tmp_path: Path, keys_file: Path) -> None:
    env = {"LABELQ_API_KEYS": KEY_ENV, "LABELQ_API_KEYS_FILE": str(keys_file), "LABELQ_LOG_LEVEL": "debug"}
    with serve(tmp_path / "stderr.log", env=env) as served:
        url = f"{served.base}/find-issues"
        assert_401(httpx.post(url, json=GOOD, timeout=60))
        assert_401(httpx.post(url, json=GOOD, headers=bearer(WRONG), timeout=60), "invalid_token")
        for key in (KEY_ENV, KEY_FILE):
            r = httpx.post(url, json=GOOD, headers=bearer(key), timeout=60)
            assert r.status_code == 200, r.text
        r = httpx.post(f"{served.base}/dataset-health", json=GOOD, headers=bearer(KEY_FILE), timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{served.base}/health/ready", timeout=10).status_code == 200
        scrape = httpx.get(f"{served.base}/metrics", timeout=10)
        assert scrape.status_code == 200
        assert sample(scrape.text, "labelq_requests_total", route="/find-issues", method="POST", status="401") == 2
        assert httpx.get(f"{served.base}/schema/openapi.json", timeout=10).status_code == 401
        log = served.log()
    lines = [line for line in served.log_lines() if line.get("message") == "request"]
    assert [line["status"] for line in lines if line.get("route") == "/find-issues"] == [401, 401, 200, 200]
    for secret in (KEY_ENV, KEY_FILE, WRONG, "Bearer", "authorization"):
        assert secret not in log, secret
