"""Service settings, read from the environment (``LABELQ_*``) and validated once at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PREFIX = "LABELQ_"
#: What an `X-Labelq-Dataset` value must look like to become a metric label value.
DATASET_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
#: What an API key must look like: an RFC 6750 bearer token (b64token) of 16 to 512 characters.
API_KEY = re.compile(r"[A-Za-z0-9._~+/-]{16,512}=*")
#: Settings whose values are secret: never echoed in error messages.
SECRET_SETTINGS = frozenset({"api_keys"})


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
    max_inflight_bytes: int = Field(
        0,
        ge=0,
        description="Memory budget of one worker process for the requests it holds at once (bodies, decoded "
        "arrays, working memory, answers), estimated before allocating; a request that does not fit gets 503 "
        "with Retry-After. 0 = half of the memory limit (cgroup, else physical memory) divided by `workers`.",
    )
    request_timeout_seconds: float = Field(
        60,
        gt=0,
        le=86400,
        description="How long after its body has arrived a request may wait for its kernels to start "
        "(decoding and queueing for the process's kernels); later gets 503 with Retry-After.",
    )
    api_keys: tuple[str, ...] = Field(
        (),
        repr=False,
        description="API keys (comma-separated); when any key is configured (here or in `api_keys_file`), every "
        "route but the health probes and /metrics requires `Authorization: Bearer <key>`.",
    )
    api_keys_file: str | None = Field(
        None,
        description="A file of API keys, one per line (blank lines and lines starting with # are skipped), "
        "e.g. a mounted Kubernetes Secret; read at start-up.",
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

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            keys = [k.strip() for k in value.split(",") if k.strip()]
            if not keys:  # set but empty (e.g. a missing Secret key): refuse rather than run without auth
                raise ValueError("is set but holds no key; unset it to run without authentication")
            value = keys
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, key in enumerate(value):
            if not API_KEY.fullmatch(key):
                raise ValueError(f"key {i + 1} of {len(value)} is not {_API_KEY_RULE}")
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, value: str | None) -> str | None:
        if value is not None:
            read_api_keys_file(value)
        return value

    def bearer_keys(self) -> tuple[str, ...]:
        """Every configured API key: ``api_keys`` and those of ``api_keys_file`` (read now)."""
        from_file = read_api_keys_file(self.api_keys_file) if self.api_keys_file else ()
        return tuple(dict.fromkeys((*self.api_keys, *from_file)))

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
                f"{PREFIX}{str(err['loc'][0]).upper()}: {err['msg']}"
                + ("" if err["loc"] and err["loc"][0] in SECRET_SETTINGS else f" (got {err.get('input')!r})")
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None


class SettingsError(ValueError):
    """A setting is unknown or has a bad value."""


_API_KEY_RULE = "a bearer token of 16 to 512 characters (A-Z a-z 0-9 . _ ~ + / -, then = padding)"


def read_api_keys_file(path: str) -> tuple[str, ...]:
    """The keys of an API keys file: one per line, surrounding whitespace
    stripped, blank lines and ``#`` comment lines skipped. Error messages
    name lines, never keys.

    Raises:
        ValueError: the file cannot be read, holds no key, or a line is not a key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API keys file {path!r}: {type(exc).__name__}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not API_KEY.fullmatch(line):
            raise ValueError(f"{path!r} line {number} is not {_API_KEY_RULE}")
        keys.append(line)
    if not keys:
        raise ValueError(f"the API keys file {path!r} holds no key; unset it to run without authentication")
    return tuple(keys)


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
