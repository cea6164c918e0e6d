"""Tasks plug into the one training loop (`flowers.training.loop.fit(cfg, task)`): they supply the loss.

`ClassificationTask` (L1–L3) is cross-entropy; `DistillationTask` (L5) is knowledge distillation:

loss = α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE(student, labels)   (Hinton et al. 2015)

The T² keeps the KD gradients on the same scale as the CE gradients when T changes.

Teacher signal, two modes (recorded as the `distill_mode` param of the stage):

- `cache_teacher: true` (default): the teacher (usually the L4 ensemble: three ResNet-50s) runs
  ONCE per training image before training, with its own eval transform (resize + centre crop, no
  augmentation); its probabilities are kept in memory keyed by dataset index. Trade-off: the
  student sees augmented crops but is matched to the teacher's view of the whole image, so the
  target ignores what the crop cut off. In exchange an epoch costs only the student's
  forward/backward instead of three ResNet-50 forwards per batch, which on a CPU is the
  difference between minutes and hours.
- `cache_teacher: false`: the teacher runs on the same augmented batch every step (exact KD).
  The loop hands tasks the *normalized* float batch; inverting the normalization
  (`Normalize.inverse`) recovers the uint8 pixels exactly, and the teacher then applies its
  own eval preprocessing to that augmented image (`LoadedModel.from_pixels`: each ensemble
  member its own resize and centre crop), so every teacher kind (checkpoint, ensemble, ONNX)
  is used through its one `predict_proba(uint8)` interface.

With `data.feature_cache` (frozen trunk) the cached mode takes a shortcut when it can prove it
exact: if every teacher member is a network whose trunk up to the student's cut has the same
weights and eval preprocessing as the student's, its probabilities come from the student's
cached features through the member's own top layers (`teacher_probs_from_features`) instead of
from the images. That is cheap enough to do for every cached augmented view as well as the
clean image, so the teacher is *consistent*: each step matches the student to the teacher's
probabilities on the very view the student sees, the exact-KD target at cached cost (Beyer et
al. 2022, "a good teacher is patient and consistent"). The loader's sample key
(`feature_cache.sample_key`) picks the row. Otherwise the teacher runs on the clean images as
above, and every view of an image gets that image's row.

Teachers return probabilities (an ensemble has no single set of logits); tempering them uses
softmax(log p / T), which equals softmax(z / T) for any logits z with softmax(z) = p.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowers import config as C
from flowers.data.transforms import Normalize
from flowers.inference.predict import LoadedModel, load_model, predict_dataset

if TYPE_CHECKING:
    from flowers.registry.uris import ModelRef
    from flowers.data.bundle import DataBundle
    from flowers.models import TailNet

    # the student's frozen-trunk network, its cached clean training features (N x C x h x w) and
    # cached augmented views (V x N x C x h x w, or None)
    CachedTrain = tuple[TailNet, np.ndarray, np.ndarray | None]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- tasks


class Task(Protocol):
    """Supplies the loss; `fit` supplies everything else."""

    name: str

    def setup(self, data: DataBundle, device: torch.device, features: CachedTrain | None = None) -> None: ...

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]: ...


class ClassificationTask:
    """Cross-entropy with optional label smoothing."""

    name = "classification"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def setup(self, data: DataBundle, device: torch.device, features: CachedTrain | None = None) -> None:
        pass

    def __call__(self, model, x, y, idx):
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), "logits": logits}


def make_task(cfg: C.Config) -> Task:
    """The task a config names: `classify` (L1–L3) or `distill` (L5)."""
    if cfg.task == "distill":
        return DistillationTask.from_config(cfg)
    return ClassificationTask(cfg.optim.label_smoothing)


# ----------------------------------------------------------------------------- teacher on cached features


def teacher_probs_from_features(teacher: LoadedModel, student: TailNet, feats: np.ndarray, pp,
                                batch_size: int = 256, views: np.ndarray | None = None) -> torch.Tensor | None:
    """The teacher's probabilities on the images behind `feats` (the student's cached trunk output
    under preprocessing `pp`), computed from those features, or None when that would not be exact:
    a member that is not a torch network, has another eval preprocessing, or another trunk.

    With `views` (V x N x ...: the cached augmented views of the same N images) the result has
    (V + 1) x N rows, row `feature_cache.sample_key(i, slot, N)`: slot 0 the clean image, slot
    v + 1 its view v."""
    from flowers.training import feature_cache as FC
    from flowers.inference.ensemble_model import EnsembleModule
    from flowers.models import FlowerNet, TailNet
    from flowers.inference.predict import TorchProbModel

    mod = teacher.module
    if isinstance(mod, EnsembleModule):
        members, weights = list(mod.members), [float(w) for w in mod.weights]
        pps = [teacher.views[i] for i in mod.view_index]
    elif mod is not None:
        members, weights, pps = [mod], [1.0], [teacher.preprocessing]
    else:
        return None
    want = FC.trunk_fingerprint(student)
    units = student.trainable_units
    tails = []
    for m, mpp in zip(members, pps):
        if not isinstance(m, TorchProbModel) or not isinstance(m.net, FlowerNet) or mpp != pp:
            return None
        try:
            tail = TailNet(m.net, units)
        except ValueError:
            return None
        if tail.cut != student.cut or FC.trunk_fingerprint(tail) != want:
            return None
        tails.append(tail.eval())
    sources = [feats] + ([] if views is None else [views[v] for v in range(len(views))])
    n = len(feats)
    total = torch.zeros(len(sources) * n, len(teacher.class_names))
    with torch.inference_mode():
        for slot, src in enumerate(sources):
            for i in range(0, n, batch_size):
                x = torch.from_numpy(np.asarray(src[i:i + batch_size], dtype=np.float32))
                rows = FC.sample_key(i, slot, n)
                for w, tail in zip(weights, tails):
                    total[rows:rows + len(x)] += w * torch.softmax(tail(x).float(), 1)
    log.info("teacher probabilities for %d training images%s from the shared trunk's cached features "
             "(%d members)", n, f" and their {len(sources) - 1} augmented view(s)" if len(sources) > 1 else "",
             len(tails))
    return total / sum(weights)


# ----------------------------------------------------------------------------- loss


def _looks_like_probs(t: torch.Tensor) -> bool:
    return bool((t >= 0).all() and torch.allclose(t.sum(-1), torch.ones_like(t[..., 0]), atol=1e-3))


def kd_loss(student_logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, T: float,
            alpha: float, teacher_is_logits: bool | None = None) -> torch.Tensor:
    """α·T²·KL(teacher_T ‖ student_T) + (1 − α)·CE; `teacher` holds probabilities or logits
    (auto-detected unless `teacher_is_logits` says which)."""
    teacher = teacher.detach().float()
    if teacher_is_logits is None:
        teacher_is_logits = not _looks_like_probs(teacher)
    # log-probabilities at T=1 either way; log p is a valid set of logits for p
    t_logits = teacher if teacher_is_logits else torch.log(teacher.clamp_min(1e-30))
    t_log_T = F.log_softmax(t_logits / T, dim=-1)
    s_log_T = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = F.kl_div(s_log_T, t_log_T, reduction="batchmean", log_target=True)
    loss = alpha * T * T * kl
    if alpha < 1.0:
        if labels is None:
            raise ValueError("labels are needed when alpha < 1")
        loss = loss + (1.0 - alpha) * F.cross_entropy(student_logits.float(), labels)
    return loss


# ----------------------------------------------------------------------------- task


class DistillationTask:
    """Task for `flowers.training.loop.fit`: the student learns from a teacher model loaded by URI."""

    name = "distill"

    def __init__(self, teacher_uri: "str | ModelRef", temperature: float = 4.0, alpha: float = 0.7, cache_teacher: bool = True,
                 batch_size: int = 64, workers: int = 0, progress: bool = False) -> None:
        self.teacher_ref = teacher_uri  # a ModelRef loads without asking the registry again
        self.teacher_uri = teacher_uri if isinstance(teacher_uri, str) else teacher_uri.uri
        self.T = float(temperature)
        self.alpha = float(alpha)
        self.cache_teacher = cache_teacher
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.teacher: LoadedModel | None = None
        self.cache: torch.Tensor | None = None
        self.mode = "cached" if cache_teacher else "online"
        self.setup_seconds = 0.0
        self.norm: Normalize | None = None  # the student's normalization, inverted for the online teacher

    @classmethod
    def from_config(cls, cfg: C.Config, teacher: "ModelRef | None" = None) -> "DistillationTask":
        """From the config's distill section; `teacher`: the config's teacher URI already resolved by the caller."""
        if not cfg.distill.teacher:
            raise C.ConfigError("distill.teacher: a teacher model URI is required (e.g. --set distill.teacher=models:/flowers-ensemble@champion)")
        return cls(teacher or cfg.distill.teacher, cfg.distill.temperature, cfg.distill.alpha, cfg.distill.cache_teacher,
                   cfg.data.eval_batch_size, cfg.data.workers, cfg.train.progress)

    def setup(self, data: DataBundle, device: torch.device, features: CachedTrain | None = None) -> None:
        """Load the teacher, check its classes, and (cached mode) precompute its probabilities
        (from the student's cached trunk `features` when the teacher provably shares that trunk)."""
        t0 = time.perf_counter()
        self.teacher = load_model(self.teacher_ref, "cpu" if device.type == "cpu" else str(device))
        if list(self.teacher.class_names) != list(data.class_names):
            raise C.ConfigError(
                f"distill.teacher '{self.teacher_uri}' predicts {len(self.teacher.class_names)} classes but the "
                f"student's data has {len(data.class_names)} (or another order); distill on the teacher's dataset")
        pp = data.preprocessing
        self.norm = Normalize(pp.mean, pp.std).to(device)
        if self.cache_teacher:
            probs = None
            if features is not None:
                net, clean, views = features
                probs = teacher_probs_from_features(self.teacher, net, clean, pp, self.batch_size, views)
                if probs is not None:  # "cached-trunk-views": consistent, per cached view
                    self.mode = "cached-trunk" + ("-views" if views is not None else "")
            self.cache = (probs if probs is not None else self.teacher_probs_for(data)).to(device)
        self.setup_seconds = time.perf_counter() - t0
        log.info("distillation teacher %s (%s mode) ready in %.1fs", self.teacher_uri, self.mode, self.setup_seconds)

    def teacher_probs_for(self, data: DataBundle) -> torch.Tensor:
        """Teacher probabilities for every training image, in dataset order (the teacher's own eval transform)."""
        ds = data.eval_part("train", self.teacher.transform(), self.teacher.draft_size)
        probs, _ = predict_dataset(self.teacher.predict_proba, ds, batch_size=self.batch_size, workers=self.workers,
                                   progress=self.progress, desc="teacher cache")
        return torch.from_numpy(probs)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        # the augmented batch as uint8 pixels, then the teacher's own eval preprocessing of it
        pixels = self.norm.inverse(x.detach()).cpu()
        with torch.inference_mode():
            p = self.teacher.predict_proba(self.teacher.from_pixels(pixels))
        return torch.from_numpy(np.asarray(p, dtype=np.float32)).to(x.device)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            raise RuntimeError("DistillationTask.setup() must run before training")
        logits = model(x)
        if self.cache is not None:
            # idx is the loader's sample key (feature_cache.sample_key); a table of clean-image rows
            # only (the teacher ran on the images) serves every view of an image with its image's row
            teacher = self.cache[idx.to(self.cache.device) % len(self.cache)]
        else:
            teacher = self._online(x)
        return {"loss": kd_loss(logits, teacher, y, self.T, self.alpha, teacher_is_logits=False), "logits": logits}
