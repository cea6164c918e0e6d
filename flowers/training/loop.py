"""One training loop for every level (L1–L3 classifiers and the L5 student).

`fit(cfg, task)` builds data and model from the config, trains with AdamW,
validates every epoch, keeps the best-val checkpoint, and evaluates it on the
test split. Levels differ only by config; the L5 student differs by `task`.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from flowers import config as C
from flowers.evaluation import metrics as E
from flowers.training import feature_cache as FC
from flowers.models.checkpoint import load_checkpoint, per_image_record, save_checkpoint
from flowers.data.bundle import build_data, make_loader
from flowers.data.transforms import Normalize, Preprocessing, train_transform
from flowers.registry.governance import data_lineage
from flowers.models import TailNet, build_model, model_spec
from flowers.inference.predict import predict_dataset
from flowers.registry.run_notes import dataset_record
from flowers.runtime import configure_torch_threads, progress_bar

if TYPE_CHECKING:
    from flowers.training.tasks import Task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- optimisation


def param_groups(model: nn.Module, cfg: C.OptimConfig) -> list[dict]:
    """Backbone vs head learning rates; no weight decay on norms and biases."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_backbone = name.startswith("backbone.")
        no_decay = p.ndim <= 1
        groups.setdefault((is_backbone, no_decay), []).append(p)
    return [
        {
            "params": ps,
            "lr": cfg.lr * (cfg.backbone_lr_mult if bb else 1.0),
            "weight_decay": 0.0 if nd else cfg.weight_decay,
            "name": f"{'backbone' if bb else 'head'}{'_no_decay' if nd else ''}",
        }
        for (bb, nd), ps in sorted(groups.items())
    ]


def lr_lambda(cfg: C.OptimConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            t = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return f


# ----------------------------------------------------------------------------- loop


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise C.ConfigError(f"train.device: '{name}' requested but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def train_one_epoch(model, task, loader, optimizer, scheduler, norm, device, *, max_batches=None,
                    grad_clip=None, progress=True, desc="train") -> dict[str, float]:
    """One pass over the training loader; returns loss, accuracy and throughput."""
    model.train()
    use_amp = device.type == "cuda"
    total_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    n = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = progress_bar(loader, progress, total=n, desc=desc)
    for i, (x, y, idx) in enumerate(bar):
        if i >= n:
            break
        x = norm(x.to(device, non_blocking=True))
        if use_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = task(model, x, y, idx)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        # .item() is a device sync; once per batch is fine at these batch sizes
        bs = y.shape[0]
        total_loss += out["loss"].item() * bs
        correct += (out["logits"].argmax(1) == y).sum().item()
        seen += bs
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    dt = time.perf_counter() - t0
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "images_per_s": seen / dt, "seconds": dt}


