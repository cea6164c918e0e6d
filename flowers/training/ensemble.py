"""L4: soft-voting ensemble over models loaded by URI, and the diversity analysis.

An ensemble is a self-contained model folder::

    flowers_model.json   {"kind": "ensemble", "members": [{"uri", "name", "version", "file"}], "weights", ...}
    members/0_l1/        each member's model folder, copied in (a training checkpoint becomes
                         model.safetensors + manifest: no pickle, no optimizer state)

so `flowers.inference.predict.load_model(folder)` (or `models:/flowers-ensemble@champion` once
logged) needs nothing else. Every member sees its own eval preprocessing: the ensemble's
input has one view per distinct member preprocessing (`LoadedModel.views`), so members
trained at different sizes each get the image resized and cropped as in their own training
evaluation, never a resize of another member's crop.

Diversity: the seed claimed that architectural diversity (attention vs not) helps more than
hyperparameter changes. `diversity_report` measures pairwise disagreement, double-fault rate
and error correlation, what the full ensemble fixes or breaks per member, and the gain of
every two-member ensemble grouped by kind (architecture vs hyperparameter-only pairs), each
kind's mean gain and the claim itself (architecture gain minus hyperparameter gain) with a
95 % bootstrap interval over test images.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowers.registry import uris as registry
from flowers.evaluation import stats
from flowers.models.checkpoint import (PER_IMAGE, ModelLoadError, find_manifest, load_checkpoint, per_image_record, read_manifest,
                                verify_folder, write_checkpoint_folder, write_json, write_manifest)
from flowers.config import ConfigError, DataConfig
from flowers.data.transforms import Preprocessing
from flowers.inference.ensemble_model import REGISTERED_NAME, load_ensemble, load_members, member_views, soft_vote
from flowers.training.stages import StageResult

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- voting


# ----------------------------------------------------------------------------- building and loading


def _member_source(path: Path, uri: str) -> Path:
    """The file or folder behind a resolved member (what gets copied into the ensemble folder)."""
    if path.is_dir():
        manifest = find_manifest(path)
        if manifest:
            return manifest.parent
        if (path / "best.pt").is_file():
            return path / "best.pt"
        raise ModelLoadError(f"no model found in '{path}' (member '{uri}'): expected a model manifest or best.pt")
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def build_ensemble(member_uris: Sequence["str | registry.ModelRef"], out_dir: Path, weights: Sequence[float] | None = None,
                   name: str = REGISTERED_NAME, member_names: Sequence[str] | None = None,
                   target: registry.TrackingTarget | None = None) -> Path:
    """Write a self-contained ensemble folder from member URIs; returns the folder.

    Members must share class names (same dataset and order); each member's checkpoint
    or exported folder is copied under `members/`. Members are described, not loaded.
    """
    if not member_uris:
        raise ConfigError("an ensemble needs at least one member URI")
    if weights is not None and len(weights) != len(member_uris):
        raise ConfigError(f"{len(weights)} ensemble weights for {len(member_uris)} members")
    weights = [1.0] * len(member_uris) if weights is None else [float(w) for w in weights]
    soft_vote([np.ones((1, 1))] * len(weights), weights)  # validates the weights
    out_dir = Path(out_dir)
    (out_dir / "members").mkdir(parents=True, exist_ok=True)
    members, class_names, pps, infos = [], None, [], []
    for i, uri in enumerate(member_uris):
        ref = registry.resolve_ref(uri, target)
        info = registry.describe(ref)
        uri = ref.uri
        infos.append(info)
        if class_names is None:
            class_names = list(info.class_names)
        elif list(info.class_names) != class_names:
            raise ConfigError(
                f"ensemble member '{uri}' has {len(info.class_names)} classes that differ from the first member's "
                f"{len(class_names)}; every member must be trained on the same dataset and class order")
        src = _member_source(registry.fetch(ref), str(uri))
        config = info.manifest.get("config") or {}
        mname = (member_names[i] if member_names else None) or config.get("level") or info.name
        as_folder = src.is_dir() or src.suffix != ".onnx"  # a checkpoint file becomes a model folder
        dest = out_dir / "members" / f"{i}_{_safe(str(mname))}{'' if as_folder else src.suffix}"
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        if src.is_dir():
            verify_folder(src, read_manifest(src))  # copy only a member that is what it was written as
            shutil.copytree(src, dest)
        elif as_folder:
            write_checkpoint_folder(load_checkpoint(src), dest)
        else:
            shutil.copy2(src, dest)
        pp = Preprocessing.from_dict(info.preprocessing)
        pps.append(pp)
        members.append({
            "uri": str(uri), "name": str(mname), "version": info.version, "file": str(dest.relative_to(out_dir)),
            "model_name": info.manifest.get("model_name"), "kind": info.kind, "image_size": pp.image_size,
            "preprocessing": pp.to_dict(), "test_accuracy": info.manifest.get("test_accuracy"),
            **({"run_id": info.run_id} if info.run_id else {}),
        })
    views, _ = member_views(pps)
    parents = [{"name": (info.name if info.version else m["name"]), "version": m["version"], "uri": m["uri"]}
               for info, m in zip(infos, members)]
    write_manifest(out_dir, "ensemble", "", name=name, members=members, weights=weights, class_names=class_names,
                   preprocessing=views[0].to_dict(), views=[v.to_dict() for v in views],
                   created=time.strftime("%Y-%m-%dT%H:%M:%S"), lineage={"parents": parents})
    log.info("ensemble of %d members (%d input views) written to %s", len(members), len(views), out_dir)
    return out_dir


# ----------------------------------------------------------------------------- diversity


def _pair_kind(a: str | None, b: str | None) -> str:
    """`architecture` if the networks differ (e.g. attention vs not), else `hyperparameter`."""
    if a is None or b is None:
        return "unknown"
    return "architecture" if a != b else "hyperparameter"


def diversity_report(member_probs: dict[str, np.ndarray], labels: np.ndarray,
                     architectures: dict[str, str] | None = None,
                     weights: dict[str, float] | None = None) -> dict[str, Any]:
    """Pairwise and ensemble-level diversity of members' predictions on one labelled split.

    `architectures` maps member name → model name (e.g. `resnet50`, `attention_resnet50`); two
    members with different names form an `architecture` pair, equal names a `hyperparameter`
    pair. Returns {'members', 'pairs', 'fixes', 'ensemble', 'by_kind', 'claim'}.

    Per image, a pair's gain is (pair ensemble right) - (its better member right), in {-1, 0, 1};
    a kind's gain is that averaged over its pairs, and `claim` is the architecture kind's gain
    minus the hyperparameter kind's (None unless both kinds exist). Intervals (`gain_low`,
    `gain_high`, and the claim's) resample test images, keeping each image's results from
    every model together; the better member of a pair is fixed on the full test set.
    """
    labels = np.asarray(labels)
    names = list(member_probs)
    preds = {n: np.asarray(p).argmax(1) for n, p in member_probs.items()}
    wrong = {n: preds[n] != labels for n in names}
    arch = architectures or {}
    w = weights or {}
    members = {n: {"top1": float(1 - wrong[n].mean()), "architecture": arch.get(n)} for n in names}

    def vote(ns: Sequence[str]) -> np.ndarray:
        return soft_vote([member_probs[n] for n in ns], [w.get(n, 1.0) for n in ns])

    pairs = []
    pair_gain: dict[str, list[np.ndarray]] = {}  # kind → per-image gain of each of its pairs
    for a, b in itertools.combinations(names, 2):
        ea, eb = wrong[a].astype(float), wrong[b].astype(float)
        corr = float(np.corrcoef(ea, eb)[0, 1]) if ea.std() > 0 and eb.std() > 0 else float("nan")
        pair_right = vote([a, b]).argmax(1) == labels
        pair_acc = float(pair_right.mean())
        best = max(members[a]["top1"], members[b]["top1"])
        better = a if members[a]["top1"] >= members[b]["top1"] else b
        kind = _pair_kind(arch.get(a), arch.get(b))
        pair_gain.setdefault(kind, []).append(pair_right.astype(float) - (~wrong[better]).astype(float))
        pairs.append({
            "a": a, "b": b, "kind": kind,
            "disagreement": float((preds[a] != preds[b]).mean()),
            "double_fault": float((wrong[a] & wrong[b]).mean()),
            "error_correlation": corr,
            "pair_ensemble_top1": pair_acc,
            "gain_over_best_member": pair_acc - best,
        })
    ens_pred = vote(names).argmax(1)
    ens_wrong = ens_pred != labels
    fixes = [{"member": n, "member_errors": int(wrong[n].sum()),
              "fixed_by_ensemble": int((wrong[n] & ~ens_wrong).sum()),
              "introduced_by_ensemble": int((~wrong[n] & ens_wrong).sum()),
              "net_gain": int((wrong[n] & ~ens_wrong).sum() - (~wrong[n] & ens_wrong).sum())} for n in names]
    by_kind: dict[str, dict[str, float]] = {}
    kind_gain = {kind: np.mean(g, axis=0) for kind, g in pair_gain.items()}  # per image
    for kind in sorted({p["kind"] for p in pairs}):
        ps = [p for p in pairs if p["kind"] == kind]
        ci = stats.mean_interval(kind_gain[kind])
        by_kind[kind] = {
            "pairs": len(ps),
            "mean_gain_over_best_member": float(np.mean([p["gain_over_best_member"] for p in ps])),
            "gain_low": ci.low,
            "gain_high": ci.high,
            "mean_disagreement": float(np.mean([p["disagreement"] for p in ps])),
            "mean_error_correlation": float(np.nanmean([p["error_correlation"] for p in ps]))
            if any(np.isfinite(p["error_correlation"]) for p in ps) else float("nan"),
        }
    return {
        "members": members,
        "pairs": pairs,
        "fixes": fixes,
        "ensemble": {"top1": float(1 - ens_wrong.mean()),
                     "oracle_top1": float(1 - np.logical_and.reduce([wrong[n] for n in names]).mean()),
                     "all_wrong": float(np.logical_and.reduce([wrong[n] for n in names]).mean())},
        "by_kind": by_kind,
        "claim": architecture_claim(kind_gain),
    }


def architecture_claim(kind_gain: dict[str, np.ndarray]) -> dict[str, float] | None:
    """Architecture pairs' mean gain minus hyperparameter pairs', per image, with its 95 % interval.

    The seed's claim holds on this test set when the interval lies above 0; an interval that
    contains 0 means the test images cannot tell the two kinds apart.
    """
    if "architecture" not in kind_gain or "hyperparameter" not in kind_gain:
        return None
    ci = stats.mean_interval(kind_gain["architecture"] - kind_gain["hyperparameter"])
    return {"architecture_minus_hyperparameter_gain": ci.estimate, "low": ci.low, "high": ci.high,
            "confidence": ci.confidence, "images": int(len(kind_gain["architecture"]))}


def diversity_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a diversity report into float metrics for tracking."""
    out: dict[str, float] = {}
    for p in report["pairs"]:
        key = f"{prefix}pair_{p['a']}_{p['b']}"
        for k in ("disagreement", "double_fault", "error_correlation", "pair_ensemble_top1", "gain_over_best_member"):
            out[f"{key}_{k}"] = float(p[k])
    for kind, d in report["by_kind"].items():
        for k, v in d.items():
            out[f"{prefix}{kind}_pairs_{k}"] = float(v)
    if report["pairs"]:
        out[f"{prefix}mean_disagreement"] = float(np.mean([p["disagreement"] for p in report["pairs"]]))
        out[f"{prefix}mean_double_fault"] = float(np.mean([p["double_fault"] for p in report["pairs"]]))
    out[f"{prefix}oracle_top1"] = report["ensemble"]["oracle_top1"]
    claim = report.get("claim")
    if claim:
        out[f"{prefix}arch_minus_hparam_gain"] = claim["architecture_minus_hyperparameter_gain"]
        out[f"{prefix}arch_minus_hparam_gain_low"] = claim["low"]
        out[f"{prefix}arch_minus_hparam_gain_high"] = claim["high"]
    return out


