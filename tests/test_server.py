"""The real thing: `labelq serve` in a subprocess on loopback."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

import datasets
from serving import serve
from service import find_issues


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the port from the environment (serve sets LABELQ_PORT), the host from the flag
    with serve(tmp_path_factory.mktemp("server") / "stderr.log") as served:
        yield served.base


def test_served_answer_equals_in_process(server):
    labels, P = datasets.make(datasets.Spec(seed=11, n=2000, k=6, noise="systematic"))
    r = httpx.post(
        f"{server}/find-issues",
        json={"labels": labels.tolist(), "pred_probs": P.tolist(), "options": {"filter_by": "both"}},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    want = find_issues(labels, P, filter_by="both")
    got = r.json()
    assert got["ranked_issue_indices"] == want.ranked_issue_indices.tolist()
    np.testing.assert_array_equal(got["noise"]["inverse_noise_matrix"], want.noise.inverse_noise_matrix)


def test_concurrent_requests_all_succeed(server):
    """Several requests at once: kernels are serialised, none fails."""
    import concurrent.futures as cf

    labels, P = datasets.make(datasets.Spec(seed=12, n=5000, k=10))
    payload = {"labels": labels.tolist(), "pred_probs": P.tolist()}
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(httpx.post, f"{server}/find-issues", json=payload, timeout=120) for _ in range(16)]
        results = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in results)
    assert len({r.content for r in results}) == 1


def test_bad_setting_stops_start_up_with_a_clear_message():
    env = {**os.environ, "LABELQ_PORT": "eighty"}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert b"LABELQ_PORT" in proc.stderr
    env = {**os.environ, "LABELQ_PROT": "8000"}
    proc = subprocess.run([sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"LABELQ_PROT is not a known setting" in proc.stderr
