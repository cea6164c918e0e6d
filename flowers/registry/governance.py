"""Registry governance: the champion/challenger gate, lineage, and the model card.

Every new registered version is a `challenger`. `decide(name, version)` compares it with the
current `champion` on the same test images, image by image (each version carries its
per-image test results, `test_per_image.json`, in its model folder):

- the two must have been tested on the same images: equal split hashes (hash of the sorted
  test image ids), else a one-line `GateError` and nothing moves;
- the paired difference accuracy(challenger) - accuracy(champion) gets a 95% paired
  bootstrap interval, and the exact McNemar test a two-sided p-value;
- the challenger is promoted unless it is shown worse: it stays a challenger only when the
  interval's lower bound is below -margin AND McNemar rejects equality (p < alpha) with the
  challenger behind. A small test set therefore promotes anything not clearly worse; the
  recorded interval says how much the comparison could tell.

The statistics, the decision, who and when are recorded as `gate.*` tags on the version. A
first version (no champion yet) becomes champion; `force=True` promotes regardless and says
so. Lineage (`lineage.*` tags and the manifest) and the Markdown model card are written when
a version is logged (`flowers.registry.tracking.StudyTracker.log_model_dir`).
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowers.registry import uris as registry
from flowers.evaluation import stats
from flowers.models.checkpoint import (MANIFEST, PER_IMAGE, ModelLoadError, dataset_checksum, read_per_image, sha256_file,
                                split_hash)
from flowers.registry.flavor import FOLDER_PATH

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.005  # half a point of accuracy
DEFAULT_ALPHA = 0.05
GATE_PREFIX = "gate."
LINEAGE_PREFIX = "lineage."
ACCURACY_TAG = "flowers.test_accuracy"


class GateError(ModelLoadError):
    """The gate cannot compare or promote (no such version, another split, no registry...): one line."""


# ----------------------------------------------------------------------------- lineage


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the resolved config as canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_lineage(data, config: dict[str, Any]) -> dict[str, Any]:
    """Lineage fields a model learns at training time: dataset checksum, split hash, config hash.

    `data` is a `flowers.data.bundle.DataBundle`; the split hash covers its test images.
    """
    from flowers.models.checkpoint import image_id

    parts = (data.train, data.val, data.test)
    return {
        "data_source": data.source,
        "data_checksum": dataset_checksum([p for d in parts for p in d.paths],
                                          [int(y) for d in parts for y in d.labels]),
        "split_hash": split_hash([image_id(p) for p in data.test.paths]),
        "config_hash": config_hash(config),
    }


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout holding the code (None outside a checkout)."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def parents_text(parents: Sequence[dict[str, Any]]) -> str:
    """'flowers-l1/3,flowers-l3/2' (name/version, or the URI when no version is known)."""
    return ",".join(f"{p['name']}/{p['version']}" if p.get("version") else str(p.get("uri") or p.get("name"))
                    for p in parents)


def lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """`lineage.*` version tags (MLflow tags are strings)."""
    out = {}
    for k, v in lineage.items():
        if v is None:
            continue
        out[LINEAGE_PREFIX + k] = parents_text(v) if k == "parents" else str(v)[:5000]
    return out


def who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# ----------------------------------------------------------------------------- the gate


@dataclass
class Comparison:
    """A challenger against the champion on the same images."""

    n_images: int
    challenger_accuracy: float
    champion_accuracy: float
    difference: float
    difference_low: float
    difference_high: float
    confidence: float
    only_challenger: int
    only_champion: int
    p_value: float


def compare(challenger: dict[str, Any], champion: dict[str, Any], resamples: int = stats.DEFAULT_RESAMPLES,
            seed: int = 0) -> Comparison:
    """Paired statistics of two per-image records (`flowers.models.checkpoint.per_image_record`) on the same split."""
    if challenger["split_hash"] != champion["split_hash"] or sorted(challenger["ids"]) != sorted(champion["ids"]):
        raise GateError(f"the two versions were tested on different images (split hash {challenger['split_hash']} "
                        f"vs {champion['split_hash']}); compare them on the same split")
    order = {i: k for k, i in enumerate(champion["ids"])}
    idx = np.array([order[i] for i in challenger["ids"]])
    lab_a, lab_b = np.asarray(challenger["labels"]), np.asarray(champion["labels"])[idx]
    if not np.array_equal(lab_a, lab_b):
        raise GateError("the two versions disagree about the test labels of the same images; "
                        "they were not evaluated on the same dataset")
    a = np.asarray(challenger["preds"]) == lab_a
    b = np.asarray(champion["preds"])[idx] == lab_b
    diff = stats.paired_bootstrap(a, b, resamples=resamples, seed=seed)
    mc = stats.mcnemar_exact(a, b)
    return Comparison(len(a), float(a.mean()), float(b.mean()), diff.estimate, diff.low, diff.high,
                      diff.confidence, mc.only_a, mc.only_b, mc.p_value)


def not_worse(c: Comparison, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA) -> bool:
    """The rule: refuse only when the interval reaches below -margin and McNemar shows the challenger behind."""
    shown_worse = c.p_value < alpha and c.difference < 0
    return c.difference_low >= -margin or not shown_worse


@dataclass
class Decision:
    """What the gate did for `name` version `version`, as recorded in its `gate.*` tags."""

    name: str
    version: str
    decision: str  # first | promoted | kept | forced | already champion
    promoted: bool
    reason: str
    champion_version: str | None = None  # the champion it was compared with (None: there was none)
    comparison: Comparison | None = None
    margin: float = DEFAULT_MARGIN
    alpha: float = DEFAULT_ALPHA
    by: str = field(default_factory=who)
    at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def tags(self) -> dict[str, str]:
        out = {"decision": self.decision, "reason": self.reason, "margin": f"{self.margin:g}",
               "alpha": f"{self.alpha:g}", "by": self.by, "at": self.at}
        if self.champion_version:
            out["champion_version"] = self.champion_version
        if self.comparison:
            out.update({k: (f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in asdict(self.comparison).items()})
        return {GATE_PREFIX + k: v for k, v in out.items()}


def _points(x: float) -> str:
    return f"{100 * x:+.2f}"


def _reason(c: Comparison, promoted: bool, margin: float, alpha: float) -> str:
    stat = (f"difference {_points(c.difference)} points [{_points(c.difference_low)}, {_points(c.difference_high)}] "
            f"on {c.n_images} images, McNemar p={c.p_value:.3g}")
    if promoted:
        return f"not shown worse than the champion: {stat}"
    return f"worse than the champion: {stat} (interval below -{100 * margin:g} points and p < {alpha:g})"


def version_record(client, tracking: str, name: str, version: str) -> dict[str, Any]:
    """A registered version's per-image test results, checksum-verified, without its weights."""
    from mlflow.artifacts import download_artifacts

    mv = client.get_model_version(name, version)
    source = client.get_model_version_download_uri(name, version).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            got = {f: Path(download_artifacts(artifact_uri=f"{source}/{FOLDER_PATH}/{f}", dst_path=tmp,
                                              tracking_uri=tracking)) for f in (MANIFEST, PER_IMAGE)}
        except Exception as e:  # MLflow raises many types when a file is absent
            raise GateError(f"{name} version {version} carries no per-image test results ({str(e).splitlines()[0]}); "
                            "it was registered before the gate: promote with --force") from None
        pinned = (mv.tags or {}).get(registry.MANIFEST_TAG)
        if pinned and sha256_file(got[MANIFEST]) != pinned:
            raise GateError(f"{name} version {version}: its manifest does not match the checksum recorded at "
                            "registration; refusing to use it")
        manifest = json.loads(got[MANIFEST].read_text())
        want = (manifest.get("sha256") or {}).get(PER_IMAGE)
        if not want or sha256_file(got[PER_IMAGE]) != want:
            raise GateError(f"{name} version {version}: {PER_IMAGE} does not match its manifest checksum")
        return read_per_image(got[PER_IMAGE].parent)


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            return None
        raise