def model_proba(model: nn.Module, norm: Normalize, device: torch.device,
                channels_last: bool = False) -> Callable[[torch.Tensor], np.ndarray]:
    """A training network as `uint8 batch → probabilities` for `flowers.inference.predict.predict_dataset`
    (`channels_last`: the model is in that format too; oneDNN's faster layout for image batches)."""

    def proba(x: torch.Tensor) -> np.ndarray:
        x = norm(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        return torch.softmax(logits.float(), 1).cpu().numpy()

    return proba


def evaluate(model, loader, norm, device, **kw) -> dict[str, float]:
    """Loss, top-1 and top-5 on a loader (the per-epoch validation)."""
    model.eval()
    probs, labels = predict_dataset(model_proba(model, norm, device), loader, **kw)
    m = E.compute_metrics(probs, labels)
    return {"loss": m["nll"], "acc": m["top1"], "top5": m["top5"]}


# ----------------------------------------------------------------------------- fit


def cached_features(cfg: C.Config, data, model: nn.Module, norm: Normalize) -> tuple[TailNet, FC.CachedParts]:
    """Freeze `model` below `model.trainable_units` and open (or build) the cached trunk features
    of `data` that `cfg` trains on (`flowers.training.feature_cache`)."""
    dc = cfg.data
    net = TailNet(model, cfg.model.trainable_units)
    parts = FC.prepare(net, data.train, data.val, norm, data.val.transform,
                       None if dc.augment == "none" else data.train.transform, dc.cache_views,
                       cfg.train.seed, dc.cache_dir, dc.eval_batch_size, cfg.train.progress,
                       eval_desc={"preprocessing": data.preprocessing.to_dict(), "draft": data.val.draft_size},
                       view_desc={"augment": dc.augment, "image_size": dc.image_size, "cutout_frac": dc.cutout_frac},
                       shift_transform=train_transform("shifts", dc.image_size), shift_views=dc.shift_views)
    return net, parts


def warm_feature_cache(cfg: C.Config, threads: int | None = None) -> FC.CachedParts | None:
    """Build the cache entries `cfg` will train on, with all of this process's cores (a study's driver
    does this before its 1-CPU trials start, so they open the entries instead of each building them)."""
    if not cfg.data.feature_cache:
        return None
    configure_torch_threads(threads)
    spec = model_spec(cfg.model.name)
    pp = Preprocessing.for_size(cfg.data.image_size, spec.mean, spec.std, cfg.data.resize_size)
    data = build_data(cfg.data, pp, seed=cfg.train.seed)
    model = build_model(cfg.model.name, num_classes=data.num_classes, pretrained=cfg.model.pretrained,
                        dropout=cfg.model.dropout)
    return cached_features(cfg, data, model, Normalize(pp.mean, pp.std))[1]


@dataclass
class FitResult:
    run_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_val_acc: float
    test_metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)


EpochCallback = Callable[[dict[str, float], Path], None]


@dataclass
class _Setup:
    """What `fit` builds before the first epoch."""

    device: torch.device
    threads: int
    data: Any
    run_dir: Path
    model: nn.Module  # the whole network on images: tested and saved
    norm: nn.Module
    net: nn.Module  # what trains and validates (the tail on cached features, or `model`)
    in_norm: nn.Module
    cache_info: dict[str, Any] | None
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    base: dict[str, Any]  # checkpoint fields every save carries


