"""CI's load test: the smoke profile of loadtests/run.py (20 s of small requests
against a `labelq serve` it starts on loopback), through the same runner as
every other profile. Its summary must show no errors and every SLO met."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_profile_meets_its_slos(tmp_path):
    out = tmp_path / "smoke.json"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LABELQ_", "LOADTEST_")) and k not in ("BASE_URL", "TARGET", "PROMETHEUS_MULTIPROC_DIR")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "run.py"), "smoke", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, report
    summary = json.loads(out.read_text())
    assert summary["passed"], report
    assert all(slo["ok"] for slo in summary["slos"]), summary["slos"]
    small = summary["shapes"]["small"]
    assert small["failures"] == 0 and small["requests"] >= 100, small
    assert summary["errors"] == {}
    assert small["server_timing_ms"]["kernel"] > 0  # the Server-Timing header was read
    assert summary["memory"]["max_mb"] > 0  # the server's memory was sampled