def connect(tracking_uri: str | None = None, home: str | Path = registry.DEFAULT_HOME):
    """(client, tracking URI) for the registry, or a one-line GateError when it cannot be reached."""
    import urllib.error
    import urllib.request

    uri = registry.tracking_uri(tracking_uri, home)
    if uri.startswith(("http://", "https://")):
        # one quick probe: MLflow's client would retry a dead server for minutes before failing
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # it answered (a proxy or auth in front): reachable
        except (urllib.error.URLError, OSError) as e:
            raise GateError(f"cannot reach the model registry at {uri}: {getattr(e, 'reason', e)}") from None
    c = registry.client(uri)
    try:
        c.search_registered_models(max_results=1)
    except Exception as e:
        raise GateError(f"cannot reach the model registry at {uri}: {str(e).splitlines()[0][:300]}") from None
    return c, uri


def get_version(client, name: str, version: str):
    """The ModelVersion, or a one-line GateError."""
    from mlflow.exceptions import MlflowException

    if not str(version).isdigit():
        raise GateError(f"version must be a number, got '{version}'")
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e.error_code) or "not found" in str(e).lower():
            raise GateError(f"registered model '{name}' has no version {version}") from None
        raise GateError(f"cannot read {name} version {version}: {str(e).splitlines()[0]}") from None