def write_diversity_tables(report: dict[str, Any], out_dir: Path, prefix: str = "test") -> list[Path]:
    """CSV per table plus one Markdown summary (pairs, fixes/introduced, by kind)."""
    out_dir = Path(out_dir)
    files = []
    for table in ("pairs", "fixes"):
        rows = report[table]
        path = out_dir / f"{prefix}_diversity_{table}.csv"
        with open(path, "w", newline="") as f:
            if rows:
                wr = csv.DictWriter(f, fieldnames=list(rows[0]))
                wr.writeheader()
                wr.writerows(rows)
        files.append(path)

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    def md(rows: list[dict]) -> list[str]:
        if not rows:
            return ["(none)"]
        keys = list(rows[0])
        return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
               ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]

    lines = [f"# Ensemble diversity ({prefix})", "", "## Members", ""]
    lines += md([{"member": n, **d} for n, d in report["members"].items()])
    lines += ["", f"Ensemble top-1 {report['ensemble']['top1']:.4f}; oracle (any member right) "
              f"{report['ensemble']['oracle_top1']:.4f}.", "", "## Pairs", ""] + md(report["pairs"])
    lines += ["", "## Errors the full ensemble fixes / introduces, per member", ""] + md(report["fixes"])
    lines += ["", "## Two-member ensembles by kind (architecture = different networks, e.g. attention vs not; "
              "hyperparameter = same network, different recipe)", ""]
    lines += md([{"kind": k, **d} for k, d in report["by_kind"].items()])
    claim = report.get("claim")
    if claim:
        lines += ["", f"Architecture minus hyperparameter gain: {100 * claim['architecture_minus_hyperparameter_gain']:+.2f} "
                  f"points, 95% interval [{100 * claim['low']:+.2f}, {100 * claim['high']:+.2f}] (bootstrap over "
                  f"{claim['images']} test images)."]
    path = out_dir / f"{prefix}_diversity.md"
    path.write_text("\n".join(lines) + "\n")
    return files + [path]


