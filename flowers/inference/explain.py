"""Interpretability: Grad-CAM (autograd hooks, no extra package) and L3's own attention map, as PNG grids.

Grad-CAM targets `FlowerNet.gradcam_layer()` (the backbone's last conv block) of any
checkpoint model (L1–L3, the student's best.pt) or of each member of an ensemble. Attention
models also show their learned spatial attention map. The exported ONNX student has no
gradients: explain its source checkpoint instead (`source_checkpoint` in its manifest).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flowers.models.checkpoint import ModelLoadError
from flowers.inference.predict import Batch, LoadedModel, Predictor, collate, load_model

log = logging.getLogger(__name__)


def explainable_modules(model: LoadedModel) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, uint8→logits module with `.net.gradcam_layer()`, input view index) for a checkpoint
    model or each ensemble member."""
    mod = model.module
    if mod is not None and hasattr(mod, "net") and hasattr(mod.net, "gradcam_layer"):
        return [(model.name, mod, 0)]
    if mod is not None and hasattr(mod, "members"):
        names = [m.get("name", str(i)) for i, m in enumerate(model.meta.get("members", []))] or \
                [str(i) for i in range(len(mod.members))]
        return [(n, m, v) for n, m, v in zip(names, mod.members, mod.view_index)
                if hasattr(m, "net") and hasattr(m.net, "gradcam_layer")]
    hint = model.meta.get("source_checkpoint")
    raise ModelLoadError(
        f"model '{model.source or model.name}' ({model.meta.get('kind', 'unknown kind')}) has no PyTorch network to "
        "take gradients from; Grad-CAM needs a checkpoint model" + (f", e.g. {hint}" if hint else " (best.pt)"))


def gradcam_maps(module: torch.nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] for uint8 NCHW `images`; targets default to the predicted class.

    Selvaraju et al.'s recipe on `module.net.gradcam_layer()`: the layer's activations weighted by the
    spatial mean of the target logit's gradient, ReLU, upsampled to the image, scaled per image to [0, 1].
    Plain autograd hooks, so the core needs neither OpenCV nor the grad-cam package.
    """
    module = module.eval()
    layer = module.net.gradcam_layer()
    saved: dict[str, torch.Tensor] = {}

    def keep(_mod, _inp, out):
        saved["act"] = out
        out.register_hook(lambda g: saved.__setitem__("grad", g))

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = images.float().requires_grad_(True)  # the module normalizes 0..255 floats itself
            logits = module(x)
            idx = logits.argmax(dim=1) if targets is None else torch.as_tensor(list(targets), dtype=torch.long)
            module.zero_grad(set_to_none=True)
            logits.gather(1, idx.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    act, grad = saved["act"].detach(), saved["grad"].detach()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.amin(dim=(1, 2), keepdim=True)
    cam = cam - lo
    cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-7)
    return np.clip(np.nan_to_num(cam.cpu().numpy().astype(np.float32)), 0.0, 1.0)


@torch.inference_mode()
def attention_maps(module: torch.nn.Module, images: torch.Tensor) -> np.ndarray | None:
    """The attention head's own map (N, H, W) in [0, 1] upsampled to the image; None if the model has none."""
    net = getattr(module, "net", None)
    if net is None or not getattr(getattr(net, "spec", None), "attention", False):
        return None
    _, attn = net(module.norm(images), return_attention=True)
    up = F.interpolate(attn.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    # min-max per image: the raw sigmoid map often sits in a narrow band; the shape is what matters
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    return ((up - lo) / (hi - lo).clamp_min(1e-6)).cpu().numpy()


def overlay(image: torch.Tensor, heat: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """uint8 CHW image + [0, 1] map → RGB uint8 HWC with a jet overlay (half image, half heat map)."""
    from matplotlib import colormaps

    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32) / 255.0
    jet = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3].astype(np.float32)
    mixed = (1.0 - image_weight) * jet + image_weight * rgb
    mixed = mixed / max(float(mixed.max()), 1e-7)
    return (mixed * 255.0).round().astype(np.uint8)


