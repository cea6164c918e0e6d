"""`flowers cluster up|down|env|kill|restart`: the local multi-node test cluster (`jobs.localcluster`),
with the job queue's dispatcher on its PostgreSQL."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("cluster", help="a local test cluster: Ray head + worker nodes (token auth, masked driver "
                                       "folders), MLflow on PostgreSQL, S3 (moto): up | down | env | kill W | restart W")
    p.add_argument("action", choices=["up", "down", "env", "kill", "restart"])
    p.add_argument("worker", nargs="?", help="worker node name for kill/restart (worker_a, worker_b, ...)")
    p.add_argument("--state", help="state dir: pids, ports, logs, data (default $FLOWERS_CLUSTER_STATE, "
                                   "else <tmp>/flowers-cluster)")
    p.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs each worker node offers (default 1)")
    p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs each worker node offers (default 0)")
    p.add_argument("--mask", action="append", metavar="DIR",
                   help="folder hidden on workers behind an empty read-only tmpfs (repeatable; default: "
                        "./.flowers ./runs ./mlruns $FLOWERS_DATA ../shared/flowers102)")
    p.add_argument("--no-mask", action="store_true", help="start workers without a mount namespace (no root needed)")
    p.add_argument("--queues", metavar="YAML",
                   help="job queues for the dispatcher `up` starts: name → max_running, priority (docs/queue.md)")
    p.add_argument("--node-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for every node (repeatable); inherited RAY_* variables are dropped")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex

    from flowers.config import ConfigError
    from jobs import localcluster as T

    try:
        if args.action == "up":
            if args.queues:
                from jobs.queue.config import load_queues

                load_queues(args.queues)  # a bad file: one line now, not a dispatcher that exits later
            bad = [kv for kv in args.node_env if "=" not in kv or kv.startswith("=")]
            if bad:
                raise ConfigError(f"--node-env {bad[0]!r}: expected KEY=VALUE")
            cluster = T.up(args.state, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                           gpus_per_worker=args.gpus_per_worker, masks=[] if args.no_mask else args.mask,
                           node_env=dict(kv.split("=", 1) for kv in args.node_env), queues=args.queues)
            state = "" if args.state is None else f" --state {shlex.quote(str(cluster.state_dir))}"
            print(f"test cluster running; point a shell at it with: eval \"$(flowers cluster env{state})\"\n"
                  f"stop it with: flowers cluster down{state}")
        elif args.action == "down":
            T.down(args.state)
        elif args.action == "env":
            for k, v in T.LocalCluster.load(args.state).env().items():
                print(f"export {k}={shlex.quote(v)}")
        else:
            if not args.worker:
                raise ConfigError(f"flowers cluster {args.action}: name a worker node (worker_a, worker_b, ...)")
            fn = T.kill_worker if args.action == "kill" else T.restart_worker
            print(fn(args.worker, args.state))
    except T.ClusterError as e:
        raise ConfigError(str(e)) from None
    return 0