def plot_diversity(report: dict[str, Any], path: Path) -> Path:
    """Bars: each member, each pair ensemble and the full ensemble's top-1."""
    from flowers.evaluation.metrics import pyplot

    plt = pyplot()
    labels = list(report["members"]) + [f"{p['a']}+{p['b']}" for p in report["pairs"]] + ["all"]
    vals = [d["top1"] for d in report["members"].values()] + [p["pair_ensemble_top1"] for p in report["pairs"]] \
        + [report["ensemble"]["top1"]]
    colors = ["tab:grey"] * len(report["members"]) + \
             ["tab:blue" if p["kind"] == "architecture" else "tab:orange" for p in report["pairs"]] + ["tab:green"]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(labels) + 2), 4))
    ax.bar(range(len(vals)), vals, color=colors)
    ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right")
    lo = min(vals)
    ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(vals) + 0.05))
    ax.set_ylabel("top-1")
    ax.set_title("members (grey), architecture pairs (blue), hyperparameter pairs (orange), all (green)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- the L4 stage


def stage_metrics(ens: dict[str, np.ndarray], probs: dict[str, dict[str, np.ndarray]],
                  labels: dict[str, np.ndarray], test_m: dict[str, float]) -> dict[str, float]:
    """The L4 run's flat metrics: the vote on val/test, every member, the gain over the best member."""
    from flowers.evaluation.metrics import compute_metrics

    val_m = compute_metrics(ens["val"], labels["val"])
    metrics: dict[str, float] = {
        "val_top1": val_m["top1"], "test_top1": test_m["top1"], "test_top5": test_m["top5"],
        "test_nll": test_m["nll"], "test_ece": test_m["ece"], "test_mean_per_class_acc": test_m["mean_per_class_acc"],
    }
    keys = list(probs["test"])
    for k in keys:
        mt = compute_metrics(probs["test"][k], labels["test"])
        metrics[f"member_{k}_test_top1"] = mt["top1"]
        metrics[f"member_{k}_test_nll"] = mt["nll"]
        metrics[f"member_{k}_val_top1"] = compute_metrics(probs["val"][k], labels["val"])["top1"]
    metrics["gain_over_best_member"] = metrics["test_top1"] - max(metrics[f"member_{k}_test_top1"] for k in keys)
    return metrics


def run_ensemble_stage(member_uris: dict[str, str], data_cfg: DataConfig, out_dir: Path,
                       weights: dict[str, float] | None = None, threshold_policy: str = "coverage",
                       threshold_target: float = 0.95, workers: int | None = None,
                       explain_images: int = 8, ood_images: int = 32,
                       target: "registry.TrackingTarget | None" = None, fuse: bool = True) -> StageResult:
    """Build the ensemble, evaluate members and ensemble on val/test, write diversity tables and plots;
    `fuse`: add its one-graph serving artifact (`flowers.inference.fused_ensemble`).

    `member_uris` maps a member key (e.g. 'l1') to its URI; each member's probabilities are
    computed once per split, on the images in its own eval preprocessing, and reused for every
    metric. `data_cfg` is the members' shared data config; `target` the store their URIs live in.
    """
    from flowers.data.bundle import build_data
    from flowers.evaluation.metrics import write_eval_artifacts
    from flowers.registry.governance import data_lineage
    from flowers.inference.fused_ensemble import fuse_for_stage
    from flowers.inference.predict import predict_dataset
    from flowers.training.stages import Explained, stage_tail

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(member_uris)
    w = [float((weights or {}).get(k, 1.0)) for k in keys]
    model_dir = build_ensemble([member_uris[k] for k in keys], out_dir / "model", w, member_names=keys, target=target)
    manifest = read_manifest(model_dir)
    ens_model = load_ensemble(model_dir, manifest, "cpu")
    members = dict(load_members(model_dir, manifest))
    data = build_data(data_cfg, ens_model.preprocessing, seed=data_cfg.seed)
    if list(data.class_names) != list(manifest["class_names"]):
        raise ConfigError(f"the members have {len(manifest['class_names'])} classes but the data "
                          f"({data.source}) has {len(data.class_names)}; pass the members' data config")
    nw = data_cfg.workers if workers is None else workers
    probs: dict[str, dict[str, np.ndarray]] = {"val": {}, "test": {}}
    labels: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        for key, loaded in members.items():
            ds = data.eval_part(split, loaded.transform(), loaded.draft_size)
            probs[split][key], labels[split] = predict_dataset(loaded.predict_proba, ds, batch_size=data_cfg.eval_batch_size,
                                                               workers=nw)
            log.info("member %s %s top-1 %.4f", key, split, (probs[split][key].argmax(1) == labels[split]).mean())
    ens = {s: soft_vote([probs[s][k] for k in keys], w) for s in probs}
    test_m, files = write_eval_artifacts(ens["test"], labels["test"], data.class_names, out_dir, prefix="test")
    # per-image results in the model folder: the registry gate compares versions on them
    write_json(model_dir / PER_IMAGE, per_image_record(data.test.paths, labels["test"], ens["test"].argmax(1)))
    metrics = stage_metrics(ens, probs, labels, test_m)
    if fuse:  # the serving artifact: one ONNX graph (INT8 when it keeps the accuracy), compared on test
        metrics.update(fuse_for_stage(model_dir, data, ens_model, ens["test"], labels["test"],
                                      batch_size=data_cfg.eval_batch_size, workers=nw))

    arch = {k: loaded.meta.get("model_name") for k, loaded in members.items()}
    report = diversity_report(probs["test"], labels["test"], arch, dict(zip(keys, w)))
    metrics.update(diversity_metrics(report))
    artifacts = list(files.values()) + write_diversity_tables(report, out_dir, "test")
    (out_dir / "test_diversity.json").write_text(json.dumps(report, indent=2))
    artifacts += [out_dir / "test_diversity.json", plot_diversity(report, out_dir / "test_diversity.png")]

    data_config = {"data": {f: getattr(data_cfg, f) for f in data_cfg.__dataclass_fields__}}
    explain = [Explained(k, m, data.eval_part("test", m.transform(), m.draft_size), probs["test"][k])
               for k, m in members.items() if m.module is not None]
    metrics, tail_files = stage_tail(
        out_dir, model_dir, ens_model, (ens["val"], labels["val"]), (ens["test"], labels["test"]),
        {"ensemble": ens["test"], **probs["test"]}, policy=threshold_policy, target=threshold_target,
        ood_images=ood_images, explain=explain, explain_images=explain_images, metrics=metrics,
        manifest={"test_accuracy": metrics["test_top1"], "val_accuracy": metrics["val_top1"], "data": data.source,
                  "config": data_config,
                  "lineage": {**data_lineage(data, data_config), **(manifest.get("lineage") or {})}})
    artifacts += tail_files
    from flowers.registry.run_notes import dataset_record  # the splits as the stage run's MLflow dataset inputs

    (out_dir / "datasets.json").write_text(json.dumps(dataset_record(data)))
    artifacts.append(out_dir / "datasets.json")
    params = {"members": ",".join(keys), "weights": ",".join(f"{x:g}" for x in w),
              "uncertainty_policy": threshold_policy, "uncertainty_target": threshold_target,
              **{f"member_{k}_uri": member_uris[k] for k in keys}}
    tags = {"stage": "l4", "registered_name": REGISTERED_NAME,
            **{f"member_{m['name']}_version": str(m.get("version")) for m in manifest["members"]}}
    log.info("ensemble test top-1 %.4f (best member %.4f), threshold %.3f", metrics["test_top1"],
             metrics["test_top1"] - metrics["gain_over_best_member"], metrics["uncertainty_threshold"])
    return StageResult(model_dir=model_dir, metrics={k: float(v) for k, v in metrics.items()}, params=params,
                       artifacts=artifacts, tags=tags)
