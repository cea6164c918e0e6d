"""Real Flowers-102 (skipped unless FLOWERS_DATA points at a copy)."""

import pytest

from conftest import REPO, real_data_root, requires_real_data

pytestmark = [requires_real_data, pytest.mark.realdata]


@pytest.mark.slow
def test_cpu_profile_learns_on_a_class_subset(tmp_path):
    """Pretrained Lite0, 10 classes, 2 short epochs: far above the 10 % chance level."""
    from flowers.config import load_config
    from flowers.training.tasks import make_task
    from flowers.training.loop import fit

    cfg = load_config(REPO / "configs/level1.yaml", "cpu", [
        f"data.root={real_data_root()}", "data.classes=10", "data.image_size=128", "train.epochs=2",
        "train.progress=false", "data.workers=1"])
    res = fit(cfg, make_task(cfg), run_dir=tmp_path / "run")
    assert res.test_metrics["n"] > 50
    assert res.test_metrics["top1"] > 0.6, res.test_metrics
