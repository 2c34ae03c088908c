"""Graceful shutdown of the real server: SIGTERM while requests are in flight."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import time

import httpx
import numpy as np
import orjson
import pytest

from serving import sample, serve

GRACE_SECONDS = 30
IN_FLIGHT = 6


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    rng = np.random.default_rng(7)
    n, k = 50_000, 20  # ~20 MB of JSON: about a second or two each, and the kernels run one at a time
    P = rng.dirichlet(np.ones(k), n)
    labels = rng.integers(0, k, n)
    body = orjson.dumps({"labels": labels, "pred_probs": P}, option=orjson.OPT_SERIALIZE_NUMPY)
    env = {"LABELQ_WARMUP": "false", "LABELQ_GRACE_SECONDS": str(GRACE_SECONDS)}
    with serve(tmp_path / "stderr.log", env=env) as served:
        # compile (or load from cache) the kernels this request needs before timing anything
        prime = httpx.post(
            f"{served.base}/find-issues", json={"labels": [0, 1], "pred_probs": [[1, 0], [0, 1]]}, timeout=600
        )
        assert prime.status_code == 200

        def post() -> httpx.Response:
            return httpx.post(
                f"{served.base}/find-issues", content=body, headers={"Content-Type": "application/json"}, timeout=120
            )

        with cf.ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(post) for _ in range(IN_FLIGHT)]
            deadline = time.monotonic() + 60
            while True:  # all of them accepted and being handled (the scrape itself is one more)
                in_flight = sample(httpx.get(f"{served.base}/metrics", timeout=10).text, "labelq_requests_in_flight")
                if in_flight == IN_FLIGHT + 1:
                    break
                assert not any(f.done() for f in futures), "requests finished before SIGTERM: make them bigger"
                assert time.monotonic() < deadline, f"only {in_flight} in flight"
                time.sleep(0.05)
            t0 = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            # no new connections once draining, while the requests are still running...
            while time.monotonic() - t0 < 10:
                try:
                    httpx.get(f"{served.base}/health/live", timeout=5)
                except httpx.ConnectError:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("still accepting connections 10 s after SIGTERM")
            assert not all(f.done() for f in futures), "refused only after the requests ended: make them bigger"
            results = [f.result() for f in futures]
        # ...but every request already in flight completes
        assert [r.status_code for r in results] == [200] * IN_FLIGHT
        assert all(r.json()["n_examples"] == n for r in results)
        assert served.proc.wait(timeout=GRACE_SECONDS + 10) == 0
        assert time.monotonic() - t0 < GRACE_SECONDS
        log = served.log_lines()
    assert any(line["message"].startswith("shutdown signal: draining") for line in log)
    done = [line for line in log if line.get("route") == "/find-issues" and line.get("n") == n]
    assert len(done) == IN_FLIGHT and all(line["status"] == 200 for line in done)
