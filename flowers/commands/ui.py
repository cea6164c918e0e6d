"""`flowers ui`: the MLflow UI on localhost for the study's store."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the embedded store (or --tracking-uri)")
    p.add_argument("--home", default=".flowers", help="embedded store folder (default .flowers)")
    p.add_argument("--tracking-uri", help="backend store URI (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=run)


def run(args) -> int:
    import subprocess
    import sys

    from pathlib import Path

    from flowers.registry import resolve_target

    target = resolve_target(args.tracking_uri, args.home)
    if target.tracking_uri.startswith("http"):
        print(f"MLflow server: open {target.tracking_uri}")
        return 0
    if target.embedded and not Path(target.tracking_uri.split("sqlite:///", 1)[1]).is_file():
        raise FileNotFoundError(f"no MLflow store at {target.tracking_uri}: run `flowers study` first or pass --home")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", target.tracking_uri,
           "--host", "127.0.0.1", "--port", str(args.port)]
    if target.artifact_root:
        cmd += ["--default-artifact-root", target.artifact_root]
    print(f"MLflow UI: http://127.0.0.1:{args.port}  (store {target.tracking_uri}; Ctrl-C to stop)", flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
