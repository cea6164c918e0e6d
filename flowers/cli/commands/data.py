"""`flowers data download | verify | synth | publish | fetch`."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("data", help="download, verify or synthesize the dataset")
    s = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = s.add_parser("download", help="download Flowers-102 from the Oxford VGG site (MD5-verified, atomic)")
    d.add_argument("--root", help="target folder (default: $FLOWERS_DATA or ~/.cache/flowers/flowers102)")
    d.add_argument("--base-url", help="mirror URL holding the three official files")
    d.set_defaults(func=download)
    v = s.add_parser("verify", help="check the dataset and print counts per split and class")
    v.add_argument("--root", help="dataset folder (default: $FLOWERS_DATA)")
    v.add_argument("--split", default="official", choices=["official", "random"])
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true", help="print counts as JSON (errors as {\"error\": ...})")
    v.set_defaults(func=verify)
    y = s.add_parser("synth", help="write a tiny synthetic dataset in the VGG layout (tests, demos)")
    y.add_argument("root")
    y.add_argument("--classes", type=int, default=5)
    y.add_argument("--per-class", type=int, default=12)
    y.add_argument("--size", type=int, default=96)
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(func=synth)
    u = s.add_parser("publish", help="upload a dataset folder to s3://... or a shared folder, with an MD5 manifest",
                     description="Copies every file, then writes flowers-dataset.json (sizes and MD5s) last. Trials "
                                 "on a cluster then use --set data.root=URI and each node caches a verified copy. "
                                 "S3-compatible servers: set AWS_ENDPOINT_URL_S3.")
    u.add_argument("src", help="local dataset folder (e.g. $FLOWERS_DATA)")
    u.add_argument("uri", help="destination: s3://bucket/prefix or a folder every node mounts")
    u.set_defaults(func=publish)
    f = s.add_parser("fetch", help="materialise a dataset URI into this node's cache (checksum-verified) and print the path")
    f.add_argument("uri", help="s3://bucket/prefix, https://host/prefix or a folder holding flowers-dataset.json")
    f.add_argument("--cache", help="cache folder (default: $FLOWERS_CACHE/datasets or ~/.cache/flowers/datasets)")
    f.set_defaults(func=fetch)


def download(args) -> int:
    import os
    from pathlib import Path

    from flowers.data import VGG_BASE_URL, download_flowers102, load_vgg

    root = Path(args.root or os.environ.get("FLOWERS_DATA") or Path.home() / ".cache/flowers/flowers102")
    download_flowers102(root, base_url=args.base_url or VGG_BASE_URL)
    ds = load_vgg(root)
    print(f"Flowers-102 ready at {root}: {len(ds.paths)} images, {ds.num_classes} classes")
    print(f"use it with: export FLOWERS_DATA={root}")
    return 0


def verify(args) -> int:
    from pathlib import Path

    from flowers.data import load_vgg, make_split, resolve_data_root, verify_report

    ds = load_vgg(resolve_data_root(args.root))
    split = make_split(ds.labels, args.split, seed=args.seed, setid=ds.setid)
    if getattr(args, "json", False):
        import json

        import numpy as np

        per_class = {part: np.bincount(ds.labels[np.asarray(idx, dtype=np.int64)], minlength=ds.num_classes).tolist()
                     for part, idx in split.items()}
        print(json.dumps({"root": str(Path(ds.root).resolve()), "images": int(len(ds.labels)), "classes": int(ds.num_classes),
                          "split": args.split, "seed": args.seed,
                          "split_sizes": {k: int(len(v)) for k, v in split.items()},
                          "class_names": list(ds.class_names), "per_class": per_class,
                          "empty_classes": {k: [c for c, n in enumerate(v) if n == 0] for k, v in per_class.items()}}))
        return 0
    print(verify_report(ds, split))
    return 0


def synth(args) -> int:
    from flowers.data import write_synthetic

    ds = write_synthetic(args.root, num_classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"synthetic dataset at {ds.root}: {len(ds.paths)} images, {ds.num_classes} classes")
    return 0


def publish(args) -> int:
    from flowers.data.remote import publish as publish_dataset

    manifest = publish_dataset(args.src, args.uri)
    total = sum(f["size"] for f in manifest["files"].values())
    print(f"published {len(manifest['files'])} files ({total / 1e6:.1f} MB) to {args.uri}")
    print(f"use it with: --set data.root={args.uri}")
    return 0


def fetch(args) -> int:
    from pathlib import Path

    from flowers.data.remote import materialize

    print(materialize(args.uri, Path(args.cache) if args.cache else None))
    return 0