def decide(name: str, version: str, tracking_uri: str | None = None, margin: float = DEFAULT_MARGIN,
           alpha: float = DEFAULT_ALPHA, force: bool = False, client=None) -> Decision:
    """Run the gate for `name` version `version`: compare with the champion, record tags, move `champion`.

    Raises GateError (and moves no alias) when the version does not exist, the registry is
    unreachable, or (without `force`) the two were tested on different images or carry no
    per-image results.
    """
    if not 0 <= margin < 1:
        raise GateError(f"margin is a fraction of accuracy in [0, 1) (0.005 = half a point), got {margin}")
    if client is None:
        client, tracking = connect(tracking_uri)
    else:
        tracking = tracking_uri or registry.tracking_uri()
    version = str(get_version(client, name, version).version)
    champion = _alias_version(client, name, registry.CHAMPION)
    if champion == version:
        return Decision(name, version, "already champion", False, f"version {version} is already the champion",
                        champion, margin=margin, alpha=alpha)
    comparison = None
    if champion is None:
        d = Decision(name, version, "first", True, "no champion yet: the first version becomes champion",
                     None, margin=margin, alpha=alpha)
    else:
        try:
            comparison = compare(version_record(client, tracking, name, version),
                                 version_record(client, tracking, name, champion))
        except GateError as e:
            if not force:
                raise GateError(f"{name} version {version} vs champion version {champion}: {e}") from None
            reason = f"forced without comparison ({e})"
        else:
            ok = not_worse(comparison, margin, alpha)
            reason = _reason(comparison, ok, margin, alpha)
        if force:
            d = Decision(name, version, "forced", True, reason if comparison is None else f"forced; {reason}",
                         champion, comparison, margin, alpha)
        else:
            d = Decision(name, version, "promoted" if ok else "kept", ok, reason, champion, comparison, margin, alpha)
    for k, v in d.tags().items():
        client.set_model_version_tag(name, version, k, v)
    if d.promoted:
        client.set_registered_model_alias(name, registry.CHAMPION, version)
        if _alias_version(client, name, registry.CHALLENGER) == version:
            client.delete_registered_model_alias(name, registry.CHALLENGER)
    log.info("gate %s v%s: %s (%s)", name, version, d.decision, d.reason)
    return d


# ----------------------------------------------------------------------------- listing


