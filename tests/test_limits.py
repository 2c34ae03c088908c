"""Back-pressure, in process: the memory budget, the kernel gate and its deadline, Content-Encoding.

The served versions (a real burst, a real queue) are in tests/test_limits_live.py.
"""

from __future__ import annotations

import io
import threading
import time
import tracemalloc

import msgspec
import numpy as np
import orjson
import pytest
from litestar.testing import TestClient

from service import core, limits
from service.app import create_app, decode_json_request
from service.errors import Overloaded, PayloadTooLarge
from service.jsonkeys import find_duplicate_key
from service.settings import Settings

GOOD = {
    "labels": [0, 0, 1, 1, 2, 2],
    "pred_probs": [[0.9, 0.05, 0.05], [0.1, 0.85, 0.05], [0.05, 0.9, 0.05], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8],
                   [0.7, 0.2, 0.1]],
}  # fmt: skip
MiB = 1 << 20


def client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(warmup=False, **settings)))  # type: ignore[arg-type]


def npz_body(n: int, k: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, labels=rng.integers(0, k, n), pred_probs=rng.dirichlet(np.ones(k), n).astype(np.float32))
    return buf.getvalue()


def metric(c: TestClient, name: str, **labels: str) -> float:
    from serving import sample

    value = sample(c.get("/metrics").text, name, **labels)
    assert value is not None, name
    return value


def assert_503(r, type_suffix: str) -> dict:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert int(r.headers["retry-after"]) >= 1
    p = r.json()
    assert p["status"] == 503 and p["type"].endswith(type_suffix) and p["detail"], p
    return p


# ---------------------------------------------------------------- the budget


def test_reservation_grows_shrinks_and_refuses() -> None:
    budget = limits.MemoryBudget(100)
    reasons: list[str] = []
    a, b = limits.Reservation(budget, reasons.append), limits.Reservation(budget, reasons.append)
    a.resize(60, "body", "a")
    with pytest.raises(Overloaded) as exc:
        b.resize(50, "body", "b")  # 60 + 50 > 100: not now
    assert exc.value.status == 503 and exc.value.headers["Retry-After"] == str(limits.RETRY_AFTER_SECONDS)
    assert b.held == 0 and budget.used == 60
    with pytest.raises(PayloadTooLarge) as too_large:
        b.resize(101, "pred_probs", "b")  # never
    assert too_large.value.status == 413 and too_large.value.field == "pred_probs"
    assert "LABELQ_MAX_INFLIGHT_BYTES" in too_large.value.detail
    a.resize(30, "body", "a")  # shrinking always works
    b.resize(70, "body", "b")
    assert budget.used == 100
    a.release()
    b.release()
    b.release()  # twice is harmless
    assert budget.used == 0 and reasons == ["memory", "too_large"]


def test_json_estimate_bounds_the_measured_decode() -> None:
    """The budget's JSON estimate is at least what decoding really allocates (tracemalloc)."""
    rng = np.random.default_rng(1)
    for n, k, decimals in [(20_000, 10, None), (5_000, 40, 1), (30_000, 3, 3)]:
        P = rng.dirichlet(np.ones(k), n)
        if decimals:
            P = np.round(P, decimals)
        body = orjson.dumps({"labels": rng.integers(0, k, n), "pred_probs": P}, option=orjson.OPT_SERIALIZE_NUMPY)
        assert limits.count_json_values(body) == n * k + n
        tracemalloc.start()
        try:
            decode_json_request(body)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert limits.json_decode_bytes(body) >= len(body) + peak, (n, k, peak)


def test_compute_estimate_grows_with_k_squared_and_threads() -> None:
    assert limits.compute_bytes(1000, 10, 1) < limits.compute_bytes(1000, 10, 2)
    assert limits.compute_bytes(1, 100_000, 1) > 10 * 100_000**2  # K x K buffers, whatever N
    assert limits.compute_bytes(1, 100_000, 1, pairwise=False) < 100 * 100_000


