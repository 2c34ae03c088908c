"""Benchmarks: labelq against the reference (cleanlab 2.9.0), measured in the same run.

    python benchmarks/run.py                      # everything (about 15 minutes)
    python benchmarks/run.py --sections kernels   # kernels, scaling, http (comma-separated)
    python benchmarks/run.py --quick              # smaller sizes, fewer repeats

Prints markdown tables (medians of several runs, ratios against the reference and
against one parallel read pass over the same array) and writes the raw figures to
benchmarks/results.json. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from numba import njit, prange

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import find_issues  # noqa: E402
from service.core import FILTER_BY  # noqa: E402

METHODS = list(FILTER_BY)


# ---------------------------------------------------------------- data and timing


def dataset(n: int, k: int, dtype=np.float32, seed: int = 0, noise: float = 0.1):
    """Softmax outputs of a decent model (true class logit +4) with ``noise`` of
    the labels flipped at random."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    P = np.empty((n, k), dtype=dtype)
    step = max(1, 2_000_000 // k)
    for lo in range(0, n, step):  # in blocks: no N x K float64 temporary
        hi = min(n, lo + step)
        logits = rng.standard_normal((hi - lo, k), dtype=np.float32)
        logits[np.arange(hi - lo), true[lo:hi]] += 4.0
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        P[lo:hi] = logits
    labels = true.copy()
    flip = rng.random(n) < noise
    labels[flip] = rng.integers(0, k, int(flip.sum()))
    return labels, P


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@njit(parallel=True, fastmath=True, cache=True)
def _read_pass(P):
    out = np.zeros(P.shape[0], np.float32)
    for i in prange(P.shape[0]):
        acc = np.float32(0.0)
        for j in range(P.shape[1]):
            acc += P[i, j]
        out[i] = acc
    return out


def read_pass(P, repeats: int) -> float:
    """One parallel read pass over the array: the memory-bandwidth floor."""
    _read_pass(P)
    return median_time(lambda: _read_pass(P), repeats)


def peak_extra_bytes(fn) -> int:
    """Peak resident memory during ``fn()`` above the resident memory before it (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return -1
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def reference_call(labels, P, method):
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_label_issues(labels, P, filter_by=method)


def mb(x: float) -> str:
    return f"{x / 2**20:.0f} MB"


# ---------------------------------------------------------------- sections


def bench_kernels(quick: bool, results: dict) -> None:
    sizes = [(100_000, 10), (1_000_000, 10), (1_000_000, 100), (100_000, 1000)]
    if quick:
        sizes = [(100_000, 10), (200_000, 100)]
    rows = []
    for n, k in sizes:
        labels, P = dataset(n, k)
        find_issues(labels, P)  # compile / load
        methods = METHODS if (n, k) == sizes[2 if not quick else 1] else ["prune_by_noise_rate"]
        rp = read_pass(P, 7)
        for method in methods:
            ours = median_time(lambda: find_issues(labels, P, filter_by=method), 3 if quick else 5)
            ref = median_time(lambda: reference_call(labels, P, method), 1 if quick else 3)
            mem = peak_extra_bytes(lambda: find_issues(labels, P, filter_by=method))
            rows.append(
                {"n": n, "k": k, "method": method, "ours_s": ours, "reference_s": ref, "read_pass_s": rp,
                 "peak_extra_bytes": mem, "input_bytes": P.nbytes}
            )
            print(f"  {n}x{k} {method}: ours {ours * 1e3:.1f} ms, reference {ref * 1e3:.0f} ms", flush=True)
        # scores and noise estimates alone: the other rank_by methods
        for rank_by in ("normalized_margin", "confidence_weighted_entropy"):
            ours = median_time(lambda: find_issues(labels, P, filter_by="confident_learning", rank_by=rank_by), 3)
            ref = median_time(lambda: _reference_scores(labels, P, rank_by), 1 if quick else 3)
            rows.append({"n": n, "k": k, "method": f"scores:{rank_by}", "ours_s": ours, "reference_s": ref,
                         "read_pass_s": rp, "peak_extra_bytes": -1, "input_bytes": P.nbytes})
        del P
    results["kernels"] = rows
    print("\n### Kernels (float32 input, in-process; medians)\n")
    print("| N x K | method | labelq | cleanlab | speed-up | read pass | labelq / read pass | peak extra memory (input) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{mb(r['peak_extra_bytes'])} ({mb(r['input_bytes'])})" if r["peak_extra_bytes"] >= 0 else "-"
        print(
            f"| {r['n']:,} x {r['k']} | {r['method']} | {r['ours_s'] * 1e3:.1f} ms | {r['reference_s'] * 1e3:.0f} ms "
            f"| {r['reference_s'] / r['ours_s']:.0f}x | {r['read_pass_s'] * 1e3:.1f} ms "
            f"| {r['ours_s'] / r['read_pass_s']:.1f}x | {mem} |"
        )


def _reference_scores(labels, P, rank_by):
    """The reference's scores plus its noise estimates (what the confident_learning row also returns)."""
    from cleanlab import count, rank

    rank.get_label_quality_scores(labels, P, method=rank_by)
    count.estimate_py_and_noise_matrices_from_probabilities(labels, P)


def bench_scaling(quick: bool, results: dict) -> None:
    n_curve = [10_000, 100_000, 1_000_000, 10_000_000] if not quick else [10_000, 100_000, 1_000_000]
    k_curve = [10, 100, 500, 1000, 2000] if not quick else [10, 100, 500]
    rows = []
    for n in n_curve:
        labels, P = dataset(n, 10)
        find_issues(labels, P)
        rows.append({"n": n, "k": 10, "ours_s": median_time(lambda: find_issues(labels, P), 5),
                     "read_pass_s": read_pass(P, 5)})
    for k in k_curve:
        labels, P = dataset(100_000, k)
        find_issues(labels, P)
        rows.append({"n": 100_000, "k": k, "ours_s": median_time(lambda: find_issues(labels, P), 5),
                     "read_pass_s": read_pass(P, 5)})
    results["scaling"] = rows
    print("\n### Scaling (default method, float32; time per element should stay flat)\n")
    print("| N x K | labelq | ns per element | read pass |")
    print("|---|---|---|---|")
    for r in rows:
        per = r["ours_s"] / (r["n"] * r["k"]) * 1e9
        print(f"| {r['n']:,} x {r['k']} | {r['ours_s'] * 1e3:.1f} ms | {per:.2f} | {r['read_pass_s'] * 1e3:.1f} ms |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_http(quick: bool, results: dict) -> None:
    import httpx

    port = _free_port()
    env = {**os.environ, "LABELQ_PORT": str(port), "LABELQ_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        rows = []
        cases = [(100_000, 10, "json"), (100_000, 10, "npz"), (1_000_000, 100, "npz")]
        if quick:
            cases = [(100_000, 10, "json"), (100_000, 10, "npz"), (200_000, 100, "npz")]
        with httpx.Client(timeout=600) as client:
            for n, k, fmt in cases:
                labels, P = dataset(n, k)
                if fmt == "json":
                    body = json.dumps({"labels": labels.tolist(), "pred_probs": P.astype(np.float64).tolist()}).encode()
                    headers = {"content-type": "application/json"}
                else:
                    buf = io.BytesIO()
                    np.savez(buf, labels=labels, pred_probs=P)
                    body = buf.getvalue()
                    headers = {"content-type": "application/x-npz", "accept": "application/x-npz"}
                parts = []

                def call():
                    # In 1 MiB pieces with a Content-Length: httpx sends one bytes body in quadratic time.
                    r = client.post(f"{base}/find-issues", content=_pieces(body),
                                    headers={**headers, "content-length": str(len(body))})
                    r.raise_for_status()
                    parts.append(r.headers["server-timing"])

                call()
                total = median_time(call, 3 if quick else 5)
                timing = _median_server_timing(parts[1:])
                ref = median_time(lambda: reference_call(labels, P, "prune_by_noise_rate"), 1 if quick else 3)
                rows.append({"n": n, "k": k, "format": fmt, "body_bytes": len(body), "end_to_end_s": total,
                             "server_timing_ms": timing, "reference_in_process_s": ref})
                print(f"  http {n}x{k} {fmt}: {total * 1e3:.0f} ms (reference {ref * 1e3:.0f} ms)", flush=True)
                del P, body
        results["http"] = rows
        print("\n### Over HTTP on loopback (float32 data; default method; medians)\n")
        print("| N x K | format | body | end to end | decode | validate | kernel | encode | cleanlab in-process | speed-up |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            t = r["server_timing_ms"]
            print(
                f"| {r['n']:,} x {r['k']} | {r['format']} | {mb(r['body_bytes'])} | {r['end_to_end_s'] * 1e3:.0f} ms "
                f"| {t.get('decode', 0):.0f} ms | {t.get('validate', 0):.0f} ms | {t.get('kernel', 0):.0f} ms "
                f"| {t.get('encode', 0):.0f} ms | {r['reference_in_process_s'] * 1e3:.0f} ms "
                f"| {r['reference_in_process_s'] / r['end_to_end_s']:.1f}x |"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _pieces(body: bytes, size: int = 1 << 20):
    view = memoryview(body)
    for i in range(0, len(body), size):
        yield bytes(view[i : i + size])


def _median_server_timing(headers: list[str]) -> dict[str, float]:
    parts: dict[str, list[float]] = {}
    for h in headers:
        for item in h.split(","):
            name, _, dur = item.strip().partition(";dur=")
            parts.setdefault(name, []).append(float(dur))
    return {k: statistics.median(v) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="kernels,scaling,http")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    args = parser.parse_args()
    import numba

    results: dict = {"machine": {"cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                                 "numpy": np.__version__, "numba": numba.__version__}}
    for section in args.sections.split(","):
        {"kernels": bench_kernels, "scaling": bench_scaling, "http": bench_http}[section.strip()](args.quick, results)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    main()
