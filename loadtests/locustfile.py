"""Locust scenarios for labelq: ``POST /find-issues`` with fixed payload shapes.

Run it through ``loadtests/run.py`` (which starts the server, gates on its
health, enforces the SLOs and writes the summary). Run directly, it needs the
configuration that ``run.py`` writes::

    LOADTEST_CONFIG=cfg.json locust -f loadtests/locustfile.py --headless --only-summary

``cfg.json`` holds ``base_url`` (loopback only), ``profile`` (the stages, see
``common.Profile``) and ``raw_out`` (where the raw measurements go when the run
ends). The profile's shape class drives the users stage by stage and stops the
run after the last stage; a watchdog quits 300 s after that whatever happens.

Every answer is checked (status, media type, the shape of every field, and the
same flagged set for the same payload); a failed check is a failed request.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections import defaultdict

import gevent
from locust import FastHttpUser, LoadTestShape, events, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Profile, check_response, payload, require_loopback

log = logging.getLogger("loadtest")

with open(os.environ["LOADTEST_CONFIG"]) as _f:
    CONFIG = json.load(_f)
BASE_URL = require_loopback(CONFIG["base_url"])
PROFILE = Profile.from_json(CONFIG["profile"])
STAGE_ENDS = [sum(s.duration for s in PROFILE.stages[: i + 1]) for i in range(len(PROFILE.stages))]


def _health_gate() -> None:
    """No load unless the target says it is ready."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{BASE_URL}/health/ready", timeout=10) as r:
            if r.status == 200:
                return
            raise SystemExit(f"{BASE_URL}/health/ready answered {r.status}; not starting load")
    except OSError as exc:
        raise SystemExit(f"{BASE_URL}/health/ready failed ({exc}); not starting load") from None


_health_gate()
# Payloads are built once, before the clock starts, so the client only sends bytes.
_t = time.perf_counter()
PAYLOADS = {name: payload(name) for name in PROFILE.shapes}
log.warning("payloads built in %.1f s: %s", time.perf_counter() - _t,
            ", ".join(f"{p.name} {len(p.body) / 1e6:.1f} MB" for p in PAYLOADS.values()))


def _prime() -> dict[str, dict]:
    """One request per shape before the clock starts, checked like the others:
    one-time costs (first allocations, any kernel compiled on first use) are
    reported as the first request's latency, not mixed into the stages."""
    import urllib.request

    out = {}
    for name, p in PAYLOADS.items():
        req = urllib.request.Request(BASE_URL + p.shape.path, data=p.body, headers=p.headers, method="POST")
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                status, ctype, content, timing = r.status, r.headers.get("content-type", ""), r.read(), \
                    r.headers.get("server-timing")
        except OSError as exc:
            raise SystemExit(f"priming request for {name} failed: {exc}") from None
        ms = (time.perf_counter() - t) * 1000
        problem, _ = check_response(status, ctype, content, p.shape)
        if problem:
            raise SystemExit(f"priming request for {name}: {problem}")
        out[name] = {"ms": round(ms, 1), "server_timing": timing}
    return out


PRIMING = _prime()


