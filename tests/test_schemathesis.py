"""schemathesis against the OpenAPI schema served by a real `labelq serve`.

For every operation of the served schema, schemathesis generates requests
(schema-valid ones, half of them with the data made valid so that answers
of 200 are checked too; and schema-violating ones: negative mode) and sends them
over TCP; every response must not be a 5xx and must conform to the schema (a
documented status code and media type, and a body matching its schema).

Bounded: at most ``MAX_EXAMPLES`` cases per operation and mode, and a
wall-clock budget per test; once the budget is spent the remaining generated
cases are not sent. The cases are derandomised: every run sends the same ones.

(schemathesis's own pytest loader, ``schemathesis.pytest.from_fixture``, does
not run under pytest 9.2 (it reads ``node._nodeid``), so the operations are
driven through its Python API with hypothesis here.)
"""

from __future__ import annotations

import math
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from serving import serve

from service.app import create_app
from service.settings import Settings

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
# per mode; the operations not listed take no input
MAX_EXAMPLES = {"findIssues": 1500, "datasetHealth": 500, "outOfDistribution": 500}
BUDGET_SECONDS = {"findIssues": 50.0, "datasetHealth": 25.0, "outOfDistribution": 25.0}
# The batched protocol: fuzzed in both modes too (a valid start is repaired below; the other
# steps need a context from a real run, so their generated cases are refused with 4xx, which
# is what is checked: never a 5xx, always a documented problem).
BATCHED = ["batchedStart", "batchedSums", "batchedJoint", "batchedCandidates", "batchedApply", "batchedMerge",
           "batchedFinalize"]
MAX_EXAMPLES.update({op: 150 for op in BATCHED})
BUDGET_SECONDS.update({op: 8.0 for op in BATCHED})


def _fit(values, k: int, fill):
    """A generated per-class list cut or padded to K entries."""
    return (list(values) + [fill] * k)[:k]


def make_valid(case, fix: bool):
    """Keep the generated options, but make the data valid (rows normalised,
    labels in range, per-class options of K entries) when ``fix``: random rows
    almost never sum to 1, and the 200 answers must be checked against the
    schema too. Labels that are absent (optional for outOfDistribution) stay
    absent."""
    if not fix:
        return case
    if case.media_type == "application/x-npz":
        import io

        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, labels=np.array([0, 1, 1, 2]), pred_probs=np.array(
            [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32))
        case.body = buf.getvalue()
        return case
    body = case.body if isinstance(case.body, dict) else {}
    rows = [r for r in body.get("pred_probs") or [] if r][:40]
    k = max(2, min(8, len(rows[0]) if rows else 2))
    data = []
    for i in range(max(1, len(rows))):
        raw = [abs(v) for v in (rows[i] if i < len(rows) else [])][:k]
        raw = [v if math.isfinite(v) and v < 1e300 else 1.0 for v in raw] + [1.0] * (k - len(raw))
        total = sum(raw)
        data.append([v / total for v in raw] if total > 0 else [1.0 / k] * k)
    labels = [abs(int(v)) % k for v in (body.get("labels") or [])][: len(data)]
    labels += [i % k for i in range(len(labels), len(data))]
    fixed = {"pred_probs": data} if "labels" not in body else {"labels": labels, "pred_probs": data}
    options = body.get("options")
    if isinstance(options, dict):
        options = dict(options)
        if isinstance(options.get("class_names"), list):
            options["class_names"] = _fit(options["class_names"], k, "class")
        if isinstance(options.get("confident_thresholds"), list):
            options["confident_thresholds"] = _fit(
                [min(abs(v), 1.0) if math.isfinite(v) else 0.5 for v in options["confident_thresholds"]], k, 0.5
            )
        if isinstance(options.get("num_to_remove_per_class"), list):
            options["num_to_remove_per_class"] = _fit([abs(v) % 3 for v in options["num_to_remove_per_class"]], k, 0)
        fixed["options"] = options
    case.body = fixed
    return case


def make_valid_start(case, fix: bool):
    """A batched start whose counts add up: non-negative class counts (K >= 2), n_examples their sum."""
    if not fix or not isinstance(case.body, dict):
        return case
    counts = [abs(int(v)) % 1000 for v in (case.body.get("class_counts") or [])][:50]
    counts = (counts + [1, 1])[: max(2, len(counts))]
    if sum(counts) == 0:
        counts[0] = 1
    options = case.body.get("options")
    if isinstance(options, dict) and isinstance(options.get("num_to_remove_per_class"), list):
        options = dict(options, num_to_remove_per_class=_fit(
            [abs(v) % 3 for v in options["num_to_remove_per_class"]], len(counts), 0))
    case.body = {"class_counts": counts, "n_examples": sum(counts), "dtype": case.body.get("dtype", "float32"),
                 **({"options": options} if options is not None else {})}
    return case


REPAIR = {"findIssues": make_valid, "datasetHealth": make_valid, "outOfDistribution": make_valid,
          "batchedStart": make_valid_start}


def _operations() -> list[tuple[str, str, str]]:
    """(method, path, operationId) of every documented operation, read from the app itself."""
    spec = create_app(Settings(warmup=False)).openapi_schema.to_schema()
    return [(m.upper(), p, op["operationId"]) for p, item in spec["paths"].items() for m, op in item.items()]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("schemathesis") / "stderr.log") as served:
        yield served
        assert served.proc.poll() is None, "the server died"


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.base}/schema/openapi.json")


def test_served_schema_has_the_operations(api_schema):
    served = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert served == {(m, p) for m, p, _ in OPERATIONS}


CASES = [
    pytest.param(m, p, op, mode, id=f"{op}-{mode.value}")
    for m, p, op in OPERATIONS
    for mode in [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    if op in MAX_EXAMPLES or mode == GenerationMode.POSITIVE  # an operation without inputs has no invalid ones
]


@pytest.mark.parametrize("method, path, operation_id, mode", CASES)
def test_operation_conforms_to_its_schema(api_schema, method, path, operation_id, mode):
    operation = api_schema[path][method]
    deadline = time.monotonic() + BUDGET_SECONDS.get(operation_id, 5.0)
    statuses: Counter[int] = Counter()

    strategy = operation.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE and operation_id in REPAIR:
        repair = REPAIR[operation_id]
        strategy = st.tuples(strategy, st.booleans()).map(lambda t: repair(*t))

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES.get(operation_id, 50),
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows the request as sent
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case):
        if time.monotonic() > deadline:
            return  # the budget is spent: generate, do not send
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        statuses[response.status_code] += 1

    run()
    print(f"{operation_id} {mode.value}: {sum(statuses.values())} cases sent, statuses {dict(statuses)}")
    assert statuses, "no case was sent"
    if mode == GenerationMode.POSITIVE and operation_id in REPAIR:
        assert statuses[200], f"{operation_id}: no valid case was answered 200, so no answer was checked"
