"""The batched protocol (service.batched) equals one request, exactly.

Every method on many seeded datasets, several batch sizes (including one row
per batch, and batches missing whole classes), merges in shuffled orders and
groupings; and the checks that refuse partials that do not fit.
"""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import batched, find_issues
from service.core import FILTER_BY
from service.errors import InputError

FILTERS = list(FILTER_BY)
SPECS = datasets.specs()
# Small sets for one-row batches, and larger ones that need deep sum trees
# (classes over 128 and, in float16, over 8192 values), missing classes and ties.
SMALL = [s for s in SPECS if s.n <= 60][::3]
LARGE = [s for s in SPECS if s.n >= 1000 and (s.missing or s.singletons or s.quantize or s.seed % 4 == 0)]
LARGE += [s for s in SPECS if s.n >= 20000 and s not in LARGE]


def assert_same(one, two) -> None:
    assert np.array_equal(one.is_label_issue, two.is_label_issue)
    assert np.array_equal(one.ranked_issue_indices, two.ranked_issue_indices)
    assert np.array_equal(one.label_quality_score, two.label_quality_score)
    assert np.array_equal(one.suggested_label, two.suggested_label)
    assert one.num_label_issues == two.num_label_issues
    for f in ("thresholds", "confident_joint", "joint", "noise_matrix", "inverse_noise_matrix", "py"):
        assert np.array_equal(getattr(one.noise, f), getattr(two.noise, f)), f
    assert one.noise.estimated_num_label_issues == two.noise.estimated_num_label_issues


@pytest.mark.parametrize("spec", SMALL, ids=lambda s: s.id)
@pytest.mark.parametrize("filter_by", FILTERS)
def test_one_row_batches(spec, filter_by):
    labels, P = datasets.make(spec)
    assert_same(find_issues(labels, P, filter_by=filter_by), batched.run(labels, P, 1, filter_by=filter_by))


