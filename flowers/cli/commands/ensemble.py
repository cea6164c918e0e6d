"""`flowers ensemble`: L4 soft-voting ensemble of models given by URI, with the diversity analysis."""
from __future__ import annotations

import json
import re
from pathlib import Path

from flowers.cli.commands import add_config_args


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="L4: soft-voting ensemble of model URIs, evaluated with diversity tables",
                       description="Build a self-contained ensemble folder from member URIs (NAME=URI or URI), evaluate "
                                   "members and ensemble on val/test, write diversity tables, plots and the threshold.")
    p.add_argument("--members", nargs="+", required=True, metavar="[NAME=]URI",
                   help="member models: models:/name@alias, runs:/..., a run folder or best.pt; e.g. l1=runs/l1")
    p.add_argument("--weights", nargs="+", type=float, help="one voting weight per member (default equal)")
    p.add_argument("--out", required=True, help="output folder (the model goes to OUT/model)")
    p.add_argument("--data-config", help="YAML with the members' data section (default: the first member's config)")
    add_config_args(p)
    p.add_argument("--policy", choices=["coverage", "accuracy"], default="coverage",
                   help="uncertainty threshold policy on val: target coverage or target selective accuracy")
    p.add_argument("--target", type=float, default=0.95, help="target coverage / selective accuracy (default 0.95: at most 5 %% of validation images flagged)")
    p.add_argument("--explain", type=int, default=8, metavar="N", help="Grad-CAM grids for N test images per member (0: none)")
    p.set_defaults(func=run, heavy=True)


def parse_members(items: list[str]) -> dict[str, str]:
    """`l1=runs/l1` or a bare URI (named m0, m1, ...); names must be unique."""
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        m = re.fullmatch(r"([A-Za-z][\w-]*)=(.+)", item)
        name, uri = (m.group(1), m.group(2)) if m else (f"m{i}", item)
        if name in out:
            from flowers.config import ConfigError

            raise ConfigError(f"--members: the name '{name}' is used twice")
        out[name] = uri
    return out


def run(args) -> int:
    from flowers import config as C
    from flowers.training.ensemble import run_ensemble_stage
    from flowers.registry.uris import describe

    members = parse_members(args.members)
    if args.weights and len(args.weights) != len(members):
        raise C.ConfigError(f"--weights: {len(args.weights)} weights for {len(members)} members")
    config = args.data_config or args.config
    if config:
        data_cfg = C.load_config(config, args.profile, args.overrides).data
    else:
        first = describe(next(iter(members.values())))  # its config, without loading weights
        if not first.manifest.get("config"):
            raise C.ConfigError(f"member '{first.uri}' carries no data config; pass --data-config")
        data_cfg = C.build(C.Config, first.manifest["config"]).data
        if args.overrides:  # --set data.x=y applies to the members' data config
            over = {".".join(k): v for k, v in (C.parse_override(o) for o in args.overrides)}
            data_cfg = C.replace(C.Config(data=data_cfg), over).data
    weights = dict(zip(members, args.weights)) if args.weights else None
    res = run_ensemble_stage(members, data_cfg, Path(args.out), weights=weights, threshold_policy=args.policy,
                             threshold_target=args.target, explain_images=args.explain)
    keys = ["val_top1", "test_top1", "test_top5", "test_nll", "test_ece", "gain_over_best_member", "mean_disagreement",
            "uncertainty_threshold", "coverage_at_threshold", "entropy_auroc", "ood_entropy_auroc"]
    summary = {k: round(res.metrics[k], 4) for k in keys if k in res.metrics}
    summary.update({k: round(v, 4) for k, v in res.metrics.items() if k.startswith("member_") and k.endswith("test_top1")})
    print(json.dumps(summary, indent=2))
    print(f"model: {res.model_dir}\ntables: {args.out}/test_diversity.md")
    return 0
