"""``labelq serve``: run the HTTP service.

Each flag can also be set in the environment (``LABELQ_HOST``, ``LABELQ_PORT``,
``LABELQ_WORKERS``); flags win. Settings are validated before anything starts.

Logs are JSON lines on stderr (:mod:`service.logs`). With several workers,
metrics are kept in a fresh ``PROMETHEUS_MULTIPROC_DIR`` so that a scrape of
any worker adds up all of them (:mod:`service.metrics`). On SIGTERM the server
stops accepting connections, lets in-flight requests finish for up to
``LABELQ_GRACE_SECONDS``, and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from service.settings import PREFIX, Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labelq", description="Find label errors with confident learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1, env LABELQ_HOST)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000, env LABELQ_PORT)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1, env LABELQ_WORKERS)")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env(host=args.host, port=args.port, workers=args.workers)
    except SettingsError as exc:
        print(f"labelq: {exc}", file=sys.stderr)
        return 2
    # Worker processes build their app from the environment: pass the flags on.
    for name in ("host", "port", "workers"):
        os.environ[PREFIX + name.upper()] = str(getattr(settings, name))

    import uvicorn

    from service import logs, metrics

    # uvicorn handles SIGTERM/SIGINT while it serves, then restores the handlers
    # found here and re-raises the signal: after a graceful drain, exit 0 rather
    # than die of the signal. Before uvicorn starts, a signal just ends the start.
    serving = False

    def _stopped(signum: int, frame: object) -> None:
        if not serving:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    multiproc = settings.workers > 1 or bool(os.environ.get(metrics.MULTIPROC_ENV))
    with metrics.multiprocess_dir() if multiproc else contextlib.nullcontext():
        serving = True
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
            log_config=logs.log_config(settings.log_level),
            access_log=False,  # labelq logs one JSON line per request itself
            timeout_graceful_shutdown=settings.grace_seconds,  # type: ignore[arg-type]
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
