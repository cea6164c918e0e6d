"""The model registry: names, aliases, tracking-URI resolution and the one model-URI resolver.

URIs: `models:/name@alias`, `models:/name/3`, `models:/name` (latest), `runs:/<id>/path`,
`mlflow-artifacts:/...` (through MLflow), or a local path to a checkpoint, a model folder
with a `flowers_model.json` manifest, or an `.onnx` file.

Nothing here changes MLflow's process globals: every MLflow call gets the tracking URI
explicitly, so resolving a model never redirects a study's logging.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from flowers.models.checkpoint import ModelLoadError, locate_model

log = logging.getLogger(__name__)

DEFAULT_HOME = ".flowers"  # the embedded store lives under the working folder
CHAMPION = "champion"  # what serving and scoring follow; moved only by the gate (flowers.registry.governance)
CHALLENGER = "challenger"  # every newly registered version
MANIFEST_TAG = "flowers.manifest_sha256"  # version tag: SHA-256 of the version's model manifest
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # logged-model tag: the registered versions made from it
# the study registers each level's model under these names
REGISTERED = {"l1": "flowers-l1", "l2": "flowers-l2", "l3": "flowers-l3",
              "ensemble": "flowers-ensemble", "distill": "flowers-student"}


# ----------------------------------------------------------------------------- tracking URIs


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs go: a tracking URI and (embedded store only) the artifact folder."""

    tracking_uri: str
    artifact_root: str | None = None  # None: the server decides (mlflow-artifacts:/)

    @property
    def embedded(self) -> bool:
        return self.tracking_uri.startswith("sqlite:")


def embedded_target(home: str | Path = DEFAULT_HOME) -> TrackingTarget:
    """`sqlite:///<abs home>/mlflow.db` with artifacts in `<home>/mlartifacts`."""
    home = Path(home).expanduser().resolve()
    return TrackingTarget(f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri())


def resolve_target(tracking_uri: str | None = None, home: str | Path = DEFAULT_HOME) -> TrackingTarget:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else the embedded store under `home`."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return embedded_target(home)
    if uri.startswith("sqlite:"):
        # a sqlite store needs a local artifact folder beside it, not ./mlruns in whatever cwd
        db = Path(uri.split("sqlite:///", 1)[-1])
        return TrackingTarget(uri, (db.parent / "mlartifacts").resolve().as_uri())
    return TrackingTarget(uri)


def tracking_uri(explicit: str | None = None, home: str | Path = DEFAULT_HOME) -> str:
    """The store that resolves `models:/` and `runs:/` URIs.

    Explicit URI, else $MLFLOW_TRACKING_URI, else the embedded store under `home`, which
    must exist: resolving against an empty new SQLite file would only say "not found".
    """
    target = resolve_target(explicit, home)
    if not target.embedded or explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return target.tracking_uri
    db = Path(target.tracking_uri.split("sqlite:///", 1)[1])
    if not db.is_file():
        raise ModelLoadError(
            f"no MLflow store to resolve models:/ and runs:/ URIs: MLFLOW_TRACKING_URI is unset and the embedded "
            f"store {db} does not exist. Run the study from this folder first (`make run`), or set "
            "MLFLOW_TRACKING_URI / --tracking-uri to your tracking server.")
    return target.tracking_uri


def is_mlflow_uri(uri: str | Path) -> bool:
    """True for URIs that only MLflow can resolve."""
    return str(uri).startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def export_store(uris: Iterable[str | Path], explicit: str | None = None) -> None:
    """For entry points: put the store that resolves these URIs in $MLFLOW_TRACKING_URI.

    Ray workers (Serve replicas, Data actors, trials) inherit it, so they resolve `models:/`
    against the same store as the driver, whatever their working directory.
    """
    if explicit:
        os.environ["MLFLOW_TRACKING_URI"] = explicit
    elif any(is_mlflow_uri(u) for u in uris) and not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()


