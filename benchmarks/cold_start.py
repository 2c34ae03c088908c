"""Cold start: seconds from `labelq serve` to /health/ready 200.

    python benchmarks/cold_start.py            # with numba's cache as it is (warm after a first run)
    python benchmarks/cold_start.py --no-cache # with an empty NUMBA_CACHE_DIR (every kernel compiled)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def measure(env: dict[str, str]) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "LABELQ_PORT": str(port), "LABELQ_LOG_LEVEL": "warning"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ)
    for _ in range(args.runs):
        if args.no_cache:
            env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="labelq-numba-")
        print(f"ready after {measure(env):.1f} s ({'empty' if args.no_cache else 'existing'} numba cache)", flush=True)


if __name__ == "__main__":
    main()
