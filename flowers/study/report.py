"""Study report: Markdown (+ PNGs) from MLflow, next to the seed's figures.

Reads the study's experiment only (never the trial folders), so it works for a
study tracked on a remote server as well as the embedded store. Missing stages
read "not run".

Every level comparison (L2 vs L1, L3 vs L1, ensemble vs its best member, student vs
ensemble, INT8 vs fp32) is paired over the test images: each model folder carries its
per-image test results (`test_per_image.json`), read back from the runs' MLflow artifacts;
the difference in accuracy gets a 95 % paired bootstrap interval and McNemar's exact p
(`flowers.evaluation.stats`, through `flowers.registry.governance.compare`). Two models tested on different
images are "not comparable".
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flowers.registry import governance
from flowers.registry import tracking as T
from flowers.models.checkpoint import PER_IMAGE, ModelLoadError, read_per_image
from flowers.registry.flavor import FOLDER_PATH
from flowers.registry.uris import CHAMPION, REGISTERED

log = logging.getLogger(__name__)

# The seed project: ResNet-50 on a GPU, seeded random 80/10/10 split, 224 px (val, test top-1 %),
# and its L5 constraints (accuracy >= 95 %, batch-1 latency < 100 ms, INT8).
SEED = {
    "setup": "seed: ResNet-50 (ImageNet), GPU, random 80/10/10 split, 224 px",
    "l1": (97.68, 97.31),
    "l2": (97.07, 97.92),
    "l3": (98.41, 97.68),
    "student_int8_latency_ms": 59.0,
    "student_bar_top1": 95.0,
    "student_bar_latency_ms": 100.0,
}
# where a run's per-image test results are: in its logged model folder, and (L5) the fp32 student's
MODEL_RECORD = f"model/{FOLDER_PATH}/{PER_IMAGE}"
FP32_RECORD = "artifacts/test_per_image_fp32.json"
ENSEMBLE_STAGE, DISTILL_STAGE = "l4-ensemble", "l5-distill"
LEVEL_TITLES = {"l1": "L1 transfer baseline", "l2": "L2 regularized recipe", "l3": "L3 attention pooling"}
# MLflow metric names (the `flowers.registry.run_notes` vocabulary) the L4 section shows
DIVERSITY_KEYS = ("diversity/mean_disagreement", "diversity/mean_double_fault", "diversity/oracle_acc",
                  "test/gain_over_best_member", "test/ece")


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
    info = {"study": study, "parent": {"params": dict(parent.data.params), "tags": dict(parent.data.tags),
                                       "metrics": dict(parent.data.metrics), "status": parent.info.status},
            "trials": trials, "stages": stages, "champions": champions}
    info["records"] = collect_records(client, info)
    return info


def level_trial(info: dict[str, Any], level: str) -> dict[str, Any] | None:
    """The trial that is `level`: its registered champion's run, else the finished trial with that role."""
    by_run = {t["run_id"]: t for t in info["trials"]}
    ch = info["champions"].get(level)
    t = by_run.get(ch["run_id"]) if ch else None
    if t is None:
        t = next((x for x in info["trials"] if level in x["roles"] and x["status"] == "FINISHED"), None)
    return t


def _download_record(client, run_id: str, path: str) -> dict[str, Any] | None:
    """A per-image record logged with a run (None when the run has none)."""
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        try:  # runs:/ reaches the run's logged models too (`model/...`), not only its artifact folder
            local = Path(download_artifacts(artifact_uri=f"runs:/{run_id}/{path}", dst_path=tmp,
                                            tracking_uri=client.tracking_uri))
        except Exception:  # MLflow raises many types for an absent artifact
            return None
        try:
            return read_per_image(local)
        except ModelLoadError as e:
            log.warning("run %s: %s", run_id, e)
            return None


