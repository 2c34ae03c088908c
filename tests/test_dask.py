"""The Dask adapter on a LocalCluster equals one request, exactly."""

from __future__ import annotations

import datasets
import pytest
from test_batched import assert_same

from service import find_issues

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from service.dask_adapter import find_issues as dask_find_issues

SPEC = next(s for s in datasets.specs() if s.n == 5000 and s.k == 50 and s.dtype == "float16")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        with distributed.Client(c) as client:
            yield client


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "both", "confident_learning", "low_normalized_margin"])
def test_dask_equals_one_request(cluster, filter_by):
    labels, P = datasets.make(SPEC)
    # uneven row chunks, and the columns split (the adapter joins them)
    dP = da.from_array(P, chunks=((700, 1, 1299, 3000), (20, 30)))
    dy = da.from_array(labels, chunks=1000)
    assert_same(find_issues(labels, P, filter_by=filter_by), dask_find_issues(dy, dP, filter_by=filter_by))
