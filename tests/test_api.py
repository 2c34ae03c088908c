"""The HTTP API through litestar's test client: the contract, the errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from litestar.testing import TestClient

import datasets
from service import find_issues
from service.app import create_app
from service.core import Options
from service.schemas import FindIssuesOptions
from service.settings import Settings


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, max_body_bytes=4 << 20))) as c:
        yield c


def body(labels, P, **options):
    out = {"labels": [int(v) for v in labels], "pred_probs": np.asarray(P, dtype=np.float64).tolist()}
    if options:
        out["options"] = options
    return out


def dataset(n=300, k=4, seed=3):
    return datasets.make(datasets.Spec(seed=seed, n=n, k=k))


GOOD = body(*dataset(20, 3))


def assert_problem(r, status, field):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    p = r.json()
    assert p["status"] == status and p["title"] and p["detail"] and p["type"]
    if field is not None:
        assert p.get("field") == field, p
    return p


# ---------------------------------------------------------------- contract


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"filter_by": "both", "rank_by": "normalized_margin", "adjust_pred_probs": True},
        {"filter_by": "prune_by_class", "frac_noise": 0.5, "min_examples_per_class": 3},
        {"filter_by": "low_self_confidence", "rank_by": "confidence_weighted_entropy"},
        {"num_to_remove_per_class": [3, 2, 1, 0]},
    ],
)
def test_response_equals_in_process_api(client, options):
    labels, P = dataset()
    r = client.post("/find-issues", json=body(labels, P, **options))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    got = r.json()
    want = find_issues(labels, P, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    assert got["n_examples"] == 300 and got["n_classes"] == 4
    assert got["num_label_issues"] == want.num_label_issues == sum(got["is_label_issue"])
    assert got["is_label_issue"] == want.is_label_issue.tolist()
    assert got["suggested_label"] == want.suggested_label.tolist()
    assert got["ranked_issue_indices"] == want.ranked_issue_indices.tolist()
    assert sorted(got["ranked_issue_indices"]) == [i for i, f in enumerate(got["is_label_issue"]) if f]
    np.testing.assert_array_equal(got["label_quality_score"], want.label_quality_score)  # exact round trip
    noise = got["noise"]
    assert set(noise) == {
        "thresholds", "ood_thresholds", "confident_joint", "joint", "noise_matrix", "inverse_noise_matrix", "py",
        "estimated_num_label_issues",
    }
    for name in ("thresholds", "confident_joint", "joint", "noise_matrix", "inverse_noise_matrix", "py"):
        np.testing.assert_array_equal(noise[name], getattr(want.noise, name), err_msg=name)
    assert noise["estimated_num_label_issues"] == want.noise.estimated_num_label_issues
    assert "kernel;dur=" in r.headers["server-timing"]


def test_options_are_optional_and_default_to_the_reference(client):
    labels, P = dataset()
    a = client.post("/find-issues", json=body(labels, P)).json()
    b = client.post("/find-issues", json=body(labels, P, filter_by="prune_by_noise_rate", rank_by="self_confidence",
                                              frac_noise=1.0, num_to_remove_per_class=None,
                                              min_examples_per_class=1, adjust_pred_probs=False)).json()
    assert a == b


def test_schema_defaults_equal_core_defaults():
    wire, core = FindIssuesOptions(), Options()
    for name in Options.__dataclass_fields__:
        assert getattr(wire, name) == getattr(core, name), name


def test_ints_are_accepted_as_probabilities(client):
    r = client.post("/find-issues", json={"labels": [0, 1, 1], "pred_probs": [[1, 0], [0, 1], [0.5, 0.5]]})
    assert r.status_code == 200, r.text
    assert r.json()["suggested_label"] == [0, 1, 0]


def test_rows_within_tolerance_are_used_as_given(client):
    P = [[0.6004, 0.4], [0.2, 0.8], [0.7, 0.2996], [0.1, 0.9]]
    r = client.post("/find-issues", json={"labels": [0, 1, 0, 1], "pred_probs": P})
    assert r.status_code == 200, r.text
    assert r.json()["label_quality_score"] == [0.6004, 0.8, 0.7, 0.9]


def test_health_and_openapi(client):
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").status_code in (200, 503)
    spec = client.get("/schema/openapi.json").json()
    op = spec["paths"]["/find-issues"]["post"]
    assert op["operationId"] == "findIssues"
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/FindIssuesRequest")
    assert {"200", "400", "413", "415", "422"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    for name in ("FindIssuesRequest", "FindIssuesOptions", "ThresholdsOptions", "FindIssuesResponse", "NoiseEstimates"):
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} is undocumented"
    assert set(schemas["FindIssuesResponse"]["properties"]) == {
        "n_examples", "n_classes", "num_label_issues", "is_label_issue", "label_quality_score",
        "suggested_label", "ranked_issue_indices", "category", "category_counts", "noise",
    }


# ---------------------------------------------------------------- errors

P2 = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
L2 = [0, 1, 1]

BAD = [
    # (description, json body, status, field)
    ("inf value", {"labels": L2, "pred_probs": [[1e999, 0.1], [0.2, 0.8], [0.6, 0.4]]}, 422, "pred_probs[0][0]"),
    ("negative value", {"labels": L2, "pred_probs": [[0.9, 0.1], [-0.2, 1.2], [0.6, 0.4]]}, 422, "pred_probs[1][0]"),
    ("value above one", {"labels": L2, "pred_probs": [[0.9, 0.1], [0.2, 0.8], [1.4, -0.4]]}, 422, "pred_probs[2][0]"),
    ("row off", {"labels": L2, "pred_probs": [[0.9, 0.1], [0.2, 0.7], [0.6, 0.4]]}, 422, "pred_probs[1]"),
    ("row off tolerance", {"labels": L2, "pred_probs": [[0.9, 0.1], [0.2, 0.8], [0.6, 0.41]],
                           "options": {"prob_tolerance": 1e-3}}, 422, "pred_probs[2]"),
    ("label too large", {"labels": [0, 2, 1], "pred_probs": P2}, 422, "labels[1]"),
    ("label negative", {"labels": [0, 1, -1], "pred_probs": P2}, 422, "labels[2]"),
    ("label fractional", {"labels": [0, 1.5, 1], "pred_probs": P2}, 422, "labels[1]"),
    ("label string", {"labels": [0, "1", 1], "pred_probs": P2}, 422, "labels[1]"),
    ("label bool", {"labels": [0, True, 1], "pred_probs": P2}, 422, "labels[1]"),
    ("label huge", {"labels": [0, 10**30, 1], "pred_probs": P2}, 422, "labels[1]"),
    ("prob string", {"labels": L2, "pred_probs": [[0.9, "0.1"], [0.2, 0.8], [0.6, 0.4]]}, 422, "pred_probs[0][1]"),
    ("prob null", {"labels": L2, "pred_probs": [[0.9, None], [0.2, 0.8], [0.6, 0.4]]}, 422, "pred_probs[0][1]"),
    ("N mismatch", {"labels": [0, 1], "pred_probs": P2}, 422, "labels"),
    ("ragged", {"labels": L2, "pred_probs": [[0.9, 0.1], [1.0], [0.6, 0.4]]}, 422, "pred_probs[1]"),
    ("K = 1", {"labels": [0, 0], "pred_probs": [[1.0], [1.0]]}, 422, "pred_probs"),
    ("N = 0", {"labels": [], "pred_probs": []}, 422, "pred_probs"),
    ("missing labels", {"pred_probs": P2}, 422, None),
    ("missing pred_probs", {"labels": L2}, 422, None),
    ("not an object", [1, 2, 3], 422, None),
    ("unknown top-level field", {"labels": L2, "pred_probs": P2, "extra": 1}, 422, None),
    ("unknown option", {"labels": L2, "pred_probs": P2, "options": {"filterby": "both"}}, 422, "options"),
    ("bad filter_by", {"labels": L2, "pred_probs": P2, "options": {"filter_by": "magic"}}, 422, "options.filter_by"),
    ("bad rank_by", {"labels": L2, "pred_probs": P2, "options": {"rank_by": 3}}, 422, "options.rank_by"),
    ("frac_noise > 1", {"labels": L2, "pred_probs": P2, "options": {"frac_noise": 1.5}}, 422, "options.frac_noise"),
    ("frac_noise < 0", {"labels": L2, "pred_probs": P2, "options": {"frac_noise": -0.1}}, 422, "options.frac_noise"),
    ("min_examples < 0", {"labels": L2, "pred_probs": P2, "options": {"min_examples_per_class": -1}}, 422,
     "options.min_examples_per_class"),
    ("min_examples float", {"labels": L2, "pred_probs": P2, "options": {"min_examples_per_class": 1.5}}, 422,
     "options.min_examples_per_class"),
    ("adjust not bool", {"labels": L2, "pred_probs": P2, "options": {"adjust_pred_probs": "yes"}}, 422,
     "options.adjust_pred_probs"),
    ("tolerance 0", {"labels": L2, "pred_probs": P2, "options": {"prob_tolerance": 0}}, 422, "options.prob_tolerance"),
    ("ntr wrong length", {"labels": L2, "pred_probs": P2, "options": {"num_to_remove_per_class": [1]}}, 422,
     "options.num_to_remove_per_class"),
    ("ntr negative", {"labels": L2, "pred_probs": P2, "options": {"num_to_remove_per_class": [1, -1]}}, 422,
     "options.num_to_remove_per_class[1]"),
    ("ntr with confident_learning", {"labels": L2, "pred_probs": P2, "options": {
        "num_to_remove_per_class": [1, 1], "filter_by": "confident_learning"}}, 422,
     "options.num_to_remove_per_class"),
    ("frac_noise with predicted_neq_given", {"labels": L2, "pred_probs": P2, "options": {
        "frac_noise": 0.5, "filter_by": "predicted_neq_given"}}, 422, "options.frac_noise"),
    ("adjust with entropy", {"labels": L2, "pred_probs": P2, "options": {
        "adjust_pred_probs": True, "rank_by": "confidence_weighted_entropy"}}, 422, "options.adjust_pred_probs"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_named_4xx(client, case):
    _, payload, status, field = case
    content = json.dumps(payload).replace("Infinity", "1e999")  # an overflowing literal is valid JSON
    r = client.post("/find-issues", content=content, headers={"content-type": "application/json"})
    assert_problem(r, status, field)
    # The service still answers a good request.
    assert client.post("/find-issues", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b'{"labels": [0, 1], "pred_probs": [[NaN, 0.5]]}', b"\xff\xfe", b'{"labels": [0,1],}'],
    ids=["empty", "truncated", "NaN literal", "not utf-8", "trailing comma"],
)
def test_malformed_json_is_400(client, raw):
    r = client.post("/find-issues", content=raw, headers={"content-type": "application/json"})
    assert_problem(r, 400, "body")


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/xml", "multipart/form-data"])
def test_wrong_content_type_is_415(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/find-issues", content=json.dumps(GOOD), headers=headers)
    assert_problem(r, 415, "Content-Type")


def test_json_with_charset_is_fine(client):
    r = client.post("/find-issues", content=json.dumps(GOOD), headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_oversize_body_is_413(client):
    big = b'{"labels": [' + b"0," * (3 << 20) + b"0]}"
    r = client.post("/find-issues", content=big, headers={"content-type": "application/json"})
    assert_problem(r, 413, "body")
    assert client.post("/find-issues", json=GOOD).status_code == 200


def test_unknown_route_and_method(client):
    assert_problem(client.get("/nope"), 404, None)
    assert_problem(client.get("/find-issues"), 405, None)


# ---------------------------------------------------------------- in-process errors


@pytest.mark.parametrize(
    "labels, P, field",
    [
        (np.array([0, 1]), np.array([[0.5, 0.5], [np.nan, 1.0]]), "pred_probs[1][0]"),
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]], dtype=np.int64), "pred_probs"),
        (np.array([0, 1]), np.array([0.5, 0.5]), "pred_probs"),
        (np.array([0.0, 1.0]), np.array([[0.5, 0.5], [0.5, 0.5]]), "labels"),
        (np.array([[0, 1]]), np.array([[0.5, 0.5], [0.5, 0.5]]), "labels"),
        (np.array([0, 3]), np.array([[0.5, 0.5], [0.5, 0.5]], dtype=np.float16), "labels[1]"),
    ],
)
def test_in_process_errors_name_the_field(labels, P, field):
    from service import InputError

    with pytest.raises(InputError) as exc:
        find_issues(labels, P)
    assert exc.value.field == field


def test_in_process_unknown_option():
    from service import InputError

    with pytest.raises(InputError) as exc:
        find_issues([0, 1], np.array([[0.5, 0.5], [0.5, 0.5]]), filterby="both")
    assert exc.value.field == "options.filterby"


def test_float16_input_is_not_copied_to_float64(monkeypatch):
    """The kernels read float16 through a uint16 view: no upcast of the matrix."""
    from service import core

    seen = {}
    original = core._compute

    def spy(labels, P, dtype, o):
        seen["dtype"], seen["base"] = P.dtype, P.base
        return original(labels, P, dtype, o)

    monkeypatch.setattr(core, "_compute", spy)
    labels, P = dataset()
    P16 = P.astype(np.float16)
    find_issues(labels, P16)
    assert seen["dtype"] == np.uint16 and seen["base"] is P16
