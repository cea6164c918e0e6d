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
from typing import Any

from flowers.models.checkpoint import MANIFEST, ModelLoadError, find_manifest, locate_model, read_json, sha256_file

log = logging.getLogger(__name__)

DEFAULT_HOME = ".flowers"  # the embedded store lives under the working folder
CHAMPION = "champion"  # what serving and scoring follow; moved only by the gate (flowers.registry.governance)
CHALLENGER = "challenger"  # every newly registered version
MANIFEST_TAG = "flowers.manifest_sha256"  # version tag: SHA-256 of the version's model manifest
MODEL_FOLDER = "flowers_model"  # the flowers model's folder inside a logged MLflow model
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


def client(uri: str | None = None):
    """An MlflowClient on `uri` (default: `tracking_uri()`) for tracking and registry alike."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# ----------------------------------------------------------------------------- model URIs


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


@dataclass(frozen=True)
class ModelRef:
    """A model reference resolved once, at the edge: what to load and from where.

    Made by `resolve_ref` and handed as an argument to everything downstream (Tune trials,
    Ray Data actors, Serve replicas): they fetch the files with `fetch(ref)` and never ask
    the registry again or read the environment to find the store. Picklable.
    """

    uri: str  # as given: models:/name@alias, models:/name/3, runs:/..., or a local path
    pinned: str  # models:/name/<version> for registered models; else the absolute path or URI
    source: str  # where the files are: an artifact URI, or an absolute local path
    kind: str  # checkpoint | ensemble | onnx (the manifest's kind)
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # read once
    tracking: TrackingTarget | None = None  # the store that serves `source`; None for local files
    manifest_sha256: str | None = None  # recorded at registration; `fetch` refuses other files
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        """`name v3 @champion`, or the path: what logs and error messages call the model."""
        if self.version:
            return f"{self.name} v{self.version}" + (f" @{self.alias}" if self.alias else "")
        return self.uri


def store_target(explicit: str | None = None, home: str | Path = DEFAULT_HOME) -> TrackingTarget:
    """The store that resolves `models:/` and `runs:/` URIs, read once at the edge (see `tracking_uri`)."""
    return TrackingTarget(tracking_uri(explicit, home))


# where a flowers model keeps its manifest inside a logged MLflow model (`flowers.registry.flavor`)
MANIFEST_PLACES = (f"artifacts/{MODEL_FOLDER}/{MANIFEST}", f"{MODEL_FOLDER}/{MANIFEST}", MANIFEST)


def _fetch_manifest(source: str, tracking: str, uri: str) -> tuple[dict[str, Any], str | None]:
    """(manifest, its SHA-256) of a model in a store, downloading the manifest file only."""
    import tempfile

    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory(prefix="flowers-manifest-") as tmp:
        for place in MANIFEST_PLACES:
            try:
                local = download_artifacts(artifact_uri=f"{source.rstrip('/')}/{place}", tracking_uri=tracking,
                                           dst_path=tmp)
            except Exception:  # not at this place: MLflow raises several types for a missing file
                continue
            return read_json(local, f"model '{uri}': its manifest vanished while it was read"), sha256_file(Path(local))
    return {}, None  # a bare checkpoint or ONNX file logged without a manifest


def _local_ref(uri: str) -> ModelRef:
    path = Path(uri).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: '{uri}' is neither an existing path nor a models:/ or runs:/ URI")
    path = path.resolve()
    kind, _, manifest = locate_model(path, verify=False)  # reads the manifest only, no weights
    return ModelRef(uri=uri, pinned=str(path), source=str(path), kind=kind, manifest=manifest)


def resolve_ref(uri: "str | Path | ModelRef", target: TrackingTarget | None = None) -> ModelRef:
    """The one model-URI resolver: one registry lookup and one manifest read, no weights.

    `target` is the store for `models:/` and `runs:/` URIs (default: `store_target()`,
    read at the edge from --tracking-uri / $MLFLOW_TRACKING_URI / the embedded store).
    """
    if isinstance(uri, ModelRef):
        return uri
    uri = str(uri)
    if not is_mlflow_uri(uri):
        return _local_ref(uri)
    target = target or store_target()
    tracking = target.tracking_uri
    try:
        facts: dict[str, Any] = {}
        source = pinned = uri
        if uri.startswith("models:/"):
            c = client(tracking)
            mv, alias = _version(c, uri)
            facts = {"name": mv.name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id,
                     "manifest_sha256": (mv.tags or {}).get(MANIFEST_TAG)}
            # MLflow resolves models:/ against the global registry URI, ignoring the argument;
            # resolving the version's artifact location ourselves keeps this side-effect free
            source = c.get_model_version_download_uri(mv.name, mv.version)
            pinned = f"models:/{mv.name}/{mv.version}"
        manifest, sha = _fetch_manifest(source, tracking, uri)
    except ModelLoadError:
        raise
    except Exception as e:  # MLflow raises many types; the user needs one clear message
        raise _registry_error(uri, tracking, e) from None
    if facts.get("manifest_sha256") and sha != facts["manifest_sha256"]:
        raise ModelLoadError(f"model '{uri}': its manifest does not match the checksum the registry recorded "
                             "for this version; the artifacts were changed after registration, refusing them")
    kind = manifest.get("kind") or ("onnx" if source.endswith(".onnx") else "checkpoint")
    ref = ModelRef(uri=uri, pinned=pinned, source=source, kind=kind, manifest=manifest, tracking=target, **facts)
    log.info("resolved %s to %s (%s)", uri, ref.pinned, kind)
    return ref


def fetch(ref: ModelRef) -> Path:
    """The model's files on local disk (downloaded from `ref.tracking` for stored models).

    No registry lookup: the version was pinned when `ref` was made. A registered version's
    manifest must still be the one the registry recorded.
    """
    if ref.tracking is None:
        return Path(ref.source)
    try:
        from mlflow.artifacts import download_artifacts

        local = Path(download_artifacts(artifact_uri=ref.source, tracking_uri=ref.tracking.tracking_uri))
    except Exception as e:
        raise _registry_error(ref.pinned, ref.tracking.tracking_uri, e) from None
    if ref.manifest_sha256:
        found = find_manifest(local)
        if found is None or sha256_file(found) != ref.manifest_sha256:
            raise ModelLoadError(f"model '{ref.uri}': its manifest does not match the checksum the registry recorded "
                                 "for this version; the artifacts were changed after registration, refusing them")
    return local


def alias_version(name: str, alias: str, target: TrackingTarget) -> str | None:
    """The version `name@alias` points at now, or None when the alias is unset (a cheap poll)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(target.tracking_uri).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def pin(uri: "str | Path | ModelRef", target: TrackingTarget | None = None) -> str:
    """models:/name@alias → models:/name/<version>; every other URI unchanged (see `resolve_ref`)."""
    return resolve_ref(uri, target).pinned


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