def _loaders(cfg: C.Config, task: Task, data, model: nn.Module, norm: nn.Module, device: torch.device):
    """(net, in_norm, cache_info, train loader, val loader); sets the task up on the same inputs."""
    dc = cfg.data
    if not dc.feature_cache:
        task.setup(data, device)
        return (model, norm, None, make_loader(data.train, dc.batch_size, True, dc.workers, cfg.train.seed),
                make_loader(data.val, dc.eval_batch_size, False, dc.workers))
    net, parts = cached_features(cfg, data, model, norm)
    net = net.to(device)
    cache_info = {"dir": str(parts.root), "seconds": parts.seconds, "cut": net.cut,
                  "views": 0 if parts.train_views is None else int(parts.train_views.shape[0])}
    log.info("frozen trunk (%d of %d backbone units) on cached features from %s (%.1fs); %d trainable "
             "parameters", net.cut, net.cut + cfg.model.trainable_units, parts.root, parts.seconds,
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    train_loader = FC.feature_loader(FC.CachedFeatures(parts.train_clean, data.train.labels, parts.train_views,
                                                       cfg.train.seed), dc.batch_size, True, cfg.train.seed)
    val_loader = FC.feature_loader(FC.CachedFeatures(parts.val_clean, data.val.labels), dc.eval_batch_size, False)
    task.setup(data, device, features=(net, parts.train_clean, parts.train_views))
    return net, FC.ToFloat(), cache_info, train_loader, val_loader


def _setup(cfg: C.Config, task: Task, run_dir: str | Path | None) -> _Setup:
    """Seed, data (checked before anything is written), run folder, model, loaders, optimizer."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    threads = configure_torch_threads(cfg.train.threads)
    spec = model_spec(cfg.model.name)
    pp = Preprocessing.for_size(cfg.data.image_size, spec.mean, spec.std, cfg.data.resize_size)
    # read and check the data before creating anything on disk, so a bad path leaves no empty run folder
    data = build_data(cfg.data, pp, seed=cfg.train.seed)
    run_dir = Path(run_dir or Path(cfg.train.out_dir) / (cfg.train.run_name or f"{cfg.level}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("data %s: train %d, val %d, test %d images, %d classes", data.source,
             len(data.train), len(data.val), len(data.test), data.num_classes)
    (run_dir / "split.json").write_text(json.dumps(data.split))
    # the splits as MLflow dataset inputs (checksum and per-part hashes; flowers.registry.tracking.log_datasets)
    (run_dir / "datasets.json").write_text(json.dumps(dataset_record(data)))
    C.dump_yaml(cfg, run_dir / "config.yaml")

    model = build_model(cfg.model.name, num_classes=data.num_classes, pretrained=cfg.model.pretrained,
                        dropout=cfg.model.dropout).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    norm = Normalize(pp.mean, pp.std).to(device)
    net, in_norm, cache_info, train_loader, val_loader = _loaders(cfg, task, data, model, norm, device)
    dc = cfg.data
    steps_per_epoch = len(train_loader) if dc.max_train_batches is None else min(len(train_loader), dc.max_train_batches)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim, steps_per_epoch * cfg.train.epochs, steps_per_epoch))
    base = {"model_name": cfg.model.name, "dropout": cfg.model.dropout, "class_names": data.class_names,
            "preprocessing": pp.to_dict(), "config": C.to_dict(cfg), "task": task.name}
    base["lineage"] = data_lineage(data, base["config"])  # dataset checksum, split and config hashes
    return _Setup(device, threads, data, run_dir, model, norm, net, in_norm, cache_info, train_loader, val_loader,
                  optimizer, scheduler, base)


def _epochs(cfg: C.Config, task: Task, s: _Setup, history: list[dict[str, float]], start_epoch: int,
            best_val: float, best_epoch: int, callback: EpochCallback | None) -> tuple[float, int]:
    """Train from `start_epoch`; after each epoch save last.pt (and best.pt when val improved), then
    call `callback`. Returns the best val accuracy and its epoch."""
    dc = cfg.data
    epochs = progress_bar(range(start_epoch, cfg.train.epochs), cfg.train.progress, desc=f"{cfg.level} epochs",
                          initial=start_epoch, total=cfg.train.epochs)
    for epoch in epochs:
        if hasattr(s.train_loader.dataset, "set_epoch"):
            s.train_loader.dataset.set_epoch(epoch)  # cached features: this epoch's choice of views
        tr = train_one_epoch(s.net, task, s.train_loader, s.optimizer, s.scheduler, s.in_norm, s.device,
                             max_batches=dc.max_train_batches, grad_clip=cfg.optim.grad_clip,
                             progress=cfg.train.progress, desc=f"epoch {epoch + 1}/{cfg.train.epochs}")
        t_val = time.perf_counter()
        va = evaluate(s.net, s.val_loader, s.in_norm, s.device, max_batches=dc.max_eval_batches,
                      progress=cfg.train.progress, desc="val")
        metrics = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                   "val_acc": va["acc"], "val_top5": va["top5"], "lr": s.optimizer.param_groups[-1]["lr"],
                   "epoch_seconds": tr["seconds"] + (time.perf_counter() - t_val),
                   "images_per_s": tr["images_per_s"], "threads": s.threads}
        history.append(metrics)
        improved = va["acc"] > best_val
        if improved:
            best_val, best_epoch = va["acc"], epoch + 1
        state = {**s.base, "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                 "scheduler": s.scheduler.state_dict(), "epoch": epoch, "history": history,
                 "best_val_acc": best_val, "best_epoch": best_epoch}
        if improved:
            save_checkpoint(s.run_dir / "best.pt", state)
        # last.pt is what an interrupted run resumes from
        save_checkpoint(s.run_dir / "last.pt", state)
        metrics["best_val_acc"] = best_val
        log.info("epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f (%.1fs, %.1f img/s)",
                 epoch + 1, cfg.train.epochs, tr["loss"], tr["acc"], va["loss"], va["acc"],
                 metrics["epoch_seconds"], tr["images_per_s"])
        epochs.set_postfix(val_acc=f"{va['acc']:.3f}", best=f"{best_val:.3f}", refresh=False)
        if callback:
            callback(dict(metrics), s.run_dir)
    return best_val, best_epoch


def _test_best(cfg: C.Config, s: _Setup, artifacts: dict[str, Any]) -> dict[str, Any]:
    """The best checkpoint on test: metrics and plots, recorded inside best.pt with per-image results."""
    dc = cfg.data
    best_path = s.run_dir / "best.pt"
    best = load_checkpoint(best_path, s.device)
    s.model.load_state_dict(best["model"])
    test_loader = make_loader(s.data.test, dc.eval_batch_size, False, dc.workers)
    # the whole network on the test images in channels_last: 1.6x faster inference on CPU here
    # (bench/train_speedups.py), which is most of a cached-trunk trial's time after its last epoch
    s.model.eval().to(memory_format=torch.channels_last)
    probs, labels = predict_dataset(model_proba(s.model, s.norm, s.device, channels_last=True), test_loader,
                                    max_batches=dc.max_eval_batches, progress=cfg.train.progress, desc="test")
    test_metrics, files = E.write_eval_artifacts(probs, labels, s.data.class_names, s.run_dir, prefix="test")
    artifacts.update(files)
    # record the test result inside the checkpoint so a model file carries its own accuracy
    best["test_metrics"] = {k: v for k, v in test_metrics.items() if isinstance(v, (int, float))}
    # per-image results: the registry gate compares two versions image by image
    best["test_per_image"] = per_image_record(s.data.test.paths[: len(labels)], labels, probs.argmax(1))
    save_checkpoint(best_path, best)
    return test_metrics


def fit(
    cfg: C.Config,
    task: Task,
    callback: EpochCallback | None = None,
    run_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    evaluate_test: bool = True,
) -> FitResult:
    """Train per `cfg` with the loss `task` supplies (`flowers.training.tasks.make_task(cfg)`); return the
    best-val checkpoint and its test metrics.

    `callback(metrics, run_dir)` runs after every epoch, once `last.pt` (and
    `best.pt` if improved) are on disk: Tune and MLflow plug in there.
    `resume_from` is a `last.pt` from an interrupted run of the same config.
    """
    t_start = time.perf_counter()
    s = _setup(cfg, task, run_dir)
    history: list[dict[str, float]] = []
    start_epoch, best_val, best_epoch = 0, -1.0, -1
    if resume_from:
        state = load_checkpoint(resume_from, s.device)
        s.model.load_state_dict(state["model"])
        s.optimizer.load_state_dict(state["optimizer"])
        s.scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_val, best_epoch = state["best_val_acc"], state["best_epoch"]
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)
    best_val, best_epoch = _epochs(cfg, task, s, history, start_epoch, best_val, best_epoch, callback)

    artifacts = {"curves": E.plot_curves(history, s.run_dir / "curves.png")}
    test_metrics = _test_best(cfg, s, artifacts) if evaluate_test else {}
    summary = {
        "level": cfg.level, "model": cfg.model.name, "data": s.data.source, "best_epoch": best_epoch,
        "best_val_acc": best_val, "test": {k: v for k, v in test_metrics.items() if isinstance(v, (int, float))},
        "wall_seconds": time.perf_counter() - t_start, "device": str(s.device), "threads": s.threads,
        "feature_cache": s.cache_info, "history": history,
    }
    (s.run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    return FitResult(s.run_dir, s.run_dir / "best.pt", best_epoch, best_val, test_metrics, history, artifacts)
