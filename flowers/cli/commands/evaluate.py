"""`flowers evaluate`: score a checkpoint or model URI on a split of its dataset, or under the shift suite."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint or model URI on val/test (or under named shifts)",
                       description="Rebuild the split the model was trained on and write metrics, confusion matrix and "
                                   "per-class CSV. With --shifts: top-1 and flagged share of the test split under "
                                   "named, seeded image shifts (small, JPEG, blur, crops, colour casts, ...; "
                                   "flowers/evaluation/shifts.py), per shift, mean and worst.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="path to best.pt")
    g.add_argument("--model", help="model URI (models:/name@alias, runs:/..., or a path)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", help="dataset root (default: the one in the checkpoint's config, else $FLOWERS_DATA)")
    p.add_argument("--config", help="data config to use when the model carries none (ensemble, ONNX)")
    p.add_argument("--out", default="eval", help="output folder")
    p.add_argument("--shifts", nargs="?", const="all", metavar="SPEC",
                   help="run the shift suite on the test split: 'all' (default) or e.g. 'jpeg10,small64,rotate15=30'")
    p.add_argument("--per-class", type=int, metavar="N", help="shift suite: at most N test images per class (seeded)")
    p.add_argument("--seed", type=int, default=0, help="shift suite: seed of the shifts and of --per-class")
    p.add_argument("--experiment", metavar="NAME",
                   help="shift suite: log tables, plots and metrics to this MLflow experiment once all has run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for --experiment (default: $MLFLOW_TRACKING_URI, "
                                          "else the embedded store)")
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    if args.shifts is not None:
        return run_shifts(args)
    from flowers.evaluation.evaluate_model import evaluate_uri

    metrics = evaluate_uri(args.checkpoint or args.model, split=args.split, data_root=args.data,
                           config_path=args.config, out_dir=Path(args.out))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, indent=2))
    print(f"artifacts: {args.out}/")
    return 0


def run_shifts(args) -> int:
    from flowers.config import ConfigError
    from flowers.evaluation.evaluate_model import evaluate_shifts
    from flowers.evaluation.shifts import parse_shifts

    shifts = parse_shifts(args.shifts)  # a bad name or value stops here, before any model loads
    if args.per_class is not None and args.per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {args.per_class}")
    if args.split != "test":
        raise ConfigError("--shifts scores the test split; drop --split")
    report = evaluate_shifts(args.checkpoint or args.model, shifts, data_root=args.data, config_path=args.config,
                             out_dir=Path(args.out), per_class=args.per_class, seed=args.seed,
                             experiment=args.experiment, tracking_uri=args.tracking_uri)
    print(report.markdown)
    print(f"{report.images} test images, {len(shifts)} shifts, {report.seconds:.0f} s; artifacts: {args.out}/")
    return 0
