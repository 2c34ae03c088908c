"""Headless Chromium for the browser tests: Debian's ``chromium`` package, driven by Playwright.

Nothing downloads a browser (no ``playwright install``): the tests launch ``/usr/bin/chromium``.
When it is missing, :func:`ensure_chromium` installs it with apt-get (CI runs as root), or fails
the test with the command to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
#: As the machine notes prescribe: no sandbox (root), no GPU, and no background connections,
#: which a closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APT_TIMEOUT = 1200  # seconds, for apt-get update + install


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_chromium() -> Path:
    """The chromium binary, installed from Debian's packages if it is missing."""
    if CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    how = "apt-get update && apt-get install -y --no-install-recommends chromium"
    if shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} is missing and there is no apt-get to install it; install Debian's chromium package")
    if os.geteuid() != 0:
        pytest.fail(f"{CHROMIUM} is missing and the tests are not root, so cannot install it; run as root: {how}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        try:
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"installing chromium timed out after {APT_TIMEOUT} s at: {' '.join(cmd)}")
        if proc.returncode != 0:
            pytest.fail(
                f"installing chromium failed ({' '.join(cmd)} exited {proc.returncode}):\n"
                f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
            )
    if not CHROMIUM.exists():
        pytest.fail(f"apt-get installed chromium but {CHROMIUM} does not exist")
    return CHROMIUM
