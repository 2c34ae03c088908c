"""Service settings, read from the environment (``LABELQ_*``) and validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "LABELQ_"
#: What an `X-Labelq-Dataset` value must look like to become a metric label value.
DATASET_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


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
    grace_seconds: float = Field(
        30, gt=0, le=3600, description="On SIGTERM, how long in-flight requests may take to finish before exit."
    )
    dataset_tags: tuple[str, ...] = Field(
        (),
        description="Allowed `X-Labelq-Dataset` values for the metrics' `dataset` label (comma-separated); "
        "others are `other`. Empty: the first `dataset_tag_limit` distinct values are kept.",
    )
    dataset_tag_limit: int = Field(
        20, ge=0, le=1000, description="Without `dataset_tags`: how many distinct dataset tags a process keeps."
    )
    report_page: bool = Field(
        True, description="Serve the interactive label-quality report page (GET /, static files under /report/)."
    )

    @field_validator("dataset_tags", mode="before")
    @classmethod
    def _split_tags(cls, value: object) -> object:
        if isinstance(value, str):
            value = [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("dataset_tags")
    @classmethod
    def _check_tags(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tag in value:
            if not DATASET_TAG.fullmatch(tag) or tag in ("none", "other"):
                raise ValueError(
                    f"{tag!r} is not a dataset tag: 1 to 64 of A-Z a-z 0-9 _ . : - starting with a letter or digit, "
                    "not 'none' or 'other'"
                )
        return value

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
