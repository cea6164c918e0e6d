"""`flowers tune`: a hyperparameter search around one level (ASHA early stopping optional)."""
from __future__ import annotations


def register(sub) -> None:
    from flowers.commands import add_config_args

    p = sub.add_parser("tune", help="hyperparameter search for one level with Ray Tune (optional ASHA), tracked in MLflow")
    add_config_args(p)
    p.add_argument("--param", action="append", default=[], metavar="KEY=SPACE",
                   help="search space, e.g. optim.lr=loguniform:1e-4:3e-3 or data.augment=choice:light,strong (repeatable)")
    p.add_argument("--samples", type=int, default=8, help="number of trials")
    p.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA on val_acc)")
    p.add_argument("--name", default="flowers-tune", help="experiment name (MLflow and Tune)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: embedded store under .flowers/)")
    p.set_defaults(func=run, heavy=True)


def run(args) -> int:
    import json

    from flowers.config import ConfigError, load_config
    from flowers.study import ResourcesConfig, parse_space, run_search

    if not args.param:
        raise ConfigError("flowers tune: give at least one --param KEY=SPACE (e.g. optim.lr=loguniform:1e-4:3e-3)")
    cfg = load_config(args.config, args.profile, args.overrides)
    res = run_search(cfg, parse_space(args.param), args.name, args.samples, args.asha,
                     ResourcesConfig(cpus_per_trial=args.cpus_per_trial, max_concurrent=args.max_concurrent),
                     tracking_uri=args.tracking_uri, address=args.address)
    print(json.dumps(res, indent=2, default=str))
    return 0