def describe(uri: "str | Path | ModelRef", target: TrackingTarget | None = None) -> ModelInfo:
    """Name, version, kind, classes and preprocessing of a model, without loading its weights.

    Ensembles, exported students and registered models carry this in their manifest (read
    once by `resolve_ref`); a bare local checkpoint or ONNX file is read for its header.
    """
    ref = resolve_ref(uri, target)
    manifest = dict(ref.manifest)
    classes, pp, name = manifest.get("class_names"), manifest.get("preprocessing"), manifest.get("name")
    if not (classes and pp) and ref.tracking is None:
        _, target_file, _ = locate_model(Path(ref.source), verify=False)
        if ref.kind == "checkpoint":  # a bare local checkpoint: read its header fields
            from flowers.models.checkpoint import checkpoint_fields, load_checkpoint

            try:
                manifest = {**checkpoint_fields(load_checkpoint(target_file)), **manifest}
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot read model '{ref.uri}': {e}") from None
            classes, pp, name = manifest["class_names"], manifest["preprocessing"], manifest["name"] or target_file.stem
        elif ref.kind == "onnx":
            import json

            import onnx

            meta = {p.key: p.value for p in onnx.load(str(target_file), load_external_data=False).metadata_props}
            classes = json.loads(meta.get("class_names", "null"))
            pp = json.loads(meta.get("preprocessing", "null"))
            name = name or target_file.stem
    if not classes or not pp:
        raise ModelLoadError(f"model '{ref.uri}' carries no class names/preprocessing; re-export it")
    return ModelInfo(str(ref.uri), ref.name or name or Path(ref.source).stem, ref.kind,
                     ref.version or manifest.get("version"), ref.alias, ref.run_id, list(classes), dict(pp), manifest)


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
