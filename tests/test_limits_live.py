"""Back-pressure of a real `labelq serve`: bursts of large requests against a small memory budget, and
a queue longer than the request timeout. Every request is answered (200, or 503 with Retry-After),
the process survives and stays correct."""

from __future__ import annotations

import concurrent.futures as cf
import io
import time

import httpx
import numpy as np
import orjson
import pytest
from serving import sample, serve

from service import core

MiB = 1 << 20
NPZ = "application/x-npz"


def dataset(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    P = np.empty((n, k), np.float32)
    for i in range(0, n, 50_000):
        m = min(50_000, n - i)
        P[i : i + m] = rng.dirichlet(np.ones(k), m)
    return rng.integers(0, k, n), P


def npz_body(labels: np.ndarray, P: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, labels=labels, pred_probs=P)
    return buf.getvalue()


def vm(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


def post(base: str, body: bytes, ctype: str) -> httpx.Response:
    # a fresh connection per request, as many independent clients would
    return httpx.post(f"{base}/find-issues?filter_by=both" if ctype == NPZ else f"{base}/find-issues", content=body,
                      headers={"Content-Type": ctype}, timeout=300)  # fmt: skip


def assert_overloaded(r: httpx.Response, kind: str) -> None:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    assert int(r.headers["retry-after"]) >= 1
    p = r.json()
    assert p["status"] == 503 and p["type"].endswith(kind), p


def test_a_burst_over_the_memory_budget_gets_200_or_503(tmp_path) -> None:
    """Budget 100 MiB. Each large npz request (200k x 20 float32, 17 MB) reserves about 85 MB while its
    arrays are read and 67 MB before its kernels, each medium JSON one (50k x 10, 10 MB) 45 MB while it is
    decoded: of the twelve sent at once, one or two fit at a time."""
    big_l, big_p = dataset(200_000, 20, 1)
    mid_l, mid_p = dataset(50_000, 10, 2)
    big = npz_body(big_l, big_p)
    mid = orjson.dumps({"labels": mid_l, "pred_probs": mid_p.astype(np.float64)}, option=orjson.OPT_SERIALIZE_NUMPY)
    want_big = core.find_issues(big_l, big_p, filter_by="both").ranked_issue_indices.tolist()
    want_mid = core.find_issues(mid_l, mid_p.astype(np.float64)).ranked_issue_indices.tolist()
    budget = 100 * MiB
    env = {"LABELQ_MAX_INFLIGHT_BYTES": str(budget), "LABELQ_REQUEST_TIMEOUT_SECONDS": "300"}
    with serve(tmp_path / "stderr.log", env=env) as served:
        pid = served.proc.pid  # one worker: uvicorn serves in this process
        assert post(served.base, big, NPZ).status_code == 200  # first-request costs out of the way
        rss_before = vm(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the peak from now on
        payloads = [(big, NPZ), (mid, "application/json")] * 6
        with cf.ThreadPoolExecutor(len(payloads)) as pool:
            answers = list(pool.map(lambda p: post(served.base, *p), payloads))
        hwm = vm(pid, "VmHWM")
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503}, statuses
        assert 200 in statuses and 503 in statuses, statuses
        for (body, ctype), r in zip(payloads, answers, strict=True):
            if r.status_code == 200:
                assert r.json()["ranked_issue_indices"] == (want_big if ctype == NPZ else want_mid)
            else:
                assert_overloaded(r, "/overloaded")
        # still ready, nothing reserved, every refusal counted
        assert httpx.get(f"{served.base}/health/ready", timeout=10).status_code == 200
        scrape = httpx.get(f"{served.base}/metrics", timeout=10).text
        assert sample(scrape, "labelq_inflight_reserved_bytes") == 0
        assert sample(scrape, "labelq_rejected_requests_total", reason="memory") == statuses.count(503)
        # a client that honours Retry-After gets its answer
        time.sleep(max(int(r.headers["retry-after"]) for r in answers if r.status_code == 503))
        for (body, ctype), r in zip(payloads, answers, strict=True):
            if r.status_code == 503:
                again = post(served.base, body, ctype)
                assert again.status_code == 200, again.text
        assert served.proc.poll() is None
        print(
            f"burst: {statuses.count(200)} x 200, {statuses.count(503)} x 503; server RSS {rss_before / MiB:.0f} "
            f"MiB before, peak {hwm / MiB:.0f} MiB (budget {budget / MiB:.0f} MiB)"
        )
    # Resident memory grew by about the budget (0.96 to 1.25 x measured), where the twelve requests at
    # once would need ~600 MB: the estimates cover the transient copies; allow for the allocator's slack.
    assert hwm - rss_before < 1.6 * budget, (rss_before, hwm)


def test_a_queue_longer_than_the_timeout_gets_503(tmp_path) -> None:
    """Timeout 0.5 s. Ten requests of 300k x 20 at once queue for one process's kernels (a few hundred ms
    each): the first ones are answered, those that cannot start in time get 503 with Retry-After."""
    labels, P = dataset(300_000, 20, 3)
    body = npz_body(labels, P)
    want = core.find_issues(labels, P, filter_by="both").ranked_issue_indices.tolist()
    env = {"LABELQ_REQUEST_TIMEOUT_SECONDS": "0.5"}
    with serve(tmp_path / "stderr.log", env=env) as served:
        assert post(served.base, body, NPZ).status_code == 200
        with cf.ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: post(served.base, body, NPZ), range(10)))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
        for r in answers:
            if r.status_code == 200:
                assert r.json()["ranked_issue_indices"] == want
            else:
                assert_overloaded(r, "/kernel-timeout")
                assert "LABELQ_REQUEST_TIMEOUT_SECONDS" in r.json()["detail"]
        scrape = httpx.get(f"{served.base}/metrics", timeout=10).text
        assert sample(scrape, "labelq_rejected_requests_total", reason="timeout") == statuses.count(503)
        assert httpx.get(f"{served.base}/health/ready", timeout=10).status_code == 200
        assert post(served.base, body, NPZ).status_code == 200
        print(f"queue: {statuses.count(200)} x 200, {statuses.count(503)} x 503")


@pytest.mark.parametrize("expect_continue", [False, True])
def test_a_refused_body_still_gets_its_answer(tmp_path, expect_continue: bool) -> None:
    """Refused on its Content-Length (more than the whole budget: 413), a 40 MB body being sent is read
    and dropped so the client reads the problem instead of a reset connection; a client waiting for
    `100 Continue` gets the answer without sending the body."""
    import socket

    body = b"0" * (40 * MiB)
    env = {"LABELQ_MAX_INFLIGHT_BYTES": str(16 * MiB)}
    with serve(tmp_path / "stderr.log", env=env) as served:
        head = (f"POST /find-issues HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{'Expect: 100-continue' + chr(13) + chr(10) if expect_continue else ''}"
                "Connection: close\r\n\r\n").encode()  # fmt: skip
        with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
            sock.sendall(head)
            if not expect_continue:
                sock.sendall(body)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        status_line, _, rest = data.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 413"), data[:300]
        assert b'"field":"body"' in rest and b"LABELQ_MAX_INFLIGHT_BYTES" in rest
        assert httpx.get(f"{served.base}/health/ready", timeout=10).status_code == 200
