"""``labelq serve``: run the HTTP service.

Each flag can also be set in the environment (``LABELQ_HOST``, ``LABELQ_PORT``,
``LABELQ_WORKERS``); flags win. Settings are validated before anything starts.
"""

from __future__ import annotations

import argparse
import os
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

    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
