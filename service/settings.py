"""Service settings, read from the environment (``LABELQ_*``) and validated once at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PREFIX = "LABELQ_"


class Settings(BaseModel):
    """Every setting, its default and its range. The README's table lists them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, le=64, description="Server worker processes.")
    max_body_bytes: int = Field(
        1 << 30, ge=1024, description="Largest request body accepted; larger requests get 413."
    )
    max_cells: int = Field(
        1 << 30, ge=4, description="Largest N x K accepted (checked before allocating); larger gets 413."
    )
    threads: int = Field(
        0, ge=0, le=1024, description="Kernel threads per request; 0 = the CPUs this process may use (cgroup limit)."
    )
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$", description="Log level.")
    warmup: bool = Field(True, description="Compile/load the kernels before reporting ready.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``LABELQ_<NAME>`` variables, then ``overrides``.

        Raises:
            SettingsError: an unknown ``LABELQ_`` variable or a bad value, named.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for key, raw in env.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :].lower()
            if name not in cls.model_fields:
                raise SettingsError(f"{key} is not a known setting; known: {', '.join(_env_names())}")
            values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{PREFIX}{str(err['loc'][0]).upper()}: {err['msg']} (got {err.get('input')!r})"
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None


class SettingsError(ValueError):
    """A setting is unknown or has a bad value."""


def _env_names() -> list[str]:
    return [PREFIX + name.upper() for name in Settings.model_fields]


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota
    (a container's CPU limit), rounded up, at least 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
