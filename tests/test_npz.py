"""The binary format: npz in, npz out, and npz that must be refused."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

import datasets
from service import find_issues, npz
from service.app import create_app
from service.settings import Settings

NPZ = "application/x-npz"


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, max_cells=10_000_000))) as c:
        yield c


def npz_bytes(compressed=False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def post(client, body, query="", accept=None):
    headers = {"content-type": NPZ}
    if accept:
        headers["accept"] = accept
    return client.post(f"/find-issues{query}", content=body, headers=headers)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip_equals_in_process(client, dtype, compressed):
    labels, P = datasets.make(datasets.Spec(seed=5, n=800, k=5, dtype=dtype))
    r = post(client, npz_bytes(compressed, labels=labels, pred_probs=P),
             "?filter_by=both&rank_by=normalized_margin&num_to_remove_per_class=3,3,3,3,3", accept=NPZ)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(NPZ)
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    want = find_issues(labels, P, filter_by="both", rank_by="normalized_margin",
                       num_to_remove_per_class=(3, 3, 3, 3, 3))
    flat = {**{k: v for k, v in want.to_dict().items() if k != "noise"}, **want.to_dict()["noise"]}
    assert set(z.files) == set(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(z[name], value, err_msg=name)
    assert z["n_examples"].shape == () and int(z["n_examples"]) == 800


def test_npz_input_is_computed_in_its_own_precision(client):
    """float32 data over npz is computed as float32 (JSON would make it float64)."""
    labels, P = datasets.make(datasets.Spec(seed=6, n=500, k=4, dtype="float32"))
    r = post(client, npz_bytes(labels=labels, pred_probs=P))
    assert r.status_code == 200
    assert r.json()["is_label_issue"] == find_issues(labels, P).is_label_issue.tolist()


def test_json_response_is_the_default(client):
    labels, P = datasets.make(datasets.Spec(seed=7, n=50, k=3))
    r = post(client, npz_bytes(labels=labels, pred_probs=P))
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["n_examples"] == 50


def test_json_request_can_ask_for_npz(client):
    r = client.post("/find-issues", json={"labels": [0, 1], "pred_probs": [[0.9, 0.1], [0.3, 0.7]]},
                    headers={"accept": NPZ})
    assert r.status_code == 200 and r.headers["content-type"].startswith(NPZ)
    assert np.load(io.BytesIO(r.content))["suggested_label"].tolist() == [0, 1]


GOOD_L = np.array([0, 1, 1])
GOOD_P = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])


def lying_header(shape) -> bytes:
    """An npz whose pred_probs header declares ``shape`` but holds 6 values."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("labels.npy", _npy(GOOD_L))
        header = {"descr": "<f8", "fortran_order": False, "shape": shape}
        raw = io.BytesIO()
        np.lib.format.write_array_header_1_0(raw, header)
        zf.writestr("pred_probs.npy", raw.getvalue() + GOOD_P.tobytes())
    return buf.getvalue()


def _npy(a) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def pickled() -> bytes:
    buf = io.BytesIO()
    obj = np.array([{"a": 1}, {"b": 2}, None], dtype=object)
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("labels.npy", _npy(GOOD_L))
        b = io.BytesIO()
        np.save(b, obj, allow_pickle=True)
        zf.writestr("pred_probs.npy", b.getvalue())
    return buf.getvalue()


def bomb() -> bytes:
    """A small compressed member that declares and inflates to a huge array."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.npy", _npy(GOOD_L))
        header = {"descr": "<f8", "fortran_order": False, "shape": (40_000_000, 10)}
        raw = io.BytesIO()
        np.lib.format.write_array_header_1_0(raw, header)
        zf.writestr("pred_probs.npy", raw.getvalue() + bytes(8 * 1_000_000))
    return buf.getvalue()


def negative_bomb() -> bytes:
    """A compressed member whose header declares a negative dimension over 100 MB of zeros: reading
    "-16 bytes" would once inflate all of it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels.npy", _npy(GOOD_L))
        raw = io.BytesIO()
        np.lib.format.write_array_header_1_0(raw, {"descr": "<f8", "fortran_order": False, "shape": (-8, 2)})
        zf.writestr("pred_probs.npy", raw.getvalue() + bytes(100_000_000))
    return buf.getvalue()


