"""Run a load profile against labelq and enforce its SLOs.

    python loadtests/run.py smoke                 # CI's: 20 s of small requests
    python loadtests/run.py stress --workers 2    # find the knee of every shape
    python loadtests/run.py soak --rate 40 --duration 660
    BASE_URL=http://127.0.0.1:8000 python loadtests/run.py average   # an already running server

Profiles (``common.profiles``): smoke, average, stress, spike, soak. Without
``BASE_URL`` (or ``TARGET``) the runner starts ``labelq serve`` itself on a free
127.0.0.1 port (``--workers``, ``--threads``) and stops it at the end; targets
other than loopback addresses are refused. It waits for ``/health/ready``, runs
locust headless with the profile's stages (the run stops by itself after the
last stage; the runner kills it if it overruns), samples the server's resident
memory (``/proc/<pid>/status``, the whole process tree) and CPU once a second,
and writes a JSON summary to ``loadtests/results/<profile>.json`` (``--out``):
per shape and per stage the throughput, p50/p90/p99/max latency and the
``Server-Timing`` breakdown, per minute the latency and memory, and every SLO
with its threshold, value and verdict. Exit code: 0 when every SLO holds, 1
when one fails, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import Profile, profiles, require_loopback, target_from_env, with_shapes

RESULTS = HERE / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_ready(base: str, timeout: float, proc: subprocess.Popen | None = None, workers: int = 1,
               log_path: Path | None = None) -> None:
    """Until ``/health/ready`` answers 200 (and, for several workers, every
    worker has logged that it is ready, or 50 fresh connections in a row were
    answered ready)."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path else ""
            raise RunError(f"the server exited with {proc.returncode} before it was ready:\n{tail}")
        if http_status(f"{base}/health/ready") == 200:
            in_a_row += 1
            logged = log_path.read_text().count("ready after") if log_path else 0
            if workers <= 1 or logged >= workers or in_a_row >= 50:
                return
            time.sleep(0.05)
            continue
        in_a_row = 0
        time.sleep(0.25)
    raise RunError(f"{base}/health/ready did not answer 200 within {timeout:.0f} s")