def save_grid(images: torch.Tensor, panels: dict[str, np.ndarray | None], titles: Sequence[str], path: Path,
              title: str = "") -> Path:
    """One row per image: the image, then one overlay per named map."""
    from flowers.evaluation.metrics import pyplot

    plt = pyplot()
    cols = ["image"] + [k for k, v in panels.items() if v is not None]
    n = len(images)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.4 * len(cols), 2.4 * n + (0.4 if title else 0)), squeeze=False)
    for i in range(n):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(images[i].permute(1, 2, 0).numpy() if col == "image" else overlay(images[i], panels[col][i]))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(titles[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def explain_batch(model: LoadedModel, images: Batch, targets: Sequence[int] | None = None) -> dict[str, np.ndarray | None]:
    """Every map for a batch (one tensor per input view): `gradcam` (or `gradcam <member>` for
    ensembles, each on its own view, resized to the first view for display) and `attention` maps."""
    panels: dict[str, np.ndarray | None] = {}
    mods = explainable_modules(model)
    views = images if isinstance(images, tuple) else (images,)
    shown = views[0].shape[-2:]
    for name, mod, v in mods:
        suffix = f" {name}" if len(mods) > 1 else ""
        panels["gradcam" + suffix] = _fit(gradcam_maps(mod, views[v], targets), shown)
        att = attention_maps(mod, views[v])
        att = None if att is None else _fit(att, shown)
        if att is not None:
            panels["attention" + suffix] = att
    return panels


def _fit(maps: np.ndarray, size: torch.Size) -> np.ndarray:
    """Heatmaps (N, h, w) → (N, H, W) so that every panel overlays the displayed view."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    t = F.interpolate(torch.from_numpy(maps)[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return t[:, 0].numpy()


def explain_images(uri: str | Path, images: Sequence[str | Path], out_dir: Path, top_k: int = 3) -> list[Path]:
    """`flowers explain`: one PNG grid per image plus `explanations.json` with the predictions."""
    model = load_model(uri)
    explainable_modules(model)  # fail before decoding anything if there is nothing to explain
    pred = Predictor(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    records: list[dict[str, Any]] = []
    for path in images:
        x = collate([pred.load_image(path)])  # ImageDecodeError → one-line CLI error
        res = pred.format(pred.predict_proba(x), top_k)[0]
        panels = explain_batch(model, x, [res["label"]])
        x = x[0] if isinstance(x, tuple) else x
        title = f"{Path(path).name}: {res['name']} ({res['confidence']:.2f}){' uncertain' if res['uncertain'] else ''}"
        files.append(save_grid(x, panels, [res["name"]], out_dir / f"{Path(path).stem}_explain.png", title))
        records.append({"image": str(path), "explanation": str(files[-1]), **res})
    (out_dir / "explanations.json").write_text(json.dumps(records, indent=2))
    return files + [out_dir / "explanations.json"]


def explain_dataset(model: LoadedModel, dataset, probs: np.ndarray, labels: np.ndarray, out_dir: Path,
                    n: int = 8, pairs: int = 3, seed: int = 0) -> list[Path]:
    """Grids for a seeded sample of `dataset` and for the most-confused class pairs (images of the
    true class that were predicted as the other), maps computed for the predicted class."""
    from flowers.evaluation.metrics import confusion_matrix, most_confused

    names = model.class_names
    preds = probs.argmax(1)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    files = []

    def grid(idx: Sequence[int], path: Path, title: str) -> None:
        if not len(idx):
            return
        x = collate([dataset[int(i)][0] for i in idx])
        titles = [f"true {names[labels[i]]}\npred {names[preds[i]]}" for i in idx]
        panels = explain_batch(model, x, [int(preds[i]) for i in idx])
        files.append(save_grid(x[0] if isinstance(x, tuple) else x, panels, titles, path, title))

    sample = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    grid(sample, out_dir / "sample_explain.png", f"{model.name}: Grad-CAM on a sample of test images")
    cm = confusion_matrix(labels, preds, len(names))
    for k, pair in enumerate(most_confused(cm, names, pairs)):
        idx = np.where((labels == pair["true_label"]) & (preds == pair["predicted_label"]))[0][:3]
        grid(idx, out_dir / f"confused_{k}_explain.png", f"{pair['true']} → {pair['predicted']} ({pair['count']}x)")
    return files
