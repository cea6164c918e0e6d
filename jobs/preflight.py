"""Checks before a study starts any trial: storage, tracking server and data reachable, and
nothing that only the driver's disk holds when the cluster spans several nodes.

Every failure is one line (a user error: exit 2) and leaves nothing written.
"""
from __future__ import annotations

import logging
import urllib.error
import urllib.request

from flowers import config as C
from flowers import storage
from flowers.data.remote import materialize
from flowers.registry.uris import TrackingTarget
from flowers.study.plan import TrialSpec, storage_path

log = logging.getLogger(__name__)


def check_tracking(target: TrackingTarget, timeout_s: float = 5.0) -> None:
    """An MLflow server must answer /health (MLflow's own client would retry for minutes)."""
    uri = target.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise C.ConfigError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix "
                             "--tracking-uri / MLFLOW_TRACKING_URI") from None


def check_study(study: C.StudyConfig, specs: list[TrialSpec], target: TrackingTarget, multi_node: bool) -> None:
    """Refuse to start what would fail later: unusable storage, tracking or data, or driver-local
    paths on a cluster whose trials may run on other nodes."""
    tune_storage = storage_path(study.home, study.storage_path)
    roots = sorted({str(s.cfg.data.root) for s in specs if s.cfg.data.root})
    if multi_node and not study.shared_storage:
        if not storage.is_remote(tune_storage):
            raise C.ConfigError(
                f"Tune storage {tune_storage} is a folder on the driver, but the cluster spans several nodes; "
                "set --set study.storage_path=s3://BUCKET/PREFIX (or --set study.shared_storage=true if every "
                "node mounts it)")
        if target.embedded or target.tracking_uri.startswith("file:"):
            raise C.ConfigError(
                f"the MLflow store {target.tracking_uri} is on the driver's disk, but the cluster spans several "
                "nodes; pass --tracking-uri http://MLFLOW-SERVER:5000")
        local = [r for r in roots if not storage.is_remote(r)]
        if local or not roots:
            where = local[0] if local else "$FLOWERS_DATA / the default folder"
            raise C.ConfigError(
                f"data.root {where} is a folder on the driver, but the cluster spans several nodes; publish it "
                f"(`flowers data publish {local[0] if local else 'DIR'} s3://BUCKET/flowers102`) and pass "
                "--set data.root=s3://BUCKET/flowers102")
    if storage.is_remote(tune_storage):
        storage.check_writable(tune_storage)
    check_tracking(target)
    for root in roots:
        if storage.is_remote(root):
            # the driver's node verifies every checksum once, so a bad dataset fails here, not in a trial
            log.info("checking dataset %s", root)
            materialize(root)