# --------------------------------------------------------------------------
# Measurements: per stage and per minute, per shape
# --------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.t0_wall: float | None = None
        self.stage_starts_wall: list[float | None] = [None] * len(PROFILE.stages)
        self.latency = defaultdict(list)  # (stage, shape) -> ms of successful requests in the stage's window
        self.completed = defaultdict(int)  # (stage, shape) -> requests completed in the window (ok or not)
        self.attempts = defaultdict(int)  # (stage, shape) -> requests, whole stage
        self.failures = defaultdict(int)  # (stage, shape) -> failed requests, whole stage
        self.by_minute = defaultdict(list)  # (minute, shape) -> ms
        self.minute_failures = defaultdict(int)
        self.timing = defaultdict(lambda: defaultdict(float))  # (stage, shape) -> Server-Timing sums (ms)
        self.errors: dict[str, int] = defaultdict(int)  # message -> count (first 200 chars)
        self.fingerprints: dict[str, tuple] = {}

    def stage_at(self, t: float) -> int:
        for i, end in enumerate(STAGE_ENDS):
            if t < end:
                return i
        return len(STAGE_ENDS) - 1

    def record(self, shape_name: str, ms: float, ok: bool, server_timing: str | None, message: str | None) -> None:
        shape = SHAPE_INSTANCE
        t = shape.get_run_time() if shape else 0.0
        i = self.stage_at(t)
        stage = PROFILE.stages[i]
        start = STAGE_ENDS[i] - stage.duration
        minute = int(t // 60)
        key = (i, shape_name)
        self.attempts[key] += 1
        if not ok:
            self.failures[key] += 1
            self.minute_failures[(minute, shape_name)] += 1
            self.errors[(message or "")[:200]] += 1
        if t - start < stage.settle:
            return
        self.completed[key] += 1
        if ok:
            self.latency[key].append(ms)
            self.by_minute[(minute, shape_name)].append(ms)
            if server_timing:
                sums = self.timing[key]
                sums["n"] += 1
                for part in server_timing.split(","):
                    name, _, dur = part.strip().partition(";dur=")
                    if dur:
                        sums[name] += float(dur)

    def dump(self, path: str) -> None:
        def keyed(d):
            return [[k[0], k[1], v] for k, v in d.items()]

        out = {
            "t0_wall": self.t0_wall,
            "stage_starts_wall": self.stage_starts_wall,
            "latency": keyed(self.latency),
            "completed": keyed(self.completed),
            "attempts": keyed(self.attempts),
            "failures": keyed(self.failures),
            "by_minute": keyed(self.by_minute),
            "minute_failures": keyed(self.minute_failures),
            "timing": [[k[0], k[1], dict(v)] for k, v in self.timing.items()],
            "errors": dict(self.errors),
            "fingerprints": {k: list(v) for k, v in self.fingerprints.items()},
            "priming": PRIMING,
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, path)


REC = Recorder()
SHAPE_INSTANCE = None  # the StagedShape, once it ticks


# --------------------------------------------------------------------------
# The user and the load shape
# --------------------------------------------------------------------------


class LabelqUser(FastHttpUser):
    host = BASE_URL
    network_timeout = 300.0
    connection_timeout = 10.0
    insecure = False

    def on_start(self) -> None:
        self._rng = random.Random(id(self))
        self._last_start = time.perf_counter()

    def wait_time(self) -> float:
        """Paced to the stage's rate (each user 1/users of it), or no wait (closed loop)."""
        stage = PROFILE.stages[REC.stage_at(SHAPE_INSTANCE.get_run_time() if SHAPE_INSTANCE else 0.0)]
        if stage.rate is None or not stage.users:
            return 0.0
        interval = stage.users / stage.rate
        # random phase per request keeps the users from sending in lock-step
        return max(0.0, interval * self._rng.uniform(0.5, 1.5) - (time.perf_counter() - self._last_start))

    @task
    def find_issues(self) -> None:
        self._last_start = time.perf_counter()
        stage = PROFILE.stages[REC.stage_at(SHAPE_INSTANCE.get_run_time() if SHAPE_INSTANCE else 0.0)]
        if not stage.mix:  # a drain: this user is about to be stopped
            gevent.sleep(0.2)
            return
        names = list(stage.mix)
        name = names[0] if len(names) == 1 else self._rng.choices(names, weights=[stage.mix[n] for n in names])[0]
        p = PAYLOADS[name]
        with self.client.post(p.shape.path, data=p.body, headers=p.headers, name=name, catch_response=True) as r:
            if not r.status_code:
                problem, fingerprint = f"no answer: {getattr(r, 'error', None)!r}", ()
            else:
                problem, fingerprint = check_response(
                    r.status_code, r.headers.get("content-type", "") if r.headers else "", r.content or b"", p.shape
                )
            if problem is None:
                first = REC.fingerprints.setdefault(name, fingerprint)
                if fingerprint != first:
                    problem = f"a different answer to the same payload: {fingerprint} != {first}"
            if problem is None:
                r.success()
            else:
                r.failure(problem)


class StagedShape(LoadTestShape):
    """The profile's stages, one after another; None after the last stops the run."""

    def tick(self):
        global SHAPE_INSTANCE
        SHAPE_INSTANCE = self
        t = self.get_run_time()
        if REC.t0_wall is None:
            REC.t0_wall = time.time() - t
        if t >= STAGE_ENDS[-1]:
            return None
        i = REC.stage_at(t)
        if REC.stage_starts_wall[i] is None:
            REC.stage_starts_wall[i] = time.time()
        # Start (or stop) all of a stage's users at once; stopped users finish their request first.
        return PROFILE.stages[i].users, 1000.0


@events.request.add_listener
def _on_request(request_type, name, response_time, response_length, response=None, exception=None, **_kw):
    timing = None
    if response is not None and exception is None and response.headers:
        timing = response.headers.get("server-timing")
    REC.record(name, response_time, exception is None, timing, None if exception is None else str(exception))


@events.init.add_listener
def _on_init(environment, **_kw):
    # Hard stop: the shape ends the run; if anything keeps it going, quit anyway.
    limit = STAGE_ENDS[-1] + 300.0

    def watchdog():
        gevent.sleep(limit)
        log.error("watchdog: the run exceeded %.0f s; quitting", limit)
        if environment.runner is not None:
            environment.runner.quit()

    gevent.spawn(watchdog)


@events.quitting.add_listener
def _on_quitting(environment, **_kw):
    REC.dump(CONFIG["raw_out"])
