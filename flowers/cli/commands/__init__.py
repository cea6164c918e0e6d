"""Subcommands of `flowers`; each module has `register(subparsers)`."""

COMMAND_MODULES = ["train", "evaluate", "data", "predict", "score", "study", "tune", "ui", "submit", "jobs", "report", "models", "serve", "ensemble", "distill", "export", "explain", "cluster", "queues"]


def add_config_args(p) -> None:
    """--config/--profile/--set, shared by every command that takes a run config."""
    p.add_argument("--config", "-c", help="YAML config (e.g. configs/level1.yaml)")
    p.add_argument("--profile", "-p", help="profile merged on top: a name under configs/profiles/ (cpu, smoke) or a path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
