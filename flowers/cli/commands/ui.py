"""`flowers ui`: the MLflow UI on localhost for the study's store."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the embedded store (or --tracking-uri)")
    p.add_argument("--home", default=".flowers", help="embedded store folder (default .flowers)")
    p.add_argument("--tracking-uri", help="backend store URI (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--study", help="the study whose runs table to link (default: flowers-study, else the newest "
                                   "experiment in the store)")
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1: one person browsing)")
    p.set_defaults(func=run)


def run(args) -> int:
    import subprocess
    import sys

    from pathlib import Path

    from flowers.registry.uris import resolve_target

    target = resolve_target(args.tracking_uri, args.home)
    if target.tracking_uri.startswith("http"):
        print(f"MLflow server: open {target.tracking_uri}")
        print(_study_line(target.tracking_uri, args.study, target.tracking_uri))
        return 0
    if target.embedded and not Path(target.tracking_uri.split("sqlite:///", 1)[1]).is_file():
        raise FileNotFoundError(f"no MLflow store at {target.tracking_uri}: run `flowers study` first or pass --home")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", target.tracking_uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers)]
    if target.artifact_root:
        cmd += ["--default-artifact-root", target.artifact_root]
    base = f"http://127.0.0.1:{args.port}"
    print(f"MLflow UI: {base}  (store {target.tracking_uri}; Ctrl-C to stop)", flush=True)
    print(_study_line(target.tracking_uri, args.study, base), flush=True)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def _study_line(tracking_uri: str, study: str, base: str) -> str:
    """Where the study's runs table is: MLflow's UI opens on its GenAI pages unless the link says otherwise."""
    from mlflow import MlflowClient

    from flowers.registry.run_notes import runs_url

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study or "flowers-study")
    if exp is None and not study:
        found = [e for e in client.search_experiments(order_by=["creation_time DESC"]) if e.name != "Default"]
        exp = found[0] if found else None
    if exp is None:
        return f"  no experiment '{study or 'flowers-study'}' in this store yet (--study NAME names another)"
    return f"  study '{exp.name}', runs table with L1..L5 first: {runs_url(base, exp.experiment_id)}"