def aliases_of(client, name: str) -> dict[str, list[str]]:
    """version → its aliases, for one registered model."""
    out: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        out.setdefault(str(version), []).append(alias)
    return out


def describe_version(mv, aliases: Sequence[str] = ()) -> dict[str, Any]:
    """One version as plain data: name, version, aliases, test accuracy, lineage and the gate's decision."""
    tags = dict(mv.tags or {})
    return {
        "name": mv.name, "version": str(mv.version), "aliases": sorted(aliases),
        "test_accuracy": float(tags[ACCURACY_TAG]) if tags.get(ACCURACY_TAG) else None,
        "kind": tags.get("flowers.kind"), "run_id": mv.run_id, "source": mv.source,
        "uncertainty_threshold": tags.get("flowers.uncertainty_threshold"),
        "uncertainty_temperature": tags.get("flowers.uncertainty_temperature"),
        "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000))
        if mv.creation_timestamp else None,
        "lineage": {k[len(LINEAGE_PREFIX):]: v for k, v in tags.items() if k.startswith(LINEAGE_PREFIX)},
        "gate": {k[len(GATE_PREFIX):]: v for k, v in tags.items() if k.startswith(GATE_PREFIX)},
    }


def list_versions(client, name: str | None = None) -> list[dict[str, Any]]:
    """Every version of `name` (or of every registered model), newest first per model."""
    from mlflow.exceptions import MlflowException

    if name:
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise GateError(f"no registered model '{name}'") from None
        names = [name]
    else:
        names = sorted(m.name for m in client.search_registered_models(max_results=1000))
    rows = []
    for n in names:
        aliases = aliases_of(client, n)
        versions = client.search_model_versions(f"name='{n}'", max_results=1000)
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            rows.append(describe_version(mv, aliases.get(str(mv.version), [])))
    return rows


def find_version(client, spec: str):
    """`NAME@alias`, `NAME/version` or `NAME` (latest) → ModelVersion; GateError when it names none."""
    from mlflow.exceptions import MlflowException

    if "@" in spec:
        name, alias = spec.split("@", 1)
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise GateError(f"no registered model '{name}'") from None
        v = _alias_version(client, name, alias)
        if v is None:
            raise GateError(f"alias '{alias}' of '{name}' points to no version")
        return get_version(client, name, v)
    name, _, version = spec.partition("/")
    if version:
        return get_version(client, name, version)
    versions = client.search_model_versions(f"name='{name}'", max_results=1000)
    if not versions:
        raise GateError(f"no registered model '{name}' (or it has no versions)")
    return max(versions, key=lambda v: int(v.version))


# ----------------------------------------------------------------------------- the model card


INTENDED_USE = """\
Classifies a photograph of a single flower into one of the classes listed above (Oxford
Flowers-102 categories unless the data line says otherwise). Intended for research,
teaching and demonstrations of the flowers pipeline, and for assisted labelling where a
person checks the predictions flagged `uncertain`."""

LIMITS = """\
- It always answers one of its classes: images of other flowers, other objects or
  several flowers get a class anyway. The `uncertain` flag (normalized entropy above the
  threshold) catches part of them, not all.
- The accuracy above holds for test images like the training photos (same collection,
  framing and quality); other cameras, drawings or heavy crops are untested.
- The interval is over the test images of one split; small test sets give wide intervals.
- Not for decisions with safety, medical or legal consequences (e.g. edibility or toxicity)."""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def worst_classes(record: dict[str, Any], class_names: Sequence[str], k: int = 10) -> list[dict[str, Any]]:
    """The k classes with the lowest test accuracy (ties: more images first)."""
    labels, preds = np.asarray(record["labels"]), np.asarray(record["preds"])
    rows = []
    for c in np.unique(labels):
        m = labels == c
        rows.append({"label": int(c), "name": class_names[c] if c < len(class_names) else str(c),
                     "support": int(m.sum()), "correct": int((preds[m] == c).sum()),
                     "accuracy": float((preds[m] == c).mean())})
    return sorted(rows, key=lambda r: (r["accuracy"], -r["support"], r["label"]))[:k]