def collect_records(client, info: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    """Per-image test results of every model the comparisons need, from the runs' artifacts.

    Keys: l1, l2, l3 (the level's run), ensemble, member:<key> (the versions the ensemble was
    built from), student_int8 (the deployed student), student_fp32.
    """
    cache: dict[tuple[str, str], dict[str, Any] | None] = {}

    def get(run_id: str | None, path: str = MODEL_RECORD) -> dict[str, Any] | None:
        if not run_id:
            return None
        if (run_id, path) not in cache:
            cache[(run_id, path)] = _download_record(client, run_id, path)
        return cache[(run_id, path)]

    records: dict[str, dict[str, Any] | None] = {}
    for level in ("l1", "l2", "l3"):
        t = level_trial(info, level)
        records[level] = get(t["run_id"] if t else None)
    ens = info["stages"].get(ENSEMBLE_STAGE)
    if ens:
        records["ensemble"] = get(ens["run_id"])
        for tag, version in ens["tags"].items():
            key = tag[len("member_"):-len("_version")] if tag.startswith("member_") and tag.endswith("_version") else None
            if key in REGISTERED and version not in ("", "None"):
                try:
                    records[f"member:{key}"] = get(client.get_model_version(REGISTERED[key], version).run_id)
                except Exception as e:
                    log.warning("ensemble member %s version %s: %s", key, version, str(e).splitlines()[0])
    dis = info["stages"].get(DISTILL_STAGE)
    if dis:
        records["student_int8"] = get(dis["run_id"])
        records["student_fp32"] = get(dis["run_id"], FP32_RECORD)
    return records


def T_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


# ----------------------------------------------------------------------------- paired comparisons


def paired(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    """A vs B on the same test images: {'status': 'ok', ...governance.Comparison fields} or why not."""
    if a is None or b is None:
        return {"status": "missing"}
    if len(a["ids"]) != len(b["ids"]) or set(a["ids"]) != set(b["ids"]):
        return {"status": "not comparable",
                "why": f"tested on different images ({len(a['ids'])} vs {len(b['ids'])} ids, split hash "
                       f"{a.get('split_hash')} vs {b.get('split_hash')})"}
    try:
        c = governance.compare(a, b)
    except governance.GateError as e:
        return {"status": "not comparable", "why": str(e)}
    return {"status": "ok", **asdict(c)}


def comparisons(info: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title, paired result) for every level comparison the report shows."""
    rec = info.get("records") or {}
    rows = [("L2 vs L1", paired(rec.get("l2"), rec.get("l1"))),
            ("L3 vs L1", paired(rec.get("l3"), rec.get("l1")))]
    ens = info["stages"].get(ENSEMBLE_STAGE)
    m = (ens or {}).get("metrics") or {}
    members = {k[len("members/"):-len("/test_acc")]: v for k, v in m.items()
               if k.startswith("members/") and k.endswith("/test_acc")}
    if members:
        best = max(members, key=lambda k: members[k])
        rows.append((f"ensemble vs best member ({best})", paired(rec.get("ensemble"), rec.get(f"member:{best}"))))
    else:
        rows.append(("ensemble vs best member", paired(rec.get("ensemble"), None)))
    rows += [("student INT8 vs ensemble", paired(rec.get("student_int8"), rec.get("ensemble"))),
             ("student INT8 vs student fp32", paired(rec.get("student_int8"), rec.get("student_fp32")))]
    return rows


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def comparison_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    md = ["| comparison (A vs B) | A top-1 % | B top-1 % | A − B (points) | 95 % interval | McNemar p | "
          "only A right / only B right | test images |", "|---|---|---|---|---|---|---|---|"]
    for title, r in rows:
        if r["status"] == "ok":
            md.append(f"| {title} | {100 * r['challenger_accuracy']:.2f} | {100 * r['champion_accuracy']:.2f} | "
                      f"{_points(r['difference'])} | [{_points(r['difference_low'])}, {_points(r['difference_high'])}] | "
                      f"{r['p_value']:.3g} | {r['only_challenger']} / {r['only_champion']} | {r['n_images']} |")
        elif r["status"] == "not comparable":
            md.append(f"| {title} | not comparable: {r['why']} | | | | | | |")
        else:
            md.append(f"| {title} | not run (or no per-image results) | | | | | | |")
    return md


def _claim_lines(m: dict[str, float]) -> list[str]:
    """The seed's diversity claim with its intervals, from the L4 stage's metrics."""
    if "diversity/arch_minus_hparam_gain" not in m:
        return []
    kinds = []
    for kind in ("architecture", "hyperparameter"):
        g = m.get(f"diversity/{kind}_pairs_mean_gain_over_best_member")
        lo, hi = m.get(f"diversity/{kind}_pairs_gain_low"), m.get(f"diversity/{kind}_pairs_gain_high")
        if g is not None and lo is not None and hi is not None:
            kinds.append(f"{kind} pairs {_points(g)} points [{_points(lo)}, {_points(hi)}]")
    d, lo, hi = m["diversity/arch_minus_hparam_gain"], m["diversity/arch_minus_hparam_gain_low"], m["diversity/arch_minus_hparam_gain_high"]
    verdict = ("supported on this test set (interval above 0)" if lo > 0 else
               "contradicted on this test set (interval below 0)" if hi < 0 else
               "not shown: the interval contains 0, so these test images cannot tell the two kinds apart")
    return ["", "Seed's claim (architecture diversity helps an ensemble more than hyperparameter changes). Gain of "
            "two-member ensembles over their better member: " + ("; ".join(kinds) or "n/a per kind") +
            f". Architecture minus hyperparameter: **{_points(d)} points, 95 % interval [{_points(lo)}, {_points(hi)}]** "
            f"(paired bootstrap over test images): {verdict}."]


def seed_table(info: dict[str, Any]) -> list[str]:
    """This run's test top-1 beside the seed's figures and bars."""
    md = ["| model | this run: test top-1 % | seed: test top-1 % | seed's bar |", "|---|---|---|---|"]
    for level in ("l1", "l2", "l3"):
        t = level_trial(info, level)
        mine = _pct(t["metrics"].get("test/acc")) if t else "not run"
        md.append(f"| {LEVEL_TITLES[level]} | {mine} | {SEED[level][1]:.2f} | – |")
    ens = (info["stages"].get(ENSEMBLE_STAGE) or {}).get("metrics") or {}
    md.append(f"| L4 ensemble | {_pct(ens.get('test/acc')) if ens else 'not run'} | not reported | – |")
    dis = (info["stages"].get(DISTILL_STAGE) or {}).get("metrics") or {}
    md.append(f"| L5 student, static INT8 | {_pct(dis.get('test/acc_int8')) if dis else 'not run'} | not reported | "
              f"≥ {SEED['student_bar_top1']:.0f} |")
    md.append(f"| L5 student INT8, batch-1 p50 latency (ms) | {_ms(dis.get('latency/int8_p50_ms')) if dis else 'not run'} | "
              f"{SEED['student_int8_latency_ms']:.0f} | < {SEED['student_bar_latency_ms']:.0f} |")
    return md


def _bar_png(rows: list[tuple[str, float | None, float | None]], path: Path, title: str) -> Path | None:
    rows = [r for r in rows if r[1] is not None]
    if not rows:
        return None
    from flowers.evaluation.metrics import pyplot

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


def _levels_section(info: dict[str, Any], out_dir: Path) -> list[str]:
    """The L1–L3 table and plot, and the registered champions."""
    md: list[str] = []
    champions = info["champions"]
    md += ["## Levels (top-1 %, best-val checkpoint)", "",
           "| Level | trial | setup | val | test | seed val | seed test |", "|---|---|---|---|---|---|---|"]
    level_rows = []
    for level in ("l1", "l2", "l3"):
        t = level_trial(info, level)  # the registered champion, else the trial with that role
        sv, st = SEED[level]
        if t:
            m = t["metrics"]
            md.append(f"| {LEVEL_TITLES[level]} | {t['key']} | {_setup(t['params'])} | {_pct(m.get('val/best_acc'))} | "
                      f"{_pct(m.get('test/acc'))} | {sv:.2f} | {st:.2f} |")
            level_rows.append((level, m.get("val/best_acc"), m.get("test/acc")))
        else:
            md.append(f"| {LEVEL_TITLES[level]} | – | – | not run | not run | {sv:.2f} | {st:.2f} |")
    png = _bar_png(level_rows, out_dir / "levels.png", "Levels: val/test top-1")
    if png:
        md += ["", f"![levels]({png.name})"]
    if champions:
        md += ["", "Registered: " + ", ".join(f"`{c['uri']}` (v{c['version']})" for c in champions.values())]
    return md


def _ablation_section(info: dict[str, Any], out_dir: Path) -> list[str]:
    """The L2 ablation grid's table and plot."""
    md: list[str] = []
    abl = sorted((t for t in info["trials"] if "ablation" in t["roles"]), key=lambda t: tuple(sorted(t["axes"].items())))
    md += ["", "## L2 ablation grid (top-1 %)", ""]
    if abl:
        axes = sorted({a for t in abl for a in t["axes"]})
        md += ["| " + " | ".join(axes) + " | trial | val | test |", "|" + "---|" * (len(axes) + 3)]
        rows = []
        for t in abl:
            m = t["metrics"]
            md.append("| " + " | ".join(t["axes"].get(a, "") for a in axes) +
                      f" | {t['key']} | {_pct(m.get('val/best_acc'))} | {_pct(m.get('test/acc'))} |")
            rows.append(("/".join(t["axes"].get(a, "") for a in axes), m.get("val/best_acc"), m.get("test/acc")))
        png = _bar_png(rows, out_dir / "ablation.png", "Ablation: val/test top-1")
        if png:
            md += ["", f"![ablation]({png.name})"]
        md += ["", "All grid points share the split, seed and epochs; the seed reported L2 (strong augmentation, "
               "label smoothing, weight decay, cosine) only, not the grid."]
        md += _grid_budget_note(abl, [level_trial(info, lv) for lv in ("l1", "l2", "l3")])
    else:
        md.append("not run")
    return md


def _ensemble_section(info: dict[str, Any]) -> list[str]:
    """L4: members vs the ensemble, diversity and the architecture claim."""
    md: list[str] = []
    md += ["", "## L4 ensemble: members vs ensemble (test top-1 %)", ""]
    ens = info["stages"].get("l4-ensemble")
    if ens and ens["metrics"]:
        m = ens["metrics"]
        md += ["| model | test |", "|---|---|"]
        for k in sorted(k for k in m if k.startswith("members/") and k.endswith("/test_acc")):
            md.append(f"| member {k[len('members/'):-len('/test_acc')]} | {_pct(m[k])} |")
        md.append(f"| **ensemble** (val {_pct(m.get('val/acc'))}) | **{_pct(m.get('test/acc'))}** |")
        div = {k: v for k, v in m.items() if k in DIVERSITY_KEYS}
        if div:
            md += ["", "Diversity: " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in sorted(div.items()))]
        md += _claim_lines(m)
        md += ["", f"Setup: {_setup(ens['params']) if 'data.root' in ens['params'] else 'members as above'}; hardware as above."]
    else:
        md.append("not run")
    return md


def _student_section(info: dict[str, Any]) -> list[str]:
    """L5: teacher vs the student (fp32, INT8) with latency."""
    md: list[str] = []
    md += ["", "## L5 student: teacher vs student", ""]
    dis = info["stages"].get("l5-distill")
    if dis and dis["metrics"]:
        m = dis["metrics"]
        md += ["| model | test top-1 % | batch-1 latency p50 (ms) |", "|---|---|---|",
               f"| teacher | {_pct(m.get('teacher/test_acc'))} | {_ms(m.get('latency/teacher_p50_ms'))} |",
               f"| student fp32 | {_pct(m.get('test/acc_fp32'))} | {_ms(m.get('latency/fp32_p50_ms'))} |",
               f"| student INT8 (static) | {_pct(m.get('test/acc_int8'))} | {_ms(m.get('latency/int8_p50_ms'))} |",
               f"| student INT8 (dynamic) | – | {_ms(m.get('latency/dynamic_int8_p50_ms'))} |",
               f"| seed student INT8 | – | {SEED['student_int8_latency_ms']:.0f} |",
               "", f"Setup: {_setup(dis['params'])}; latency on the hardware above."]
        tags = dis.get("tags") or {}
        if tags.get("int8_recipe"):
            md += ["", f"INT8 recipe `{tags['int8_recipe']}` (saturation-safe on CPUs without VNNI: "
                   f"{tags.get('int8_saturation_safe', '?')}); exported and validated on {tags.get('int8_validated_on', '?')}."]
    else:
        md.append("not run")
    return md


def render(info: dict[str, Any], out_dir: Path) -> str:
    """The Markdown text (writes the PNGs it links into `out_dir`)."""
    trials, stages = info["trials"], info["stages"]
    hw = info["parent"]["tags"].get("hardware", "not recorded")
    # the header describes the level models (L1 first): grid points may run at a smaller budget
    order = {"l1": 0, "l2": 1, "l3": 2}
    levels_first = sorted(trials, key=lambda t: min((order.get(r, 3) for r in t["roles"]), default=3))
    any_params = next((t["params"] for t in levels_first if t["params"]), {})
    md = [f"# Study report: {info['study']}", "",
          f"- Hardware: {hw}",
          f"- Setup (this study's level models): {_setup(any_params)}",
          f"- Seed figures: {SEED['setup']}",
          f"- Trials: {len(trials)} ({sum(t['status'] == 'FINISHED' for t in trials)} finished)", ""]

    # ---- beside the seed, and the paired comparisons
    md += ["## This run beside the seed", ""] + seed_table(info)
    md += ["", "Not like for like unless the setups match: see each section's setup line and the seed's above.", ""]
    md += ["## Level comparisons (paired over the same test images)", ""] + comparison_table(comparisons(info))
    md += ["", "A − B: difference in test top-1 with a 95 % paired bootstrap interval (images resampled, both models' "
           "results kept together); McNemar: exact two-sided test on the images only one of the two gets right. "
           "An interval that contains 0 means the test set cannot tell the two apart.", ""]

    md += _levels_section(info, out_dir) + _ablation_section(info, out_dir)
    md += _ensemble_section(info) + _student_section(info)
    from flowers.study.robustness_step import report_lines

    md += report_lines(stages.get("robustness"))
    md.append("")
    return "\n".join(md)


def _grid_budget_note(grid: list[dict], levels: list[dict | None]) -> list[str]:
    """Say so when the grid ran at a smaller budget than the level models (a profile's `grid:` section)."""
    def epochs(t: dict | None) -> str | None:
        return None if not t else str((t.get("params") or {}).get("train.epochs"))

    g = sorted({e for e in map(epochs, grid) if e and e != "None"})
    lv = sorted({e for e in map(epochs, levels) if e and e != "None"})
    if not g or not lv or g == lv:
        return []
    return ["", f"**Budget:** grid points trained {', '.join(g)} epochs each, the level models {', '.join(lv)} "
            "(a smaller budget for the grid, set by the profile's `grid:` section). Grid rows compare with each "
            "other, not with the level rows above."]


def write_report(study: str, out_dir: str | Path, tracker: T.StudyTracker | None = None) -> Path:
    """Write `<out_dir>/report.md` (+ PNGs) and `report.html` (the same, figures inline: MLflow's artifact
    viewer renders it) for `study`; returns the Markdown path."""
    from flowers.study.report_html import markdown_to_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render(collect(study, tracker), out_dir)
    path = out_dir / "report.md"
    path.write_text(text)
    path.with_suffix(".html").write_text(markdown_to_html(text, out_dir, f"Study report: {study}"))
    log.info("report written to %s", path)
    return path
