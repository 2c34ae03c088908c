"""What the load tests share: payload shapes, profiles and SLOs, the loopback rule.

Imported by ``run.py`` (the runner) and ``locustfile.py`` (inside locust's
gevent process); it imports nothing of locust or gevent.

Shapes are fixed so that latencies compare between runs: a shape is N x K,
a wire format in and out, and one seeded dataset (softmax outputs of a decent
model with 10 % of the labels flipped). Profiles are lists of stages; a stage
holds a number of users for a duration, sends a weighted mix of shapes, and
either paces the users to a total request rate (``rate``, requests/s) or runs
them closed-loop (``rate=None``: each user sends its next request as soon as
the last one is answered).
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np

# --------------------------------------------------------------------------
# Shapes and payloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    n: int
    k: int
    fmt: str  # "json" (JSON in, JSON out) or "npz" (float32 npz in, npz out)
    options: str = "filter_by=both"  # every shape runs the same options (query string for npz)

    @property
    def path(self) -> str:
        return "/find-issues?" + self.options if self.fmt == "npz" else "/find-issues"


SHAPES: dict[str, Shape] = {
    "small": Shape(1_000, 10, "json"),
    "medium_json": Shape(100_000, 10, "json"),
    "medium_npz": Shape(100_000, 10, "npz"),
    "large_npz": Shape(1_000_000, 100, "npz"),
}

#: the "mixed" traffic: mostly small requests, some medium in both formats.
MIXED = {"small": 80, "medium_json": 10, "medium_npz": 10}


def dataset(n: int, k: int, seed: int = 0, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (labels int64 (N,), pred_probs (N, K) of ``dtype``), built in blocks."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    labels = true.copy()
    flip = rng.random(n) < 0.1
    labels[flip] = rng.integers(0, k, int(flip.sum()))
    P = np.empty((n, k), dtype=dtype)
    step = max(1, 2_000_000 // k)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        logits = rng.standard_normal((hi - lo, k)).astype(np.float32)
        logits[np.arange(hi - lo), true[lo:hi]] += 3.0
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        P[lo:hi] = logits
    return labels.astype(np.int64), P


@dataclass(frozen=True)
class Payload:
    name: str
    shape: Shape
    body: bytes
    headers: dict[str, str]


def payload(name: str) -> Payload:
    """The request body and headers of a shape (built once per process)."""
    import orjson

    s = SHAPES[name]
    if s.fmt == "json":
        labels, P = dataset(s.n, s.k, seed=s.n + s.k, dtype=np.float64)
        opts = dict(kv.split("=", 1) for kv in s.options.split("&")) if s.options else {}
        body = orjson.dumps({"labels": labels, "pred_probs": P, "options": opts}, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
    else:
        labels, P = dataset(s.n, s.k, seed=s.n + s.k, dtype=np.float32)
        buf = io.BytesIO()
        np.savez(buf, labels=labels, pred_probs=P)
        body = buf.getvalue()
        headers = {"Content-Type": "application/x-npz", "Accept": "application/x-npz"}
    return Payload(name, s, body, headers)


RESPONSE_FIELDS = (
    "n_examples", "n_classes", "num_label_issues", "is_label_issue", "label_quality_score", "suggested_label",
    "ranked_issue_indices",
)
NOISE_FIELDS = (
    "thresholds", "confident_joint", "joint", "noise_matrix", "inverse_noise_matrix", "py",
    "estimated_num_label_issues",
)


def check_response(status: int, content_type: str, content: bytes, shape: Shape) -> tuple[str | None, tuple]:
    """Check one answer: status 200, media type, and the shape of every field.

    Returns (problem or None, fingerprint). The fingerprint (issue counts and
    the ranked indices' hash) must be the same for every answer to the same
    payload: the service is deterministic.
    """
    if status != 200:
        return f"status {status}: {content[:200]!r}", ()
    n, k = shape.n, shape.k
    want_type = "application/json" if shape.fmt == "json" else "application/x-npz"
    if not content_type.startswith(want_type):
        return f"content-type {content_type!r}, expected {want_type}", ()
    try:
        if shape.fmt == "json":
            import orjson

            doc = orjson.loads(content)
            flat = {**{f: doc[f] for f in RESPONSE_FIELDS}, **{f: doc["noise"][f] for f in NOISE_FIELDS}}
            lens = {f: len(flat[f]) for f in ("is_label_issue", "label_quality_score", "suggested_label")}
            ranked = np.asarray(flat["ranked_issue_indices"], dtype=np.int64)
            mats = {f: (len(flat[f]), *{len(r) for r in flat[f]}) for f in NOISE_FIELDS[1:5]}
            vecs = {f: len(flat[f]) for f in ("thresholds", "py")}
            flagged = sum(flat["is_label_issue"])
        else:
            z = np.load(io.BytesIO(content), allow_pickle=False)
            flat = {f: z[f] for f in RESPONSE_FIELDS + NOISE_FIELDS}
            lens = {f: flat[f].shape[0] for f in ("is_label_issue", "label_quality_score", "suggested_label")}
            ranked = flat["ranked_issue_indices"].astype(np.int64)
            mats = {f: flat[f].shape for f in NOISE_FIELDS[1:5]}
            vecs = {f: flat[f].shape[0] for f in ("thresholds", "py")}
            flagged = int(flat["is_label_issue"].sum())
    except Exception as exc:  # noqa: BLE001  (any unreadable or incomplete answer is a failed check)
        return f"unreadable {shape.fmt} answer: {type(exc).__name__}: {exc}", ()
    if int(flat["n_examples"]) != n or int(flat["n_classes"]) != k:
        return f"n_examples x n_classes = {flat['n_examples']} x {flat['n_classes']}, expected {n} x {k}", ()
    bad = {f: v for f, v in lens.items() if v != n}
    if bad:
        return f"per-example arrays of the wrong length (expected {n}): {bad}", ()
    if any(m != (k, k) for m in mats.values()) or any(v != k for v in vecs.values()):
        return f"noise matrices of the wrong shape (expected {k} x {k}): {mats} {vecs}", ()
    num = int(flat["num_label_issues"])
    if not num == flagged == ranked.shape[0]:
        return f"num_label_issues {num}, flagged {flagged}, ranked {ranked.shape[0]} disagree", ()
    fingerprint = (num, int(flat["estimated_num_label_issues"]), hashlib.blake2b(ranked.tobytes()).hexdigest())
    return None, fingerprint


# --------------------------------------------------------------------------
# Profiles and SLOs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    duration: float  # seconds
    users: int
    mix: dict[str, int]  # shape -> weight (empty: a drain, with no users)
    rate: float | None = None  # total requests/s over all users (paced); None = closed loop
    settle: float = 0.0  # seconds at the start left out of the stage's statistics


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    stages: tuple[Stage, ...]
    #: SLOs that fail the run: the largest error rate, and the largest p99 (ms) per shape over the run.
    max_error_rate: float = 0.0
    p99_ms: dict[str, float] = field(default_factory=dict)
    #: soak only: RSS of the last minute over the first minute after warm-up, and latency drift.
    max_rss_growth: float | None = None
    max_p99_drift: float | None = None
    warmup: float = 0.0  # seconds left out of the drift/RSS comparison

    @property
    def duration(self) -> float:
        return sum(s.duration for s in self.stages)

    @property
    def shapes(self) -> list[str]:
        return sorted({name for s in self.stages for name in s.mix})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        return cls(**{**d, "stages": tuple(Stage(**s) for s in d["stages"])})


def _steps(shape: str, users: list[int], seconds: float, mix: dict[str, int] | None = None) -> list[Stage]:
    """Closed-loop steps of ``users`` for one shape (or mix), after a drain: every
    user of the previous block finishes its request and stops before the next block
    starts, so that no request of this block overlaps one of the last."""
    drain = Stage(f"drain-before-{shape}", 10.0, 0, {}, None, settle=10.0)
    return [drain] + [
        Stage(f"{shape}@{u}", seconds, u, mix or {shape: 1}, None, settle=min(5.0, seconds / 4)) for u in users
    ]


#: Measured saturation of the "mixed" traffic with one worker on the 2-core machine (README, "Load and soak").
MIXED_SATURATION_RPS = 31.6


def profiles(rate: float | None = None, duration: float | None = None) -> dict[str, Profile]:
    """Every named profile. ``rate``/``duration`` override the soak's and average's."""
    soak_rate = rate or round(0.7 * MIXED_SATURATION_RPS, 1)
    soak_seconds = duration or 660.0
    avg_rate = rate or round(0.4 * MIXED_SATURATION_RPS, 1)
    return {
        "smoke": Profile(
            "smoke",
            "Two paced users of small requests for 20 s: the service answers, correctly and quickly.",
            (Stage("small", duration or 20.0, 2, {"small": 1}, rate or 20.0, settle=2.0),),
            p99_ms={"small": 500.0},
        ),
        "average": Profile(
            "average",
            "Mixed traffic at about 40 % of the measured saturation, 3 minutes.",
            (Stage("mixed", duration or 180.0, 8, MIXED, avg_rate, settle=10.0),),
            p99_ms={"small": 1000.0, "medium_json": 5000.0, "medium_npz": 2000.0},
        ),
        "stress": Profile(
            "stress",
            "Closed-loop steps of 1..16 users per shape, then mixed: where throughput stops growing (the knee).",
            tuple(
                _steps("small", [1, 2, 4, 8, 16], 20.0)
                + _steps("medium_json", [1, 2, 4, 8], 25.0)
                + _steps("medium_npz", [1, 2, 4, 8], 20.0)
                + _steps("large_npz", [1, 2, 3], 40.0)
                + _steps("mixed", [2, 4, 8, 16], 25.0, MIXED)
            ),
        ),
        "spike": Profile(
            "spike",
            "Small requests: 30 s at 20 req/s, a 30 s spike of 32 closed-loop users, 30 s back at 20 req/s.",
            (
                Stage("before", 30.0, 2, {"small": 1}, 20.0, settle=3.0),
                Stage("spike", 30.0, 32, {"small": 1}, None, settle=3.0),
                Stage("after", 30.0, 2, {"small": 1}, 20.0, settle=5.0),
            ),
            p99_ms={"small": 2000.0},
        ),
        "soak": Profile(
            "soak",
            f"Mixed traffic at {soak_rate} req/s (about 70 % of saturation) for {soak_seconds / 60:.0f} minutes: "
            "no errors, flat memory and latency.",
            (Stage("soak", soak_seconds, 8, MIXED, soak_rate, settle=0.0),),
            p99_ms={"small": 1000.0, "medium_json": 5000.0, "medium_npz": 2000.0},
            max_rss_growth=0.10,
            max_p99_drift=1.5,
            warmup=60.0,
        ),
    }


def with_shapes(profile: Profile, shapes: list[str]) -> Profile:
    """The profile restricted to stages that send only the given shapes."""
    stages = tuple(s for s in profile.stages if set(s.mix) <= set(shapes))
    if not stages:
        raise SystemExit(f"profile {profile.name} has no stage sending only {', '.join(shapes)}")
    return replace(profile, stages=stages)


# --------------------------------------------------------------------------
# Targets: loopback only
# --------------------------------------------------------------------------


def require_loopback(base_url: str) -> str:
    """``base_url`` unchanged if its host is a loopback address (127.0.0.0/8, ::1,
    or a name resolving only to those); else SystemExit. Load goes nowhere else."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"target {base_url!r} is not an http(s) URL")
    host = parts.hostname
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise SystemExit(f"target host {host!r} does not resolve: {exc}") from None
        addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not addresses or not all(a.is_loopback for a in addresses):
        raise SystemExit(
            f"refusing target {base_url!r}: load tests only target loopback addresses "
            f"(127.0.0.0/8, ::1); {host!r} is {', '.join(map(str, sorted(addresses, key=str)))}"
        )
    return base_url.rstrip("/")


def target_from_env(environ: dict[str, str]) -> str | None:
    """``BASE_URL`` (a URL) or ``TARGET`` (host[:port], or a URL); None if neither is set."""
    raw = environ.get("BASE_URL") or environ.get("TARGET")
    if not raw:
        return None
    if "://" not in raw:
        raw = "http://" + raw
    if urlsplit(raw).port is None:  # the service's default port
        parts = urlsplit(raw)
        raw = parts._replace(netloc=f"{parts.netloc}:8000").geturl()
    return require_loopback(raw)
