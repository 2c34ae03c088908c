"""Seeded synthetic datasets for conformance tests: (labels, pred_probs) pairs
with the shapes of real label noise and the corners of the algorithm."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spec:
    seed: int
    n: int
    k: int
    dtype: str = "float64"
    noise: str = "uniform"  # uniform | systematic | sparse | none
    noise_rate: float = 0.2
    missing: int = 0  # classes with no given labels
    singletons: int = 0  # classes with exactly one given label
    certain_frac: float = 0.0  # rows that are (near) one-hot
    uniform_frac: float = 0.0  # rows that are exactly uniform
    sharpness: float = 2.0  # logit scale of the true class
    quantize: int = 0  # round probabilities to multiples of 1/quantize (creates ties)

    @property
    def id(self) -> str:
        parts = [f"s{self.seed}", f"{self.n}x{self.k}", self.dtype, self.noise]
        if self.missing:
            parts.append(f"miss{self.missing}")
        if self.singletons:
            parts.append(f"single{self.singletons}")
        if self.certain_frac:
            parts.append("certain")
        if self.uniform_frac:
            parts.append("uniform-rows")
        if self.quantize:
            parts.append(f"q{self.quantize}")
        return "-".join(parts)


def noise_matrix(rng: np.random.Generator, k: int, kind: str, rate: float) -> np.ndarray:
    """Column-stochastic P(given | true)."""
    if kind == "none":
        return np.eye(k)
    if kind == "uniform":
        m = np.full((k, k), rate / (k - 1))
    elif kind == "systematic":  # each class is confused with one other class
        m = np.zeros((k, k))
        partner = rng.permutation(k)
        for j in range(k):
            other = partner[j] if partner[j] != j else (j + 1) % k
            m[other, j] = rate
    elif kind == "sparse":  # a few random off-diagonal cells
        m = np.zeros((k, k))
        cells = max(1, k // 2)
        for _ in range(cells):
            i, j = rng.integers(0, k, 2)
            if i != j:
                m[i, j] += rate * rng.uniform(0.3, 1.0)
        colsum = m.sum(0)
        m[:, colsum > 0.6] *= 0.6 / colsum[colsum > 0.6]
    else:
        raise ValueError(kind)
    np.fill_diagonal(m, 0.0)
    np.fill_diagonal(m, 1.0 - m.sum(0))
    return m


def make(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    n, k = spec.n, spec.k
    prior = rng.dirichlet(np.full(k, 3.0))
    true = rng.choice(k, size=n, p=prior)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), true] += spec.sharpness * rng.uniform(0.2, 2.0, n)
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)

    nm = noise_matrix(rng, k, spec.noise, spec.noise_rate)
    given = true.copy()
    for j in range(k):
        idx = np.flatnonzero(true == j)
        if idx.size:
            given[idx] = rng.choice(k, size=idx.size, p=nm[:, j])

    # Corners: classes with no labels or one label; one-hot and uniform rows.
    classes = rng.permutation(k)
    missing = classes[: spec.missing]
    singles = classes[spec.missing : spec.missing + spec.singletons]
    keep = np.setdiff1d(np.arange(k), np.concatenate([missing, singles]))
    for c in np.concatenate([missing, singles]):
        on = given == c
        if on.any():
            given[on] = rng.choice(keep, size=on.sum())
    for c in singles:
        given[rng.integers(0, n)] = c
    if spec.certain_frac:
        rows = rng.random(n) < spec.certain_frac
        eps = 1e-9 if spec.dtype == "float64" else 0.0
        P[rows] = eps
        P[rows, rng.integers(0, k, rows.sum())] = 1.0 - eps * (k - 1)
    if spec.uniform_frac:
        rows = rng.random(n) < spec.uniform_frac
        P[rows] = 1.0 / k
    if spec.quantize:
        P = np.round(P * spec.quantize) / spec.quantize
        P[np.arange(n), P.argmax(1)] += 1.0 - P.sum(1)
        bad = (P < 0).any(1)
        P[bad] = 1.0 / k
    # keep at least two classes in the labels (the reference requires it)
    if np.unique(given).size < 2:
        given[0], given[1 % n] = keep[0], keep[-1] if keep.size > 1 else (keep[0] + 1) % k
    return given.astype(np.int64), np.ascontiguousarray(P.astype(spec.dtype))


def specs() -> list[Spec]:
    """The conformance suite: 240 seeded datasets."""
    out: list[Spec] = []
    rng = np.random.default_rng(20261122)
    seed = 0
    dtypes = ["float64", "float32", "float16"]
    kinds = ["uniform", "systematic", "sparse"]

    def add(**kw):
        nonlocal seed
        seed += 1
        out.append(Spec(seed=seed, **kw))

    # Sizes across the range, each dtype and noise shape.
    for n, k in [(2, 2), (3, 2), (5, 3), (10, 2), (20, 4), (50, 3), (100, 10), (300, 7), (1000, 2),
                 (1000, 25), (2000, 5), (5000, 50), (3000, 200), (20000, 10), (10000, 100)]:
        for dt in dtypes:
            for kind in kinds:
                add(n=n, k=k, dtype=dt, noise=kind, noise_rate=float(rng.uniform(0.05, 0.45)))
    # Large N (fewer: the reference is slow).
    for dt in dtypes:
        add(n=100_000, k=10, dtype=dt, noise="uniform")
    add(n=100_000, k=2, dtype="float32", noise="systematic")
    add(n=50_000, k=20, dtype="float64", noise="sparse")
    # Corners.
    for i in range(8):
        dt = dtypes[i % 3]
        k = [3, 5, 10, 30][i % 4]
        add(n=[200, 1000, 3000][i % 3], k=k, dtype=dt, missing=1 + i % 2)
        add(n=[200, 1000, 3000][i % 3], k=k, dtype=dt, singletons=1 + i % 3)
        add(n=[200, 1000][i % 2], k=k, dtype=dt, certain_frac=0.3)
        add(n=[200, 1000][i % 2], k=k, dtype=dt, uniform_frac=0.1)
        add(n=[100, 500][i % 2], k=k, dtype=dt, quantize=[10, 20, 100][i % 3])
        add(n=[300, 2000][i % 2], k=k, dtype=dt, noise="none")
        add(n=[300, 2000][i % 2], k=k, dtype=dt, sharpness=0.2)  # near-uniform rows
    for k in [2, 3]:
        for dt in dtypes:
            add(n=500, k=k, dtype=dt, noise="systematic", noise_rate=0.45, missing=0)
    return out
