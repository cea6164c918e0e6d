"""Soft votes of level models from several study runs: clean top-1 and the shift suite for every subset.

    FLOWERS_DATA=/path/flowers102 python bench/ensemble_mix.py \\
        --store shipped=/path/run1/.flowers --store shifts=/path/run2/.flowers

Each `--store NAME=HOME` is a study's home (its `mlflow.db` and artifacts); the members of its
`models:/flowers-ensemble@champion` (the level models) are loaded from it and named `NAME_l1`, ...
Every model runs once on the full test split (clean) and once on the shift suite's images (2 per class,
seeded, as the study's robustness step); then every subset of the models is voted with equal weights
from those probabilities, so 63 ensembles of 6 models cost 6 models' forward passes. Prints the
subsets sorted by clean top-1 with the suite's clean, mean and worst, and which meet the issue-28 goals
(mean within 5 of clean, worst within 15, clean top-1 at most 0.3 below `--reference`'s).
Selecting a subset by this table is selecting on the test split: use it to compare designs, not to ship one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from _common import cpu_line, unresolvable

REPO = Path(__file__).resolve().parents[1]
ENSEMBLE = "models:/flowers-ensemble@champion"


class InputError(Exception):
    """A wrong store or option: printed as one `error:` line, exit 2."""


def load_members(stores: dict[str, Path]) -> list:
    """The level models of each store's champion ensemble, as SuiteModels named `<store>_<member>`."""
    import mlflow

    from flowers.evaluation.robustness import suite_models

    out = []
    for name, home in stores.items():
        db = home / "mlflow.db"
        if not db.is_file():
            raise InputError(f"--store {name}={home}: no mlflow.db there (give a study's home, e.g. .flowers)")
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        why = unresolvable([ENSEMBLE])  # a store without a registered ensemble: one line, before any loading
        if why:
            raise InputError(f"--store {name}={home}: {why.removeprefix('error: ')}")
        models, _, _ = suite_models(name, ENSEMBLE)
        for m in models:
            m.name = m.name.replace("/", "_")
        out += models
    return out


def vote_table(full: dict[str, np.ndarray], suite: dict[str, dict[str, np.ndarray]], labels_full: np.ndarray,
               labels_suite: np.ndarray) -> list[dict]:
    """Every non-empty subset's equal-weight vote: clean top-1 (full split), suite clean, mean, worst."""
    names = sorted(full)
    shifts = [s for s in next(iter(suite.values())) if s != "clean"]

    def top1(p: np.ndarray, y: np.ndarray) -> float:
        return 100.0 * float((p.argmax(1) == y).mean())

    rows = []
    for r in range(1, len(names) + 1):
        for sub in itertools.combinations(names, r):
            per = {s: top1(np.mean([suite[m][s] for m in sub], 0), labels_suite) for s in shifts}
            worst = min(per, key=per.get)
            rows.append({"members": list(sub), "clean_test": top1(np.mean([full[m] for m in sub], 0), labels_full),
                         "suite_clean": top1(np.mean([suite[m]["clean"] for m in sub], 0), labels_suite),
                         "mean": float(np.mean(list(per.values()))), "worst": per[worst], "worst_shift": worst})
    return sorted(rows, key=lambda r: (-r["clean_test"], -r["mean"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", action="append", required=True, metavar="NAME=HOME",
                   help="a study's home folder (repeatable)")
    p.add_argument("--reference", help="members (comma-separated) whose vote is the clean baseline "
                                       "(default: the first store's)")
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    if args.per_class < 1:
        raise InputError(f"--per-class {args.per_class}: must be at least 1")
    stores = {}
    for item in args.store:
        name, sep, home = item.partition("=")
        if not sep or not name or not home:
            raise InputError(f"--store {item!r}: expected NAME=HOME, e.g. shipped=../run1/.flowers")
        stores[name] = Path(home).expanduser()

    from flowers import config as C
    from flowers.data.bundle import build_data
    from flowers.evaluation.shifts import parse_shifts
    from flowers.evaluation.suite import score_suite, stratified_subset

    models = load_members(stores)
    data_cfg = C.load_config(REPO / "configs/level1.yaml", "study-cpu").data
    data = build_data(data_cfg, models[0].model.preprocessing, seed=data_cfg.seed)
    labels = np.asarray(data.test.labels)
    full = score_suite(models, list(data.test.paths), labels, [], seed=data_cfg.seed)
    idx = stratified_subset(labels, args.per_class, data_cfg.seed)
    shifts = parse_shifts("all")
    suite = score_suite(models, [data.test.paths[i] for i in idx], labels[idx], shifts, seed=data_cfg.seed)
    rows = vote_table({m: d["clean"] for m, d in full.probs.items()}, suite.probs, labels, labels[idx])
    first = next(iter(stores))
    ref_members = sorted(args.reference.split(",")) if args.reference else sorted(m for m in full.probs
                                                                                  if m.startswith(f"{first}_"))
    ref = next((r for r in rows if sorted(r["members"]) == ref_members), None)
    if ref is None:
        raise InputError(f"--reference {','.join(ref_members)}: not a subset of the loaded models "
                         f"({', '.join(sorted(full.probs))})")
    print(f"CPU: {cpu_line()}")
    print(f"{len(models)} models, {len(labels)} clean test images, suite {len(idx)} images x {len(shifts)} shifts; "
          f"{full.seconds + suite.seconds:.0f} s; reference {'+'.join(ref_members)} clean {ref['clean_test']:.2f}")
    print("| members | clean test top-1 | suite clean / mean / worst | goals |")
    print("|---|---:|---|---|")
    for r in rows:
        ok = (r["suite_clean"] - r["mean"] <= 5 and r["suite_clean"] - r["worst"] <= 15
              and r["clean_test"] >= ref["clean_test"] - 0.3)
        print(f"| {', '.join(r['members'])} | {r['clean_test']:.2f} | {r['suite_clean']:.1f} / {r['mean']:.1f} / "
              f"{r['worst']:.1f} ({r['worst_shift']}) | {'all met' if ok else ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