def corrupt_crc() -> bytes:
    data = bytearray(npz_bytes(labels=GOOD_L, pred_probs=GOOD_P))
    i = data.rfind(GOOD_P.tobytes()[:8])
    data[i] ^= 0xFF
    return bytes(data)


BAD = [
    ("not a zip", b"hello", "", 400, "body"),
    ("truncated", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P)[:-40], "", 400, None),
    ("corrupted data (CRC)", corrupt_crc(), "", 400, "pred_probs"),
    ("missing labels", npz_bytes(pred_probs=GOOD_P), "", 422, "labels"),
    ("extra array", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P, other=GOOD_L), "", 422, "other"),
    ("pickled objects", pickled(), "", 422, "pred_probs"),
    ("header claims 10^12 elements", lying_header((1_000_000, 1_000_000)), "", 413, "pred_probs"),
    ("header claims more than the data", lying_header((30, 2)), "", 422, "pred_probs"),
    ("header claims less than the data", lying_header((2, 2)), "", 422, "pred_probs"),
    ("zip bomb", bomb(), "", 413, "pred_probs"),
    ("header with a negative dimension", lying_header((-1, 2)), "", 422, "pred_probs"),
    ("zip bomb behind a negative dimension", negative_bomb(), "", 422, "pred_probs"),
    ("string labels", npz_bytes(labels=np.array(["a", "b", "c"]), pred_probs=GOOD_P), "", 422, "labels"),
    ("integer pred_probs", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P.astype(int)), "", 422, "pred_probs"),
    ("float labels", npz_bytes(labels=GOOD_L.astype(float), pred_probs=GOOD_P), "", 422, "labels"),
    ("unknown query option", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P), "?filterby=both", 422, "options.filterby"),
    ("duplicate query option", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P), "?frac_noise=0.5&frac_noise=0.6", 422,
     "options.frac_noise"),
    ("bad query value", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P), "?frac_noise=lots", 422, "options.frac_noise"),
    ("bad boolean", npz_bytes(labels=GOOD_L, pred_probs=GOOD_P), "?adjust_pred_probs=maybe", 422,
     "options.adjust_pred_probs"),
    ("NaN value", npz_bytes(labels=GOOD_L, pred_probs=np.array([[0.9, 0.1], [np.nan, 0.8], [0.6, 0.4]])), "", 422,
     "pred_probs[1][0]"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_npz_is_a_named_4xx(client, case):
    _, body, query, status, field = case
    r = post(client, body, query)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    if field is not None:
        assert r.json()["field"] == field
    ok = post(client, npz_bytes(labels=GOOD_L, pred_probs=GOOD_P))
    assert ok.status_code == 200


def test_json_query_options_are_refused(client):
    r = client.post("/find-issues?filter_by=both", json={"labels": [0, 1], "pred_probs": [[0.9, 0.1], [0.3, 0.7]]})
    assert r.status_code == 422 and r.json()["field"] == "query"


def test_json_cells_limit_is_413():
    with TestClient(create_app(Settings(warmup=False, max_cells=8))) as c:
        r = c.post("/find-issues", json={"labels": [0, 1, 0, 1, 0], "pred_probs": [[0.5, 0.5]] * 5})
        assert r.status_code == 413 and "limit is 8" in r.json()["detail"]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_is_the_crc_of_the_concatenation(a, b):
    assert npz.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_parallel_crc32_equals_zlib(monkeypatch, threads):
    monkeypatch.setattr(npz, "_CRC_PIECE", 1000)  # small pieces, so that every thread count splits
    data = np.random.default_rng(threads).bytes(100_003)
    assert npz.crc32(memoryview(data), threads) == zlib.crc32(data)
    assert npz.crc32(memoryview(data)[5:20_000], threads) == zlib.crc32(data[5:20_000])


def test_a_corrupt_large_stored_member_is_refused(monkeypatch):
    """The CRC check still refuses a flipped byte when it runs in pieces."""
    monkeypatch.setattr(npz, "_CRC_PIECE", 1 << 12)
    labels, P = datasets.make(datasets.Spec(seed=3, n=2000, k=5))
    buf = io.BytesIO()
    np.savez(buf, labels=labels, pred_probs=P.astype(np.float32))
    body = bytearray(buf.getvalue())
    body[len(body) // 2] ^= 0x10
    with pytest.raises(npz.MalformedNpz, match="CRC"):
        npz.read_request(bytes(body), 10**9)
