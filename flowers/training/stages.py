"""What the L4 (ensemble) and L5 (student) stages share: the result type and the stage tail.

The tail runs after a stage has its deployed model and its val/test probabilities:
entropy threshold chosen on val → risk–coverage on test → out-of-distribution check →
Grad-CAM grids → the model manifest updated with threshold and metrics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowers.inference import uncertainty as U
from flowers.models.checkpoint import update_manifest
from flowers.inference.predict import LoadedModel


@dataclass
class StageResult:
    """A stage's model folder (with its manifest), metrics, params and files to log."""

    model_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str | int | float | bool | None] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Explained:
    """A model to draw Grad-CAM grids for, on a test set in its own preprocessing."""

    name: str
    model: LoadedModel
    dataset: Any
    probs: np.ndarray


def stage_tail(out_dir: Path, model_dir: Path, deployed: LoadedModel, val: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], curves: dict[str, np.ndarray], *, policy: str = "coverage",
               target: float = 0.95, ood_images: int = 32, explain: Sequence[Explained] = (),
               explain_images: int = 8, manifest: dict[str, Any] | None = None,
               metrics: dict[str, float] | None = None) -> tuple[dict[str, float], list[Path]]:
    """Threshold → risk–coverage → OOD → explain → manifest, for the deployed model.

    `val`/`test` are the deployed model's (probabilities, labels); `curves` maps a name to
    test probabilities for the risk–coverage plot (the deployed model's included). Returns
    the tail's metrics (merged into `metrics`) and the files it wrote.
    """
    out_dir = Path(out_dir)
    metrics = dict(metrics or {})
    (val_p, val_y), (test_p, test_y) = val, test
    # temperature on val (kept when it lowers val NLL), threshold on the scaled val (ECE before/after in metrics)
    temp, thr, cal = U.calibrate(val_p, val_y, test_p, test_y, policy, target)
    metrics.update(cal)
    test_p = U.temperature_scale(test_p, temp)  # the flag judges what the predictor reports
    metrics.update(U.selective_summary(test_p, test_y, thr))
    rc = {name: U.risk_coverage(p, test_y) for name, p in curves.items()}
    artifacts = [U.plot_risk_coverage(rc, out_dir / "test_risk_coverage.png", metrics["coverage_at_threshold"])]
    # generated non-flower images go through the deployed model's own preprocessing
    metrics.update(U.ood_report(lambda px: U.temperature_scale(deployed.predict_proba(deployed.from_pixels(px)), temp), test_p,
                                deployed.draft_size, n=ood_images, threshold=thr))
    if explain_images:
        from flowers.inference.explain import explain_dataset

        for e in explain:
            sub = out_dir / "explain" / e.name if len(explain) > 1 else out_dir / "explain"
            artifacts += explain_dataset(e.model, e.dataset, e.probs, test_y, sub, n=explain_images,
                                         pairs=min(3, explain_images))
    update_manifest(model_dir, uncertainty_threshold=thr, uncertainty_temperature=temp,
                    uncertainty_policy={"policy": policy, "target": target},
                    metrics={k: v for k, v in metrics.items() if np.isfinite(v)}, **(manifest or {}))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, artifacts
