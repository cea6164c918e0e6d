"""`flowers models list|show|promote|canary|shadow|abort|rollback`: the registry's versions, their lineage,
the champion gate, and the live lifecycle a running `flowers serve` follows (flowers/registry/lifecycle.py)."""
from __future__ import annotations

import argparse
import json

LIST_COLUMNS = ("name", "version", "aliases", "test_acc", "threshold", "decision", "split", "git", "created")


def register(sub) -> None:
    p = sub.add_parser("models", help="registered models: list, show, promote through the gate; canary, shadow, abort, rollback",
                       description="New versions are registered as `challenger`; `champion` (what serving and "
                                   "scoring follow) moves only through the gate: a paired comparison with the "
                                   "current champion on the same test images (see flowers/registry/governance.py).")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    store.add_argument("--home", default=".flowers", help="embedded store folder (default .flowers)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("list", parents=[store],
                          help="versions with aliases, test accuracy, gate decision, split hash, git commit")
    ls.add_argument("name", nargs="?", help="one registered model (default: all)")
    ls.add_argument("--json", action="store_true",
                    help="a JSON list, one object per version (errors as {\"error\": ...})")
    ls.set_defaults(func=run_list)
    sh = verbs.add_parser("show", parents=[store], help="one version: lineage, gate decision and statistics")
    sh.add_argument("spec", metavar="NAME[@ALIAS|/VERSION]", help="e.g. flowers-l1@champion, flowers-l1/3")
    sh.add_argument("--json", action="store_true", help="one JSON object (errors as {\"error\": ...})")
    sh.set_defaults(func=run_show)
    pr = verbs.add_parser("promote", parents=[store], help="run the gate for a version against the champion (or --force it)")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true", help="make it champion whatever the comparison says (recorded)")
    pr.add_argument("--margin", type=float, default=None,
                    help="accepted accuracy loss, a fraction (default 0.005 = half a point)")
    pr.set_defaults(func=run_promote)
    ca = verbs.add_parser("canary", parents=[store], help="send a share of the live traffic to a version")
    ca.add_argument("name")
    ca.add_argument("version")
    ca.add_argument("--percent", type=float, required=True, help="share of the route's requests, (0, 100]")
    ca.set_defaults(func=run_canary)
    sw = verbs.add_parser("shadow", parents=[store],
                          help="give a version a copy of every live request (it never answers; compared)")
    sw.add_argument("name")
    sw.add_argument("version")
    sw.set_defaults(func=run_shadow)
    ab = verbs.add_parser("abort", parents=[store], help="end the canary and/or the shadow")
    ab.add_argument("name")
    ab.add_argument("--only", choices=("canary", "shadow"), help="end only this one (default: both)")
    ab.set_defaults(func=run_abort)
    rb = verbs.add_parser("rollback", parents=[store], help="move champion back to the version it replaced")
    rb.add_argument("name")
    rb.add_argument("--reason", default="", help="why (recorded as a rollback.reason tag)")
    rb.set_defaults(func=run_rollback)


def _connect(args):
    import os

    from flowers.registry.governance import connect

    # the gate downloads two small JSON files: no progress bars around a one-line answer
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return connect(args.tracking_uri, args.home)


def run_list(args) -> int:
    from flowers.registry.governance import list_versions

    client, _ = _connect(args)
    rows = list_versions(client, args.name)
    if args.json:  # one document, so `json.loads(stdout)` works whatever the number of versions
        print(json.dumps(rows, default=str))
        return 0
    table = [[r["name"], r["version"], ",".join(r["aliases"]) or "-",
              f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-",
              r.get("uncertainty_threshold") or "-",
              r["gate"].get("decision", "-"), r["lineage"].get("split_hash", "-"),
              (r["lineage"].get("git_commit") or "-")[:10] + ("+dirty" if r["lineage"].get("git_dirty") == "True" else ""),
              r["created"] or "-"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(LIST_COLUMNS, *table)]
    for line in [LIST_COLUMNS, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    return 0


def run_show(args) -> int:
    from flowers.registry.governance import aliases_of, describe_version, find_version

    client, _ = _connect(args)
    mv = find_version(client, args.spec)
    info = describe_version(mv, aliases_of(client, mv.name).get(str(mv.version), []))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    acc = f"{info['test_accuracy']:.4f}" if info["test_accuracy"] is not None else "-"
    print(f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or '-'}  "
          f"test accuracy: {acc}  kind: {info['kind'] or '-'}")
    print(f"run: {info['run_id']}  created: {info['created']}  source: {info['source']}")
    for section in ("lineage", "gate"):
        print(f"{section}:")
        for k, v in sorted(info[section].items()):
            print(f"  {k}: {v}")
        if not info[section]:
            print("  (none recorded)")
    return 0


def run_promote(args) -> int:
    from flowers.registry.governance import DEFAULT_MARGIN, decide

    client, uri = _connect(args)
    d = decide(args.name, args.version, uri, DEFAULT_MARGIN if args.margin is None else args.margin,
               force=args.force, client=client)
    print(f"{d.name} version {d.version}: {d.decision}" + (" -> champion" if d.promoted else "") + f" ({d.reason})")
    if d.promoted:
        from flowers.registry.lifecycle import finish_canary

        if finish_canary(client, d.name, d.version):
            print(f"{d.name}: canary version {d.version} finished (it is the champion)")
    return 0


def run_canary(args) -> int:
    from flowers.registry.lifecycle import set_canary

    client, _ = _connect(args)
    v = set_canary(client, args.name, args.version, args.percent)
    print(f"{args.name} version {v}: canary at {args.percent:g}% of the live requests "
          f"(`flowers models promote {args.name} {v}` finishes it, `flowers models abort {args.name}` ends it)")
    return 0


def run_shadow(args) -> int:
    from flowers.registry.lifecycle import set_shadow

    client, _ = _connect(args)
    v = set_shadow(client, args.name, args.version)
    print(f"{args.name} version {v}: shadow (gets a copy of every live request; compare in GET /v1/models)")
    return 0


def run_abort(args) -> int:
    from flowers.registry.lifecycle import CANARY, SHADOW, abort

    client, _ = _connect(args)
    ended = abort(client, args.name, (args.only,) if args.only else (CANARY, SHADOW))
    print(f"{args.name}: ended " + ", ".join(f"{a} (version {v})" for a, v in ended.items()))
    return 0


def run_rollback(args) -> int:
    from flowers.registry.lifecycle import rollback

    client, _ = _connect(args)
    old, new = rollback(client, args.name, args.reason)
    print(f"{args.name}: champion rolled back from version {old} to version {new}")
    return 0
