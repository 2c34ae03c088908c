"""Dataset health and out-of-distribution scores: conformance with the
reference (cleanlab 2.9.0 ``health_summary`` and ``OutOfDistribution``) on
generated and real datasets, and the two HTTP endpoints (JSON, npz, errors).

Orders and counts must be identical; floats equal to 1e-9 relative (float64
input) or 1e-6 (float16/32). The reference sorts its tables with pandas'
default (unstable) sort; the oracle runs it stable (equal values in index
order, what we document), and untouched where its order has no ties.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import reference
from litestar.testing import TestClient

from service import InputError, dataset_health, out_of_distribution
from service.app import create_app
from service.settings import Settings

# Every third generated dataset up to 20k rows: all dtypes, noise shapes and corners.
SPECS = [s for s in datasets.specs()[::3] if s.n <= 20_000]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "labelerrors"
NPZ = "application/x-npz"

CLASS_COLUMNS = {
    "class_index": "Class Index",
    "label_issues": "Label Issues",
    "inverse_label_issues": "Inverse Label Issues",
    "label_noise": "Label Noise",
    "inverse_label_noise": "Inverse Label Noise",
    "label_quality_score": "Label Quality Score",
}
PAIR_COLUMNS = {
    "class_index_a": "Class Index A",
    "class_index_b": "Class Index B",
    "num_overlapping_examples": "Num Overlapping Examples",
    "joint_probability": "Joint Probability",
}
OOD_PARAMS = [
    {"method": "entropy", "adjust_pred_probs": True},
    {"method": "entropy", "adjust_pred_probs": False},
    {"method": "least_confidence", "adjust_pred_probs": True},
    {"method": "least_confidence", "adjust_pred_probs": False},
    {"method": "gen", "adjust_pred_probs": False},
    {"method": "gen", "adjust_pred_probs": True, "M": 3, "gamma": 0.5},
]


def rtol(dtype) -> float:
    return 1e-9 if np.dtype(dtype) == np.float64 else 1e-6


def check_health(ours, ref, tol):
    assert ours.overall_label_health_score == ref["overall_label_health_score"]
    np.testing.assert_allclose(ours.joint, ref["joint"], rtol=tol, atol=1e-300)
    for table, columns, name in (
        (ours.classes_by_label_quality, CLASS_COLUMNS, "classes_by_label_quality"),
        (ours.overlapping_classes, PAIR_COLUMNS, "overlapping_classes"),
    ):
        for field, column in columns.items():
            got, want = getattr(table, field), ref[name][column]
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=tol, atol=1e-15, err_msg=f"{name}.{field}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{name}.{field}")


def check_health_where_ties_do_not_matter(ours, labels, P, asymmetric):
    """Against the untouched reference: each table's order wherever its own
    order does not depend on how pandas' unstable sort breaks ties."""
    stable = reference.health_summary(labels, P, asymmetric=asymmetric)
    plain = reference.health_summary(labels, P, asymmetric=asymmetric, stable=False)
    for name, attr, column in (
        ("classes_by_label_quality", "class_index", "Class Index"),
        ("overlapping_classes", "class_index_a", "Class Index A"),
    ):
        if np.array_equal(stable[name][column], plain[name][column]):
            np.testing.assert_array_equal(getattr(getattr(ours, name), attr), plain[name][column])


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_matches_reference(spec: datasets.Spec):
    labels, P = datasets.make(spec)
    tol = rtol(P.dtype)
    for asymmetric in (False, True):
        ours = dataset_health(labels, P, asymmetric=asymmetric)
        check_health(ours, reference.health_summary(labels, P, asymmetric=asymmetric), tol)
        if not asymmetric:
            check_health_where_ties_do_not_matter(ours, labels, P, asymmetric)
    for params in OOD_PARAMS:
        ours = out_of_distribution(P, labels, **params)
        want = reference.ood_scores(P, labels, **params)
        np.testing.assert_allclose(ours.ood_score, want, rtol=tol, atol=1e-12, err_msg=str(params))


