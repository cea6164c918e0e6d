"""One model reference, resolved once: a `models:/` URI costs one registry lookup and one manifest
read at the edge, the weights are not downloaded to read the manifest, and loading from the
`ModelRef` (what workers get) asks the registry nothing and reads no environment."""
from __future__ import annotations

import pickle
from pathlib import Path

import mlflow
import pytest

from flowers.inference import predict as P
from flowers.models import checkpoint as CK
from flowers.registry import tracking as T
from flowers.registry import uris as R


@pytest.fixture(scope="module")
def store(trained_run, tmp_path_factory):
    """An embedded store with one registered version of the smoke model, @champion."""
    old = mlflow.get_tracking_uri()
    target = R.embedded_target(tmp_path_factory.mktemp("refstore"))
    T.configure(target)
    tr = T.StudyTracker("refs", target)
    run = tr.child("l1", "trial")
    version = tr.log_model_dir(run, trained_run.run_dir, "model", "ref-model", alias=R.CHAMPION)
    tr.finish(run)
    mlflow.set_tracking_uri(old)
    return target, version


def _count(monkeypatch, module, name) -> list[int]:
    calls = [0]
    real = getattr(module, name)

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_resolving_reads_the_registry_once_and_only_the_manifest(store, monkeypatch, tmp_path):
    target, version = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # no embedded store here: everything must come from `target`
    lookups = _count(monkeypatch, R, "_version")
    downloads: list[str] = []
    import mlflow.artifacts as A

    real_download = A.download_artifacts

    def spy(*a, **k):
        downloads.append(k.get("artifact_uri") or a[0])
        return real_download(*a, **k)

    monkeypatch.setattr(A, "download_artifacts", spy)
    ref = R.resolve_ref("models:/ref-model@champion", target)
    assert (lookups[0], ref.pinned, ref.version, ref.alias) == (1, f"models:/ref-model/{version}", version, "champion")
    assert ref.kind == "checkpoint" and ref.manifest["class_names"] and ref.manifest_sha256
    assert len(downloads) == 1 and downloads[0].endswith(CK.MANIFEST), downloads  # the manifest file, not the weights
    info = R.describe(ref)  # from the reference: no second lookup
    assert (lookups[0], info.version, info.class_names) == (1, version, ref.manifest["class_names"])


def test_loading_a_ref_asks_the_registry_nothing(store, monkeypatch, tmp_path):
    target, version = store
    ref = R.resolve_ref("models:/ref-model@champion", target)
    ref = pickle.loads(pickle.dumps(ref))  # what a Ray actor or Serve replica receives
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # a wrong store in the env is never read
    monkeypatch.chdir(tmp_path)
    lookups = _count(monkeypatch, R, "_version")
    manifest_reads = _count(monkeypatch, CK, "read_manifest")
    model = P.load_model(ref)
    assert (lookups[0], manifest_reads[0]) == (0, 0)
    assert (model.name, model.version, model.meta["alias"]) == ("ref-model", version, "champion")
    assert model.meta["pinned"] == f"models:/ref-model/{version}"


def test_a_local_path_resolves_without_a_store(trained_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    ref = R.resolve_ref(trained_checkpoint)
    assert ref.tracking is None and ref.source == str(Path(trained_checkpoint).resolve())
    assert P.load_model(ref).class_names == R.describe(ref).class_names


def test_bad_references_say_what_to_do(store, tmp_path):
    target, _ = store
    with pytest.raises(CK.ModelLoadError, match="neither an existing path nor a models:/"):
        R.resolve_ref(tmp_path / "nothing-here")
    with pytest.raises(CK.ModelLoadError, match="cannot resolve model URI 'models:/ref-model@nope'"):
        R.resolve_ref("models:/ref-model@nope", target)
    with pytest.raises(CK.ModelLoadError, match="malformed model URI"):
        R.resolve_ref("models:/", target)
    assert R.alias_version("ref-model", "nope", target) is None


def test_loaders_are_registered_by_function_not_by_name():
    from flowers.inference.ensemble_model import load_ensemble
    from flowers.inference.onnx_models import load_onnx

    assert P.LOADERS == {"checkpoint": P.load_torch_checkpoint, "ensemble": load_ensemble, "onnx": load_onnx}