def model_card(manifest: dict[str, Any], record: dict[str, Any] | None, name: str | None = None) -> str:
    """The Markdown model card of a model folder (manifest + per-image test results)."""
    name = name or manifest.get("name") or "flowers model"
    lineage = manifest.get("lineage") or {}
    classes = manifest.get("class_names") or []
    pp = manifest.get("preprocessing") or {}
    lines = [f"# Model card: {name}", "",
             f"Kind `{manifest.get('kind')}`" + (f", network `{manifest['model_name']}`" if manifest.get("model_name") else "")
             + f", {len(classes)} classes, input {pp.get('image_size')} px (resize {pp.get('resize_size')}, centre crop).",
             "", "## Data", ""]
    lines += _table(["field", "value"], [["source", lineage.get("data_source") or manifest.get("data") or "?"],
                               ["dataset checksum", lineage.get("data_checksum") or "?"],
                               ["split hash (test ids)", (record or {}).get("split_hash") or lineage.get("split_hash") or "?"],
                               ["test images", len(record["ids"]) if record else "?"]])
    lines += ["", "## Metrics (test)", ""]
    rows: list[list[Any]] = []
    if record:
        correct = np.asarray(record["preds"]) == np.asarray(record["labels"])
        ci = stats.accuracy_interval(correct)
        rows.append(["top-1 accuracy", f"{ci.estimate:.4f}", f"[{ci.low:.4f}, {ci.high:.4f}]"])
    elif manifest.get("test_accuracy") is not None:
        rows.append(["top-1 accuracy", f"{manifest['test_accuracy']:.4f}", "(no per-image results)"])
    extra = {**(manifest.get("test_metrics") or {}), **(manifest.get("metrics") or {})}
    for key, label in (("top5", "top-5 accuracy"), ("test_top5", "top-5 accuracy"), ("nll", "NLL"),
                       ("test_nll", "NLL"), ("ece", "ECE"), ("test_ece", "ECE")):
        if isinstance(extra.get(key), (int, float)) and label not in [r[0] for r in rows]:
            rows.append([label, f"{extra[key]:.4f}", ""])
    lines += _table(["metric", "value", "95% interval (bootstrap over test images)"], rows)
    if record:
        lines += ["", "## Worst ten classes (test)", ""]
        lines += _table(["class", "images", "correct", "accuracy"],
                        [[f"{r['name']} ({r['label']})", r["support"], r["correct"], f"{r['accuracy']:.3f}"]
                         for r in worst_classes(record, classes)])
    lines += ["", "## Uncertainty", ""]
    thr, m = manifest.get("uncertainty_threshold"), manifest.get("metrics") or {}
    if thr is not None:
        pol = manifest.get("uncertainty_policy") or {}
        lines.append(f"A prediction is flagged `uncertain` when its normalized entropy exceeds {thr:.3f} "
                     f"(chosen on validation, policy {pol.get('policy', '?')} target {pol.get('target', '?')}).")
        if m.get("coverage_at_threshold") is not None:
            lines.append(f"On test it accepts {100 * m['coverage_at_threshold']:.1f}% of the images, with accuracy "
                         f"{m.get('selective_acc_at_threshold', float('nan')):.4f} on those.")
    else:
        lines.append("No threshold was calibrated for this model: predictors use the default normalized-entropy "
                     "threshold 0.5, with unmeasured coverage.")
    lines += ["", "## Lineage", ""]
    lines += _table(["field", "value"], [[k, parents_text(v) if k == "parents" else v] for k, v in lineage.items() if v not in (None, "", [])])
    lines += ["", "## Intended use", "", INTENDED_USE, "", "## Limits", "", LIMITS, ""]
    return "\n".join(lines)
