"""`flowers report --study NAME`: Markdown + PNGs from MLflow."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="write the study report (Markdown + PNGs) from MLflow")
    p.add_argument("--study", default="flowers-study", help="study (= MLflow experiment) name")
    p.add_argument("--out", help="output folder (default .flowers/reports/<study>)")
    p.add_argument("--home", default=".flowers", help="embedded store folder (default .flowers)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from flowers.registry import tracking as T
    from flowers.registry.uris import resolve_target
    from flowers.study.report import write_report

    T.configure(resolve_target(args.tracking_uri, args.home))
    path = write_report(args.study, Path(args.out or Path(args.home) / "reports" / args.study))
    print(path)
    return 0
