"""`flowers train`: one level, one run, into a run folder."""
from __future__ import annotations

import json

from flowers.cli.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser("train", help="train one level (L1-L3 or the student) and evaluate it on test",
                       description="Train with the one training loop; writes config, checkpoints, metrics and plots to a run folder.")
    add_config_args(p)
    p.add_argument("--out", help="run folder (default: train.out_dir/<level>-<time>)")
    p.add_argument("--resume", metavar="LAST_PT", help="continue an interrupted run from its last.pt")
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    from flowers.config import load_config
    from flowers.training.tasks import make_task
    from flowers.training.loop import fit

    cfg = load_config(args.config, args.profile, args.overrides)
    res = fit(cfg, make_task(cfg), run_dir=args.out, resume_from=args.resume)
    t = res.test_metrics
    print(json.dumps({"run_dir": str(res.run_dir), "best_epoch": res.best_epoch,
                      "val_acc": round(res.best_val_acc, 4), "test_top1": round(t.get("top1", float("nan")), 4),
                      "test_top5": round(t.get("top5", float("nan")), 4)}, indent=2))
    print(f"checkpoint: {res.best_checkpoint}\nplots: {res.run_dir}/curves.png, {res.run_dir}/test_confusion.png")
    return 0