def client(uri: str | None = None):
    """An MlflowClient on `uri` (default: `tracking_uri()`) for tracking and registry alike."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ----------------------------------------------------------------------------- model URIs


@dataclass(frozen=True)
class Resolved:
    """A model URI made local: the path, plus registry facts when it came from the registry."""

    path: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    manifest_sha256: str | None = None  # recorded at registration; loaders check the manifest against it


def _split_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/name@alias | models:/name/3 | models:/name → (name, alias, version)."""
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if not name or not alias:
            raise ModelLoadError(f"malformed model URI '{uri}': expected models:/NAME@ALIAS")
        return name, alias, None
    name, _, version = rest.partition("/")
    if not name or (version and not version.isdigit()):
        raise ModelLoadError(f"malformed model URI '{uri}': expected models:/NAME, models:/NAME/VERSION "
                             "or models:/NAME@ALIAS")
    return name, None, version or None


def _version(c, uri: str):
    """The ModelVersion a models:/ URI names (latest when it names no version or alias)."""
    name, alias, version = _split_models_uri(uri)
    if alias:
        return c.get_model_version_by_alias(name, alias), alias
    if version:
        return c.get_model_version(name, version), None
    versions = c.search_model_versions(f"name='{name}'")
    if not versions:
        raise ModelLoadError(f"registered model '{name}' has no versions")
    return max(versions, key=lambda v: int(v.version)), None


def _registry_error(uri: str, tracking: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot resolve model URI '{uri}' at tracking URI '{tracking}': {str(e).splitlines()[0]}. "
        "Check the name/alias in the MLflow UI (`flowers ui`) or set MLFLOW_TRACKING_URI / --tracking-uri.")


def resolve(uri: str | Path) -> Resolved:
    """The one model-URI resolver: a local path for `uri` (downloading registry artifacts)."""
    uri = str(uri)
    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model not found: '{uri}' is neither an existing path nor a models:/ or runs:/ URI")
        return Resolved(path)
    tracking = tracking_uri()
    try:
        from mlflow.artifacts import download_artifacts

        facts: dict[str, Any] = {}
        source = uri
        if uri.startswith("models:/"):
            c = client(tracking)
            mv, alias = _version(c, uri)
            facts = {"name": mv.name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id,
                     "manifest_sha256": (mv.tags or {}).get(MANIFEST_TAG)}
            # MLflow resolves models:/ against the global registry URI, ignoring the argument;
            # resolving the version's artifact location ourselves keeps this side-effect free
            source = c.get_model_version_download_uri(mv.name, mv.version)
        local = download_artifacts(artifact_uri=source, tracking_uri=tracking)
    except ModelLoadError:
        raise
    except Exception as e:  # MLflow raises many types; the user needs one clear message
        raise _registry_error(uri, tracking, e) from None
    return Resolved(Path(local), **facts)


def pin(uri: str | Path) -> str:
    """models:/name@alias → models:/name/<version>; every other URI unchanged.

    Workers given the pinned URI load the version the driver checked, even if the alias
    moves meanwhile; a redeploy after an alias move then rolls onto the new version.
    """
    uri = str(uri)
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    tracking = tracking_uri()
    try:
        mv, _ = _version(client(tracking), uri)
    except ModelLoadError:
        raise
    except Exception as e:
        raise _registry_error(uri, tracking, e) from None
    return f"models:/{mv.name}/{mv.version}"


@dataclass
class ModelInfo:
    """What a model is, read from its manifest or checkpoint header, without building it."""

    uri: str
    name: str
    kind: str
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    class_names: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def describe(uri: str | Path) -> ModelInfo:
    """Name, version, kind, classes and preprocessing of a model, without loading its weights.

    Ensembles, exported students and registered checkpoints carry this in their manifest;
    a bare checkpoint is read once (still no network is built).
    """
    r = resolve(uri)
    kind, target, manifest = locate_model(r.path, verify=False)  # reads the manifest only, no weights
    classes, pp = manifest.get("class_names"), manifest.get("preprocessing")
    name = manifest.get("name")
    if kind == "checkpoint" and not (classes and pp):  # a bare local checkpoint: read its header fields
        from flowers.models.checkpoint import checkpoint_fields, load_checkpoint

        try:
            manifest = {**checkpoint_fields(load_checkpoint(target)), **manifest}
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read model '{uri}': {e}") from None
        classes, pp, name = manifest["class_names"], manifest["preprocessing"], manifest["name"] or target.stem
    if kind == "onnx" and not (classes and pp):
        import json

        import onnx

        meta = {p.key: p.value for p in onnx.load(str(target), load_external_data=False).metadata_props}
        classes = json.loads(meta.get("class_names", "null"))
        pp = json.loads(meta.get("preprocessing", "null"))
    if not classes or not pp:
        raise ModelLoadError(f"model '{uri}' carries no class names/preprocessing; re-export it")
    return ModelInfo(str(uri), r.name or name or Path(target).stem, kind, r.version or manifest.get("version"),
                     r.alias, r.run_id, list(classes), dict(pp), manifest)