def load_real(name: str):
    folder = DATA / name
    if not folder.exists():
        pytest.skip(f"shared data not found at {folder}")
    return np.load(folder / "labels.npy", allow_pickle=False), np.load(folder / "pred_probs.npy", allow_pickle=False)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_real_set_matches_reference(name: str, dtype: str):
    labels, P = load_real(name)
    P = P.astype(dtype)
    tol = rtol(dtype)
    names = [f"class {k}" for k in range(P.shape[1])]
    ours = dataset_health(labels, P, class_names=names)
    ref = reference.health_summary(labels, P, class_names=names)
    check_health(ours, ref, tol)
    assert ours.classes_by_label_quality.class_name == list(ref["classes_by_label_quality"]["Class Name"])
    assert ours.overlapping_classes.class_name_a == list(ref["overlapping_classes"]["Class Name A"])
    assert ours.overlapping_classes.class_name_b == list(ref["overlapping_classes"]["Class Name B"])
    for params in OOD_PARAMS:
        ours = out_of_distribution(P, labels, **params)
        np.testing.assert_allclose(
            ours.ood_score, reference.ood_scores(P, labels, **params), rtol=tol, atol=1e-12, err_msg=str(params)
        )


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_given_confident_thresholds_score_new_data_as_the_reference(dtype):
    """Thresholds fitted on one set score another (the reference's fit, then
    score), in the precision of ``pred_probs - thresholds``."""
    train_labels, train = datasets.make(datasets.Spec(seed=41, n=2000, k=6, dtype=dtype))
    _, test = datasets.make(datasets.Spec(seed=42, n=500, k=6, dtype=dtype))
    fitted = out_of_distribution(train, train_labels).confident_thresholds
    for given in (fitted.astype(dtype), fitted):  # the reference's own fitted dtype, and float64
        for method in ("entropy", "least_confidence", "gen"):
            ours = out_of_distribution(test, method=method, confident_thresholds=given)
            ref = reference.ood_scores(test, method=method, confident_thresholds=given)
            np.testing.assert_allclose(ours.ood_score, ref, rtol=rtol(dtype), err_msg=f"{method} {given.dtype}")


def test_values_within_tolerance_above_one():
    """A value of 1.0004 is accepted as by /find-issues (the reference's input
    check refuses it when adjusting), except by the unadjusted entropy, which
    the reference refuses too."""
    labels = np.array([0, 1, 0, 1])
    P = np.array([[1.0004, 0.0], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    for method in ("least_confidence", "gen"):  # unchecked by the reference without adjustment
        ours = out_of_distribution(P, method=method, adjust_pred_probs=False)
        want = reference.ood_scores(P, method=method, adjust_pred_probs=False)
        np.testing.assert_allclose(ours.ood_score, want, rtol=1e-9)
    for method in ("entropy", "least_confidence", "gen"):
        scores = out_of_distribution(P, labels, method=method).ood_score
        assert np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()
    with pytest.raises(InputError) as exc:
        out_of_distribution(P, adjust_pred_probs=False)
    assert exc.value.field == "pred_probs[0]"


def test_scores_without_labels_when_not_adjusted():
    _, P = datasets.make(datasets.Spec(seed=43, n=300, k=4, dtype="float32"))
    ours = out_of_distribution(P, adjust_pred_probs=False, method="least_confidence")
    np.testing.assert_array_equal(ours.ood_score, P.max(axis=1))
    assert ours.confident_thresholds is None and ours.method == "least_confidence"


def test_health_of_a_clean_dataset():
    """Every label confidently right: health 1, no noise, no overlap."""
    labels = np.repeat(np.arange(3), 4)
    P = np.full((12, 3), 0.05)
    P[np.arange(12), labels] = 0.9
    h = dataset_health(labels, P, class_names=["a", "b", "c"])
    assert h.overall_label_health_score == 1.0 and h.num_label_issues == 0
    assert h.classes_by_label_quality.class_index.tolist() == [0, 1, 2]  # all 1.0: class order
    assert h.classes_by_label_quality.label_quality_score.tolist() == [1.0, 1.0, 1.0]
    assert h.overlapping_classes.joint_probability.tolist() == [0.0, 0.0, 0.0]
    assert h.overlapping_classes.class_name_a == ["a", "a", "b"]
    assert h.overlapping_classes.class_name_b == ["b", "c", "c"]


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda L, P: dataset_health(L, P, class_names=["a"]), "options.class_names"),
        (lambda L, P: dataset_health(L, P, class_names=["a", 2, "c"]), "options.class_names[1]"),
        (lambda L, P: dataset_health(L, P, class_names="abc"), "options.class_names"),
        (lambda L, P: dataset_health(L, P, asymmetric="yes"), "options.asymmetric"),
        (lambda L, P: dataset_health(L, P, prob_tolerance=0.5), "options.prob_tolerance"),
        (lambda L, P: dataset_health(L[:-1], P), "labels"),
        (lambda L, P: out_of_distribution(P, L, method="magic"), "options.method"),
        (lambda L, P: out_of_distribution(P, L, M=0), "options.M"),
        (lambda L, P: out_of_distribution(P, L, M=2.5), "options.M"),
        (lambda L, P: out_of_distribution(P, L, gamma=0), "options.gamma"),
        (lambda L, P: out_of_distribution(P, L, gamma=float("nan")), "options.gamma"),
        (lambda L, P: out_of_distribution(P, L, adjust_pred_probs=1), "options.adjust_pred_probs"),
        (lambda L, P: out_of_distribution(P, L, confident_thresholds=[0.5, 0.5]), "options.confident_thresholds"),
        (lambda L, P: out_of_distribution(P, L, confident_thresholds=[0.5, -1, 0.5]),
         "options.confident_thresholds[1]"),
        (lambda L, P: out_of_distribution(P), "labels"),
        (lambda L, P: out_of_distribution(P, L + 5), "labels[0]"),
        (lambda L, P: out_of_distribution(P[:, :1], adjust_pred_probs=False), "pred_probs"),
        (lambda L, P: out_of_distribution(np.where(P > 0.5, np.nan, P), adjust_pred_probs=False), "pred_probs[0][0]"),
        # The reference's entropy refuses values above 1 (other methods, and adjusted rows, are fine).
        (lambda L, P: out_of_distribution(np.vstack([P[:1], [[1.0004, 0, 0]], P[2:]]), adjust_pred_probs=False),
         "pred_probs[1]"),
    ],
)
def test_in_process_errors_name_the_field(call, field):
    labels = np.array([0, 1, 2, 1])
    P = np.array([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]])
    with pytest.raises(InputError) as exc:
        call(labels, P)
    assert exc.value.field == field


