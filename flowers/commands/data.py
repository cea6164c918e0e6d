"""`flowers data download | verify | synth`."""
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
    v.set_defaults(func=verify)
    y = s.add_parser("synth", help="write a tiny synthetic dataset in the VGG layout (tests, demos)")
    y.add_argument("root")
    y.add_argument("--classes", type=int, default=5)
    y.add_argument("--per-class", type=int, default=12)
    y.add_argument("--size", type=int, default=96)
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(func=synth)


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
    from flowers.data import load_vgg, make_split, resolve_data_root, verify_report

    ds = load_vgg(resolve_data_root(args.root))
    split = make_split(ds.labels, args.split, seed=args.seed, setid=ds.setid)
    print(verify_report(ds, split))
    return 0


def synth(args) -> int:
    from flowers.data import write_synthetic

    ds = write_synthetic(args.root, num_classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"synthetic dataset at {ds.root}: {len(ds.paths)} images, {ds.num_classes} classes")
    return 0
