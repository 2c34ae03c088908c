"""Helpers for tests that run `labelq serve` in a subprocess on loopback.

The server's stderr (JSON log lines) goes to a file, never to a pipe nobody
reads: one line per request would fill a pipe and stall the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    proc: subprocess.Popen
    base: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def wait_ready(served: Served, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise AssertionError(f"server exited with {served.proc.returncode}: {served.log()[-2000:]}")
        try:
            if httpx.get(f"{served.base}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready in time: {served.log()[-2000:]}")


@contextmanager
def serve(
    log_path: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[Served]:
    """`labelq serve` on 127.0.0.1 (port from LABELQ_PORT), ready; stopped on exit."""
    port = port or free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LABELQ_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env.update({"LABELQ_PORT": str(port), **(env or {})})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", *args],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", port, log_path)
    try:
        wait_ready(served)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly these labels in a scrape, or None."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None