class Server:
    """``labelq serve`` on 127.0.0.1 in its own process group."""

    def __init__(self, workers: int, threads: int | None, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LOADTEST_") and k != "PROMETHEUS_MULTIPROC_DIR"}  # the server makes its own
        env["LABELQ_PORT"] = str(self.port)
        env["LABELQ_WORKERS"] = str(workers)
        env["LABELQ_HOST"] = "127.0.0.1"
        if threads is not None:
            env["LABELQ_THREADS"] = str(threads)
        self.threads = env.get("LABELQ_THREADS", "0")
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own group: the server and its workers
                self.proc.wait(timeout=10)
        self._log.close()


class RunError(Exception):
    pass


# --------------------------------------------------------------------------
# Sampling memory and CPU from /proc
# --------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = _read(f"/proc/{entry}/stat")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out[ppid].append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    children = _children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def rss_kb(pid: int) -> int:
    try:
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        fields = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    values = [int(v) for v in _read("/proc/stat").splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class Sampler(threading.Thread):
    """Once a second: RSS of the server's process tree (per process and in
    total), CPU ticks of the server tree, of the load generator and of the
    whole machine."""

    def __init__(self, server_pid: int | None, client_pid: int) -> None:
        super().__init__(daemon=True)
        self.server_pid, self.client_pid = server_pid, client_pid
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            s: dict[str, Any] = {"t": time.time()}
            if self.server_pid is not None:
                tree = process_tree(self.server_pid)
                rss = {p: rss_kb(p) for p in tree}
                s["rss_kb"] = sum(rss.values())
                s["rss_kb_by_pid"] = rss
                s["server_ticks"] = sum(cpu_ticks(p) for p in tree)
            s["client_ticks"] = sum(cpu_ticks(p) for p in process_tree(self.client_pid))
            s["machine_busy"], s["machine_total"] = machine_ticks()
            self.samples.append(s)
            self._halt.wait(1.0)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def latency_stats(values: list[float]) -> dict[str, Any]:
    return {
        "p50_ms": pct(values, 50), "p90_ms": pct(values, 90), "p99_ms": pct(values, 99),
        "max_ms": round(max(values), 2) if values else None,
        "mean_ms": round(float(np.mean(values)), 2) if values else None,
    }


def timing_breakdown(sums: dict[str, float], latency: list[float]) -> dict[str, float] | None:
    """Mean per request of each Server-Timing part, and the rest of the
    client-observed latency ("http": transfer, ASGI, queueing outside the kernel lock)."""
    n = sums.get("n", 0)
    if not n or not latency:
        return None
    parts = {k: round(v / n, 3) for k, v in sums.items() if k != "n"}
    parts["http"] = round(float(np.mean(latency)) - sum(parts.values()), 3)
    return parts


def usage(samples: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """CPU (in cores) of the server, the client and the whole machine, and the server's RSS, in [t0, t1]."""
    window = [s for s in samples if t0 <= s["t"] <= t1]
    if len(window) < 2:
        return {}
    a, b = window[0], window[-1]
    dt = b["t"] - a["t"]
    out: dict[str, Any] = {
        "client_cores": round((b["client_ticks"] - a["client_ticks"]) / CLK_TCK / dt, 2),
        "machine_cores": round(
            (b["machine_busy"] - a["machine_busy"]) / max(1, b["machine_total"] - a["machine_total"])
            * os.cpu_count(), 2),
    }
    if "server_ticks" in a:
        out["server_cores"] = round((b["server_ticks"] - a["server_ticks"]) / CLK_TCK / dt, 2)
        out["others_cores"] = round(out["machine_cores"] - out["server_cores"] - out["client_cores"], 2)
        rss = [s["rss_kb"] for s in window]
        out["rss_mb_mean"] = round(float(np.mean(rss)) / 1024, 1)
        out["rss_mb_max"] = round(max(rss) / 1024, 1)
    return out


def summarize(profile: Profile, raw: dict[str, Any], samples: list[dict[str, Any]], meta: dict[str, Any]) -> dict:
    def table(rows):
        out = defaultdict(dict)
        for a, b, v in rows:
            out[a][b] = v
        return out

    latency, completed = table(raw["latency"]), table(raw["completed"])
    failures, timing = table(raw["failures"]), table(raw["timing"])
    stage_starts = raw["stage_starts_wall"]
    shapes = profile.shapes

    stages = []
    for i, st in enumerate(profile.stages):
        measured = st.duration - st.settle
        row: dict[str, Any] = {
            "name": st.name, "users": st.users, "rate": st.rate, "mix": st.mix,
            "seconds": st.duration, "measured_seconds": measured, "shapes": {},
        }
        total = 0
        for name in st.mix:
            lat = latency[i].get(name, [])
            done = completed[i].get(name, 0)
            total += done
            row["shapes"][name] = {
                "requests": done, "failures": failures[i].get(name, 0),
                "rps": round(done / measured, 2) if measured > 0 else 0.0, **latency_stats(lat),
                "server_timing_ms": timing_breakdown(timing[i].get(name, {}), lat),
            }
        row["rps"] = round(total / measured, 2) if measured > 0 else 0.0
        if stage_starts[i] is not None and measured > 0:
            row["usage"] = usage(samples, stage_starts[i] + st.settle, stage_starts[i] + st.duration)
            if row["rps"] and "server_cores" in row["usage"]:
                # CPU the server spent per request: capacity that does not depend on what else the machine runs
                row["usage"]["server_cpu_ms_per_request"] = round(row["usage"]["server_cores"] * 1000 / row["rps"], 2)
        if st.mix:
            stages.append(row)

    per_shape = {}
    for name in shapes:
        lat = [v for i in latency for v in latency[i].get(name, [])]
        sums: dict[str, float] = defaultdict(float)
        for i in timing:
            for k, v in timing[i].get(name, {}).items():
                sums[k] += v
        per_shape[name] = {
            "requests": sum(completed[i].get(name, 0) for i in completed),
            "failures": sum(failures[i].get(name, 0) for i in failures),
            **latency_stats(lat),
            "server_timing_ms": timing_breakdown(sums, lat),
        }

    minutes = []
    by_minute, minute_failures = table(raw["by_minute"]), table(raw["minute_failures"])
    t0 = raw.get("t0_wall")
    for m in sorted(set(by_minute) | set(minute_failures)):
        row = {"minute": m, "failures": sum(minute_failures[m].values()), "shapes": {}}
        for name, lat in by_minute[m].items():
            row["shapes"][name] = {"requests": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
        if t0 is not None:
            row["usage"] = usage(samples, t0 + 60 * m, t0 + 60 * (m + 1))
        minutes.append(row)

    knees = {}
    blocks: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in stages:
        if "@" in row["name"]:
            blocks[row["name"].split("@")[0]].append(row)
    for block, rows in blocks.items():
        best = max(rows, key=lambda r: r["rps"])
        knee = next(r for r in rows if r["rps"] >= 0.9 * best["rps"])

        def brief(r):
            s = r["shapes"]
            return {"users": r["users"], "rps": r["rps"], "usage": r.get("usage"),
                    **{n: {k: s[n][k] for k in ("rps", "p50_ms", "p99_ms", "server_timing_ms")} for n in s}}

        knees[block] = {"saturation": brief(best), "knee": brief(knee), "steps": [
            {"users": r["users"], "rps": r["rps"],
             "p50_ms": {n: r["shapes"][n]["p50_ms"] for n in r["shapes"]},
             "p99_ms": {n: r["shapes"][n]["p99_ms"] for n in r["shapes"]}} for r in rows]}

    rss = [s for s in samples if "rss_kb" in s]
    memory = None
    if rss and t0 is not None:
        after = [s["rss_kb"] for s in rss if s["t"] >= t0 + profile.warmup]
        first = [s["rss_kb"] for s in rss if t0 + profile.warmup <= s["t"] < t0 + profile.warmup + 60]
        end = t0 + profile.duration
        last = [s["rss_kb"] for s in rss if end - 60 <= s["t"] <= end]
        memory = {
            "start_mb": round(rss[0]["rss_kb"] / 1024, 1),
            "first_minute_after_warmup_mb": round(float(np.mean(first)) / 1024, 1) if first else None,
            "last_minute_mb": round(float(np.mean(last)) / 1024, 1) if last else None,
            "max_mb": round(max(after or [rss[0]["rss_kb"]]) / 1024, 1),
            "end_mb": round(rss[-1]["rss_kb"] / 1024, 1),
        }
        if first and last:
            memory["growth"] = round(float(np.mean(last)) / float(np.mean(first)) - 1.0, 4)

    # SLOs
    slos = []
    total_failures = sum(v for _, _, v in raw["failures"])
    attempted = sum(v for _, _, v in raw["attempts"])
    error_rate = total_failures / max(1, attempted)
    slos.append({"name": "error_rate", "threshold": profile.max_error_rate, "value": round(error_rate, 6),
                 "ok": error_rate <= profile.max_error_rate, "requests": attempted, "failures": total_failures})
    for name in shapes:
        slos.append({"name": f"requests[{name}]", "threshold": "> 0", "value": per_shape[name]["requests"],
                     "ok": per_shape[name]["requests"] > 0})
    for name, limit in profile.p99_ms.items():
        if name in per_shape:
            v = per_shape[name]["p99_ms"]
            slos.append({"name": f"p99_ms[{name}]", "threshold": limit, "value": v, "ok": v is not None and v <= limit})
    if profile.max_rss_growth is not None:
        g = memory.get("growth") if memory else None
        slos.append({"name": "rss_growth", "threshold": profile.max_rss_growth, "value": g,
                     "ok": g is not None and g <= profile.max_rss_growth})
    if profile.max_p99_drift is not None:
        first_m = int(profile.warmup // 60)
        last_m = int(profile.duration // 60) - 1
        for name in shapes:
            a = next((m["shapes"].get(name, {}).get("p99_ms") for m in minutes if m["minute"] == first_m), None)
            b = next((m["shapes"].get(name, {}).get("p99_ms") for m in minutes if m["minute"] == last_m), None)
            drift = round(b / a, 3) if a and b else None
            slos.append({"name": f"p99_drift[{name}] (minute {last_m} / minute {first_m})",
                         "threshold": profile.max_p99_drift, "value": drift,
                         "ok": drift is not None and drift <= profile.max_p99_drift})
    if meta.get("server_exit") is not None:
        slos.append({"name": "server_alive", "threshold": "running until the end", "ok": False,
                     "value": f"the server exited with {meta['server_exit']} during the run"})
    if meta.get("locust_exit") not in (0, None):
        slos.append({"name": "locust_exit_code", "threshold": 0, "value": meta["locust_exit"], "ok": False})

    return {
        "profile": profile.name,
        "description": profile.description,
        "passed": all(s["ok"] for s in slos),
        **meta,
        "slos": slos,
        "shapes": per_shape,
        "knees": knees,
        "stages": stages,
        "minutes": minutes,
        "memory": memory,
        "errors": raw["errors"],
        "fingerprints": raw["fingerprints"],
        "first_request": raw.get("priming"),
    }


def print_summary(s: dict[str, Any]) -> None:
    print(f"\n== {s['profile']}: {'PASSED' if s['passed'] else 'FAILED'} "
          f"({s['target']}, workers={s.get('workers')}, threads={s.get('threads')})")
    print(f"{'stage':<16}{'users':>6}{'shape':>13}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'fail':>6}"
          f"{'srv cpu':>9}{'cli cpu':>9}{'other':>7}{'cpu ms/req':>11}")
    for st in s["stages"]:
        u = st.get("usage", {})
        for name, sh in st["shapes"].items():
            print(f"{st['name']:<16}{st['users']:>6}{name:>13}{sh['rps']:>9.1f}{sh['p50_ms'] or 0:>9.1f}"
                  f"{sh['p99_ms'] or 0:>9.1f}{sh['failures']:>6}{u.get('server_cores', 0):>9.2f}"
                  f"{u.get('client_cores', 0):>9.2f}{u.get('others_cores', 0):>7.2f}"
                  f"{u.get('server_cpu_ms_per_request', 0):>11.1f}")
    for block, k in s["knees"].items():
        print(f"knee[{block}]: {k['knee']['users']} users {k['knee']['rps']} req/s; "
              f"saturation {k['saturation']['rps']} req/s at {k['saturation']['users']} users")
    for name, first in (s.get("first_request") or {}).items():
        print(f"first request[{name}]: {first['ms']} ms ({first['server_timing']})")
    if s["memory"]:
        print(f"memory: {s['memory']}")
    for e, n in list(s["errors"].items())[:10]:
        print(f"error x{n}: {e}")
    for slo in s["slos"]:
        print(f"  [{'ok' if slo['ok'] else 'FAIL'}] {slo['name']}: {slo['value']} (threshold {slo['threshold']})")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    all_profiles = profiles()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", choices=sorted(all_profiles))
    ap.add_argument("--workers", type=int, default=1, help="LABELQ_WORKERS of the server started here (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="LABELQ_THREADS of the server started here")
    ap.add_argument("--shapes", help="only the stages sending these shapes (comma-separated)")
    ap.add_argument("--rate", type=float, help="total requests/s (smoke, average, soak)")
    ap.add_argument("--duration", type=float, help="seconds (smoke, average, soak)")
    ap.add_argument("--out", type=Path, help="summary path (default loadtests/results/<profile>.json)")
    ap.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /health/ready")
    args = ap.parse_args(argv)

    profile = profiles(rate=args.rate, duration=args.duration)[args.profile]
    if args.shapes:
        profile = with_shapes(profile, args.shapes.split(","))
    out = args.out or RESULTS / f"{profile.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_suffix("")

    target = target_from_env(dict(os.environ))
    server = None
    try:
        if target is None:
            server = Server(args.workers, args.threads, Path(f"{logs}.server.log"))
            target = server.base
            print(f"started labelq serve on {target} (workers={args.workers}); waiting for /health/ready",
                  flush=True)
            wait_ready(target, args.ready_timeout, server.proc, args.workers, server.log_path)
        else:
            print(f"target {target} (from the environment); waiting for /health/ready", flush=True)
            wait_ready(require_loopback(target), args.ready_timeout)

        with tempfile.TemporaryDirectory(prefix="labelq-load-") as tmp:
            cfg_path, raw_path = Path(tmp, "config.json"), Path(tmp, "raw.json")
            cfg_path.write_text(json.dumps({"base_url": target, "profile": profile.to_json(), "raw_out": str(raw_path)}))
            env = {k: v for k, v in os.environ.items() if not k.startswith("LABELQ_")}
            env["LOADTEST_CONFIG"] = str(cfg_path)
            cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--only-summary",
                   "--loglevel", "WARNING", "--exit-code-on-error", "0", "--stop-timeout", "600"]
            started = time.time()
            with open(f"{logs}.locust.log", "wb") as locust_log:
                client = subprocess.Popen(cmd, env=env, stdout=locust_log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
                sampler = Sampler(server.proc.pid if server else _pid_from_env(), client.pid)
                sampler.start()
                limit = profile.duration + 900.0  # payloads and priming come before the clock starts
                try:
                    code = client.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    os.killpg(client.pid, signal.SIGKILL)
                    client.wait()
                    raise RunError(f"locust overran its {limit:.0f} s bound and was killed") from None
                finally:
                    sampler.stop()
            if not raw_path.exists():
                raise RunError(f"locust exited with {code} and wrote no measurements; see {logs}.locust.log:\n"
                               + Path(f"{logs}.locust.log").read_text()[-3000:])
            raw = json.loads(raw_path.read_text())
        meta = {
            "target": target, "server_started": server is not None,
            "workers": args.workers if server else None, "threads": server.threads if server else None,
            "cpus": os.cpu_count(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1), "locust_exit": code,
            "server_exit": server.proc.poll() if server else None,
        }
        summary = summarize(profile, raw, sampler.samples, meta)
        out.write_text(json.dumps(summary, indent=1))
        print_summary(summary)
        print(f"summary: {out}")
        return 0 if summary["passed"] else 1
    except RunError as exc:
        print(f"load test not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()


def _pid_from_env() -> int | None:
    """With an external target, LOADTEST_SERVER_PID lets the runner sample that server's memory."""
    pid = os.environ.get("LOADTEST_SERVER_PID")
    return int(pid) if pid else None


if __name__ == "__main__":
    raise SystemExit(main())
