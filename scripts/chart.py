#!/usr/bin/env python3
"""``helm lint`` and ``helm template`` for the labelq chart without a helm binary.

Wraps ``helm-python-sdk`` (Helm v4's Go engine through ctypes; in the ``test`` extra):

    python scripts/chart.py lint [CHART] [-f values.yaml ...]
    python scripts/chart.py template [CHART] [-f values.yaml ...] [--name N] [--namespace NS]
                                     [--set a.b=c ...] [--show-only PATH] [--skip-tests]
                                     [--include-notes] [-o rendered.yaml]

``lint`` is always strict (warnings fail) and also lints with every values file given (helm lint
only reports the merged result of one set of values). ``template`` prints what ``helm template``
prints: the rendered manifests as one YAML stream, each headed by ``# Source: <path>``, ordered by
path; test hooks are included like helm's default, ``NOTES.txt`` is left out unless asked.

Exit status: 0 ok, 1 lint findings or a render error, 2 usage errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHART = ROOT / "helm" / "labelq"
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def _helm() -> Any:
    try:
        import helm_python
    except ImportError:  # pragma: no cover - depends on the environment
        sys.exit('chart.py: helm-python-sdk is missing: pip install -e ".[test]"')
    return helm_python


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base`` (maps merge, everything else replaces), as
    helm merges several ``-f`` files."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: Iterable[str | Path] = (), sets: Iterable[str] = ()) -> dict[str, Any]:
    """User values from ``-f`` files (later wins) and ``--set`` expressions (win over files)."""
    values: dict[str, Any] = {}
    for path in files:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: values must be a mapping, got {type(loaded).__name__}")
        values = merge(values, loaded)
    sets = list(sets)
    if sets:
        # One parse of all expressions, as helm applies its --set flags to one map in turn
        # (list items set by separate flags, `a[0].x=1 --set a[0].y=2`, end up in one item).
        values = merge(values, _helm().parse_set_string(",".join(sets)))
    return values


def lint(
    chart: str | Path = DEFAULT_CHART,
    values_files: Sequence[str | Path] = (),
    *,
    namespace: str = "labelq",
    kube_version: str | None = "v1.30.0",
) -> list[str]:
    """Strict lint with the chart's defaults and then with each values file.

    Returns the problems (warnings and errors, one line each); empty means clean. Informational
    messages (``icon is recommended``) are not problems, as in ``helm lint --strict``.
    """
    helm = _helm()
    problems: list[str] = []
    runs: list[tuple[str, dict[str, Any] | None]] = [("defaults", None)]
    runs += [(str(path), load_values([path])) for path in values_files]
    for label, values in runs:
        report = helm.lint(str(chart), values, strict=True, namespace=namespace, kube_version=kube_version)
        for message in report.get("messages", []):
            severity = SEVERITY.get(message.get("severity", 0), "UNKNOWN")
            if severity in {"WARNING", "ERROR", "UNKNOWN"}:
                problems.append(f"[{label}] {severity} {message.get('path')}: {message.get('error')}")
        problems += [f"[{label}] ERROR {error}" for error in report.get("errors", []) or []]
    return problems


def render(
    chart: str | Path = DEFAULT_CHART,
    values: dict[str, Any] | None = None,
    *,
    name: str = "labelq",
    namespace: str = "labelq",
    include_tests: bool = True,
    include_notes: bool = False,
) -> dict[str, str]:
    """Rendered templates by path (``labelq/templates/deployment.yaml`` ...), sorted, empty ones
    dropped. Raises ``helm_python.HelmError`` (e.g. ``HelmValuesError`` for schema violations)."""
    helm = _helm()
    helm.validate_release_name(name)
    with helm.Chart.load(str(chart)) as loaded:
        rendered = loaded.render(values or {}, name=name, namespace=namespace, is_install=True)
    out: dict[str, str] = {}
    for path in sorted(rendered):
        text = rendered[path]
        if path.endswith("NOTES.txt"):
            if include_notes:
                out[path] = text
            continue
        if not include_tests and "/templates/tests/" in path:
            continue
        if Path(path).name.startswith("_") or not text.strip():
            continue
        out[path] = text
    return out


def to_stream(rendered: dict[str, str]) -> str:
    """One YAML stream as ``helm template`` prints it."""
    parts = []
    # manifests by path, then NOTES.txt (as comments) last
    for path, text in sorted(rendered.items(), key=lambda item: (item[0].endswith("NOTES.txt"), item[0])):
        if path.endswith("NOTES.txt"):
            parts.append(f"# Source: {path}\n" + "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines()))
        else:
            parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chart.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("lint", "template"):
        p = sub.add_parser(command)
        p.add_argument("chart", nargs="?", default=str(DEFAULT_CHART), help="chart directory (default: helm/labelq)")
        p.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
        p.add_argument("--namespace", default="labelq")
        if command == "lint":
            p.add_argument("--kube-version", default="v1.30.0", help="Kubernetes version to lint against")
        else:
            p.add_argument("--name", default="labelq", help="release name")
            p.add_argument("--set", action="append", default=[], help="helm --set expression (repeatable)")
            p.add_argument("--show-only", action="append", default=[], help="only this template path (repeatable)")
            p.add_argument("--skip-tests", action="store_true", help="leave out templates/tests/")
            p.add_argument("--include-notes", action="store_true", help="append NOTES.txt as comments")
            p.add_argument("-o", "--output", help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    helm = _helm()

    if args.command == "lint":
        problems = lint(args.chart, args.values, namespace=args.namespace, kube_version=args.kube_version)
        for problem in problems:
            print(problem, file=sys.stderr)
        runs = 1 + len(args.values)
        print(f"{Path(args.chart).name}: {runs} lint run(s), {len(problems)} problem(s)")
        return 1 if problems else 0

    try:
        values = load_values(args.values, args.set)
        rendered = render(
            args.chart,
            values,
            name=args.name,
            namespace=args.namespace,
            include_tests=not args.skip_tests,
            include_notes=args.include_notes,
        )
    except (helm.HelmError, ValueError, OSError) as exc:
        print(f"chart.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.show_only:
        wanted = set(args.show_only)
        missing = wanted - {p.split("/", 1)[1] for p in rendered} - set(rendered)
        if missing:
            print(f"chart.py: nothing rendered for {', '.join(sorted(missing))}", file=sys.stderr)
            return 1
        rendered = {p: t for p, t in rendered.items() if p in wanted or p.split("/", 1)[1] in wanted}
    stream = to_stream(rendered)
    if args.output:
        Path(args.output).write_text(stream)
    else:
        sys.stdout.write(stream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
