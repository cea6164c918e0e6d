"""Study report: Markdown (+ PNGs) from MLflow, next to the seed's figures.

Reads the study's experiment only (never the trial folders), so it works for a
study tracked on a remote server as well as the embedded store. Missing stages
read "not run".
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from flowers import tracking as T
from flowers.registry import CHAMPION, REGISTERED

log = logging.getLogger(__name__)

# The seed project: ResNet-50 on a GPU, seeded random 80/10/10 split, 224 px.
SEED = {
    "setup": "seed: ResNet-50 (ImageNet), GPU, random 80/10/10 split, 224 px",
    "l1": (97.68, 97.31),
    "l2": (97.07, 97.92),
    "l3": (98.41, 97.68),
    "student_int8_latency_ms": 59.0,
}
LEVEL_TITLES = {"l1": "L1 transfer baseline", "l2": "L2 regularized recipe", "l3": "L3 attention pooling"}
ENSEMBLE_KEYS = ("val_top1", "test_top1")
DIVERSITY_KEYS = ("mean_disagreement", "mean_double_fault", "oracle_top1", "gain_over_best_member", "test_ece")
DISTILL_KEYS = ("test_top1", "int8_test_top1", "teacher_test_top1", "latency_fp32_p50_ms", "latency_int8_p50_ms",
                "latency_dynamic_int8_p50_ms", "latency_teacher_p50_ms")


def _pct(v: float | None) -> str:
    return "not run" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _ms(v: float | None) -> str:
    return "not run" if v is None else f"{v:.1f}"


def _setup(params: dict[str, str]) -> str:
    """Data, split, image size and backbone of a run, from its logged config params."""
    if not params:
        return "n/a"
    arch = params.get("model.arch", "?") + (" + attention" if params.get("model.attention") == "True" else "")
    classes = params.get("data.classes")
    cls = f", {classes} classes" if classes not in (None, "None", "null") else ""
    epochs = params.get("train.epochs", "?")
    cap = params.get("data.max_train_batches")
    cap_s = f" (≤{cap} batches/epoch)" if cap not in (None, "None", "null") else ""
    return (f"data {params.get('data.root', '$FLOWERS_DATA')}{cls}, split {params.get('data.split', '?')} "
            f"seed {params.get('data.seed', '?')}, {params.get('data.image_size', '?')} px, {arch} "
            f"(pretrained {params.get('model.pretrained', '?')}), {epochs} epochs{cap_s}")


def collect(study: str, tracker: T.StudyTracker | None = None) -> dict[str, Any]:
    """Everything the report needs from MLflow, as plain dicts."""
    from mlflow import MlflowClient

    client = tracker.client if tracker else MlflowClient()
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise FileNotFoundError(f"no MLflow experiment named '{study}' at {T_uri()}: run `flowers study` first "
                                "or pass --tracking-uri")
    runs = client.search_runs([exp.experiment_id], max_results=2000, order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if r.data.tags.get(T.ROLE_TAG) == "study"]
    if not parents:
        raise FileNotFoundError(f"experiment '{study}' has no study run")
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials, stages = [], {}
    for r in children:
        item = {"key": r.data.tags.get(T.KEY_TAG), "status": r.info.status, "metrics": dict(r.data.metrics),
                "params": dict(r.data.params), "tags": dict(r.data.tags), "run_id": r.info.run_id,
                "roles": [x for x in r.data.tags.get("flowers.roles", "").split(",") if x],
                "axes": {k[5:]: v for k, v in r.data.tags.items() if k.startswith("axis.")}}
        if r.data.tags.get(T.ROLE_TAG) == "stage":
            stages[item["key"]] = item
        else:
            trials.append(item)
    champions = {}
    for level in ("l1", "l2", "l3"):
        name = REGISTERED[level]
        try:
            mv = client.get_model_version_by_alias(name, CHAMPION)
            champions[level] = {"run_id": mv.run_id, "version": mv.version, "uri": f"models:/{name}@{CHAMPION}"}
        except Exception:
            pass
    return {"study": study, "parent": {"params": dict(parent.data.params), "tags": dict(parent.data.tags),
                                       "metrics": dict(parent.data.metrics), "status": parent.info.status},
            "trials": trials, "stages": stages, "champions": champions}


def T_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _bar_png(rows: list[tuple[str, float | None, float | None]], path: Path, title: str) -> Path | None:
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return None
    from flowers.evaluate import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r[1] for r in rows], 0.4, label="val")
    ax.bar([x + 0.2 for x in xs], [100 * (r[2] or 0) for r in rows], 0.4, label="test")
    ax.set_xticks(list(xs), [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("top-1 %")
    lo = min(100 * min(r[1], r[2] or r[1]) for r in rows)
    ax.set_ylim(max(0, lo - 5), 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(info: dict[str, Any], out_dir: Path) -> str:
    """The Markdown text (writes the PNGs it links into `out_dir`)."""
    trials, stages, champions = info["trials"], info["stages"], info["champions"]
    hw = info["parent"]["tags"].get("hardware", "not recorded")
    by_run = {t["run_id"]: t for t in trials}
    any_params = next((t["params"] for t in trials if t["params"]), {})
    md = [f"# Study report: {info['study']}", "",
          f"- Hardware: {hw}",
          f"- Setup (this study): {_setup(any_params)}",
          f"- Seed figures: {SEED['setup']}",
          f"- Trials: {len(trials)} ({sum(t['status'] == 'FINISHED' for t in trials)} finished)", ""]

    # ---- levels
    md += ["## Levels (top-1 %, best-val checkpoint)", "",
           "| Level | trial | setup | val | test | seed val | seed test |", "|---|---|---|---|---|---|---|"]
    level_rows = []
    for level in ("l1", "l2", "l3"):
        ch = champions.get(level)
        t = by_run.get(ch["run_id"]) if ch else None
        if t is None:  # not registered: fall back to the trial with that role
            t = next((x for x in trials if level in x["roles"] and x["status"] == "FINISHED"), None)
        sv, st = SEED[level]
        if t:
            m = t["metrics"]
            md.append(f"| {LEVEL_TITLES[level]} | {t['key']} | {_setup(t['params'])} | {_pct(m.get('best_val_acc'))} | "
                      f"{_pct(m.get('test_top1'))} | {sv:.2f} | {st:.2f} |")
            level_rows.append((level, m.get("best_val_acc"), m.get("test_top1")))
        else:
            md.append(f"| {LEVEL_TITLES[level]} | – | – | not run | not run | {sv:.2f} | {st:.2f} |")
    png = _bar_png(level_rows, out_dir / "levels.png", "Levels: val/test top-1")
    if png:
        md += ["", f"![levels]({png.name})"]
    if champions:
        md += ["", "Registered: " + ", ".join(f"`{c['uri']}` (v{c['version']})" for c in champions.values())]

    # ---- ablation
    abl = sorted((t for t in trials if "ablation" in t["roles"]), key=lambda t: tuple(sorted(t["axes"].items())))
    md += ["", "## L2 ablation grid (top-1 %)", ""]
    if abl:
        axes = sorted({a for t in abl for a in t["axes"]})
        md += ["| " + " | ".join(axes) + " | trial | val | test |", "|" + "---|" * (len(axes) + 3)]
        rows = []
        for t in abl:
            m = t["metrics"]
            md.append("| " + " | ".join(t["axes"].get(a, "") for a in axes) +
                      f" | {t['key']} | {_pct(m.get('best_val_acc'))} | {_pct(m.get('test_top1'))} |")
            rows.append(("/".join(t["axes"].get(a, "") for a in axes), m.get("best_val_acc"), m.get("test_top1")))
        png = _bar_png(rows, out_dir / "ablation.png", "Ablation: val/test top-1")
        if png:
            md += ["", f"![ablation]({png.name})"]
        md += ["", "All grid points share the split, seed and epochs; the seed reported L2 (strong augmentation, "
               "label smoothing, weight decay, cosine) only, not the grid."]
    else:
        md.append("not run")

    # ---- L4
    md += ["", "## L4 ensemble: members vs ensemble (test top-1 %)", ""]
    ens = stages.get("l4-ensemble")
    if ens and ens["metrics"]:
        m = ens["metrics"]
        md += ["| model | test |", "|---|---|"]
        for k in sorted(k for k in m if k.startswith("member_") and k.endswith("_test_top1")):
            md.append(f"| member {k[len('member_'):-len('_test_top1')]} | {_pct(m[k])} |")
        md.append(f"| **ensemble** (val {_pct(m.get('val_top1'))}) | **{_pct(m.get('test_top1'))}** |")
        div = {k: v for k, v in m.items() if k in DIVERSITY_KEYS}
        if div:
            md += ["", "Diversity: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(div.items()))]
        md += ["", f"Setup: {_setup(ens['params']) if 'data.root' in ens['params'] else 'members as above'}; hardware as above."]
    else:
        md.append("not run")

    # ---- L5
    md += ["", "## L5 student: teacher vs student", ""]
    dis = stages.get("l5-distill")
    if dis and dis["metrics"]:
        m = dis["metrics"]
        md += ["| model | test top-1 % | batch-1 latency p50 (ms) |", "|---|---|---|",
               f"| teacher | {_pct(m.get('teacher_test_top1'))} | {_ms(m.get('latency_teacher_p50_ms'))} |",
               f"| student fp32 | {_pct(m.get('test_top1'))} | {_ms(m.get('latency_fp32_p50_ms'))} |",
               f"| student INT8 (static) | {_pct(m.get('int8_test_top1'))} | {_ms(m.get('latency_int8_p50_ms'))} |",
               f"| student INT8 (dynamic) | – | {_ms(m.get('latency_dynamic_int8_p50_ms'))} |",
               f"| seed student INT8 | – | {SEED['student_int8_latency_ms']:.0f} |",
               "", f"Setup: {_setup(dis['params'])}; latency on the hardware above."]
    else:
        md.append("not run")
    md.append("")
    return "\n".join(md)


def write_report(study: str, out_dir: str | Path, tracker: T.StudyTracker | None = None) -> Path:
    """Write `<out_dir>/report.md` (+ PNGs) for `study`; returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render(collect(study, tracker), out_dir)
    path = out_dir / "report.md"
    path.write_text(text)
    log.info("report written to %s", path)
    return path
