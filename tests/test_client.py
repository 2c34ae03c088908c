"""The batched client against live replicas on loopback: the result equals
one request exactly, with one replica restarted in the middle of the run."""

from __future__ import annotations

import threading

import datasets
import numpy as np
import pytest
from serving import serve
from test_batched import FILTERS, assert_same

from service import find_issues
from service.client import BatchedClient, ServiceError

SPEC = next(s for s in datasets.specs() if s.n == 5000 and s.k == 50 and s.dtype == "float32")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    d = tmp_path_factory.mktemp("replicas")
    env = {"LABELQ_THREADS": "1"}
    with serve(d / "a.log", env=env) as a, serve(d / "b.log", env=env) as b:
        yield a, b


@pytest.fixture(scope="module")
def data():
    return datasets.make(SPEC)


@pytest.mark.parametrize("filter_by", FILTERS)
def test_client_equals_one_request(replicas, data, filter_by):
    labels, P = data
    with BatchedClient([r.base for r in replicas], batch_size=700) as client:
        assert_same(find_issues(labels, P, filter_by=filter_by), client.find_issues(labels, P, filter_by=filter_by))


def test_client_memory_mapped_files_and_batches(replicas, data, tmp_path):
    labels, P = data
    np.save(tmp_path / "P.npy", P.astype(np.float16))
    np.save(tmp_path / "y.npy", labels)
    Pm = np.load(tmp_path / "P.npy", mmap_mode="r")
    ym = np.load(tmp_path / "y.npy", mmap_mode="r")
    one = find_issues(labels, np.asarray(Pm), filter_by="both", frac_noise=0.7)
    with BatchedClient(replicas[0].base, batch_size=999) as client:
        res = client.find_issues(ym, Pm, filter_by="both", frac_noise=0.7, out_dir=tmp_path / "out")
        assert isinstance(res.is_label_issue, np.memmap)
        assert_same(one, res)

        def batches():  # an iterator of batches, any sizes
            cuts = [0, 1, 17, 2000, 2001, 4999, 5000]
            return ((ym[a:b], Pm[a:b]) for a, b in zip(cuts, cuts[1:]))

        assert_same(one, client.find_issues(batches=batches, filter_by="both", frac_noise=0.7))


def test_client_survives_a_restarted_replica(tmp_path, data):
    labels, P = data
    env = {"LABELQ_THREADS": "1"}
    one = find_issues(labels, P, filter_by="prune_by_noise_rate")
    with serve(tmp_path / "a.log", env=env) as a, serve(tmp_path / "b.log", env=env) as b:
        calls = {"n": 0}
        restarted = threading.Event()

        def progress(kind, rows, final):
            calls["n"] += 1
            if kind == "joint" and not restarted.is_set():
                restarted.set()
                b.proc.kill()  # replica b dies mid-run; the client retries on a
                b.proc.wait()

        with BatchedClient([a.base, b.base], batch_size=250, progress=progress, retries=10) as client:
            res = client.find_issues(labels, P, filter_by="prune_by_noise_rate")
        assert restarted.is_set()
        assert_same(one, res)


def test_client_reports_the_service_error(replicas, data):
    labels, P = data
    bad = P.copy()
    bad[4321, 7] = -0.5
    with BatchedClient(replicas[0].base, batch_size=1000) as client, pytest.raises(ServiceError) as e:
        client.find_issues(labels, bad)
    assert e.value.status == 422 and e.value.problem["field"] == "pred_probs[4321][7]"


def test_client_retries_503_and_stays_exact(tmp_path, data):
    """A replica whose memory budget holds about one batch answers a burst of
    concurrent batches with 503 + Retry-After; the client waits and sends them
    again, and the result is still exact."""
    labels, P = data
    env = {"LABELQ_THREADS": "1", "LABELQ_MAX_INFLIGHT_BYTES": str(3 << 20)}
    with serve(tmp_path / "small.log", env=env) as small:
        with BatchedClient(small.base, batch_size=1250, concurrency=6, retries=30) as client:
            res = client.find_issues(labels, P)
            assert client.retried > 0
    assert_same(find_issues(labels, P), res)
