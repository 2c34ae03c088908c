"""Benchmark of the batched protocol: a dataset larger than one request.

    python benchmarks/batched.py                   # 10M x 100 float16 (2 GB on disk), about 20 minutes
    python benchmarks/batched.py --n 1000000       # smaller

Writes labels and pred_probs as .npy files (memory-mapped when read), then
measures, each in the same run: the client (service.client.BatchedClient)
against 1 and 2 local replicas (`labelq serve`), the reference's batch mode
(cleanlab.experimental.label_issues_batched.find_label_issues_batched) on the
same files, and the reference's in-memory call where it fits. Wall time and
peak resident memory (VmHWM) of the client and of each replica; the client's
peak includes the pages of the memory-mapped input it has read, so its
anonymous memory at the end is printed too. With --check it also runs one
in-process service.find_issues over the whole array and says whether the
batched flags, ranking and scores equal it. The reference's batch mode is
approximate (its own rule); the flagged sets are compared. It measures; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serving import serve


def write_dataset(path: Path, n: int, k: int, seed: int = 0, noise: float = 0.1) -> None:
    """Softmax outputs of a decent model, float16, with ``noise`` of labels flipped; written in blocks."""
    rng = np.random.default_rng(seed)
    P = np.lib.format.open_memmap(path / "pred_probs.npy", "w+", np.float16, (n, k))
    labels = np.lib.format.open_memmap(path / "labels.npy", "w+", np.int64, (n,))
    step = 500_000
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        true = rng.integers(0, k, hi - lo)
        logits = rng.standard_normal((hi - lo, k), dtype=np.float32)
        logits[np.arange(hi - lo), true] += 4.0
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        P[lo:hi] = logits
        flip = rng.random(hi - lo) < noise
        y = true.copy()
        y[flip] = rng.integers(0, k, int(flip.sum()))
        labels[lo:hi] = y
    P.flush()
    labels.flush()


def hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(code: str, timeout: float) -> dict:
    """Run ``code`` in a fresh Python (so its peak memory is its own); it prints one JSON line."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if out.returncode != 0:
        return {"error": out.stderr[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


CLIENT = """
import json, resource, sys, time
import numpy as np
from service.client import BatchedClient
P = np.load({p!r}, mmap_mode="r"); y = np.load({y!r}, mmap_mode="r")
t = time.perf_counter()
with BatchedClient({urls!r}, batch_size={batch}, concurrency={conc}) as c:
    r = c.find_issues(y, P, filter_by={method!r}, out_dir={out!r})
wall = time.perf_counter() - t
np.save({out!r} + "/ranked.npy", r.ranked_issue_indices)
anon = [l for l in open("/proc/self/status") if l.startswith("RssAnon")][0].split()[1]
print(json.dumps({{"wall": wall, "flagged": int(r.num_label_issues), "anon_end_mb": int(anon) / 1024,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CHECK = """
import json, time
import numpy as np
from service import find_issues
P = np.load({p!r}); y = np.load({y!r})
t = time.perf_counter(); r = find_issues(y, P, filter_by={method!r}); wall = time.perf_counter() - t
same = (np.array_equal(np.load({out!r} + "/is_label_issue.npy"), r.is_label_issue)
        and np.array_equal(np.load({out!r} + "/ranked.npy"), r.ranked_issue_indices)
        and np.array_equal(np.load({out!r} + "/label_quality_score.npy"), r.label_quality_score))
print(json.dumps({{"wall": wall, "flagged": int(r.num_label_issues), "equal": bool(same)}}))
"""

REFERENCE_BATCHED = """
import json, resource, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
from cleanlab.experimental.label_issues_batched import find_label_issues_batched
t = time.perf_counter()
issues = find_label_issues_batched(labels_file={y!r}, pred_probs_file={p!r}, batch_size={batch}, n_jobs=2, verbose=False)
wall = time.perf_counter() - t
np.save({out!r}, issues)
print(json.dumps({{"wall": wall, "flagged": int(len(issues)),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

REFERENCE_MEMORY = """
import json, resource, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
from cleanlab.filter import find_label_issues
P = np.load({p!r}); y = np.load({y!r})
t = time.perf_counter()
mask = find_label_issues(y, P, filter_by={method!r})
wall = time.perf_counter() - t
print(json.dumps({{"wall": wall, "flagged": int(mask.sum()),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--batch", type=int, default=250_000)
    ap.add_argument("--method", default="prune_by_noise_rate")
    ap.add_argument("--dir", default=None, help="where to write the dataset (default: a temporary directory)")
    ap.add_argument("--no-reference-memory", action="store_true", help="skip the reference's in-memory call")
    ap.add_argument("--check", action="store_true", help="compare with one in-process find_issues (needs the RAM)")
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="labelq-batched-"))
    work.mkdir(parents=True, exist_ok=True)
    p, y = str(work / "pred_probs.npy"), str(work / "labels.npy")
    if not Path(p).exists() or np.load(p, mmap_mode="r").shape != (args.n, args.k):
        t = time.perf_counter()
        write_dataset(work, args.n, args.k)
        print(f"wrote {args.n} x {args.k} float16 ({os.path.getsize(p) / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    rows = []
    for replicas in (1, 2):
        env = {"LABELQ_THREADS": str(max(1, 2 // replicas)), "LABELQ_MAX_BODY_BYTES": str(1 << 31)}
        logs = [work / f"replica{i}.log" for i in range(replicas)]
        with serve(logs[0], env=env) as a:
            servers = [a]
            ctx2 = serve(logs[1], env=env) if replicas == 2 else None
            if ctx2 is not None:
                servers.append(ctx2.__enter__())
            try:
                out = str(work / f"out{replicas}")
                fig = run_child(
                    CLIENT.format(p=p, y=y, urls=[s.base for s in servers], batch=args.batch,
                                  conc=2 * replicas, method=args.method, out=out),
                    timeout=7200,
                )
                fig["replica_hwm_mb"] = [round(hwm_mb(s.proc.pid)) for s in servers]
            finally:
                if ctx2 is not None:
                    ctx2.__exit__(None, None, None)
        fig["what"] = f"labelq client, {replicas} replica(s)"
        rows.append(fig)
        print(json.dumps(fig), flush=True)

    fig = run_child(REFERENCE_BATCHED.format(p=p, y=y, batch=args.batch, out=str(work / "ref_batched.npy")), 7200)
    fig["what"] = "cleanlab find_label_issues_batched (n_jobs=2)"
    rows.append(fig)
    print(json.dumps(fig), flush=True)
    if not args.no_reference_memory:
        fig = run_child(REFERENCE_MEMORY.format(p=p, y=y, method=args.method), 7200)
        fig["what"] = f"cleanlab find_label_issues in memory ({args.method})"
        rows.append(fig)
        print(json.dumps(fig), flush=True)

    if args.check:
        fig = run_child(CHECK.format(p=p, y=y, method=args.method, out=str(work / "out1")), 7200)
        print(f"one in-process labelq find_issues: {fig}", flush=True)
    ours = np.load(work / "out1" / "ranked.npy")
    theirs = np.load(work / "ref_batched.npy") if (work / "ref_batched.npy").exists() else None
    print(f"\n{args.n} x {args.k} float16 on disk, batches of {args.batch}, filter_by={args.method}\n")
    print("| run | wall s | flagged | client peak MB (anonymous at end) | replica peak MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['what']} | failed: {r['error'][-200:]!r} | | | |")
            continue
        reps = ", ".join(str(x) for x in r.get("replica_hwm_mb", [])) or "-"
        anon = f" ({r['anon_end_mb']:.0f})" if "anon_end_mb" in r else ""
        print(f"| {r['what']} | {r['wall']:.1f} | {r['flagged']} | {r['maxrss_mb']:.0f}{anon} | {reps} |")
    if theirs is not None:
        common = len(np.intersect1d(ours, theirs))
        print(f"\nflagged by both: {common}; only ours: {len(ours) - common}; only the reference's batch mode: "
              f"{len(theirs) - common}")


if __name__ == "__main__":
    main()
