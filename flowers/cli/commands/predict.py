"""`flowers predict`: classify a few images with any model URI."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with a model URI")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="models:/name@alias, runs:/..., or a path")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=run, heavy=False)


def run(args) -> int:
    from flowers.inference.predict import Predictor

    pred = Predictor.from_uri(args.model)
    for path, res in zip(args.images, pred.predict(args.images, top_k=args.top_k)):
        print(json.dumps({"path": path, **res}))
    return 0
