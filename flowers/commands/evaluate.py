"""`flowers evaluate`: score a checkpoint or model URI on a split of its dataset."""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint or model URI on val/test",
                       description="Rebuild the split the model was trained on and write metrics, confusion matrix and per-class CSV.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="path to best.pt")
    g.add_argument("--model", help="model URI (models:/name@alias, runs:/..., or a path)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", help="dataset root (default: the one in the checkpoint's config, else $FLOWERS_DATA)")
    p.add_argument("--config", help="data config to use when the model carries none (ensemble, ONNX)")
    p.add_argument("--out", default="eval", help="output folder")
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from flowers.evaluate_model import evaluate_uri

    metrics = evaluate_uri(args.checkpoint or args.model, split=args.split, data_root=args.data,
                           config_path=args.config, out_dir=Path(args.out))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, indent=2))
    print(f"artifacts: {args.out}/")
    return 0
