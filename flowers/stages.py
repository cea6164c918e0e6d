"""What a pipeline stage (L4 ensemble, L5 student) hands to the study for tracking."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageResult:
    """A stage's model folder (with `flowers_model.json`), metrics, params and files to log."""

    model_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str | int | float | bool | None] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
