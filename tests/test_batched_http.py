"""The /batched/* routes: JSON and npz batches give what the in-process
steps give, and mangled contexts and partials get a 4xx naming the field,
never a 500."""

from __future__ import annotations

import copy
import io
from collections import Counter

import datasets
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient
from test_batched import assert_same

from service import batched, find_issues
from service.app import create_app
from service.settings import Settings

SPEC = next(s for s in datasets.specs() if s.n == 1000 and s.k == 25 and s.dtype == "float16")
NPZ = "application/x-npz"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False))) as c:
        yield c


@pytest.fixture(scope="module")
def data():
    return datasets.make(SPEC)


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def post(client, path, body, npz=False, accept_npz=False):
    headers = {"Content-Type": NPZ if npz else "application/json"}
    if accept_npz:
        headers["Accept"] = NPZ
    content = body if npz else orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return client.post(path, content=content, headers=headers)


def run_http(client, labels, P, size, use_npz, **options):
    """Every pass through the routes; returns the contexts and partials seen."""
    N, K = P.shape
    r = post(client, "/batched/start", {"class_counts": np.bincount(labels, minlength=K), "n_examples": N,
                                         "dtype": P.dtype.name, "options": options})
    assert r.status_code == 200, r.text
    ctx = r.json()
    seen = {"contexts": [ctx], "partials": {}}
    bounds = [(a, min(N, a + size)) for a in range(0, N, size)]

    def send(step, a, b, **extra):
        if use_npz:
            ctx_bytes = np.frombuffer(orjson.dumps(ctx), np.uint8)
            body = _npz(labels=labels[a:b], pred_probs=P[a:b], row_offset=np.int64(a), context=ctx_bytes, **extra)
            r = post(client, f"/batched/{step}", body, npz=True, accept_npz=step == "apply")
        else:
            body = {"labels": labels[a:b], "pred_probs": P[a:b].astype(np.float64), "row_offset": a, "context": ctx}
            r = post(client, f"/batched/{step}", {**body, **extra})
        assert r.status_code == 200, r.text
        if r.headers["content-type"].startswith(NPZ):
            with np.load(io.BytesIO(r.content)) as z:
                return {k: z[k] for k in z.files}
        return r.json()

    for kind in ctx["passes"]:
        parts = [
            send(kind, a, b, **({"class_offsets": np.bincount(labels[:a], minlength=K)} if kind == "sums" else {}))
            for a, b in bounds
        ]
        seen["partials"][kind] = parts
        half = post(client, "/batched/merge", {"context": ctx, "partials": parts[: len(parts) // 2]})
        assert half.status_code == 200, half.text
        r = post(client, "/batched/finalize", {"context": ctx, "partials": [half.json(), *parts[len(parts) // 2 :]]})
        assert r.status_code == 200, r.text
        ctx = r.json()
        seen["contexts"].append(ctx)
    pieces = [send("apply", a, b) for a, b in bounds]
    return batched.assemble(pieces, ctx), seen


@pytest.mark.parametrize("use_npz", [False, True], ids=["json", "npz"])
@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "confident_learning", "low_self_confidence"])
def test_routes_equal_one_request(client, data, use_npz, filter_by):
    labels, P = data
    if not use_npz:
        P = P.astype(np.float64)  # JSON numbers are float64
    result, _ = run_http(client, labels, P, 333, use_npz, filter_by=filter_by)
    assert_same(find_issues(labels, P, filter_by=filter_by), result)


@pytest.fixture(scope="module")
def recorded(client, data):
    labels, P = data
    return run_http(client, labels, P.astype(np.float64), 400, False, filter_by="both")[1]


def _mutations():
    values = st.sampled_from([None, -1, 0, 1, 2**63, 1e308, "x", [], [[]], [-1, 5], {"a": 1}, True, [0.5] * 3])
    return st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "drop", "scale", "shorten"]), values)


def _mutate(obj, pick, how, value):
    """Change one field (or one element) of a context or partial."""
    obj = copy.deepcopy(obj)
    keys = sorted(obj)
    key = keys[pick % len(keys)]
    if how == "drop":
        del obj[key]
    elif how == "set":
        obj[key] = value
    elif how == "scale" and isinstance(obj[key], list) and obj[key]:
        flat = obj[key] if not isinstance(obj[key][0], list) else obj[key][0]
        if flat and isinstance(flat[0], (int, float)):
            flat[pick % len(flat)] = flat[pick % len(flat)] * -3 + 1
    elif how == "shorten" and isinstance(obj[key], list):
        obj[key] = obj[key][:-1]
    return obj


STATUSES: Counter[int] = Counter()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(which=st.integers(0, 2), target=st.sampled_from(["context", "partial"]), mutation=_mutations())
def test_mangled_merge_and_finalize_get_4xx(client, recorded, which, target, mutation):
    kind = ["sums", "joint", "candidates"][which]
    ctx = recorded["contexts"][which]
    parts = recorded["partials"][kind]
    if target == "context":
        ctx = _mutate(ctx, *mutation)
    else:
        parts = [_mutate(parts[0], *mutation), *parts[1:]]
    for path in ("/batched/merge", "/batched/finalize"):
        r = post(client, path, {"context": ctx, "partials": parts})
        STATUSES[r.status_code] += 1
        assert r.status_code < 500, r.text
        if r.status_code != 200:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json().get("field"), r.text


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(which=st.integers(0, 3), mutation=_mutations())
def test_mangled_context_in_a_map_step_gets_4xx(client, recorded, data, which, mutation):
    labels, P = data
    step = ["sums", "joint", "candidates", "apply"][which]
    ctx = _mutate(recorded["contexts"][which], *mutation)
    body = {"labels": labels[:50], "pred_probs": P[:50].astype(np.float64), "row_offset": 0, "context": ctx}
    if step == "sums":
        body["class_offsets"] = [0] * P.shape[1]
    r = post(client, f"/batched/{step}", body)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.json().get("field"), r.text


def test_a_partial_from_another_k_is_named(client, recorded):
    ctx = recorded["contexts"][1]
    part = dict(recorded["partials"]["joint"][0], n_classes=7)
    r = post(client, "/batched/merge", {"context": ctx, "partials": [part]})
    assert r.status_code == 422 and r.json()["field"] == "n_classes"


def test_a_tampered_count_is_named(client, recorded):
    ctx = recorded["contexts"][1]
    parts = copy.deepcopy(recorded["partials"]["joint"])
    parts[0]["confident_joint_raw"][0][0] += 10**6
    r = post(client, "/batched/finalize", {"context": ctx, "partials": parts})
    assert r.status_code == 422 and r.json()["field"] == "confident_joint_raw"


def test_wrong_content_type(client):
    r = client.post("/batched/merge", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["field"] == "Content-Type"


def test_the_mangling_reached_both_answers(client, recorded):
    """The fuzz above sent requests that were refused and some that were not
    (a mutation that leaves a valid request): it exercised the checks."""
    if not STATUSES:
        test_mangled_merge_and_finalize_get_4xx(client, recorded)
    assert STATUSES[422] > 50 and STATUSES[200] > 0, STATUSES
