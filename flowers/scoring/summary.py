"""What a scoring run did: the summary written next to the output and logged to MLflow."""
from __future__ import annotations

import json
import posixpath
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from flowers import storage
from flowers.registry import uris as registry
from flowers.scoring.schema import EXPERIMENT
from flowers.scoring.plan import ScorePlan

def model_fields(plan: ScorePlan) -> dict[str, Any]:
    return {"model_uri": plan.model_uri, "model_name": plan.model_name, "model_version": plan.model_version,
            "top_k": plan.top_k, "sources": list(plan.sources)}


@dataclass
class ScoreSummary:
    """What a scoring run did; `line()` is the one-line summary printed at the end, `to_dict()` the
    summary file written next to the output and the metrics logged to MLflow."""

    out: str | Path
    listed: int
    scored: int                     # rows this run produced (error rows included)
    errors: int                     # error rows this run produced (= error rows in the output: resume retries them)
    skipped: int
    rows: int                       # rows in the output
    wall_s: float
    workers: int = 0
    batch_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    uncertain: int = 0              # this run's rows flagged uncertain
    output_uncertain: int = 0       # ... in the whole output
    layout: str = "file"
    model_uri: str = ""
    model_name: str = ""
    model_version: str | None = None
    top_k: int = 0
    sources: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def uncertain_share(self) -> float:
        """Uncertain rows among the output's scored (non-error) rows."""
        good = self.rows - self.errors
        return self.output_uncertain / good if good > 0 else 0.0

    def line(self) -> str:
        skip = f", {self.skipped} already scored (resume)" if self.skipped else ""
        return (f"scored {self.scored} images ({self.errors} errors{skip}) in {self.wall_s:.1f} s "
                f"= {self.images_per_s:.1f} img/s; {self.rows} rows in {self.out}, "
                f"{self.uncertain_share:.1%} uncertain")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(out=str(self.out), images_per_s=self.images_per_s, uncertain_share=self.uncertain_share,
                 format="flowers.scoring-summary/1", finished_at=datetime.now(timezone.utc).isoformat())
        return d


def write_summary(plan: ScorePlan, summary: ScoreSummary) -> str:
    """The summary JSON next to the output (`<stem>.summary.json`, or `_summary.json` in a dataset folder)."""
    uri = plan.summary_uri
    storage.write_bytes(uri, json.dumps(summary.to_dict(), indent=1, default=str).encode())
    return uri


def log_summary(summary: ScoreSummary, target: registry.TrackingTarget, params: dict[str, Any] | None = None) -> str:
    """One run in the `flowers-scoring` experiment: the summary's figures as metrics, the settings as
    params, the summary JSON as an artifact. Returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    c = MlflowClient(target.tracking_uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        loc = f"{target.artifact_root}/{EXPERIMENT}" if target.artifact_root else None
        exp_id = c.create_experiment(EXPERIMENT, artifact_location=loc)
    d = summary.to_dict()
    run = c.create_run(exp_id, run_name=f"score {posixpath.basename(str(summary.out).rstrip('/'))}",
                       tags={"flowers.role": "scoring", "flowers.output": str(summary.out),
                             "flowers.model_uri": summary.model_uri})
    now = int(time.time() * 1000)
    metrics = {k: d[k] for k in ("rows", "errors", "uncertain", "output_uncertain", "uncertain_share", "scored",
                                 "skipped", "listed", "images_per_s", "wall_s")}
    all_params = {"output": d["out"], "layout": d["layout"], "model_uri": d["model_uri"],
                  "model_name": d["model_name"], "model_version": d["model_version"], "top_k": d["top_k"],
                  "inputs": ",".join(d["sources"]), "workers": d["workers"], "batch_size": d["batch_size"],
                  **(params or {})}
    c.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                params=[Param(k, ("null" if v is None else str(v))[:6000]) for k, v in all_params.items()])
    c.log_dict(run.info.run_id, d, "summary.json")
    c.set_terminated(run.info.run_id)
    return run.info.run_id
