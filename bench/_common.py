"""Shared bits for the study benches: data (synthetic by default, FLOWERS_DATA with --real) and a study YAML."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def data_overrides(real: bool, classes: int | None) -> tuple[list[str], str]:
    """Trial overrides naming the data, and a description for the printout."""
    if real:
        root = os.environ.get("FLOWERS_DATA")
        if not root:
            raise SystemExit("--real needs FLOWERS_DATA pointing at Flowers-102")
        over = [f"data.root={root}"] + ([f"data.classes={classes}"] if classes else [])
        return over, f"Flowers-102 at {root}" + (f", first {classes} classes" if classes else "")
    from flowers.data import write_synthetic

    root = Path(tempfile.mkdtemp(prefix="bench-synth-")) / "flowers"
    write_synthetic(root, num_classes=10, per_class=24, size=128, seed=0)
    return [f"data.root={root}", "data.split=official"], "synthetic 10 classes x 24 images (8 train/class), 128 px"


def write_study(tmp: Path, name: str, profile: str, overrides: list[str], **extra) -> Path:
    if not profile.endswith((".yaml", ".yml")):
        profile = str(REPO / "configs/profiles" / f"{profile}.yaml")
    data = {"name": name, "levels": {}, "ablation": str(REPO / "configs/ablation.yaml"), "profile": profile,
            "overrides": overrides, "stages": ["tune"], "home": str(tmp / "home"), "max_failures": 0}
    data.update(extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cpu_line() -> str:
    """`lscpu`'s model name, CPU count and the SIMD flags (avx2, avx512, amx) of this machine."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    flags = set(info.get("Flags", "").split())
    keep = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{info.get('Model name', '?')}, {info.get('CPU(s)', '?')} CPUs, flags: {' '.join(keep) or 'no avx2'}"


def unresolvable(uris: list[str]) -> str | None:
    """None when every model URI resolves (a registry lookup and the manifest, no weights), else one line
    naming the first that does not: the benches print it and exit 2 before any work."""
    from flowers.registry.uris import resolve_ref

    for uri in uris:
        try:
            resolve_ref(uri)
        except Exception as e:  # a wrong URI or store is the user's input: say it, do not trace it
            return f"error: {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None
