"""Where the time goes in one request: each kernel of the default method timed alone.

    python benchmarks/profile.py              # 1M x 100 float32
    python benchmarks/profile.py --n 100000 --k 1000

Prints the median (and minimum) of 7 runs per kernel, the whole call, and one
parallel read pass over the same array. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import dataset

from service import core, find_issues
from service import kernels as kn


@njit(parallel=True, cache=True)
def read_pass(B):
    out = np.zeros(B.shape[0], B.dtype)
    for i in prange(B.shape[0]):
        m = B[i, 0]
        for j in range(B.shape[1]):
            m = max(m, B[i, j])
        out[i] = m
    return out


def timed(name, fn, *args):
    times = []
    for _ in range(7):
        t = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t)
    print(f"{name:28s} {statistics.median(times) * 1000:8.1f} ms   (min {min(times) * 1000:.1f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=100)
    args = ap.parse_args()
    labels, P = dataset(args.n, args.k)
    find_issues(labels[:1000], P[:1000])
    y, P2, dtype = core.check_inputs(labels, P)
    B, prec, chunks = core._as_bits(P2), core._PREC[dtype], core._n_chunks(len(y))
    ubits = kn.value_bits([1.001], dtype, -1)[0]
    timed("find_issues (whole call)", find_issues, labels, P)
    counts, starts, order = timed("class_index", kn.class_index, y, args.k)
    values = timed("label_values", kn.label_values, P2, y)
    th = timed("thresholds", core._thresholds, values, dtype, counts, starts, order)
    ood = timed("ood thresholds", core._ood_thresholds, values, dtype, counts, starts, order, 15.0)
    tbits = kn.value_bits(th[2], dtype, +1)
    scan = timed("scan_rows (the pass)", kn.scan_rows, P2, B, y, 1e-3, ubits, prec, False, tbits, ood[1], chunks)
    _, argmax, label_is_max, selfconf, other, _, offdiag, cj_raw, _, _ = scan
    timed("  row_stats alone", kn.row_stats, P2, B, y, 1e-3, ubits, prec, False, chunks)
    timed("  confident pass alone", kn.confident_pass_categories, B, y, tbits, ood[1], argmax, chunks)
    noise = timed("noise_estimates", lambda: core.noise_estimates(cj_raw.copy(), counts, th[0], ood[0], 0))
    pcm = core.prune_counts(noise.confident_joint, counts, core.make_options())
    mask = timed("prune_by_noise_rate", kn.prune_by_noise_rate, P2, B, order, starts, other > selfconf, pcm, 1, prec)
    timed("rank_flagged", kn.rank_flagged, mask & ~label_is_max, selfconf)
    timed("read pass", read_pass, B)


if __name__ == "__main__":
    main()