def _options(spec, filter_by):
    """The default options, and a non-default variant per method."""
    rng = np.random.default_rng(spec.seed)
    yield {}
    if filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):
        counts = np.bincount(datasets.make(spec)[0], minlength=spec.k)
        yield {"frac_noise": 0.5, "min_examples_per_class": int(rng.choice([0, 5, 50]))}
        yield {"num_to_remove_per_class": [int(rng.integers(0, c // 4 + 1)) for c in counts]}
    yield {"rank_by": "normalized_margin", "adjust_pred_probs": True}
    yield {"rank_by": "confidence_weighted_entropy"}


@pytest.mark.parametrize("spec", LARGE, ids=lambda s: s.id)
@pytest.mark.parametrize("filter_by", FILTERS)
def test_batches_equal_one_request(spec, filter_by):
    labels, P = datasets.make(spec)
    for options in _options(spec, filter_by):
        one = find_issues(labels, P, filter_by=filter_by, **options)
        for size in (spec.n // 7 + 1, 4099):
            assert_same(one, batched.run(labels, P, size, filter_by=filter_by, **options))


def _sorted_batches(labels, P, K):
    """Rows sorted by label: most batches miss most classes."""
    order = np.argsort(labels, kind="stable")
    return labels[order], P[order]


@pytest.mark.parametrize("spec", [s for s in LARGE if s.k >= 10][:6], ids=lambda s: s.id)
def test_batches_missing_classes(spec):
    labels, P = _sorted_batches(*datasets.make(spec), spec.k)
    for fb in FILTERS:
        assert_same(find_issues(labels, P, filter_by=fb), batched.run(labels, P, spec.n // 13 + 1, filter_by=fb))


def _passes(labels, P, size, seed, **options):
    """Run the passes with the partials merged in a random tree, shuffled."""
    rng = np.random.default_rng(seed)
    N, K = P.shape
    ctx = batched.start(np.bincount(labels, minlength=K), N, P.dtype.name, **options)
    bounds = [(a, min(N, a + size)) for a in range(0, N, size)]
    for kind in ctx["passes"]:
        parts = []
        for a, b in bounds:
            if kind == "sums":
                parts.append(batched.map_sums(labels[a:b], P[a:b], a, np.bincount(labels[:a], minlength=K), ctx))
            elif kind == "joint":
                parts.append(batched.map_joint(labels[a:b], P[a:b], a, ctx))
            else:
                parts.append(batched.map_candidates(labels[a:b], P[a:b], a, ctx))
        while len(parts) > 1:  # random groups of 2 or 3, in random order
            rng.shuffle(parts)
            g = int(rng.integers(2, 4))
            parts = [batched.merge(parts[i : i + g], ctx) for i in range(0, len(parts), g)]
        ctx = batched.finalize(parts[0], ctx)
    pieces = [batched.apply(labels[a:b], P[a:b], a, ctx) for a, b in bounds]
    rng.shuffle(pieces)
    return batched.assemble(pieces, ctx)


@pytest.mark.parametrize("spec", LARGE[:8], ids=lambda s: s.id)
@pytest.mark.parametrize("seed", [1, 2])
def test_merge_order_does_not_matter(spec, seed):
    labels, P = datasets.make(spec)
    for fb in ("prune_by_noise_rate", "both", "low_self_confidence"):
        assert_same(find_issues(labels, P, filter_by=fb), _passes(labels, P, spec.n // 9 + 1, seed, filter_by=fb))


# --------------------------------------------------------------------------
# Partials that do not fit are refused, naming the field
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_parts():
    spec = next(s for s in SPECS if s.n == 1000 and s.k == 25)
    labels, P = datasets.make(spec)
    N, K = P.shape
    ctx = batched.start(np.bincount(labels, minlength=K), N, P.dtype.name)
    sums = [batched.map_sums(labels[a : a + 300], P[a : a + 300], a, np.bincount(labels[:a], minlength=K), ctx)
            for a in range(0, N, 300)]
    return labels, P, ctx, sums


def _field(exc: pytest.ExceptionInfo) -> str:
    return exc.value.field


def test_refuses_another_k(run_parts):
    labels, P, ctx, sums = run_parts
    bad = dict(sums[0], n_classes=ctx["n_classes"] + 1)
    with pytest.raises(InputError) as e:
        batched.merge([bad, sums[1]], ctx)
    assert _field(e) == "n_classes"


def test_refuses_mixed_passes(run_parts):
    labels, P, ctx, sums = run_parts
    with pytest.raises(InputError) as e:
        batched.merge([sums[0], dict(sums[1], **{"pass": "joint"})], ctx)
    assert _field(e) == "pass"


def test_refuses_a_batch_twice(run_parts):
    labels, P, ctx, sums = run_parts
    with pytest.raises(InputError) as e:
        batched.merge([sums[0], sums[0]], ctx)
    assert _field(e) == "rows"


def test_refuses_missing_batches(run_parts):
    labels, P, ctx, sums = run_parts
    with pytest.raises(InputError) as e:
        batched.finalize(batched.merge(sums[:-1], ctx), ctx)
    assert _field(e) == "rows"


def test_refuses_tampered_counts(run_parts):
    labels, P, ctx, sums = run_parts
    ctx2 = batched.finalize(batched.merge(sums, ctx), ctx)
    N, K = P.shape
    joint = [batched.map_joint(labels[a : a + 500], P[a : a + 500], a, ctx2) for a in (0, 500)]
    tampered = dict(joint[0], confident_joint_raw=joint[0]["confident_joint_raw"] * 1000)
    with pytest.raises(InputError) as e:
        batched.merge([tampered, joint[1]], ctx2)
    assert _field(e) == "confident_joint_raw"
    short = dict(joint[0], seen=joint[0]["seen"] - 1)
    with pytest.raises(InputError) as e:
        batched.finalize(batched.merge([short, joint[1]], ctx2), ctx2)
    assert _field(e) in ("seen", "confident_joint_raw")


def test_refuses_wrong_order_of_passes(run_parts):
    labels, P, ctx, sums = run_parts
    with pytest.raises(InputError) as e:
        batched.map_joint(labels[:10], P[:10], 0, ctx)
    assert _field(e) == "context.done"


def test_refuses_a_bad_offset(run_parts):
    labels, P, ctx, sums = run_parts
    K = P.shape[1]
    with pytest.raises(InputError) as e:
        batched.map_sums(labels[:10], P[:10], 0, np.bincount(labels, minlength=K), ctx)
    assert _field(e).startswith("class_offsets")
    with pytest.raises(InputError) as e:
        batched.map_sums(labels[:10], P[:10], P.shape[0], np.zeros(K, np.int64), ctx)
    assert _field(e) == "row_offset"


def test_bad_values_name_the_global_row(run_parts):
    labels, P, ctx, sums = run_parts
    bad = P[500:600].copy()
    bad[7, 3] = np.nan
    with pytest.raises(InputError) as e:
        batched.map_sums(labels[500:600], bad, 500, np.bincount(labels[:500], minlength=P.shape[1]), ctx)
    assert _field(e) == "pred_probs[507][3]"


def test_percentile_thresholds_refused():
    with pytest.raises(InputError) as e:
        batched.start([3, 3], 6, "float32", thresholds={"method": "percentile"})
    assert _field(e) == "options.thresholds.method"


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(0, 300),
    cells=st.integers(1, 6),
    distinct=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_select_is_the_m_smallest_per_cell(n, cells, distinct, seed):
    """The per-cell selection (counting sort + selection) equals sorting by
    (cell, key, index) and keeping the first m of each cell; keys with many ties."""
    rng = np.random.default_rng(seed)
    cell = rng.integers(0, cells, n)
    key = rng.integers(0, distinct, n).astype(np.float64) * 0.25 - 0.5
    index = rng.permutation(10 * n + 1)[:n]
    limits = rng.integers(0, 8, cells)
    got = batched._select(cell, key, index, limits)
    order = np.lexsort((index, key, cell))
    rank = np.arange(n) - np.searchsorted(cell[order], cell[order])
    want = order[rank < limits[cell[order]]]
    assert got["cell"].tolist() == cell[want].tolist()
    assert got["key"].tolist() == key[want].tolist()
    assert got["index"].tolist() == index[want].tolist()