# ---------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(warmup=False, max_body_bytes=4 << 20))) as c:
        yield c


def body(P, labels=None, **options):
    out = {"pred_probs": np.asarray(P, dtype=np.float64).tolist()}
    if labels is not None:
        out["labels"] = [int(v) for v in labels]
    if options:
        out["options"] = options
    return out


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def assert_problem(r, status, field):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    p = r.json()
    assert p["status"] == status and p["title"] and p["detail"]
    if field is not None:
        assert p.get("field") == field, p


@pytest.mark.parametrize("options", [{}, {"asymmetric": True, "class_names": ["w", "x", "y", "z"]}])
def test_dataset_health_json_equals_in_process(client, options):
    labels, P = datasets.make(datasets.Spec(seed=44, n=400, k=4, noise="systematic"))
    r = client.post("/dataset-health", json=body(P, labels, **options))
    assert r.status_code == 200, r.text
    assert "kernel;dur=" in r.headers["server-timing"]
    got = r.json()
    want = dataset_health(labels, P, **options).to_dict()
    assert set(got) == set(want)
    assert got["overall_label_health_score"] == want["overall_label_health_score"]
    assert got["num_label_issues"] == want["num_label_issues"] and got["n_examples"] == 400
    np.testing.assert_array_equal(got["joint"], want["joint"])
    for table in ("classes_by_label_quality", "overlapping_classes"):
        assert set(got[table]) == set(want[table])
        for field, value in want[table].items():
            if value is None:
                assert got[table][field] is None
            else:
                np.testing.assert_array_equal(got[table][field], value, err_msg=field)
    pairs = 12 if options else 6
    assert len(got["overlapping_classes"]["joint_probability"]) == pairs


