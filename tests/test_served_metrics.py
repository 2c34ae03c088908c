"""/metrics of the real server with two worker processes: numbers add up across
workers, `promtool check metrics` passes, and a real Prometheus on loopback
scrapes it and answers a query.

promtool and prometheus come from Debian's `prometheus` package; the session
fixture installs it with apt-get when it is missing (CI runs as root on
Debian) and skips those tests, saying why, when it cannot.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving import Served, free_port, sample, serve

FIND_ISSUES_200 = {"route": "/find-issues", "method": "POST", "status": "200"}
BODY = {
    "labels": [0, 0, 1, 1, 2, 2],
    "pred_probs": [
        [0.9, 0.05, 0.05],
        [0.1, 0.85, 0.05],
        [0.05, 0.9, 0.05],
        [0.2, 0.7, 0.1],
        [0.1, 0.1, 0.8],
        [0.7, 0.2, 0.1],
    ],
}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("two-workers") / "stderr.log"
    with serve(log, args=("--workers", "2"), env={"LABELQ_WARMUP": "false"}) as served:
        yield served


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of promtool and prometheus, installed from Debian's package if needed."""

    def found() -> dict[str, str]:
        return {name: path for name in ("promtool", "prometheus") if (path := shutil.which(name))}

    tools = found()
    if len(tools) == 2:
        return tools
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("needs promtool and prometheus (Debian: apt-get install prometheus); no apt-get or not root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
    ):
        try:
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            output = getattr(exc, "stderr", b"") or b""
            pytest.skip(f"could not install Debian's prometheus package ({' '.join(cmd)}): {output.decode()[-500:]}")
    tools = found()
    if len(tools) != 2:
        pytest.skip(f"the prometheus package did not provide promtool and prometheus: found {tools}")
    return tools


def post_find_issues(base: str, n: int, dataset: str | None = None) -> list[int]:
    headers = {"X-Labelq-Dataset": dataset} if dataset else {}

    def one(_: int) -> int:  # a new connection each time, so the kernel spreads them over the workers
        return httpx.post(f"{base}/find-issues", json=BODY, headers=headers, timeout=600).status_code

    with cf.ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(n)))


def test_counts_add_up_across_workers(two_workers):
    base = two_workers.base
    before = sample(httpx.get(f"{base}/metrics").text, "labelq_requests_total", **FIND_ISSUES_200) or 0
    m = 24
    assert post_find_issues(base, m) == [200] * m
    # Scrape until both workers have answered a scrape: each answer must be the total over both.
    seen: dict[str, float] = {}
    for i in range(60):
        rid = f"scrape-{i}"
        text = httpx.get(f"{base}/metrics", headers={"X-Request-ID": rid}).text
        seen[rid] = sample(text, "labelq_requests_total", **FIND_ISSUES_200)
        assert sample(text, "labelq_build_info", **build_labels(text)) == 1  # merged as a max, not summed
        assert sample(text, "labelq_requests_in_flight") == 1  # this scrape, summed over live workers
        pid_of = {line["request_id"]: line["pid"] for line in two_workers.log_lines() if "request_id" in line}
        if len({pid_of.get(r) for r in seen} - {None}) == 2:
            break
    assert set(seen.values()) == {before + m}, seen
    lines = two_workers.log_lines()
    scrape_pids = {line["pid"] for line in lines if line.get("request_id") in seen}
    work_pids = {line["pid"] for line in lines if line.get("route") == "/find-issues"}
    assert len(scrape_pids) == 2, "both workers answered scrapes with the same total"
    assert len(work_pids) == 2, "both workers served /find-issues"
    assert sample(text, "labelq_examples_per_request_count", dataset="none") == before + m


def build_labels(text: str) -> dict[str, str]:
    from prometheus_client.parser import text_string_to_metric_families

    return next(f for f in text_string_to_metric_families(text) if f.name == "labelq_build_info").samples[0].labels


def test_promtool_check_metrics_passes_on_a_real_scrape(two_workers, prometheus_tools):
    base = two_workers.base
    post_find_issues(base, 2, dataset="promtool")
    httpx.get(f"{base}/no/such/route")
    httpx.post(f"{base}/find-issues", json={"labels": [0], "pred_probs": [[2.0, -1.0]]})  # 422
    text = httpx.get(f"{base}/metrics").text
    for family in ("labelq_requests_total", "labelq_flagged_ratio_bucket", "labelq_build_info"):
        assert family in text
    proc = subprocess.run(
        [prometheus_tools["promtool"], "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc


def test_a_real_prometheus_scrapes_and_queries_the_service(two_workers, prometheus_tools, tmp_path):
    base = two_workers.base
    assert post_find_issues(base, 3, dataset="prom-e2e") == [200] * 3
    expected = sample(httpx.get(f"{base}/metrics").text, "labelq_requests_total", **FIND_ISSUES_200)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: labelq\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{two_workers.port}']}}]\n"
    )
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as out:
        prom = subprocess.Popen(
            [
                prometheus_tools["prometheus"],
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        assert wait_for_query(api, 'up{job="labelq"}', 1.0, prom, log), "target never up"
        q = 'sum(labelq_requests_total{route="/find-issues",method="POST",status="200"})'
        assert wait_for_query(api, q, expected, prom, log), f"{q} never reached {expected}"
        q = 'sum(labelq_flagged_ratio_count{dataset="prom-e2e"})'
        assert wait_for_query(api, q, 3.0, prom, log)
    finally:
        prom.terminate()
        try:
            prom.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()


def wait_for_query(api: str, query: str, want: float, prom: subprocess.Popen, log: Path, timeout: float = 60) -> bool:
    """Poll an instant query until its single value equals ``want``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert prom.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
        try:
            r = httpx.get(f"{api}/query", params={"query": query}, timeout=5)
            result = r.json()["data"]["result"] if r.status_code == 200 else []
            if result:
                last = float(result[0]["value"][1])
                if last == want:
                    return True
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    print(f"last value of {query}: {last}")
    return False