# ----------------------------------------------------------------------------- registering


def logged_model(c, run_id: str, name: str = "model"):
    """The newest READY logged model `name` of a run (MLflow 3's model entity), or None."""
    exp = c.get_run(run_id).info.experiment_id
    found = [m for m in c.search_logged_models(experiment_ids=[exp], filter_string=f"name = '{name}'",
                                                max_results=1000)
             if m.source_run_id == run_id and str(m.status).endswith("READY")]
    return max(found, key=lambda m: m.creation_timestamp) if found else None


def register(c, name: str, run_id: str, artifact_path: str = "model", alias: str | None = CHALLENGER,
             tags: dict[str, str] | None = None, description: str | None = None,
             model_tags: dict[str, str] | None = None, model=None) -> str:
    """Register the run's logged model `artifact_path` (or `model`, a LoggedModel) as a new version of
    `name` and set `alias` on it; a run without one registers `runs:/<run_id>/<artifact_path>`.

    `tags` go on the version, `description` (the model card) too; `model_tags` (default: the
    same tags) on the registered model, whose description says what the family is and what
    its aliases mean. New versions are challengers: `flowers.registry.governance.decide` is what moves
    `champion`.
    """
    from mlflow.exceptions import MlflowException

    from flowers.registry.run_notes import model_description

    model_tags = dict(tags or {}) if model_tags is None else dict(model_tags)
    try:
        c.create_registered_model(name, tags=model_tags, description=model_description(name))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
        if c.get_registered_model(name).description != model_description(name):
            c.update_registered_model(name, description=model_description(name))
    model = model or logged_model(c, run_id, artifact_path)
    mv = None
    if model is not None:  # the version's source is the logged model (`models:/<model id>`: the UI links the two)
        try:
            mv = c.create_model_version(name, source=f"models:/{model.model_id}", run_id=run_id, tags=tags or {},
                                        description=fit_description(description), model_id=model.model_id)
        except MlflowException as e:  # an embedded store resolves that URI against the process's global store
            log.info("registering %s by its artifact location (%s)", name, str(e).splitlines()[0])
            mv = c.create_model_version(name, source=model.artifact_location, run_id=run_id, tags=tags or {},
                                        description=fit_description(description), model_id=model.model_id)
    if mv is None:
        source = f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}"
        mv = c.create_model_version(name, source=source, run_id=run_id, tags=tags or {},
                                    description=fit_description(description))
    if model is not None:  # the logged model lists its versions (the UI's "Registered models" column)
        import json

        known = json.loads(c.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
        c.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(
            [*known, {"name": name, "version": str(mv.version)}])})
    if alias:
        c.set_registered_model_alias(name, alias, mv.version)
    for k, v in model_tags.items():
        c.set_registered_model_tag(name, k, v)
    log.info("registered %s version %s%s", name, mv.version, f" @{alias}" if alias else "")
    return str(mv.version)


DESCRIPTION_CHARS = 5000  # MLflow's limit on a model version description


def fit_description(text: str | None) -> str | None:
    """A model card cut to MLflow's limit at a section boundary (the full card is the model's `model_card.md`)."""
    if text is None or len(text) <= DESCRIPTION_CHARS:
        return text
    note = "\n\n(cut here; the full card is `model_card.md` in the model's artifacts)"
    head = text[:DESCRIPTION_CHARS - len(note)]
    cut = head.rfind("\n## ")
    return (head[:cut] if cut > 0 else head) + note