def test_out_of_distribution_json_equals_in_process(client):
    labels, P = datasets.make(datasets.Spec(seed=45, n=300, k=5))
    r = client.post("/out-of-distribution", json=body(P, labels, method="gen", M=3, gamma=0.3))
    assert r.status_code == 200, r.text
    got = r.json()
    want = out_of_distribution(P, labels, method="gen", M=3, gamma=0.3)
    assert got["method"] == "gen" and got["n_classes"] == 5
    np.testing.assert_array_equal(got["ood_score"], want.ood_score)
    np.testing.assert_array_equal(got["confident_thresholds"], want.confident_thresholds)
    # Without labels and without adjustment: no thresholds.
    r = client.post("/out-of-distribution", json=body(P, adjust_pred_probs=False))
    assert r.status_code == 200 and r.json()["confident_thresholds"] is None
    # With given thresholds, no labels needed.
    r = client.post("/out-of-distribution", json=body(P, confident_thresholds=want.confident_thresholds.tolist()))
    np.testing.assert_array_equal(r.json()["ood_score"], out_of_distribution(P, labels).ood_score)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_npz_round_trips(client, dtype):
    labels, P = datasets.make(datasets.Spec(seed=46, n=600, k=4, dtype=dtype))
    r = client.post(
        "/dataset-health?asymmetric=true&class_names=a,b,c,d",
        content=npz_bytes(labels=labels, pred_probs=P),
        headers={"content-type": NPZ, "accept": NPZ},
    )
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    want = dataset_health(labels, P, asymmetric=True, class_names=list("abcd"))
    flat = {
        **{k: v for k, v in want.to_dict().items() if not isinstance(v, dict)},
        **want.classes_by_label_quality.to_dict(),
        **want.overlapping_classes.to_dict(),
    }
    assert set(z.files) == set(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(z[name], np.asarray(value), err_msg=name)

    r = client.post(
        "/out-of-distribution?method=least_confidence&adjust_pred_probs=false",
        content=npz_bytes(pred_probs=P),
        headers={"content-type": NPZ, "accept": NPZ},
    )
    assert r.status_code == 200, r.text
    z = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert set(z.files) == {"n_examples", "n_classes", "method", "ood_score"}  # null thresholds left out
    np.testing.assert_array_equal(z["ood_score"], P.max(axis=1).astype(np.float64))
    assert str(z["method"]) == "least_confidence"

    # Thresholds from the query are float64 (a list in-process), so the adjustment runs in float64.
    fitted = out_of_distribution(P, labels).confident_thresholds
    thresholds = ",".join(repr(float(t)) for t in fitted)
    r = client.post(f"/out-of-distribution?confident_thresholds={thresholds}", content=npz_bytes(pred_probs=P),
                    headers={"content-type": NPZ})
    assert r.status_code == 200, r.text
    want = out_of_distribution(P, confident_thresholds=fitted.tolist()).ood_score
    np.testing.assert_array_equal(r.json()["ood_score"], want)
    np.testing.assert_allclose(want, reference.ood_scores(P, confident_thresholds=fitted), rtol=rtol(dtype))


L3 = [0, 1, 2, 1]
P3 = [[0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]]
HTTP_BAD = [
    ("/dataset-health", {"labels": L3, "pred_probs": P3, "options": {"class_names": ["a"]}}, 422,
     "options.class_names"),
    ("/dataset-health", {"labels": L3, "pred_probs": P3, "options": {"class_names": ["a", 1, "c"]}}, 422,
     "options.class_names[1]"),
    ("/dataset-health", {"labels": L3, "pred_probs": P3, "options": {"asymmetric": "yes"}}, 422,
     "options.asymmetric"),
    ("/dataset-health", {"labels": L3, "pred_probs": P3, "options": {"method": "entropy"}}, 422, "options"),
    ("/dataset-health", {"pred_probs": P3}, 422, None),
    ("/dataset-health", {"labels": [0, 1, 5, 1], "pred_probs": P3}, 422, "labels[2]"),
    ("/dataset-health", {"labels": L3, "pred_probs": [[0.6, 0.2, 0.2], [0.1, 0.8, 0.2], [0.3, 0.3, 0.4],
                                                        [0.2, 0.7, 0.1]]}, 422, "pred_probs[1]"),
    ("/out-of-distribution", {"pred_probs": P3}, 422, "labels"),
    ("/out-of-distribution", {"pred_probs": P3, "labels": L3, "options": {"method": "magic"}}, 422,
     "options.method"),
    ("/out-of-distribution", {"pred_probs": P3, "labels": L3, "options": {"M": 0}}, 422, "options.M"),
    ("/out-of-distribution", {"pred_probs": P3, "labels": L3, "options": {"gamma": -1}}, 422, "options.gamma"),
    ("/out-of-distribution", {"pred_probs": P3, "options": {"confident_thresholds": [0.1, 0.2]}}, 422,
     "options.confident_thresholds"),
    ("/out-of-distribution", {"pred_probs": P3, "labels": [0, 1]}, 422, "labels"),
    ("/out-of-distribution", {"pred_probs": [[0.5, 0.5], [1.0]], "options": {"adjust_pred_probs": False}}, 422,
     "pred_probs[1]"),
]


@pytest.mark.parametrize("case", HTTP_BAD, ids=[f"{c[0]} {c[3]}" for c in HTTP_BAD])
def test_bad_json_is_a_named_4xx(client, case):
    path, payload, status, field = case
    assert_problem(client.post(path, content=json.dumps(payload), headers={"content-type": "application/json"}),
                   status, field)


@pytest.mark.parametrize(
    "path, arrays, query, status, field",
    [
        ("/dataset-health", {"pred_probs": np.array(P3)}, "", 422, "labels"),
        ("/dataset-health", {"labels": np.array(L3), "pred_probs": np.array(P3)}, "?method=gen", 422,
         "options.method"),
        ("/dataset-health", {"labels": np.array(L3), "pred_probs": np.array(P3)}, "?asymmetric=maybe", 422,
         "options.asymmetric"),
        ("/out-of-distribution", {"pred_probs": np.array(P3)}, "", 422, "labels"),
        ("/out-of-distribution", {"pred_probs": np.array(P3)}, "?adjust_pred_probs=false&M=x", 422, "options.M"),
        ("/out-of-distribution", {"pred_probs": np.array(P3)}, "?confident_thresholds=0.1,a,0.2", 422,
         "options.confident_thresholds"),
        ("/out-of-distribution", {"pred_probs": np.array(P3), "other": np.array(L3)}, "", 422, "other"),
    ],
)
def test_bad_npz_is_a_named_4xx(client, path, arrays, query, status, field):
    r = client.post(f"{path}{query}", content=npz_bytes(**arrays), headers={"content-type": NPZ})
    assert_problem(r, status, field)


@pytest.mark.parametrize("path", ["/dataset-health", "/out-of-distribution"])
def test_transport_errors(client, path):
    assert_problem(client.post(path, content=b"{", headers={"content-type": "application/json"}), 400, "body")
    assert_problem(client.post(path, content=b"hello", headers={"content-type": NPZ}), 400, "body")
    assert_problem(client.post(path, content=b"{}", headers={"content-type": "text/plain"}), 415, "Content-Type")
    r = client.post(f"{path}?asymmetric=true", json={"labels": L3, "pred_probs": P3})
    assert_problem(r, 422, "query")
    assert_problem(client.get(path), 405, None)


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/schema/openapi.json").json()
    for path, op_id, request, response in (
        ("/dataset-health", "datasetHealth", "DatasetHealthRequest", "DatasetHealthResponse"),
        ("/out-of-distribution", "outOfDistribution", "OutOfDistributionRequest", "OutOfDistributionResponse"),
    ):
        op = spec["paths"][path]["post"]
        assert op["operationId"] == op_id
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{request}")
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{response}")
        assert NPZ in op["requestBody"]["content"] and NPZ in op["responses"]["200"]["content"]
        assert {"200", "400", "413", "415", "422"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    for name in (
        "DatasetHealthRequest", "DatasetHealthOptions", "DatasetHealthResponse", "ClassLabelQuality",
        "OverlappingClasses", "OutOfDistributionRequest", "OutOfDistributionOptions", "OutOfDistributionResponse",
    ):
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} is undocumented"


def test_responses_decode_strictly_as_their_schemas(client):
    """The 200 bodies as the structs that generate the OpenAPI components."""
    import msgspec

    from service.schemas import DatasetHealthResponse, FindIssuesResponse, OutOfDistributionResponse

    labels, P = datasets.make(datasets.Spec(seed=47, n=200, k=3))
    cases = [
        ("/find-issues", body(P, labels, thresholds={"method": "percentile"}), FindIssuesResponse),
        ("/dataset-health", body(P, labels, class_names=["a", "b", "c"]), DatasetHealthResponse),
        ("/dataset-health", body(P, labels, asymmetric=True), DatasetHealthResponse),
        ("/out-of-distribution", body(P, labels, method="gen"), OutOfDistributionResponse),
        ("/out-of-distribution", body(P, adjust_pred_probs=False), OutOfDistributionResponse),
    ]
    for path, payload, struct in cases:
        r = client.post(path, json=payload)
        assert r.status_code == 200, r.text
        decoded = msgspec.json.decode(r.content, type=struct)
        assert set(r.json()) == set(struct.__struct_fields__)
        for name in struct.__struct_fields__:
            value = getattr(decoded, name)
            if isinstance(value, msgspec.Struct):
                assert set(r.json()[name]) == set(value.__struct_fields__), name