def test_auto_budget_is_half_the_memory_per_worker() -> None:
    total = limits.memory_limit()
    assert total > 0
    assert limits.auto_budget(1) == max(64 * MiB, total // 2)
    assert limits.auto_budget(4) == max(64 * MiB, total // 2 // 4)


# ---------------------------------------------------------------- the gate


def test_gate_is_first_come_first_served_and_times_out() -> None:
    gate = limits.KernelGate()
    assert gate.acquire()
    order: list[int] = []

    def waiter(i: int) -> None:
        assert gate.acquire(timeout=30)
        order.append(i)
        gate.release()

    threads = []
    for i in range(5):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        while gate.waiting() < i + 1:
            time.sleep(0.001)
    t0 = time.monotonic()
    assert not gate.acquire(timeout=0.05)  # queued behind five, gives up
    assert time.monotonic() - t0 >= 0.05
    assert not gate.acquire(timeout=0)
    assert gate.waiting() == 5
    gate.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]
    assert not gate.locked() and gate.waiting() == 0
    with pytest.raises(RuntimeError):
        gate.release()


def test_gate_excludes_mutually_under_contention() -> None:
    gate = limits.KernelGate()
    inside = 0
    worst = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal inside, worst
        for _ in range(200):
            if gate.acquire(timeout=0.001 if _ % 3 else None):
                with lock:
                    inside += 1
                    worst = max(worst, inside)
                with lock:
                    inside -= 1
                gate.release()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert worst == 1 and not gate.locked()


def test_app_installs_the_gate_as_the_kernel_lock() -> None:
    create_app(Settings(warmup=False))
    assert isinstance(core._KERNEL_LOCK, limits.KernelGate)
    assert limits.install_kernel_gate() is core._KERNEL_LOCK  # once per process
    # outside a request the gate waits without a deadline, as the lock did
    result = core.find_issues(np.array(GOOD["labels"]), np.array(GOOD["pred_probs"]))
    assert result.num_label_issues == 2


# ---------------------------------------------------------------- through the app


def test_a_request_that_does_not_fit_gets_503_and_then_fits() -> None:
    with client(max_inflight_bytes=64 * MiB) as c:
        app_limits: limits.Limits = c.app.state.limits
        other = limits.Reservation(app_limits.budget)
        other.resize(64 * MiB - 1000, "body", "another request")  # the budget is almost all in use
        body = npz_body(2000, 10)
        r = c.post("/find-issues", content=body, headers={"Content-Type": "application/x-npz"})
        p = assert_503(r, "/overloaded")
        assert p["field"] == "body" and "LABELQ_MAX_INFLIGHT_BYTES" in p["detail"]
        r = c.post("/dataset-health", json=GOOD)  # even a small JSON body needs more than 1000 bytes
        assert_503(r, "/overloaded")
        assert metric(c, "labelq_rejected_requests_total", reason="memory") == 2
        other.release()
        r = c.post("/find-issues", content=body, headers={"Content-Type": "application/x-npz"})
        assert r.status_code == 200, r.text
        assert app_limits.budget.used == 0  # every reservation given back
        assert metric(c, "labelq_inflight_reserved_bytes") == 0
        assert metric(c, "labelq_inflight_budget_bytes") == 64 * MiB


@pytest.mark.parametrize("media", ["json", "npz"])
def test_the_arrays_are_reserved_before_they_are_allocated(media: str) -> None:
    """The body fits, but what decoding it would allocate does not: 503 before decoding."""
    n, k = 20_000, 10
    if media == "npz":
        body, ctype = npz_body(n, k), "application/x-npz"
        field = "pred_probs"
    else:
        rng = np.random.default_rng(0)
        body = orjson.dumps({"labels": rng.integers(0, k, n), "pred_probs": rng.dirichlet(np.ones(k), n)},
                            option=orjson.OPT_SERIALIZE_NUMPY)  # fmt: skip
        ctype, field = "application/json", "body"
    with client(max_inflight_bytes=64 * MiB) as c:
        other = limits.Reservation(c.app.state.limits.budget)
        other.resize(64 * MiB - limits.BODY_COPIES * len(body) - 1000, "body", "another request")
        r = c.post("/find-issues", content=body, headers={"Content-Type": ctype})
        assert assert_503(r, "/overloaded")["field"] == field
        other.release()


def test_k_squared_working_memory_over_the_budget_is_413() -> None:
    """N = 2, K = 3000: a 50 kB body whose K x K matrices need hundreds of MB."""
    k = 3000
    P = np.full((2, k), 1.0 / k)
    body = orjson.dumps({"labels": [0, 1], "pred_probs": P}, option=orjson.OPT_SERIALIZE_NUMPY)
    with client(max_inflight_bytes=64 * MiB) as c:
        for route in ("/find-issues", "/dataset-health"):
            r = c.post(route, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 413, r.text
            p = r.json()
            assert (
                p["field"] == "pred_probs" and "2 x 3000" in p["detail"] and "LABELQ_MAX_INFLIGHT_BYTES" in p["detail"]
            )
        # out-of-distribution has no K x K work: it is answered
        r = c.post("/out-of-distribution", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        assert metric(c, "labelq_rejected_requests_total", reason="too_large") == 2


def test_a_body_larger_than_the_budget_is_413_before_it_is_read() -> None:
    with client(max_inflight_bytes=64 * MiB, max_body_bytes=256 * MiB) as c:
        big = b"0" * (65 * MiB)
        r = c.post("/find-issues", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body", r.text


def test_a_request_whose_kernels_cannot_start_in_time_gets_503() -> None:
    with client(request_timeout_seconds=0.3) as c:
        gate = core._KERNEL_LOCK
        assert isinstance(gate, limits.KernelGate)
        assert gate.acquire()  # another request's kernels are running
        try:
            t0 = time.monotonic()
            r = c.post("/find-issues", json=GOOD)
            waited = time.monotonic() - t0
            p = assert_503(r, "/kernel-timeout")
            assert "LABELQ_REQUEST_TIMEOUT_SECONDS" in p["detail"]
            assert 0.3 <= waited < 10
            assert_503(c.post("/out-of-distribution", json=GOOD), "/kernel-timeout")
        finally:
            gate.release()
        assert metric(c, "labelq_rejected_requests_total", reason="timeout") == 2
        r = c.post("/find-issues", json=GOOD)
        assert r.status_code == 200, r.text
        assert "queue;dur=" in r.headers["server-timing"]
        assert c.app.state.limits.budget.used == 0


def test_a_request_waits_for_the_kernels_within_its_timeout() -> None:
    with client(request_timeout_seconds=30) as c:
        gate = core._KERNEL_LOCK
        assert gate.acquire()
        threading.Timer(0.3, gate.release).start()
        r = c.post("/find-issues", json=GOOD)
        assert r.status_code == 200, r.text
        queue = float(r.headers["server-timing"].split("queue;dur=")[1].split(",")[0])
        assert queue >= 200  # ms, waiting for the gate


# ---------------------------------------------------------------- Content-Encoding and duplicate keys


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "gzip, identity", "x-custom"])
def test_content_encoding_is_415(encoding: str) -> None:
    with client() as c:
        for route in ("/find-issues", "/dataset-health", "/out-of-distribution"):
            r = c.post(route, content=orjson.dumps(GOOD),
                       headers={"Content-Type": "application/json", "Content-Encoding": encoding})  # fmt: skip
            assert r.status_code == 415, r.text
            assert r.json()["field"] == "Content-Encoding"


def test_identity_content_encoding_is_accepted() -> None:
    with client() as c:
        r = c.post("/find-issues", content=orjson.dumps(GOOD),
                   headers={"Content-Type": "application/json", "Content-Encoding": "identity"})  # fmt: skip
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"labels": [0, 1], "labels": [1, 0], "pred_probs": [[1, 0], [0, 1]]}', "labels"),
        (b'{"labels": [0, 1], "pred_probs": [[1, 0], [0, 1]], "pred_probs": [[1, 0], [0, 1]]}', "pred_probs"),
        (b'{"labels": [0, 1], "pred_probs": [[1, 0], [0, 1]], "labels": [0, 1]}', "labels"),
        (b'{"options": {}, "labels": [0, 1], "pred_probs": [[1, 0], [0, 1]], "options": {}}', "options"),
        (
            (
                b'{"labels": [0, 1], "pred_probs": [[1, 0], [0, 1]], "options": {"rank_by": "self_confidence", '
                b'"rank_by": "normalized_margin"}}'
            ),
            "options.rank_by",
        ),
        (
            (
                b'{"labels": [0, 1], "pred_probs": [[1, 0], [0, 1]], "options": {"thresholds": {"method": "mean", '
                b'"method": "percentile"}}}'
            ),
            "options.thresholds.method",
        ),
        (b'{"lab\\u0065ls": [0, 1], "labels": [0, 1], "pred_probs": [[1, 0], [0, 1]]}', "labels"),  # same key
    ],
)
def test_duplicate_keys_are_422(body: bytes, field: str) -> None:
    assert find_duplicate_key(body) == field
    with client() as c:
        r = c.post("/find-issues", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["field"] == field and "more than once" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b' {\n "labels" : [0, 1] ,\t"pred_probs":[[1,0],[0,1]] , "options" : {"class_names": ["a", "a"]} }\r\n',
        b'{"labels": [0, 1], "pred_probs": [[1, 0], [0, 1]], "x\\"y": "}, \\"labels\\": ["}',
        b"[1, 2]",
        b"{}",
        b'{"labels": [0, 1], "\xff": 1, "\xff": 2}',  # invalid UTF-8: the decoder's 400, not ours
        b'{"labels": ' + b"[" * 100_000 + b"]" * 100_000 + b', "labels": 1}',  # too deep for msgspec: its 422
        b'{"labels": [0, 1',
    ],
)
def test_no_false_duplicates(body: bytes) -> None:
    assert find_duplicate_key(body) is None


def test_duplicate_check_relies_on_msgspec_views() -> None:
    """msgspec.Raw values are views into the body (the fast path of the check)."""
    body = b'{"a": [1, 2], "b": {"c": 3}}'
    raw = msgspec.json.decode(body, type=dict[str, msgspec.Raw])["b"]
    base = np.frombuffer(body, np.uint8).ctypes.data
    assert np.frombuffer(raw, np.uint8).ctypes.data - base == body.index(b'{"c"')


def test_in_process_api_is_unaffected_outside_requests() -> None:
    limits.admit(1 << 60, "body", "nothing")  # no request: no budget to refuse
    limits.admit_compute(0, [None, np.zeros((2, 100_000))])
